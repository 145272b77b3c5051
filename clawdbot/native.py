"""
The rules for Ollama's native API behind the gateway (C{/ollama/api/*}).

The pass-through speaks Ollama's own request bodies, but it is still the
gateway's door: a body is rebuilt from the fields Ollama documents for that
endpoint (anything else is a 400 naming it), the model must be an allowed
name, images go through the same validation as the OpenAI route, the audit
fields are the gateway's, and what changes the shared GPU for everyone is
bounded:

  - C{keep_alive}: up to C{backend.keep_alive}; C{0} (unload the model now)
    and a negative value (pin it forever) need C{admin}.  The value is sent
    on as a number of seconds, so Ollama never parses a spelling the gateway
    read differently.
  - C{options.num_ctx}: up to C{backend.max_num_ctx}.
  - load-time options (GPU layers, threads, batch, memory mapping...) and
    C{/api/generate}'s C{raw} and C{template} (which replace the model's
    prompt template) need C{admin}.

Pure functions over parsed JSON: no I/O.  Every refusal names the field.
"""

import math
import re

from clawdbot.errors import APIError, invalid
from clawdbot.translate import INT64_MAX, MAX_EMBEDDING_INPUTS, MAX_MESSAGES, resolve_model
from clawdbot.units import format_duration

ADMIN = "admin"

# Sampling options any caller may set, with their JSON type.
_RUNTIME_OPTIONS = {
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "tfs_z": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "mirostat": int,
    "mirostat_tau": float,
    "mirostat_eta": float,
    "penalize_newline": bool,
    "stop": list,
    "num_ctx": int,
}
# Options that decide how the model is loaded on the shared GPU: admin only.
_LOAD_OPTIONS = {
    "numa": bool,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "low_vram": bool,
    "f16_kv": bool,
    "logits_all": bool,
    "vocab_only": bool,
    "use_mmap": bool,
    "use_mlock": bool,
    "embedding_only": bool,
    "num_thread": int,
    "num_gqa": int,
    "rope_frequency_base": float,
    "rope_frequency_scale": float,
}


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


def needs_admin(field):
    return APIError(
        "AUTH_INSUFFICIENT_SCOPE",
        details=f"'{field}' changes the shared model for everyone; it needs the admin scope",
        headers={"WWW-Authenticate": 'Bearer realm="clawdbot", error="insufficient_scope", scope="admin"'},
    )


