"""
OpenAI's Responses API (C{POST /v1/responses}) <-> Ollama's C{/api/chat},
through the chat translation.

A Responses request becomes a chat completions body (L{chat_body}), which
L{clawdbot.backend.translate.chat_request} checks and turns into Ollama's,
so models, tools, a forced C{tool_choice}, JSON formats, thinking, images
and Ollama's settings follow one set of rules on every route.  Replies come
back as a C{response} object (L{ResponseShape.whole}) or as the Responses
event stream (L{ResponseStream}), both read from what the chat translation
makes of Ollama's reply.

Pure: no I/O.  Stored responses (C{store}, C{previous_response_id}) live in
L{clawdbot.storage.responses}; what is stored for a chain is the
conversation as chat messages (L{ResponseShape.context}).
"""

import json
import secrets
import time
from typing import Any

from clawdbot.backend import translate
from clawdbot.backend.translate import StreamTranslator, check_tool_name
from clawdbot.errors import APIError, invalid
from clawdbot.strictjson import loads_checked

# Fields that change nothing the gateway does: accepted and ignored (as is
# any other field a newer client adds; what cannot be honoured is refused).
_REFUSED = {
    "background": "background responses are not supported",
    "conversation": "conversations are not supported; chain responses with 'previous_response_id'",
    "prompt": "prompt templates are not supported",
}

# Ids of output items and responses; stored responses are found by theirs.
def response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def _item_id(prefix: str) -> str:
    return prefix + "_" + secrets.token_hex(24)


def is_response_id(value: object) -> bool:
    return isinstance(value, str) and value.startswith("resp_") and len(value) == 53 and all(c in "0123456789abcdef" for c in value[5:])


# --- the request ----------------------------------------------------------------


def _text_of_parts(content: object, where: str) -> str:
    """The text of a list of output or input parts (text kinds only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise invalid(f"{where}.content[{j}] must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{j}].text must be a string")
            texts.append(part["text"])
        elif kind == "refusal":
            if isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
        else:
            raise invalid(f"{where}.content[{j}]: part type {kind!r} is not supported here")
    return "\n".join(texts)


def _user_parts(content: object, where: str) -> Any:
    """A user or system message's content as chat completions parts (images as data URLs)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"{at} must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{at}.text must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            if part.get("image_url") is None:
                raise invalid(f"{at}: images by file id are not supported; send a base64 data URL in image_url")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_file":
            raise invalid(f"{at}: file inputs are not supported")
        else:
            raise invalid(f"{at}: part type {kind!r} is not supported")
    return parts


class _Names:
    """
    Function names as the model sees them and as the client knows them:
    a function inside a C{namespace} tool is offered as a plain function
    (its own name, or C{namespace__name} when another function has that
    name too) and its calls carry the namespace back.
    """

    def __init__(self) -> None:
        self.outer: dict[str, tuple[str | None, str]] = {}
        self._inner: dict[tuple[str | None, str], str] = {}

    def assign(self, pairs: list[tuple[str | None, str]]) -> list[str]:
        """The model's names for C{(namespace, name)} pairs, all at once (so their order does not matter)."""
        if len(set(pairs)) != len(pairs):
            raise invalid("'tools': two functions have the same name")
        plain = [name for _, name in pairs]
        out = []
        for namespace, name in pairs:
            inner = name if namespace is None or plain.count(name) == 1 else f"{namespace}__{name}"
            if inner in self.outer:
                raise invalid(f"'tools': the function {inner!r} cannot be told apart from another; rename one")
            self.outer[inner] = (namespace, name)
            self._inner[(namespace, name)] = inner
            out.append(inner)
        return out

    def inner(self, namespace: object, name: str) -> str:
        key = (namespace if isinstance(namespace, str) and namespace else None, name)
        return self._inner.get(key, name)

    def client(self, inner: str) -> tuple[str | None, str]:
        return self.outer.get(inner, (None, inner))


def _function_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    check_tool_name(tool.get("name"), f"{where}.name")
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool.get("parameters") is not None:
        function["parameters"] = tool["parameters"]
    return {"type": "function", "function": function}


