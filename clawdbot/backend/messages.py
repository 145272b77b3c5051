"""
Anthropic's Messages API (C{POST /v1/messages}) <-> Ollama's C{/api/chat},
through the chat translation, as L{clawdbot.backend.responses} does for
OpenAI's Responses API: a request becomes a chat completions body
(L{chat_body}) for L{clawdbot.backend.translate.chat_request}; the reply
becomes a C{message} (L{whole}) or Anthropic's event stream
(L{MessageStream}).  Pure: no I/O.

What coding agents send and Ollama has no use for (C{cache_control},
C{context_management}, C{output_config}, C{metadata}, echoed C{thinking}
blocks, server tools) is accepted and left out, never a 400.
"""

import json
import secrets
from typing import Any

from clawdbot.backend import translate
from clawdbot.backend.translate import StreamTranslator
from clawdbot.errors import APIError, invalid

# Anthropic's error type for each HTTP status (its SDKs map exceptions by status).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "invalid_request_error",
    503: "overloaded_error",
    504: "timeout_error",
}

# The signature on thinking blocks the gateway sends; clients echo it back
# with the block, which the gateway then leaves out.
SIGNATURE = "clawdbot"


def error_payload(err: APIError) -> dict[str, Any]:
    """C{err} in Anthropic's shape, C{{"type": "error", "error": {"type", "message"}}}."""
    message = err.as_dict()["error"]["message"]
    error = {"type": _ERROR_TYPES.get(err.status, "api_error"), "message": message}
    if err.trace_id is not None:
        error["trace_id"] = err.trace_id
    return {"type": "error", "error": error}


