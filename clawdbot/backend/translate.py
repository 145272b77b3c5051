"""
OpenAI chat completions <-> Ollama C{/api/chat}, both ways, streaming
included.

Pure functions and small objects with no I/O: the HTTP handlers feed them
parsed JSON and bytes.  Every value the gateway cannot honour is refused with
an L{APIError} (400) naming the field, never dropped silently.
"""

import base64
import binascii
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import orjson

from clawdbot.errors import APIError, invalid
from clawdbot.backend.options import ADMIN, INT64_MAX, keep_alive_policy, options_policy
from clawdbot.strictjson import loads_checked, parse_json
from clawdbot.backend.images import too_many_images

if TYPE_CHECKING:
    from clawdbot.config import Config

ROLES = {"system", "user", "assistant", "tool", "developer"}
REASONING_EFFORT = {"none": False, "minimal": True, "low": True, "medium": True, "high": True}

# Accepted and ignored: they change nothing the model produces.
_IGNORED = {"user", "metadata", "store", "service_tier", "session_id", "prompt_cache_key", "safety_identifier", "verbosity"}
_HANDLED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "think",
    "n",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "modalities",
    "options",
    "keep_alive",
}

# Far beyond a model's context: a conversation of this many messages would
# not fit.  Bounds the work of translating (and re-encoding) one body.
MAX_MESSAGES = 10_000
# OpenAI's own limit on the texts of one embeddings request.
MAX_EMBEDDING_INPUTS = 2048

_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)