def _tools(tools: object, names: _Names, dropped: list[str]) -> list[dict[str, Any]]:
    """Function tools (namespaces flattened); hosted tools Ollama cannot serve are left out and named in C{dropped}."""
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list")
    out = []
    pairs: list[tuple[str | None, str]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"tools[{i}] must be an object with a type")
        kind = tool["type"]
        if kind == "function":
            out.append(_function_tool(tool, f"tools[{i}]"))
            pairs.append((None, tool["name"]))
        elif kind == "namespace":
            namespace = tool.get("name")
            inner = tool.get("tools")
            if not isinstance(namespace, str) or not namespace or not isinstance(inner, list):
                raise invalid(f"tools[{i}] must have a name and a list of tools")
            for j, member in enumerate(inner):
                if isinstance(member, dict) and member.get("type") == "function":
                    out.append(_function_tool(member, f"tools[{i}].tools[{j}]"))
                    pairs.append((namespace, member["name"]))
                else:
                    dropped.append(f"{namespace}.{member.get('name') if isinstance(member, dict) else j}")
        else:
            dropped.append(str(tool.get("name") or kind)[:64])
    for tool, inner_name in zip(out, names.assign(pairs)):
        tool["function"]["name"] = inner_name
    return out


def _tool_choice(choice: object, names: _Names) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        raise invalid("'tool_choice' must be none, auto, required or a function to call")
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise invalid("'tool_choice.name' must be a string")
        return {"type": "function", "function": {"name": names.inner(choice.get("namespace"), choice["name"])}}
    if kind == "allowed_tools":
        tools = choice.get("tools")
        if not isinstance(tools, list):
            raise invalid("'tool_choice.tools' must be a list")
        allowed = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise invalid(f"'tool_choice.tools[{i}]' must name a function")
            allowed.append({"type": "function", "function": {"name": names.inner(tool.get("namespace"), tool["name"])}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": allowed}}
    raise invalid("'tool_choice' may name only a function tool: the gateway serves no hosted tools")


def _input_messages(value: object, names: _Names) -> list[dict[str, Any]]:
    """C{input} (a string or a list of items) as chat completions messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty list of items")
    if len(value) > translate.MAX_MESSAGES:
        raise invalid(f"'input' may hold at most {translate.MAX_MESSAGES} items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"{where}.role must be user, assistant, system or developer")
            if role == "assistant":
                messages.append({"role": "assistant", "content": _text_of_parts(item.get("content"), where)})
            else:
                messages.append({"role": "system" if role == "developer" else role, "content": _user_parts(item.get("content"), where)})
        elif kind == "function_call":
            name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
                raise invalid(f"{where} must have a name, a call_id and arguments as a string")
            if not _is_object_json(arguments):
                raise invalid(f"{where}.arguments must be a JSON string of an object")
            call = {"id": call_id, "type": "function", "function": {"name": names.inner(item.get("namespace"), name), "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.call_id must be a string")
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output if isinstance(output, str) else _text_of_parts(output, f"{where}.output")})
        elif kind == "item_reference":
            raise invalid(f"{where}: item references are not supported; send the items themselves or use 'previous_response_id'")
        elif kind == "reasoning" or (isinstance(kind, str) and kind.endswith("_call")):
            # Echoed reasoning and hosted tools' calls: nothing the model needs again.
            continue
        else:
            raise invalid(f"{where}: item type {kind!r} is not supported")
    return messages


def _is_object_json(text: str) -> bool:
    try:
        return isinstance(loads_checked(text), dict) if text.strip() else True
    except ValueError:
        return False


def _number(body: dict[str, Any], name: str, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number from {low:g} to {high:g}")
    return value


def chat_body(body: dict[str, Any], context: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A Responses request as a chat completions body, for
    L{translate.chat_request}.

    @param context: the stored conversation C{previous_response_id} names
        (chat messages), placed before the new input.
    @return: C{(chat, notes)}: C{notes} holds what the reply side needs
        (the new input as chat messages, the function names, the hosted
        tools left out).
    """
    for name, reason in _REFUSED.items():
        if body.get(name):
            raise invalid(f"'{name}': {reason}")
    if "input" not in body:
        raise invalid("'input' is required")
    names = _Names()
    dropped: list[str] = []
    chat: dict[str, Any] = {"model": body.get("model")}
    tools = _tools(body["tools"], names, dropped) if body.get("tools") is not None else []
    new = _input_messages(body["input"], names)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string")
    if not new and not context:
        raise invalid("'input' holds nothing the model can read (only reasoning or hosted tools' items)")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + list(context or []) + new
    chat["messages"] = messages
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false")
    chat["stream"] = stream
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"], names)
    elif body.get("tool_choice") not in (None, "auto", "none"):
        raise invalid("'tool_choice' asks for a tool call but no function tools are given")
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    for name in ("temperature", "top_p"):
        value = _number(body, name, 0, 2 if name == "temperature" else 1)
        if value is not None:
            chat[name] = value
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise invalid("'max_output_tokens' must be a positive integer")
        chat["max_tokens"] = limit
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise invalid("'text' must be an object")
        fmt = text.get("format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind == "json_schema":
                if not isinstance(fmt.get("schema"), dict):
                    raise invalid("'text.format.schema' must be an object")
                chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]}}
            elif kind == "json_object":
                chat["response_format"] = {"type": "json_object"}
            elif kind != "text":
                raise invalid("'text.format.type' must be text, json_object or json_schema")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise invalid("'reasoning' must be an object")
        effort = reasoning.get("effort")
        if effort is not None:
            if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
                raise invalid("'reasoning.effort' must be none, minimal, low, medium, high or xhigh")
            chat["reasoning_effort"] = "high" if effort == "xhigh" else effort
    for name in ("options", "keep_alive"):
        # Ollama's own settings, as on /v1/chat/completions.
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat, {"new": new, "names": names, "dropped": dropped}