# --- Go durations ---------------------------------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def go_duration(text):
    """
    Seconds from a Go duration string (C{time.ParseDuration}: C{"5m"},
    C{"1h30m"}, C{"-1s"}, C{"0"}), or C{None} when it is not one.
    """
    sign = 1.0
    rest = text
    if rest[:1] in ("-", "+"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        return None
    total, position = 0.0, 0
    for match in _GO_PART.finditer(rest):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        position = match.end()
    if position != len(rest):
        return None
    return sign * total


def keep_alive_seconds(value):
    """
    C{keep_alive} as Ollama reads it, in seconds (negative: forever).

    @raise APIError: 400 when it is neither a number nor a Go duration.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid("'keep_alive' must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, str):
        seconds = go_duration(value.strip())
        if seconds is None:
            raise invalid("'keep_alive' must be a number of seconds or a duration such as \"5m\"")
        return seconds
    if not math.isfinite(value):
        raise invalid("'keep_alive' must be a finite number")
    return float(value)


def keep_alive_policy(value, config, is_admin):
    """
    The C{keep_alive} to send on, in seconds, for a caller's value.

    @raise APIError: 400 above C{backend.keep_alive}; 403 for 0 or below
        without admin.
    """
    seconds = keep_alive_seconds(value)
    if is_admin:
        return seconds
    if seconds < 1:
        # Some Ollama versions read a number of seconds as a whole number:
        # anything under a second unloads the model.
        raise needs_admin("keep_alive")
    limit = config.backend.keep_alive
    if seconds > limit:
        raise invalid(f"'keep_alive' must be at most {format_duration(limit)} (backend.keep_alive)")
    return math.ceil(seconds)


# --- typed checks ---------------------------------------------------------------


def _check(value, kind, where):
    if kind is bool:
        if not isinstance(value, bool):
            raise invalid(f"'{where}' must be true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{where}' must be an integer")
        if not -INT64_MAX <= value <= INT64_MAX:
            raise invalid(f"'{where}' is out of range")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid(f"'{where}' must be a number")
        if abs(value) > 1e30:
            raise invalid(f"'{where}' is out of range")
    elif kind is str:
        if not isinstance(value, str):
            raise invalid(f"'{where}' must be a string")
    elif kind is list:
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 64:
            raise invalid(f"'{where}' must be a list of strings")
    return value


def options_policy(options, config, is_admin):
    """A caller's C{options}, checked: known keys, right types, bounded C{num_ctx}."""
    if not isinstance(options, dict):
        raise invalid("'options' must be an object")
    out = {}
    for key, value in options.items():
        where = f"options.{key}"
        if key in _RUNTIME_OPTIONS:
            out[key] = _check(value, _RUNTIME_OPTIONS[key], where)
        elif key in _LOAD_OPTIONS:
            if not is_admin:
                raise needs_admin(where)
            out[key] = _check(value, _LOAD_OPTIONS[key], where)
        else:
            raise invalid(f"'{where}' is not an option Ollama knows")
    num_ctx = out.get("num_ctx")
    if num_ctx is not None and not is_admin:
        limit = config.backend.max_num_ctx
        if limit == 0:
            raise invalid("'options.num_ctx' may not be set here (backend.max_num_ctx is 0)")
        if not 1 <= num_ctx <= limit:
            raise invalid(f"'options.num_ctx' must be between 1 and {limit} (backend.max_num_ctx)")
    return out


def _format(value):
    if value is None or value == "" or value == "json" or isinstance(value, dict):
        return value
    raise invalid("'format' must be \"json\" or a JSON schema object")


def _think(value):
    if isinstance(value, bool) or (isinstance(value, str) and value in _THINK):
        return value
    raise invalid("'think' must be true, false, \"low\", \"medium\" or \"high\"")


def _images(value, where, images):
    """Base64 images, collected into C{images} as (container, index) for the image pipeline."""
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise invalid(f"'{where}' must be a list of base64 strings")
    images.append(value)
    return value


def _messages(value, images):
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
        entry = {"role": role}
        for key in ("content", "thinking", "tool_name"):
            if key in message and message[key] is not None:
                entry[key] = _check(message[key], str, f"{where}.{key}")
        if message.get("images") is not None:
            entry["images"] = _images(list(message["images"]) if isinstance(message["images"], list) else message["images"], f"{where}.images", images)
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise invalid(f"'{where}.tool_calls' must be a list of tool calls")
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def _context(value):
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in value):
        raise invalid("'context' must be a list of token ids")
    return value


def _input(value):
    if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value
    raise invalid("'input' must be a string or a list of strings")


def native_request(name, body, config, principal):
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
    out = {"model": resolve_model(model, config)}
    images = []
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
            out[key] = _check(value, bool, key)
        elif key in ("prompt", "suffix", "system", "template"):
            out[key] = _check(value, str, key)
        elif key == "tools":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise invalid("'tools' must be a list of tool objects")
            out[key] = value
        elif key == "context":
            out[key] = _context(value)
        elif key == "input":
            out[key] = _input(value)
        elif key == "dimensions":
            if _check(value, int, key) < 1:
                raise invalid("'dimensions' must be at least 1")
            out[key] = value
    if name == "chat" and "messages" not in out:
        out["messages"] = []
    if name in ("chat", "generate", "embed", "embeddings"):
        # The owner key (provider and sub), whatever the client sent.
        out["user_id"] = principal.key
    return out, images


def filter_tags(tags, config):
    """Ollama's C{/api/tags} answer with only the models the allow-list has."""
    allowed = set(config.backend.models)
    if not allowed or not isinstance(tags, dict) or not isinstance(tags.get("models"), list):
        return tags
    kept = []
    for entry in tags["models"]:
        if isinstance(entry, dict) and (entry.get("name") in allowed or entry.get("model") in allowed):
            kept.append(entry)
    return dict(tags, models=kept)
