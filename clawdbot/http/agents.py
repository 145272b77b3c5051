"""
The APIs coding agents speak: OpenAI's Responses API (Codex CLI, the
OpenAI Agents SDK) and Anthropic's Messages API (Claude Code).  Both hold
their conversation through L{clawdbot.http.chat.Conversation}, so
authentication, scopes, limits, budgets, quotas, the fair share, usage and
the logs apply as on C{/v1/chat/completions}; the translations are
L{clawdbot.backend.responses} and L{clawdbot.backend.messages}.
"""

from twisted.logger import Logger

from clawdbot.backend import messages, responses, translate
from clawdbot.errors import APIError, invalid
from clawdbot.http.chat import Conversation
from clawdbot.http.resource import APIResource, NotFound, json_bytes, query_arg, read_json
from clawdbot.storage.responses import BrokenChain, StoredResponse

log = Logger(namespace="clawdbot.agents")

# What the header naming the tools left out may hold.
_DROPPED_HEADER_MAX = 512


def _dropped(request, names):
    """Tools Ollama cannot serve were left out: say so in a header and the log, not with a 400."""
    if not names:
        return
    value = ", ".join(names)[:_DROPPED_HEADER_MAX]
    request.setHeader(b"x-clawdbot-dropped-tools", value.encode("ascii", "replace"))
    log.info("Left out tools the model backend cannot serve: {tools}", tools=value, request_id=request.request_id)


class Responses(Conversation):
    """
    C{POST /v1/responses}: OpenAI's Responses API.  With C{store} (the
    default, as OpenAI's) the response is kept, owned by the caller, for
    C{GET}/C{DELETE /v1/responses/{id}} and as the C{previous_response_id}
    of a later call, which continues the conversation it ends.
    """

    scopes = {"POST": "chat:write"}
    route_name = "responses"
    rate_limited = True

    def __init__(self, parts):
        super().__init__(parts)
        self.stored = parts.responses
        self.item = ResponseItem(parts)

    def getChild(self, path, request):
        if not path:
            return NotFound()
        return self.item

    async def handle_POST(self, request):
        config = request.config
        owner = request.principal.key
        body = await read_json(request)
        store = body.get("store", True)
        if store is None:
            store = True
        if not isinstance(store, bool):
            raise invalid("'store' must be true or false")
        previous = body.get("previous_response_id")
        context, parent, depth, chain_bytes = None, None, 0, 0
        if previous is not None:
            if not isinstance(previous, str):
                raise invalid("'previous_response_id' must be a string")
            try:
                found = await self.stored.chain(previous, owner) if responses.is_response_id(previous) else None
            except BrokenChain:
                raise APIError("NOT_FOUND", details="an earlier response of that conversation was deleted or has expired; start a new one", param="previous_response_id") from None
            if found is None:
                # Another owner's response is as unknown as one never made.
                raise APIError("NOT_FOUND", details="'previous_response_id' names no stored response of yours", param="previous_response_id")
            last, chain_bytes, context = found
            parent, depth = previous, last + 1
        chat, notes = responses.chat_body(body, context)
        ollama_body, opts = translate.chat_request(chat, config, request.principal)
        request.audit["model"] = ollama_body["model"]
        _dropped(request, notes["dropped"])
        keep, release = None, None
        if store:
            keep, release = await self._keeper(request, config, body, notes, parent, depth, chain_bytes)
        try:
            await self.images.process_messages(ollama_body["messages"], config.images)
            shape = responses.ResponseShape(body, opts["model"], notes["names"], store)
            return await self.converse(request, config, ollama_body, opts, shape, keep)
        finally:
            if release is not None:
                release()

    async def _keeper(self, request, config, body, notes, parent, depth, chain_bytes):
        """
        How the response is kept (C{keep} of L{Conversation.converse}), once
        the limits allow it: checked before the model is called, as an
        answer that cannot be kept would be lost.  The reply itself may take
        a conversation past C{responses.max_stored_bytes} by its own size.
        """
        limits = config.responses
        owner = request.principal.key
        new = len(json_bytes(notes["new"]))
        if chain_bytes + new > limits.max_stored_bytes:
            raise invalid(f"the conversation is longer than responses.max_stored_bytes ({limits.max_stored_bytes} bytes); start a new one or send 'store': false")
        # The response echoes these back, so they are stored too.
        echoed = len(json_bytes([body.get("instructions"), body.get("tools"), body.get("metadata")]))
        release, used = await self.stored.reserve(owner, new + echoed, limits.max_bytes_per_user)
        if release is None:
            raise APIError("QUOTA_EXCEEDED", details=f"your stored responses take {used} bytes of responses.max_bytes_per_user ({limits.max_bytes_per_user}); delete some, or send 'store': false")

        async def keep(reply, incomplete):
            if incomplete:
                # A client gone mid-stream never saw a response to chain from.
                return
            result = reply if isinstance(reply, dict) else reply.result()
            turn = json_bytes(responses.context(notes["new"], result["output"], notes["names"]))
            response = json_bytes(result)
            record = StoredResponse(result["id"], owner, parent, depth, len(response) + len(turn), chain_bytes + len(turn), response.decode("utf-8"), turn.decode("utf-8"))
            await self.stored.put(record, limits.retention)

        return keep, release


