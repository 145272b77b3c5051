"""
The rules for Ollama's native API behind the gateway (C{/ollama/api/*}).

The pass-through speaks Ollama's own request bodies, but it is still the
gateway's door: a body is rebuilt from the fields Ollama documents for that
endpoint (anything else is a 400 naming it), the model must be an allowed
name, images go through the same validation as the OpenAI route, the audit
fields are the gateway's, and what changes the shared GPU for everyone is
bounded: C{keep_alive} and C{options} by the rules of
L{clawdbot.backend.options}, and C{/api/generate}'s C{raw} and C{template} (which
replace the model's prompt template) need C{admin}.

Pure functions over parsed JSON: no I/O.  Every refusal names the field.
"""

from typing import TYPE_CHECKING, Any

from clawdbot.errors import invalid
from clawdbot.backend.options import ADMIN, INT64_MAX, check, keep_alive_policy, needs_admin, options_policy
from clawdbot.backend.translate import MAX_EMBEDDING_INPUTS, MAX_MESSAGES, allows, check_tool_name, resolve_model, usable_models

if TYPE_CHECKING:
    from clawdbot.config import Config

# The request fields of each endpoint (Ollama's api/types.go), and those
# that need admin.  Model management (pull, push, create, copy, delete) is
# admin-only as a whole and passes as sent.
FIELDS = {
    "chat": {"model", "messages", "tools", "think", "format", "options", "stream", "keep_alive"},
    "generate": {"model", "prompt", "suffix", "system", "images", "think", "format", "options", "stream", "keep_alive", "context", "raw", "template"},
    "embed": {"model", "input", "truncate", "options", "keep_alive", "dimensions"},
    "show": {"model", "name", "verbose", "system", "template", "options"},
    # The legacy single-text embedding endpoint.
    "embeddings": {"model", "prompt", "options", "keep_alive"},
}
ADMIN_FIELDS = {"generate": {"raw", "template"}, "show": {"system", "template", "options"}}
# Fields the gateway sets itself; whatever a client sends there is replaced.
AUDIT_FIELDS = {"user_id", "session_id"}

_MESSAGE_FIELDS = {"role", "content", "images", "tool_calls", "thinking", "tool_name"}
_MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
_THINK = {"low", "medium", "high"}


def _format(value: Any) -> Any:
    if value is None or value == "" or value == "json" or isinstance(value, dict):
        return value
    raise invalid("'format' must be \"json\" or a JSON schema object")


def _think(value: object) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value in _THINK):
        return value
    raise invalid("'think' must be true, false, \"low\", \"medium\" or \"high\"")


def _images(value: object, where: str, images: list[list[str]]) -> list[str]:
    """Base64 images, collected into C{images} as (container, index) for the image pipeline."""
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise invalid(f"'{where}' must be a list of base64 strings")
    images.append(value)
    return value


def _messages(value: object, images: list[list[str]]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("'messages' must be a list")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"'messages' may hold at most {MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object")
        for key in message:
            if key not in _MESSAGE_FIELDS:
                raise invalid(f"'{where}.{key}' is not a message field")
        role = message.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_ROLES:
            raise invalid(f"'{where}.role' must be one of system, user, assistant, tool")
        entry: dict[str, Any] = {"role": role}
        for key in ("content", "thinking", "tool_name"):
            if key in message and message[key] is not None:
                entry[key] = check(message[key], str, f"{where}.{key}")
        if message.get("images") is not None:
            entry["images"] = _images(list(message["images"]) if isinstance(message["images"], list) else message["images"], f"{where}.images", images)
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise invalid(f"'{where}.tool_calls' must be a list of tool calls")
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def _context(value: object) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in value):
        raise invalid("'context' must be a list of token ids")
    return value


def _input(value: object) -> str | list[str]:
    if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value
    raise invalid("'input' must be a string or a list of strings")


def native_request(name: str, body: dict[str, Any], config: "Config", principal: Any) -> tuple[dict[str, Any], list[list[str]]]:
    """
    The body to send to Ollama's C{/api/<name>} for a caller's C{body}.

    @return: C{(out, images)} where C{images} lists the lists of base64
        images in C{out} (each to be replaced by the image pipeline's output).
    @raise APIError: 400 for an unknown field or a wrong value, 403 for what
        needs admin, 404 MODEL_NOT_FOUND for a model not allowed.
    """
    is_admin = ADMIN in principal.scopes
    fields = FIELDS[name]
    admin_only = ADMIN_FIELDS.get(name, set())
    for key in body:
        if key in AUDIT_FIELDS:
            continue
        if key not in fields:
            raise invalid(f"'{key}' is not a field of /api/{name}")
        if key in admin_only and not is_admin and body[key] not in (None, False, ""):
            raise needs_admin(key)
    model = body.get("model")
    if name == "show" and model is None:
        model = body.get("name")
    if model is None:
        raise invalid("'model' is required")
    if not isinstance(model, str):
        raise invalid("'model' must be a string")
    out: dict[str, Any] = {"model": resolve_model(model, config, principal)}
    images: list[list[str]] = []
    for key, value in body.items():
        if key in AUDIT_FIELDS or key in ("model", "name") or value is None:
            continue
        if key == "messages":
            out[key] = _messages(value, images)
        elif key == "images":
            out[key] = _images(list(value) if isinstance(value, list) else value, "images", images)
        elif key == "options":
            out[key] = options_policy(value, config, is_admin)
        elif key == "keep_alive":
            out[key] = keep_alive_policy(value, config, is_admin)
        elif key == "format":
            out[key] = _format(value)
        elif key == "think":
            out[key] = _think(value)
        elif key in ("stream", "raw", "truncate", "verbose"):
            out[key] = check(value, bool, key)
        elif key in ("prompt", "suffix", "system", "template"):
            out[key] = check(value, str, key)
        elif key == "tools":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise invalid("'tools' must be a list of tool objects")
            for i, tool in enumerate(value):
                if isinstance(tool.get("function"), dict):
                    check_tool_name(tool["function"].get("name"), f"tools[{i}].function.name")
            out[key] = value
        elif key == "context":
            out[key] = _context(value)
        elif key == "input":
            out[key] = _input(value)
        elif key == "dimensions":
            if check(value, int, key) < 1:
                raise invalid("'dimensions' must be at least 1")
            out[key] = value
    if name == "chat" and "messages" not in out:
        out["messages"] = []
    if name in ("chat", "generate", "embed", "embeddings"):
        # The owner key (provider and sub), whatever the client sent.
        out["user_id"] = principal.key
    return out, images


def filter_tags(tags: Any, config: "Config", principal: Any = None) -> Any:
    """Ollama's C{/api/tags} (or C{/api/ps}) answer with only the models the allow-list has and C{principal} may use."""
    allowed = set(config.backend.models)
    if not isinstance(tags, dict) or not isinstance(tags.get("models"), list):
        return tags
    usable = usable_models(principal, config) if principal is not None else None
    kept = []
    for entry in tags["models"]:
        if not isinstance(entry, dict):
            continue
        names = [n for n in (entry.get("name"), entry.get("model")) if isinstance(n, str)]
        if allowed and not any(n in allowed for n in names):
            continue
        if not any(allows(usable, n) for n in names):
            continue
        kept.append(entry)
    return dict(tags, models=kept)
