"""
Strict JSON for request bodies: what RFC 8259 allows and nothing more.

Python's C{json.loads} accepts C{NaN} and C{Infinity}, numbers beyond a
double's range, and lone UTF-16 surrogate escapes (C{"\\ud800"}) that no
UTF-8 writer can encode later.  L{parse_json} refuses each with a curated
reason, so nothing past the parser meets them.  Pure: no I/O.
"""

import json
import math
import re

from clawdbot.errors import invalid


class _Refused(ValueError):
    """A JSON document the parser reads but the gateway does not accept."""


def _no_constant(name):
    raise _Refused(f"the body contains {name}, which is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("the body contains a number too large to represent")
    return value


# The largest double has 309 digits; a longer integer is beyond any (and
# Python's own int() stops at 4300 digits).
_MAX_INT_DIGITS = 309
_LONG_DIGITS = re.compile(r"[0-9]{%d}" % _MAX_INT_DIGITS)


def _bounded_int(text):
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused("the body contains a number too large to represent")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Refused("the body contains a number too large to represent") from None
    return value


def _has_lone_surrogate(value):
    # json.loads joins an escaped pair into one code point, so any surrogate
    # left in a string (key or value, at any depth) is a lone one, and UTF-8
    # cannot encode it.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(raw):
    """
    Parse a JSON request body (UTF-8 bytes) strictly: no C{NaN} or
    C{Infinity}, no number beyond a double's range, no lone UTF-16
    surrogate (C{"\\ud800"}) in any key or value.

    @raise APIError: INVALID_REQUEST with a curated reason.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid("the body is not valid UTF-8") from None
    hooks = {"parse_constant": _no_constant, "parse_float": _finite_float}
    if _LONG_DIGITS.search(text):
        hooks["parse_int"] = _bounded_int
    try:
        value = json.loads(text, **hooks)
        # Only an escape can put a surrogate in a string (the text is valid UTF-8).
        surrogate = "\\u" in text and _has_lone_surrogate(value)
    except _Refused as e:
        raise invalid(str(e)) from None
    except ValueError:
        raise invalid("the body is not valid JSON") from None
    except RecursionError:
        raise invalid("the body is nested too deeply") from None
    if surrogate:
        raise invalid("the body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not a character")
    return value
