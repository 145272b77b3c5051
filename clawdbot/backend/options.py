"""
What a caller may ask of the shared model: Ollama's C{options} and
C{keep_alive}, checked against the gateway's policy.

Used by both doors to the model (the OpenAI routes in L{clawdbot.backend.translate}
and the native pass-through in L{clawdbot.backend.native}), so a setting has one
rule wherever it comes in:

  - C{keep_alive}: up to C{backend.keep_alive}; C{0} (unload the model now)
    and a negative value (pin it forever) need C{admin}.  The value is sent
    on as a number of seconds, so Ollama never parses a spelling the gateway
    read differently.
  - C{options.num_ctx}: up to C{backend.max_num_ctx}.
  - load-time options (GPU layers, threads, batch, memory mapping...) need
    C{admin}.

Pure functions: no I/O.  Every refusal names the field.
"""

import math
import re
from typing import TYPE_CHECKING, Any

from clawdbot.errors import APIError, invalid
from clawdbot.units import format_duration

if TYPE_CHECKING:
    from clawdbot.config import Config

# Ollama reads integers as Go's int64.
INT64_MAX = 2**63 - 1

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


def needs_admin(field: str) -> APIError:
    return APIError(
        "AUTH_INSUFFICIENT_SCOPE",
        details=f"'{field}' changes the shared model for everyone; it needs the admin scope",
        headers={"WWW-Authenticate": 'Bearer realm="clawdbot", error="insufficient_scope", scope="admin"'},
    )


# --- Go durations ---------------------------------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def go_duration(text: str) -> float | None:
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


def keep_alive_seconds(value: object) -> float:
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


def keep_alive_policy(value: object, config: "Config", is_admin: bool) -> float:
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


def check(value: Any, kind: type, where: str) -> Any:
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


def options_policy(options: object, config: "Config", is_admin: bool) -> dict[str, Any]:
    """A caller's C{options}, checked: known keys, right types, bounded C{num_ctx}."""
    if not isinstance(options, dict):
        raise invalid("'options' must be an object")
    out: dict[str, Any] = {}
    for key, value in options.items():
        where = f"options.{key}"
        if key in _RUNTIME_OPTIONS:
            out[key] = check(value, _RUNTIME_OPTIONS[key], where)
        elif key in _LOAD_OPTIONS:
            if not is_admin:
                raise needs_admin(where)
            out[key] = check(value, _LOAD_OPTIONS[key], where)
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