class ResponseItem(APIResource):
    """
    C{GET} and C{DELETE /v1/responses/{id}}: the caller's stored response
    (anyone else's: 404); C{GET /v1/responses/{id}/input_items}: its input.
    """

    isLeaf = True
    scopes = {"GET": "chat:read", "DELETE": "chat:write"}
    route_name = "response"

    def __init__(self, parts):
        super().__init__(parts)
        self.stored = parts.responses

    def _id(self, request):
        rid = request.prepath[-1].decode("latin-1")
        if not responses.is_response_id(rid) or request.postpath not in ([], [b"input_items"]):
            raise APIError("NOT_FOUND", details="no such response")
        return rid

    async def handle_GET(self, request):
        rid = self._id(request)
        owner = request.principal.key
        if request.postpath:
            return await self._input_items(request, rid, owner)
        found = await self.stored.get(rid, owner)
        if found is None:
            raise APIError("NOT_FOUND", details="no such response")
        return found

    async def _input_items(self, request, rid, owner):
        """C{GET /v1/responses/{id}/input_items}: what the call sent (C{order} desc by default, C{limit} 1-100, C{after} an item id)."""
        order = query_arg(request, "order", strict=False) or "desc"
        limit = query_arg(request, "limit", strict=False) or "20"
        after = query_arg(request, "after", strict=False)
        if order not in ("asc", "desc"):
            raise invalid("'order' must be asc or desc")
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
            raise invalid("'limit' must be a whole number from 1 to 100")
        turn = await self.stored.turn(rid, owner)
        if turn is None:
            raise APIError("NOT_FOUND", details="no such response")
        items = responses.input_items(turn, rid)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise invalid("'after' names no item of this response")
            items = items[ids.index(after) + 1 :]
        page = items[: int(limit)]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}

    async def handle_DELETE(self, request):
        rid = self._id(request)
        if request.postpath or not await self.stored.delete(rid, request.principal.key):
            raise APIError("NOT_FOUND", details="no such response")
        return {"id": rid, "object": "response", "deleted": True}


class AnthropicRoute(APIResource):
    """The Messages API's ways: Anthropic's error shape, and its C{x-api-key} header for the credential."""

    error_body = staticmethod(messages.error_body)

    async def _principal(self, request):
        headers = request.requestHeaders
        if not request.site.debug and not headers.hasHeader(b"authorization") and headers.hasHeader(b"x-api-key"):
            # The same JWT or API key, in the header Anthropic's clients send it in.
            values = [b"Bearer " + value.strip() for value in headers.getRawHeaders(b"x-api-key")]
            return await self.authentication.authenticate(values, request.client_host(), request.request_id)
        return await super()._principal(request)


class Messages(AnthropicRoute, Conversation):
    """C{POST /v1/messages}: Anthropic's Messages API, translated to Ollama's C{/api/chat}."""

    scopes = {"POST": "chat:write"}
    route_name = "messages"
    rate_limited = True

    def __init__(self, parts):
        super().__init__(parts)
        self.counter = CountTokens(parts)
        self.missing = MessagesNotFound(parts)

    def getChild(self, path, request):
        if path == b"count_tokens":
            return self.counter
        return self.missing

    async def handle_POST(self, request):
        config = request.config
        body = await read_json(request)
        chat, dropped = messages.chat_body(body, config.backend.max_num_ctx)
        ollama_body, opts = translate.chat_request(chat, config, request.principal)
        request.audit["model"] = ollama_body["model"]
        _dropped(request, dropped)
        await self.images.process_messages(ollama_body["messages"], config.images)
        return await self.converse(request, config, ollama_body, opts, messages.MESSAGES)


class CountTokens(AnthropicRoute):
    """
    C{POST /v1/messages/count_tokens}: the prompt's size in tokens, an
    estimate (four characters a token, as the token budget reckons), not
    the model's tokenizer.  Nothing reaches the model.
    """

    scopes = {"POST": "chat:write"}
    route_name = "count_tokens"
    rate_limited = True

    def __init__(self, parts):
        super().__init__(parts)
        self.missing = MessagesNotFound(parts)

    def getChild(self, path, request):
        return self.missing

    async def handle_POST(self, request):
        body = await read_json(request)
        chat, _ = messages.chat_body(body, 0, counting=True)
        ollama_body, _ = translate.chat_request(chat, request.config, request.principal)
        return messages.count(ollama_body)


class MessagesNotFound(AnthropicRoute):
    """Any other path under C{/v1/messages/}: a 404 in Anthropic's shape."""

    isLeaf = True

    def route(self, request):
        return None


def add_routes(v1, parts):
    v1.putChild(b"responses", Responses(parts))
    v1.putChild(b"messages", Messages(parts))