# --- the reply --------------------------------------------------------------------


def usage_of(reply: dict[str, Any] | None) -> dict[str, Any]:
    counts = translate.usage(reply or {})
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


class ResponseShape:
    """
    The parts of a C{response} object that come from its request (echoed
    back as OpenAI does), and the object itself at each stage.
    """

    def __init__(self, body: dict[str, Any], model: str, names: _Names, store: bool, created: float | None = None) -> None:
        self.id = response_id()
        self.created_at = int(created or time.time())
        self.names = names
        self.fields: dict[str, Any] = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
            "model": model,
            "parallel_tool_calls": body.get("parallel_tool_calls") if isinstance(body.get("parallel_tool_calls"), bool) else True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None} if isinstance(body.get("reasoning"), dict) else {"effort": None, "summary": None},
            "store": store,
            "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}} if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") if body.get("tool_choice") is not None else "auto",
            "tools": body.get("tools") if isinstance(body.get("tools"), list) else [],
            "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
            "truncation": "disabled",
            "user": None,
        }

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "output": output,
            "usage": usage,
        }
        out.update(self.fields)
        return out

    def call_item(self, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        namespace, client_name = self.names.client(name)
        item: dict[str, Any] = {"type": "function_call", "id": _item_id("fc"), "call_id": call_id, "name": client_name, "arguments": arguments, "status": status}
        if namespace:
            item["namespace"] = namespace
        return item

    # The four methods of a route's shape (clawdbot.http.chat.ChatShape).

    def whole(self, reply: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
        """The C{response} for a whole Ollama reply, read through its chat completion (L{translate.chat_response})."""
        result = translate.chat_response(reply, opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])
        message = result["choices"][0]["message"]
        output: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            output.append(_reasoning_item(_item_id("rs"), message["reasoning_content"]))
        if message.get("content"):
            output.append(_message_item(_item_id("msg"), message["content"], "completed"))
        length = result["choices"][0]["finish_reason"] == "length"
        for call in message.get("tool_calls") or []:
            if length and not call["function"]["arguments"]:
                # Cut short before the model wrote any of it: no call was made.
                continue
            output.append(self.call_item(call["id"], call["function"]["name"], call["function"]["arguments"], "incomplete" if length else "completed"))
        return self.response("incomplete" if length else "completed", output, usage_of(reply), "max_output_tokens" if length else None)

    def translator(self, opts: dict[str, Any], hold: bool) -> "ResponseStream":
        return ResponseStream(self, opts, hold)

    def fmt(self, translator: "ResponseStream") -> Any:
        return translator.error_event

    def held(self, translator: "ResponseStream") -> bytes:
        return translator.terminal()


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def context(new: list[dict[str, Any]], output: list[dict[str, Any]], names: _Names) -> list[dict[str, Any]]:
    """
    What a chain continues from: the new input and the reply, as chat
    messages (the reply's function calls carry their call ids, so a later
    C{function_call_output} finds its function).
    """
    reply: dict[str, Any] = {"role": "assistant", "content": ""}
    texts: list[str] = []
    for item in output:
        if item["type"] == "message":
            texts.extend(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            if not _is_object_json(item["arguments"]):
                # Cut short: not a call the conversation can go on from.
                continue
            name = names.inner(item.get("namespace"), item["name"])
            reply.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {"name": name, "arguments": item["arguments"]}})
    reply["content"] = "".join(texts)
    return [dict(m) for m in new] + [reply]


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ResponseStream(StreamTranslator):
    """
    Ollama's chat stream as the Responses event stream: C{response.created}
    and C{response.in_progress}, then for each output item (reasoning, the
    message, each function call) C{response.output_item.added}, its deltas
    and C{response.output_item.done}, then C{response.completed} (or
    C{response.incomplete} when the reply hit C{max_output_tokens}) with
    usage.  Every event carries its C{sequence_number}.

    @ivar output: the finished output items.
    @param hold_done: keep the last event until L{terminal} is asked for
        (the response is stored first).
    """

    def __init__(self, shape: ResponseShape, opts: dict[str, Any], hold_done: bool = False) -> None:
        super().__init__(opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"], hold_done=hold_done)
        self.shape = shape
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.pieces: list[str] = []
        self.finish: str | None = None
        # A call whose item opens with its first piece of arguments.
        self.pending: dict[str, Any] | None = None

    def event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload["type"] = kind
        payload["sequence_number"] = self.sequence
        self.sequence += 1
        return _event(kind, payload)

    def error_event(self, err: APIError) -> bytes:
        """The C{error} event that ends a stream that failed."""
        message = err.as_dict()["error"]["message"]
        payload = {"code": err.code, "message": message, "param": err.param}
        if err.trace_id is not None:
            payload["trace_id"] = err.trace_id
        return self.event("error", payload)

    def _start(self, item: dict[str, Any]) -> bytes:
        self.open = item
        self.pieces = []
        out = self.event("response.output_item.added", {"output_index": len(self.output), "item": item})
        if item["type"] == "message":
            out += self.event("response.content_part.added", {"item_id": item["id"], "output_index": len(self.output), "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        return out

    def _close(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = len(self.output)
        text = "".join(self.pieces)
        out = b""
        if item["type"] == "message":
            item = _message_item(item["id"], text, "completed")
            part = item["content"][0]
            out += self.event("response.output_text.done", {"item_id": item["id"], "output_index": index, "content_index": 0, "text": text, "logprobs": []})
            out += self.event("response.content_part.done", {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part})
        elif item["type"] == "reasoning":
            item = _reasoning_item(item["id"], text)
            out += self.event("response.reasoning_text.done", {"item_id": item["id"], "output_index": index, "content_index": 0, "text": text})
        else:
            item = dict(item, arguments=text, status="incomplete" if self.finish == "length" else "completed")
            out += self.event("response.function_call_arguments.done", {"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": text})
        out += self.event("response.output_item.done", {"output_index": index, "item": item})
        self.output.append(item)
        return out

    def line(self, raw: bytes) -> bytes:
        out = b""
        if self.sequence == 0:
            start = self.shape.response("in_progress", [])
            out += self.event("response.created", {"response": start})
            out += self.event("response.in_progress", {"response": start})
        delta, finish = self.step(raw)
        thinking = delta.get("reasoning_content")
        if thinking and self.open is not None and self.open["type"] == "function_call":
            # Thinking after a forced call began (the call is opened with its
            # first piece, so this is rare): the call's item stays whole.
            thinking = None
        if thinking:
            if self.open is None or self.open["type"] != "reasoning":
                out += self._close() + self._start({"type": "reasoning", "id": _item_id("rs"), "summary": []})
            out += self.event("response.reasoning_text.delta", {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0, "delta": thinking})  # type: ignore[index]
            self.pieces.append(thinking)
        text = delta.get("content")
        if text:
            if self.open is None or self.open["type"] != "message":
                out += self._close() + self._start({"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant", "content": []})
            out += self.event("response.output_text.delta", {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0, "delta": text, "logprobs": []})  # type: ignore[index]
            self.pieces.append(text)
        for call in delta.get("tool_calls") or []:
            arguments = call["function"].get("arguments") or ""
            if "id" in call:
                self.pending = call
            if self.pending is not None and arguments:
                # A forced call's head comes with Ollama's first line, before
                # its thinking: the item opens with the first piece of arguments.
                head, self.pending = self.pending, None
                out += self._close() + self._start(self.shape.call_item(head["id"], head["function"]["name"], "", "in_progress"))
            if arguments and self.open is not None and self.open["type"] == "function_call":
                out += self.event("response.function_call_arguments.delta", {"item_id": self.open["id"], "output_index": len(self.output), "delta": arguments})
                self.pieces.append(arguments)
        if finish is not None:
            self.finish = finish
            if self.pending is not None and finish != "length":
                head = self.pending
                out += self._close() + self._start(self.shape.call_item(head["id"], head["function"]["name"], "", "in_progress"))
            # A call cut short before any of it was written was never made.
            self.pending = None
            out += self._close()
            if not self.hold_done:
                out += self.terminal()
        return out

    def result(self) -> dict[str, Any]:
        """The finished C{response} (status, output, usage)."""
        length = self.finish == "length"
        return self.shape.response("incomplete" if length else "completed", self.output, usage_of(self.final), "max_output_tokens" if length else None)

    def terminal(self) -> bytes:
        """C{response.completed} (or C{response.incomplete}) with the whole response."""
        result = self.result()
        return self.event("response.completed" if result["status"] == "completed" else "response.incomplete", {"response": result})


def input_items(turn: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    """
    The input of a stored response as Responses items (C{GET
    /v1/responses/{id}/input_items}), from the turn it stored: every message
    but the reply at its end.  Item ids are made from the response's id and
    the item's place, so they stay the same from one call to the next.
    """
    items: list[dict[str, Any]] = []
    stem = rid[5:29]

    def next_id(prefix: str) -> str:
        return f"{prefix}_{stem}{len(items):06d}"

    for message in turn[:-1]:
        role = message.get("role")
        content = message.get("content")
        if role == "tool":
            items.append({"type": "function_call_output", "id": next_id("fco"), "call_id": message.get("tool_call_id"), "output": content, "status": "completed"})
            continue
        if role == "assistant":
            if content:
                items.append({"type": "message", "id": next_id("msg"), "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": content, "annotations": []}]})
            for call in message.get("tool_calls") or []:
                items.append({"type": "function_call", "id": next_id("fc"), "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"})
            continue
        parts = []
        for part in [content] if isinstance(content, str) else content or []:
            if isinstance(part, str):
                parts.append({"type": "input_text", "text": part})
            elif part.get("type") == "text":
                parts.append({"type": "input_text", "text": part.get("text", "")})
            elif part.get("type") == "image_url":
                parts.append({"type": "input_image", "image_url": part["image_url"]["url"], "detail": "auto"})
        items.append({"type": "message", "id": next_id("msg"), "role": role, "status": "completed", "content": parts})
    return items