def _number(value: object, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise invalid(f"'{name}' must be a number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(f"'{name}' must be between {low} and {high}")
    return value


def _integer(value: object, name: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer")
    if low is not None and value < low:
        raise invalid(f"'{name}' must be at least {low}")
    if not -INT64_MAX <= value <= INT64_MAX:
        raise invalid(f"'{name}' is out of range")
    return value


def resolve_model(requested: object, config: "Config", principal: Any = None) -> str:
    """
    The Ollama model for a request's C{model}: the default when absent, an
    alias resolved, the allow-list applied, and (for a C{principal})
    C{backend.model_access}: every route that names a model comes here.

    @raise APIError: MODEL_NOT_FOUND when the allow-list does not have it;
        403 MODEL_NOT_ALLOWED when C{principal} may not use it (the model's
        existence is no secret: the allow-list and others' model lists name it).
    """
    backend = config.backend
    if requested is None:
        requested = backend.model
    if not isinstance(requested, str) or not requested.strip():
        raise invalid("'model' must be a non-empty string")
    model = backend.aliases.get(requested, requested)
    if backend.models and model not in backend.models:
        raise APIError("MODEL_NOT_FOUND", details=f"model '{requested}' is not available")
    if principal is not None and not allows(usable_models(principal, config), model):
        raise APIError("MODEL_NOT_ALLOWED", details=f"model '{requested}' is not one you may use")
    return model


def usable_models(principal: Any, config: "Config") -> set[str] | None:
    """
    The models C{backend.model_access} lets C{principal} use (aliases
    resolved; C{"*"}: all), or C{None} when no rule names the principal's
    teams or scopes (then every model the allow-list has).
    """
    names: set[str] = set()
    matched = False
    for rule in config.backend.model_access:
        if (rule.team is not None and rule.team in principal.teams) or (rule.scope is not None and rule.scope in principal.rule_scopes):
            matched = True
            names.update(config.backend.aliases.get(name, name) for name in rule.models)
    return names if matched else None


def allows(usable: set[str] | None, model: str) -> bool:
    """Whether C{usable} (what L{usable_models} gave) lets its principal use C{model} (a resolved name)."""
    return usable is None or "*" in usable or model in usable


def data_url_image(url: object, where: str) -> bytes:
    """The base64 payload of an image C{data:} URL; anything else is a 400."""
    if not isinstance(url, str):
        raise invalid(f"{where}.image_url.url must be a string")
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            raise invalid(f"{where}: remote image URLs are not supported; send the image as a base64 data URL")
        raise invalid(f"{where}: image_url must be a base64 data URL of an image")
    payload = match.group(2).strip()
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}: the image data is not valid base64") from None
    return raw


def _content(content: object, where: str, images: list[bytes]) -> str:
    """Text of a message's content; image parts are appended to C{images} (raw bytes)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of parts")
    texts = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        if not isinstance(part, dict):
            raise invalid(f"{at} must be an object")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{at}.text must be a string")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            images.append(data_url_image(url, at))
        else:
            raise invalid(f"{at}: part type {kind!r} is not supported")
    return "\n".join(texts)


def _tool_calls_in(calls: object, where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls must be a list")
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}.tool_calls[{i}].function.name must be a string")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = parse_json(args.encode("utf-8")) if args.strip() else {}
            except APIError as e:
                raise invalid(f"{where}.tool_calls[{i}].function.arguments must be a JSON string of an object ({cast(str, e.details).replace('the body', 'it', 1)})") from None
        if not isinstance(args, dict):
            raise invalid(f"{where}.tool_calls[{i}].function.arguments must encode an object")
        out.append({"function": {"name": fn["name"], "arguments": args}})
    return out


def translate_messages(messages: object, max_images: int | None = None) -> list[dict[str, Any]]:
    """
    OpenAI C{messages} to Ollama's.

    Images stay raw: a message's C{images} is a list of the C{bytes} decoded
    from its data URLs, which no JSON encoder takes, so nothing reaches the
    backend until the handler has had them validated and re-encoded off the
    reactor (L{clawdbot.backend.images.ImageWorkers.process_messages}).  Nothing here
    parses an image.

    @param max_images: the most images all messages together may carry
        (C{images.max_per_request}); C{None}, no cap.
    """
    if not isinstance(messages, list):
        raise invalid("'messages' must be a list")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' may hold at most {MAX_MESSAGES} messages")
    image_count = 0
    out = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"{where}.role must be one of system, developer, user, assistant, tool")
        images: list[bytes] = []
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(message.get("content"), where, images)}
        if images:
            if role != "user":
                raise invalid(f"{where}: only user messages may carry images")
            image_count += len(images)
            if max_images is not None and image_count > max_images:
                raise invalid(too_many_images(max_images))
            entry["images"] = images
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls_in(message["tool_calls"], where)
            for call in message["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    tool_names[call["id"]] = call["function"]["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise invalid(f"{where}.tool_call_id must be a string")
            if call_id in tool_names:
                entry["tool_name"] = tool_names[call_id]
        out.append(entry)
    return out


# What OpenAI allows in a function's name, plus the '.' and ':' that tool
# names of some agent frameworks carry; never a space or a line break.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_object_schema(schema: object) -> bool:
    """
    C{schema} describes an object at its root: C{"type": "object"}, or no
    type and nothing else that decides one (C{{}}), with C{properties}, if
    any, an object.
    """
    if not isinstance(schema, dict) or not isinstance(schema.get("properties", {}), dict):
        return False
    if "type" in schema:
        return schema["type"] == "object"
    return not any(key in schema for key in ("anyOf", "oneOf", "allOf", "$ref", "enum", "const", "not", "if"))


def check_tool_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise invalid(f"{where} must be 1 to 64 letters, digits, '_', '-', '.' or ':'")


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(f"tools[{i}] must be a function tool")
        fn = tool["function"]
        check_tool_name(fn.get("name"), f"tools[{i}].function.name")
        entry: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise invalid(f"tools[{i}].function.description must be a string")
            entry["description"] = fn["description"]
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not is_object_schema(parameters):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema of an object (\"type\": \"object\")")
        entry["parameters"] = parameters
        out.append({"type": "function", "function": entry})
    return out


def _one_choice(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and _integer(value, name) != 1:
        raise invalid(f"'{name}' must be 1: one choice per request is supported")


def _think(value: object) -> bool | str:
    """Ollama's C{think} switch, as Ollama users send it."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value in ("low", "medium", "high"))):
        raise invalid("'think' must be true, false, \"low\", \"medium\" or \"high\"")
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    """C{stream_options.include_usage}, checked."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise invalid("'stream_options' must be an object")
    include_usage = so.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid("'stream_options.include_usage' must be true or false")
    return bool(include_usage)


# OpenAI's sampling fields and the Ollama option each one sets.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "num_predict", "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def ollama_settings(body: dict[str, Any], config: "Config", principal: Any = None) -> dict[str, Any]:
    """
    Ollama's C{options} and C{keep_alive} for an OpenAI-style body: its
    sampling fields, plus Ollama's own C{options} object and C{keep_alive}
    (sent by Ollama users through C{extra_body}), under the same policy as
    the native API (L{clawdbot.backend.options}).  A setting sent both ways is
    refused rather than one of them dropped.

    @return: the fields to add to the Ollama body (possibly none).
    """
    is_admin = principal is not None and ADMIN in principal.scopes
    options: dict[str, Any] = {}
    if body.get("options") is not None:
        options = options_policy(body["options"], config, is_admin)
    own: dict[str, Any] = {}
    if body.get("temperature") is not None:
        own["temperature"] = _number(body["temperature"], "temperature", 0, 2)
    if body.get("top_p") is not None:
        own["top_p"] = _number(body["top_p"], "top_p", 0, 1)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        own["num_predict"] = _integer(limit, "max_tokens", 1)
    if body.get("stop") is not None:
        stop = body["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise invalid("'stop' must be a string or a list of up to 16 strings")
        own["stop"] = stop
    if body.get("seed") is not None:
        own["seed"] = _integer(body["seed"], "seed")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if body.get(penalty) is not None:
            own[penalty] = _number(body[penalty], penalty, -2, 2)
    for key in own:
        if key in options:
            field = next(name for name, option in _SAMPLING.items() if option == key)
            raise invalid(f"send '{field}' or 'options.{key}', not both")
    options.update(own)
    out: dict[str, Any] = {"options": options} if options else {}
    if body.get("keep_alive") is not None:
        out["keep_alive"] = keep_alive_policy(body["keep_alive"], config, is_admin)
    return out


def tool_choice(choice: object, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """
    What C{tool_choice} asks of the model, and the tools it may use.

    @return: C{(mode, tools)}: C{"auto"}, C{"none"}, C{"forced"} (C{tools}
        is then the one function to call) or C{"required"} (several tools,
        one of them must be called).
    """
    if choice is None or choice == "auto":
        return "auto", tools
    if choice == "none":
        return "none", tools
    if choice == "required":
        if not tools:
            raise invalid("'tool_choice' is required but no 'tools' are given")
        return ("forced" if len(tools) == 1 else "required"), tools
    if not isinstance(choice, dict):
        raise invalid("'tool_choice' must be none, auto, required or a function to call")
    kind = choice.get("type")
    if kind == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise invalid("'tool_choice.function.name' must be a string")
        return "forced", [_tool_named(name, tools, "tool_choice.function.name")]
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if not isinstance(allowed, dict) or allowed.get("mode") not in ("auto", "required") or not isinstance(allowed.get("tools"), list) or not allowed["tools"]:
            raise invalid("'tool_choice.allowed_tools' must have a mode (auto or required) and a non-empty list of tools")
        subset = []
        for i, entry in enumerate(allowed["tools"]):
            fn = entry.get("function") if isinstance(entry, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(name, str):
                raise invalid(f"'tool_choice.allowed_tools.tools[{i}]' must name a function")
            subset.append(_tool_named(name, tools, f"tool_choice.allowed_tools.tools[{i}]"))
        return tool_choice(allowed["mode"], subset)
    raise invalid("'tool_choice' must be none, auto, required or a function tool; other tool types are not supported")


def _tool_named(name: str, tools: list[dict[str, Any]], where: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise invalid(f"'{where}' names a function that is not in 'tools'")


def check_forced_arguments(arguments: str, name: str, done_reason: object) -> None:
    """
    A forced call's arguments must be one JSON object, unless the reply was
    cut short (then it ends with C{finish_reason: "length"}, as OpenAI's).

    @raise APIError: 502 when the model answered something else.
    """
    if done_reason == "length":
        return
    try:
        value = loads_checked(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise APIError("UPSTREAM_UNAVAILABLE", details=f"the model did not answer with the arguments of {name}")


def forced_instruction(function: dict[str, Any]) -> str:
    text = f"Call the function {function['name']} now: answer with nothing but its arguments, as one JSON object that matches its parameters."
    if function.get("description"):
        text += f" The function: {function['description']}"
    return text


def with_instruction(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """C{messages} with C{text} added to the system prompt (a new system message when there is none)."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        first = dict(messages[0], content=(messages[0]["content"] + "\n\n" + text).strip())
        return [first] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def union_format(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The schema of a call to any one of C{functions} (C{{"name", "arguments"}}),
    for asking a model that answered without a call once more.

    Each function's parameters go under the root's C{$defs} (as C{f0},
    C{f1}...), their own local references rebased there, so that a
    C{"$ref": "#/$defs/Loc"} of a pydantic schema still finds its target.
    """
    defs = {f"f{i}": _rebase_refs(fn["parameters"], f"#/$defs/f{i}") for i, fn in enumerate(functions)}
    return {
        "$defs": defs,
        "anyOf": [
            {"type": "object", "properties": {"name": {"enum": [fn["name"]]}, "arguments": {"$ref": f"#/$defs/f{i}"}}, "required": ["name", "arguments"]}
            for i, fn in enumerate(functions)
        ],
    }


def _rebase_refs(schema: Any, base: str) -> Any:
    """
    C{schema} with every JSON-pointer C{$ref} into it (C{#}, C{#/...}) made
    relative to C{base}.  Left as they are: a schema with its own C{$id}
    (its references resolve against that), anchors (C{#name}, found
    wherever they move), and values that are data, not schemas
    (C{const}, C{enum}, C{default}, C{examples}).
    """
    if isinstance(schema, dict) and "$id" in schema:
        return schema
    if isinstance(schema, list):
        return [_rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = base + value[1:]
        elif key in _SCHEMA_DATA:
            out[key] = value
        else:
            out[key] = _rebase_refs(value, base)
    return out


# Keywords whose values are instances, not schemas.
_SCHEMA_DATA = {"const", "enum", "default", "examples"}


def union_instruction(functions: list[dict[str, Any]]) -> str:
    listed = "; ".join(f"{fn['name']}: {fn['description']}" if fn.get("description") else fn["name"] for fn in functions)
    return (
        "Call one of these functions now: answer with nothing but one JSON object with the function's "
        f"\"name\" and its \"arguments\". The functions: {listed}"
    )


def call_from_union(reply: dict[str, Any], functions: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The Ollama tool call in a reply made under L{union_format}.

    @raise APIError: 502 when the model still did not produce a call.
    """
    if reply.get("done_reason") == "length":
        # Cut short: no call to read; it ends as OpenAI's do.
        return dict(reply, message=dict(reply.get("message") or {}, content=""))
    content = (reply.get("message") or {}).get("content") or ""
    try:
        call = loads_checked(content)
    except ValueError:
        call = None
    names = {fn["name"] for fn in functions}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        raise APIError("UPSTREAM_UNAVAILABLE", details="the model did not call a tool although 'tool_choice' requires one")
    message = dict(reply.get("message") or {}, content="", tool_calls=[{"function": {"name": call["name"], "arguments": call["arguments"]}}])
    return dict(reply, message=message)


def offered_calls(calls: object, offered: Container[str] | None) -> list[Any]:
    """
    The tool calls (Ollama's) to functions that were C{offered} (names):
    a model's call to any other is no call.  All of them when C{offered} is
    C{None} (no tools were sent, as on a forced call).
    """
    if not isinstance(calls, list):
        return []
    if offered is None:
        return calls
    return [c for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict) and c["function"].get("name") in offered]


def offered_calls_only(reply: dict[str, Any], functions: list[dict[str, Any]]) -> dict[str, Any]:
    """C{reply} with only the tool calls to C{functions} (L{offered_calls})."""
    message = dict(reply.get("message") or {})
    message["tool_calls"] = offered_calls(message.get("tool_calls"), {fn["name"] for fn in functions})
    return dict(reply, message=message)


def with_counts_of(reply: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """C{reply} with an C{earlier} call's token counts added to its own (both calls are charged)."""
    return dict(reply, **{key: count(reply, key) + count(earlier, key) for key in ("prompt_eval_count", "eval_count")})


def chat_request(body: dict[str, Any], config: "Config", principal: Any = None, session_id: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    An OpenAI chat completion request body to Ollama's C{/api/chat} body.

    @return: C{(ollama_body, options)} where C{options} notes what the reply
        translation needs (C{stream}, C{include_usage}, the requested model).
        The messages' C{images} are still raw bytes (L{translate_messages}):
        the caller has them processed before the body goes anywhere.
    """
    for key in body:
        if key not in _HANDLED and key not in _IGNORED:
            raise invalid(f"'{key}' is not a supported parameter")
    model = resolve_model(body.get("model"), config, principal)
    if "messages" not in body:
        raise invalid("'messages' is required")
    messages = translate_messages(body["messages"], config.images.max_per_request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false")
    include_usage = _include_usage(body)

    _one_choice(body, "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("'logprobs' is not supported")
    if body.get("logit_bias"):
        raise invalid("'logit_bias' is not supported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("only the text modality is supported")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be true or false")

    out: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    out.update(ollama_settings(body, config, principal))

    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            out["format"] = "json"
        elif kind == "json_schema":
            schema = fmt.get("json_schema")
            if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
                raise invalid("'response_format.json_schema.schema' must be an object")
            out["format"] = schema["schema"]
        elif kind != "text":
            raise invalid("'response_format.type' must be text, json_object or json_schema")

    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    mode, tools = tool_choice(body.get("tool_choice"), tools)
    forced = required = None
    if mode in ("forced", "required") and "format" in out:
        # Both would hold the model to a schema of their own.
        raise invalid("'tool_choice' requires a function call; it cannot be combined with a JSON 'response_format'")
    if mode == "forced":
        # Ollama has no tool_choice: the model is held to the function's
        # arguments by a JSON schema, and its answer becomes the call.
        forced = tools[0]["function"]
        out["format"] = forced["parameters"]
    elif mode != "none" and tools:
        out["tools"] = tools
        if mode == "required":
            required = [t["function"] for t in tools]

    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in REASONING_EFFORT:
            raise invalid("'reasoning_effort' must be none, minimal, low, medium or high")
        out["think"] = REASONING_EFFORT[effort]
    think = body.get("think")
    if think is not None:
        # Ollama's own switch, as Ollama users send it.
        if effort is not None:
            raise invalid("send 'reasoning_effort' or 'think', not both")
        out["think"] = _think(think)

    if principal is not None:
        # The owner key (provider and sub): alice of one provider is not
        # alice of another, in Ollama's logs too.
        out["user_id"] = principal.key
    if session_id is not None:
        out["session_id"] = session_id
    # parallel_tool_calls: false keeps only the model's first tool call.
    return out, {
        "stream": stream,
        "include_usage": include_usage,
        "model": body.get("model") or model,
        "single_tool_call": parallel is False,
        # tool_choice naming one function: its name (the reply is its call),
        # and what to tell the model (added once a session's context is in).
        "forced_tool": forced["name"] if forced else None,
        "instruction": forced_instruction(forced) if forced else None,
        # tool_choice "required" with several tools: the functions offered.
        "required_tools": required,
        # The names of the functions offered: calls to others are dropped.
        "offered": {t["function"]["name"] for t in out["tools"]} if "tools" in out else None,
    }


# --- replies ------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_calls_out(calls: Any) -> list[dict[str, Any]]:
    """Ollama tool calls to OpenAI's, with arguments as a JSON string."""
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls or []):
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        out.append(
            {
                "index": i,
                "id": call.get("id") or _call_id(),
                "type": "function",
                "function": {"name": fn.get("name", ""), "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)},
            }
        )
    return out


def finish_reason(done_reason: object, has_tool_calls: bool) -> str:
    # A reply cut short says so, a tool call too (its arguments are cut).
    if done_reason == "length":
        return "length"
    if has_tool_calls:
        return "tool_calls"
    return "stop"


# A token count beyond this is no count a model server makes (2**53: exact as a double, summable in a BIGINT).
MAX_COUNT = 2**53


def count(reply: dict[str, Any], key: str) -> int:
    """
    A token count of Ollama's (C{prompt_eval_count}, C{eval_count}): an
    integer from 0 to L{MAX_COUNT}; anything else a backend sends (a string,
    a negative or fractional number, an absurd size) counts as 0, so that it
    reaches no answer, budget, metric or usage table.
    """
    value = reply.get(key)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        return 0
    return value


def usage(reply: dict[str, Any]) -> dict[str, int]:
    prompt = count(reply, "prompt_eval_count")
    completion = count(reply, "eval_count")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _text_size(value: Any, depth: int = 0) -> int:
    """The characters of text in a request body (message contents, prompts, inputs)."""
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 0
    if isinstance(value, list):
        return sum(_text_size(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_text_size(value[k], depth + 1) for k in ("content", "text", "messages", "prompt", "system", "input") if k in value)
    return 0


def estimate_tokens(body: Any) -> int:
    """
    A rough prompt size in tokens (four characters a token), for charging a
    reply that ended before Ollama reported its counts.
    """
    return _text_size(body) // 4 + 1


class Meter:
    """
    What one call to the model costs, however it ends.

    Ollama's counts (L{usage}) are exact, but they arrive only with a reply's
    last line (the routes record them in the request's audit, which wins
    over the meter).  Until then the meter holds an estimate: nothing while the
    call has not reached Ollama (queued, refused), the prompt once it has
    (Ollama evaluates it whether or not anyone waits for the answer), plus a
    token per relayed line of a stream.

    @ivar prompt: the estimated prompt size, in tokens.
    @ivar sent: the request reached Ollama.
    @ivar streamed: reply lines relayed so far.
    """

    def __init__(self, body: Any, ceiling: int = 0) -> None:
        prompt = estimate_tokens(body)
        # Ollama evaluates at most a context's worth of the prompt.
        self.prompt = min(prompt, ceiling) if ceiling else prompt
        self.sent = False
        self.streamed = 0

    def mark_sent(self, sent: bool = True) -> None:
        """The call went to Ollama (or, with C{False}, Ollama refused it: nothing was evaluated)."""
        self.sent = sent

    def usage(self) -> dict[str, Any] | None:
        """The estimated usage to charge, or C{None} when the call never reached Ollama."""
        if not self.sent:
            return None
        return {"prompt_tokens": self.prompt, "completion_tokens": self.streamed, "total_tokens": self.prompt + self.streamed, "estimated": True}


# The reply a call is assumed to produce when it sets no limit of its own,
# for the reservation taken before the call (settled to the real count).
DEFAULT_REPLY_RESERVE = 256


def reply_reserve(body: dict[str, Any], ceiling: int = 0) -> int:
    """The tokens to reserve for a call's reply: its C{num_predict}, else L{DEFAULT_REPLY_RESERVE}, at most C{ceiling}."""
    options: Any = body.get("options") if isinstance(body.get("options"), dict) else {}
    limit = options.get("num_predict")
    tokens = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else DEFAULT_REPLY_RESERVE
    return min(tokens, ceiling) if ceiling else tokens


def chat_response(
    reply: dict[str, Any],
    model: str,
    created: float | None = None,
    single_tool_call: bool = False,
    forced_tool: str | None = None,
    offered: Container[str] | None = None,
) -> dict[str, Any]:
    """
    A non-streamed Ollama C{/api/chat} reply as an OpenAI C{chat.completion}.

    @param single_tool_call: keep only the first tool call (the request's
        C{parallel_tool_calls: false}).
    @param forced_tool: the function C{tool_choice} named: the reply's
        content is its arguments (the call was made under its schema).
    @param offered: the names of the functions offered (L{offered_calls}).
    """
    message = reply.get("message") or {}
    if forced_tool is not None:
        arguments = message.get("content") or ""
        check_forced_arguments(arguments, forced_tool, reply.get("done_reason"))
        message = dict(message, content="", tool_calls=[{"function": {"name": forced_tool, "arguments": arguments}}])
    calls = tool_calls_out(offered_calls(message.get("tool_calls"), offered))
    if single_tool_call:
        calls = calls[:1]
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
    if message.get("thinking"):
        out_message["reasoning_content"] = message["thinking"]
    if calls:
        for call in calls:
            del call["index"]
        out_message["tool_calls"] = calls
        if not out_message["content"]:
            out_message["content"] = None
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(created or time.time()),
        "model": model,
        "choices": [{"index": 0, "message": out_message, "logprobs": None, "finish_reason": finish_reason(reply.get("done_reason"), bool(calls))}],
        "usage": usage(reply),
        "system_fingerprint": "fp_ollama",
    }


class LineSplitter:
    """Reassemble NDJSON lines from chunks split anywhere."""

    def __init__(self, max_line: int = 16 * 1024 * 1024) -> None:
        self.buffer = b""
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines in C{data} (plus what was buffered), without newlines."""
        if not self.buffer and data.find(b"\n") == len(data) - 1:
            # One whole line in one read: how a model's tokens arrive.
            return [data[:-1]] if data.strip() else []
        self.buffer += data
        if b"\n" not in data:
            if len(self.buffer) > self.max_line:
                raise ValueError("line too long")
            return []
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line for line in lines if line.strip()]

    def rest(self) -> list[bytes]:
        line, self.buffer = self.buffer, b""
        return [line] if line.strip() else []


class StreamTranslator:
    """
    Ollama's NDJSON chat stream to OpenAI's SSE chunks: one chunk per Ollama
    line, the role in the first, C{finish_reason} in the last, then the usage
    chunk when asked for, then C{[DONE]}.

    @ivar content: the assistant text so far (for history).
    @ivar final: the last Ollama line (counts and durations), once seen.
    """

    def __init__(
        self,
        model: str,
        include_usage: bool = False,
        created: float | None = None,
        hold_done: bool = False,
        single_tool_call: bool = False,
        forced_tool: str | None = None,
        offered: Container[str] | None = None,
    ) -> None:
        self.id = completion_id()
        self.offered = offered
        self.single_tool_call = single_tool_call
        # The function tool_choice named: the content streams as its arguments.
        self.forced_tool = forced_tool
        self.arguments: list[str] = []
        self.hold_done = hold_done
        self.model = model
        self.created = int(created or time.time())
        self.include_usage = include_usage
        self.sent_role = False
        self.tool_index = 0
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.done = False
        # Each chunk is this prefix, its choices and the tail: built once, the delta spliced in.
        self._prefix = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"system_fingerprint":"fp_ollama","choices":' % (
            self.id.encode("ascii"),
            self.created,
            orjson.dumps(model),
        )
        # With include_usage every chunk has the field, null until the last.
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def _chunk(self, choices_json: bytes, usage_json: bytes | None = None) -> bytes:
        if usage_json is None:
            return self._prefix + choices_json + self._tail
        return self._prefix + choices_json + b',"usage":' + usage_json + b"}\n\n"

    def _forced_arguments(self, delta: dict[str, Any], text: str) -> None:
        """The forced call's head in the first chunk, then each piece of content as an arguments delta."""
        if not self.tool_calls:
            call = {"index": 0, "id": _call_id(), "type": "function", "function": {"name": self.forced_tool, "arguments": text}}
            self.tool_calls.append(call)
            delta["content"] = None
            delta["tool_calls"] = [call]
        elif text:
            delta["tool_calls"] = [{"index": 0, "function": {"arguments": text}}]
        self.arguments.append(text)

    def step(self, raw: bytes) -> tuple[dict[str, Any], str | None]:
        """
        What one Ollama line adds to the reply, as an OpenAI chunk's C{delta}
        (role, content, C{reasoning_content}, C{tool_calls} with their
        indexes; a forced call's arguments arrive as its pieces) and the
        C{finish_reason} once the line is the last.  The other APIs' stream
        translators (L{clawdbot.backend.responses}, L{clawdbot.backend.messages})
        read replies through this too.

        @raise UpstreamStreamError: when the line is an error or not JSON.
        """
        data = stream_line(raw)
        message = data.get("message") or {}
        delta: dict[str, Any] = {}
        if not self.sent_role:
            delta["role"] = "assistant"
            self.sent_role = True
        text = message.get("content")
        if self.forced_tool is not None:
            self._forced_arguments(delta, text or "")
        elif text:
            delta["content"] = text
            self.content.append(text)
        elif "role" in delta:
            delta["content"] = ""
        thinking = message.get("thinking")
        if thinking:
            delta["reasoning_content"] = thinking
            self.reasoning.append(thinking)
        calls = offered_calls(message.get("tool_calls"), self.offered)
        if calls and self.single_tool_call:
            calls = calls[: max(0, 1 - self.tool_index)]
        if calls:
            out = tool_calls_out(calls)
            for call in out:
                call["index"] = self.tool_index
                self.tool_index += 1
            delta["tool_calls"] = out
            self.tool_calls.extend(out)
        finish = None
        if data.get("done"):
            if self.forced_tool is not None:
                check_forced_arguments("".join(self.arguments), self.forced_tool, data.get("done_reason"))
            self.done = True
            self.final = data
            finish = finish_reason(data.get("done_reason"), bool(self.tool_calls))
        return delta, finish

    def line(self, raw: bytes) -> bytes:
        """
        The SSE bytes for one Ollama line.

        @raise UpstreamStreamError: when the line is an error or not JSON.
        """
        delta, finish = self.step(raw)
        out = self._chunk(b'[{"index":0,"delta":' + _json(delta) + _finish_tail(finish))
        if self.done:
            if self.include_usage:
                out += self._chunk(b"[]", _json(usage(cast(dict[str, Any], self.final))))
            if not self.hold_done:
                out += DONE
        return out


DONE = b"data: [DONE]\n\n"


def _json(value: Any) -> bytes:
    """
    C{value} as compact UTF-8 JSON, by orjson (a stream's hot path); what
    orjson refuses (an integer beyond 64 bits, which a backend's reply may
    carry through L{loads_checked}) by the standard encoder, as before.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # (orjson.JSONEncodeError is one)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def _finish_tail(finish: str | None) -> bytes:
    """The end of a streamed choice: its C{logprobs} and C{finish_reason}."""
    if finish is None:
        return b',"logprobs":null,"finish_reason":null}]'
    return b',"logprobs":null,"finish_reason":' + orjson.dumps(finish) + b"}]"


class UpstreamStreamError(Exception):
    """The backend's stream went wrong; C{args[0]} is the curated reason."""


def stream_line(raw: bytes) -> dict[str, Any]:
    """
    One line of Ollama's NDJSON stream, parsed.

    @raise UpstreamStreamError: when the line is an error or not a JSON object.
    """
    try:
        data = loads_checked(raw)
    except ValueError:
        raise UpstreamStreamError("the model backend sent a malformed line") from None
    if not isinstance(data, dict):
        raise UpstreamStreamError("the model backend sent a malformed line")
    if "error" in data:
        raise UpstreamStreamError("the model backend reported an error mid-stream")
    return data


# --- legacy text completions --------------------------------------------------

# What C{POST /v1/completions} takes; the rest is refused by name.
_COMPLETION_FIELDS = {
    "model",
    "prompt",
    "suffix",
    "stream",
    "stream_options",
    "echo",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "best_of",
    "logprobs",
    "logit_bias",
    "user",
    "options",
    "keep_alive",
    "think",
}


def _completion_prompt(prompt: object) -> str:
    """The one text of a completion's C{prompt}: a string, or a list holding one string."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            # Ollama answers an empty prompt by loading the model, with no text.
            raise invalid("'prompt' must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) or isinstance(p, list) for p in prompt):
        raise invalid("'prompt' holds token ids; the model backend completes text only: send a string")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise invalid("'prompt' may hold one text: send one request per prompt")
    raise invalid("'prompt' must be a string, or a list holding one string")


def completion_request(body: dict[str, Any], config: "Config", principal: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    An OpenAI legacy completion request body (C{POST /v1/completions}) to
    Ollama's C{/api/generate} body.  Ollama applies the model's prompt
    template to the prompt (C{raw} stays off); C{max_tokens} unset leaves
    Ollama's default length rather than OpenAI's 16.

    @return: C{(ollama_body, options)} where C{options} notes what the reply
        translation needs (C{stream}, C{include_usage}, the requested
        C{model}, and C{echo_prompt}: the prompt when C{echo} is set, else
        C{None}).
    """
    for key in body:
        if key not in _COMPLETION_FIELDS:
            raise invalid(f"'{key}' is not a supported parameter")
    model = resolve_model(body.get("model"), config, principal)
    if "prompt" not in body:
        raise invalid("'prompt' is required")
    prompt = _completion_prompt(body["prompt"])
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be true or false")
    stream = bool(stream)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise invalid("'echo' must be true or false")
    _one_choice(body, "n")
    _one_choice(body, "best_of")
    if body.get("logprobs") is not None:
        raise invalid("'logprobs' is not supported: the model backend reports no token log probabilities")
    if body.get("logit_bias"):
        raise invalid("'logit_bias' is not supported")

    out: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise invalid("'suffix' must be a string")
        if suffix:
            out["suffix"] = suffix
    out.update(ollama_settings(body, config, principal))
    think = body.get("think")
    if think is not None:
        # Ollama's switch: on by default for a thinking model on /api/generate.
        out["think"] = _think(think)
    if principal is not None:
        out["user_id"] = principal.key
    return out, {"stream": stream, "include_usage": _include_usage(body), "model": body.get("model") or model, "echo_prompt": prompt if echo else None}


def text_completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def completion_response(reply: dict[str, Any], model: str, echo_prompt: str | None = None) -> dict[str, Any]:
    """
    A non-streamed Ollama C{/api/generate} reply as an OpenAI
    C{text_completion}; a thinking model's C{thinking} is left out of the
    text.

    @param echo_prompt: the prompt to put before the text (the request's
        C{echo}), or C{None}.
    """
    text = (echo_prompt or "") + (reply.get("response") or "")
    return {
        "id": text_completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(reply.get("done_reason"), False)}],
        "usage": usage(reply),
        "system_fingerprint": "fp_ollama",
    }


class CompletionStreamTranslator:
    """
    Ollama's NDJSON generate stream to OpenAI's SSE C{text_completion}
    chunks: one chunk per Ollama line, the echoed prompt (if any) in the
    first, C{finish_reason} in the last, then the usage chunk (no choices)
    when asked for, then C{[DONE]}.  With usage asked for, every other chunk
    carries C{"usage": null}, as OpenAI's do.  A thinking model's
    C{thinking} is not part of the text.

    @ivar final: the last Ollama line (counts and durations), once seen.
    """

    def __init__(self, model: str, include_usage: bool = False, echo_prompt: str | None = None) -> None:
        self.id = text_completion_id()
        self.include_usage = include_usage
        self.pending = echo_prompt or ""
        self.final: dict[str, Any] | None = None
        self.done = False
        self._prefix = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,"system_fingerprint":"fp_ollama","choices":' % (
            self.id.encode("ascii"),
            int(time.time()),
            orjson.dumps(model),
        )

    def _chunk(self, choices_json: bytes, usage_json: bytes = b"null") -> bytes:
        tail = b',"usage":' + usage_json if self.include_usage else b""
        return self._prefix + choices_json + tail + b"}\n\n"

    def line(self, raw: bytes) -> bytes:
        """
        The SSE bytes for one Ollama line.

        @raise UpstreamStreamError: when the line is an error or not JSON.
        """
        data = stream_line(raw)
        text = data.get("response")
        text = self.pending + (text if isinstance(text, str) else "")
        self.pending = ""
        finish = None
        if data.get("done"):
            self.done = True
            self.final = data
            finish = finish_reason(data.get("done_reason"), False)
        out = self._chunk(b'[{"text":' + _json(text) + b',"index":0' + _finish_tail(finish))
        if self.done:
            if self.include_usage:
                out += self._chunk(b"[]", _json(usage(cast(dict[str, Any], self.final))))
            out += DONE
        return out


# --- models and embeddings ----------------------------------------------------


def listed_models(tags: dict[str, Any], config: "Config", principal: Any = None) -> dict[str, dict[str, Any]]:
    """
    The models of Ollama's C{/api/tags} that the model list shows (config's
    allow-list, and what C{principal} may use), in its order: name -> its
    C{/api/tags} entry.  Aliases are not in it (L{models_response} adds them).
    """
    allowed = set(config.backend.models)
    usable = usable_models(principal, config) if principal is not None else None
    listed: dict[str, dict[str, Any]] = {}
    for entry in tags.get("models") or []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str) or (allowed and name not in allowed) or name in listed:
            continue
        if not allows(usable, name):
            continue
        listed[name] = entry
    return listed


def models_response(tags: dict[str, Any], config: "Config", principal: Any = None, capabilities: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """
    Ollama's C{/api/tags} as OpenAI's model list, filtered by config (and what C{principal} may use).

    @param capabilities: what each model can do (Ollama's C{/api/show}
        C{capabilities}), by model name: an entry carries C{"capabilities"}
        when its model (an alias: its target) is in it.
    """
    capabilities = capabilities or {}
    data: list[dict[str, Any]] = []

    def entry(name: str, created: int, owner: str, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": owner}
        if model in capabilities:
            out["capabilities"] = list(capabilities[model])
        return out

    listed = listed_models(tags, config, principal)
    for name, tag in listed.items():
        data.append(entry(name, _created(tag.get("modified_at")), "ollama", name))
    for alias, target in config.backend.aliases.items():
        if target in listed and alias not in listed:
            data.append(entry(alias, 0, "clawdbot", target))
    return {"object": "list", "data": data}


def _created(stamp: object) -> int:
    if not isinstance(stamp, str):
        return 0
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def embeddings_request(body: dict[str, Any], config: "Config", principal: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    for key in body:
        if key not in ("model", "input", "encoding_format", "dimensions", "user"):
            raise invalid(f"'{key}' is not a supported parameter")
    model = resolve_model(body.get("model"), config, principal)
    data = body.get("input")
    if isinstance(data, str):
        pass
    elif isinstance(data, list) and data and all(isinstance(s, int) and not isinstance(s, bool) or isinstance(s, list) for s in data):
        raise invalid(
            "'input' holds token ids; the model backend embeds text only: send strings "
            "(LangChain's OpenAIEmbeddings: set check_embedding_ctx_length=False)"
        )
    elif isinstance(data, list) and data and all(isinstance(s, str) for s in data):
        if len(data) > MAX_EMBEDDING_INPUTS:
            raise invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts")
    else:
        raise invalid("'input' must be a string or a non-empty list of strings")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid("'encoding_format' must be float or base64")
    out: dict[str, Any] = {"model": model, "input": data}
    if body.get("dimensions") is not None:
        out["dimensions"] = _integer(body["dimensions"], "dimensions", 1)
    return out, {"encoding_format": fmt, "model": body.get("model") or model}


def embeddings_response(reply: dict[str, Any], model: str, encoding_format: str) -> dict[str, Any]:
    data = []
    for i, vector in enumerate(reply.get("embeddings") or []):
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = count(reply, "prompt_eval_count")
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