def error_body(err: APIError) -> bytes:
    """The JSON bytes of C{err} in Anthropic's shape (any string can be written)."""
    payload = error_payload(err)
    text = json.dumps(payload, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


def error_event(err: APIError) -> bytes:
    """The C{error} event that ends a stream that failed."""
    return b"event: error\ndata: " + error_body(err) + b"\n\n"


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def _tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


# --- the request ----------------------------------------------------------------


def _system_text(system: object) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise invalid("'system' must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or not isinstance(block.get("text"), str):
            raise invalid(f"system[{i}] must be a text block")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{where}.source must be an object")
    if source.get("type") != "base64":
        raise invalid(f"{where}: only base64 images are supported; send the image data in source.data")
    media, data = source.get("media_type"), source.get("data")
    if not isinstance(media, str) or not media.startswith("image/") or not isinstance(data, str):
        raise invalid(f"{where}.source must have an image media_type and base64 data")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _result_text(content: object, where: str, images: list[dict[str, Any]]) -> str:
    """A C{tool_result}'s content: a string, or text (and image) blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of blocks")
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise invalid(f"{where}.content[{i}] must be an object")
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "image":
            images.append(_image(block, f"{where}.content[{i}]"))
    return "\n".join(texts)


def _messages(messages: object, system: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's C{messages} as chat completions messages."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list")
    if len(messages) > translate.MAX_MESSAGES:
        raise invalid(f"'messages' may hold at most {translate.MAX_MESSAGES} messages")
    out: list[dict[str, Any]] = list(system)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object")
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            # Claude Code sends these inside the conversation: a system message in place.
            out.append({"role": "system", "content": _system_text(content)})
            continue
        if role not in ("user", "assistant"):
            raise invalid(f"{where}.role must be user or assistant")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(f"{where}.content must be a string or a list of blocks")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(block, dict):
                raise invalid(f"{at} must be an object")
            kind = block.get("type")
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise invalid(f"{at}.text must be a string")
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                if role != "user":
                    raise invalid(f"{at}: only user messages may carry images")
                parts.append(_image(block, at))
            elif kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise invalid(f"{at}: a tool_use block belongs to an assistant message and has an id and a name")
                arguments = block.get("input", {})
                if not isinstance(arguments, dict):
                    raise invalid(f"{at}.input must be an object")
                calls.append({"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
            elif kind == "tool_result":
                if role != "user" or not isinstance(block.get("tool_use_id"), str):
                    raise invalid(f"{at}: a tool_result block belongs to a user message and has a tool_use_id")
                images: list[dict[str, Any]] = []
                text = _result_text(block.get("content"), at, images)
                if block.get("is_error") is True and not text.startswith("Error"):
                    text = "Error: " + text
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
                if images:
                    # The model sees images only in user messages.
                    results.append({"role": "user", "content": images})
            elif kind == "document":
                raise invalid(f"{at}: document blocks are not supported; send the text as a text block")
            # thinking, redacted_thinking, server tools' blocks: left out.
        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        else:
            # Tool results answer the calls just before them: they come first.
            out.extend(results)
            if parts:
                out.append({"role": "user", "content": parts})
    if all(entry["role"] == "system" for entry in out):
        raise invalid("'messages' holds nothing the model can read (no text, image, tool use or tool result)")
    return out


def _tools(tools: object, dropped: list[str]) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools[{i}] must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # Anthropic's server and client-defined tools (web search, bash,
            # text editor, computer): Ollama serves none of them.
            dropped.append(str(tool.get("name") or kind)[:64])
            continue
        if not isinstance(tool.get("input_schema"), dict):
            raise invalid(f"tools[{i}].input_schema must be a JSON schema of an object")
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    names = [tool["function"]["name"] for tool in out]
    if len(set(map(str, names))) != len(names):
        raise invalid("'tools': two tools have the same name")
    return out


def _tool_choice(choice: object, chat: dict[str, Any]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise invalid("'tool_choice' must be an object")
    kind = choice.get("type")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise invalid("'tool_choice.name' must be a string")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise invalid("'tool_choice.type' must be auto, any, tool or none")


def chat_body(body: dict[str, Any], max_reply: int, counting: bool = False) -> tuple[dict[str, Any], list[str]]:
    """
    A Messages request as a chat completions body, for
    L{translate.chat_request}; and the names of the tools left out.

    @param max_reply: the most C{max_tokens} is taken as (C{backend.max_num_ctx}):
        agents ask for far more than a local model's context.
    @param counting: the body is C{count_tokens}'s (no C{max_tokens}).
    """
    if "messages" not in body:
        raise invalid("'messages' is required")
    system = [{"role": "system", "content": _system_text(body["system"])}] if body.get("system") else []
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body["messages"], system)}
    if not counting:
        limit = body.get("max_tokens")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise invalid("'max_tokens' is required and must be a positive integer")
        chat["max_tokens"] = min(limit, max_reply) if max_reply else limit
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false")
    chat["stream"] = stream
    dropped: list[str] = []
    tools = _tools(body["tools"], dropped) if body.get("tools") is not None else []
    if tools:
        chat["tools"] = tools
        _tool_choice(body.get("tool_choice"), chat)
    elif isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") in ("any", "tool"):
        raise invalid("'tool_choice' asks for a tool call but no tools the gateway can serve are given")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("'stop_sequences' must be a list of strings")
        if stops:
            chat["stop"] = stops
    for name, high in (("temperature", 1), ("top_p", 1)):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise invalid(f"'{name}' must be a number from 0 to {high}")
            chat[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        chat["options"] = {"top_k": top_k}
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        kind = thinking.get("type")
        if kind == "enabled":
            chat["think"] = True
        elif kind == "disabled":
            chat["think"] = False
        # "adaptive": the model's own default.
    elif thinking is not None:
        raise invalid("'thinking' must be an object")
    return chat, dropped


# --- the reply --------------------------------------------------------------------


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _usage(reply: dict[str, Any] | None) -> dict[str, Any]:
    counts = translate.usage(reply or {})
    return {"input_tokens": counts["prompt_tokens"], "output_tokens": counts["completion_tokens"], "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


class MessageShape:
    """A Messages route's replies (the four methods of L{clawdbot.http.chat.ChatShape})."""

    def whole(self, reply: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
        result = translate.chat_response(reply, opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])
        return whole(result, reply, opts["model"])

    def translator(self, opts: dict[str, Any], hold: bool) -> "MessageStream":
        return MessageStream(opts)

    def fmt(self, translator: "MessageStream") -> Any:
        return error_event

    def held(self, translator: "MessageStream") -> bytes:
        return b""


MESSAGES = MessageShape()


def whole(result: dict[str, Any], reply: dict[str, Any], model: str) -> dict[str, Any]:
    """The C{message} for a whole reply, from its chat completion (L{translate.chat_response})."""
    choice = result["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": SIGNATURE})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        if choice["finish_reason"] == "length" and not call["function"]["arguments"]:
            # Cut short before the model wrote any of it: no call was made.
            continue
        content.append({"type": "tool_use", "id": _tool_use_id(), "name": call["function"]["name"], "input": _arguments(call["function"]["arguments"])})
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _STOP_REASONS[choice["finish_reason"]],
        "stop_sequence": None,
        "usage": _usage(reply),
    }


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    payload = {"type": kind, **payload}
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class MessageStream(StreamTranslator):
    """
    Ollama's chat stream as Anthropic's events: C{message_start}; for each
    block (thinking, text, each tool use) C{content_block_start}, its
    deltas (C{thinking_delta} then C{signature_delta}, C{text_delta},
    C{input_json_delta}) and C{content_block_stop}; then C{message_delta}
    with the stop reason and usage, and C{message_stop}.
    """

    def __init__(self, opts: dict[str, Any]) -> None:
        super().__init__(opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])
        self.message_id = message_id()
        self.blocks = 0
        self.open: str | None = None
        # A call whose block opens with its first piece of input.
        self.pending: dict[str, Any] | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> bytes:
        self.open = kind
        return _event("content_block_start", {"index": self.blocks, "content_block": block})

    def _open_call(self) -> bytes:
        head, self.pending = self.pending, None
        assert head is not None
        return self._close() + self._start("tool_use", {"type": "tool_use", "id": _tool_use_id(), "name": head["function"]["name"], "input": {}})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking":
            out += _event("content_block_delta", {"index": self.blocks, "delta": {"type": "signature_delta", "signature": SIGNATURE}})
        out += _event("content_block_stop", {"index": self.blocks})
        self.open = None
        self.blocks += 1
        return out

    def line(self, raw: bytes) -> bytes:
        out = b""
        if not self.sent_role:
            start: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(None)}
            out += _event("message_start", {"message": start})
        delta, finish = self.step(raw)
        thinking = delta.get("reasoning_content")
        if thinking and self.open == "tool_use":
            # Thinking after a forced call began: the tool_use block stays whole.
            thinking = None
        if thinking:
            if self.open != "thinking":
                out += self._close() + self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out += _event("content_block_delta", {"index": self.blocks, "delta": {"type": "thinking_delta", "thinking": thinking}})
        text = delta.get("content")
        if text:
            if self.open != "text":
                out += self._close() + self._start("text", {"type": "text", "text": ""})
            out += _event("content_block_delta", {"index": self.blocks, "delta": {"type": "text_delta", "text": text}})
        for call in delta.get("tool_calls") or []:
            arguments = call["function"].get("arguments") or ""
            if "id" in call:
                self.pending = call
            if self.pending is not None and arguments:
                # A forced call's head comes with Ollama's first line, before
                # its thinking: the block opens with the first piece of input.
                out += self._open_call()
            if arguments and self.open == "tool_use":
                out += _event("content_block_delta", {"index": self.blocks, "delta": {"type": "input_json_delta", "partial_json": arguments}})
        if finish is not None:
            if self.pending is not None and finish != "length":
                out += self._open_call()
            # A call cut short before any of it was written was never made.
            self.pending = None
            out += self._close()
            counts = _usage(self.final)
            out += _event("message_delta", {"delta": {"stop_reason": _STOP_REASONS[finish], "stop_sequence": None}, "usage": counts})
            out += _event("message_stop", {})
        return out


def count(ollama_body: dict[str, Any]) -> dict[str, int]:
    """C{count_tokens}' answer: an estimate (four characters a token, the tools' definitions too), not the model's tokenizer."""
    tools = ollama_body.get("tools") or []
    schema = ollama_body.get("format")
    extra = len(json.dumps([tools, schema if isinstance(schema, dict) else None], ensure_ascii=False)) // 4 if tools or isinstance(schema, dict) else 0
    return {"input_tokens": translate.estimate_tokens(ollama_body) + extra}
