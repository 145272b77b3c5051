"""
Strict JSON for request bodies: what RFC 8259 allows and nothing more.

Python's C{json.loads} accepts C{NaN} and C{Infinity}, numbers beyond a
double's range, and lone UTF-16 surrogate escapes (C{"\\ud800"}) that no
UTF-8 writer can encode later.  L{parse_json} refuses each with a curated
reason, so nothing past the parser meets them.  Pure: no I/O.

A big body is parsed on a worker thread (L{clawdbot.http.resource.JSONParsers}), and
the parse is shaped so that the thread gives the interpreter lock back
often: every number goes through a Python hook (a chance to switch
threads), the lone-surrogate check reads the escapes in the text instead of
re-encoding the parsed value, and a body with more than L{MAX_CONTAINERS}
arrays and objects (millions of C{[]} allocate for seconds inside C, lock
held, and take hundreds of megabytes) is refused.
"""

import json
import json.decoder
import json.scanner
import math
import re
from collections.abc import Callable
from typing import Any, NoReturn

import orjson

from clawdbot.errors import invalid


class _Refused(ValueError):
    """A JSON document the parser reads but the gateway does not accept."""


def _no_constant(name: str) -> NoReturn:
    raise _Refused(f"the body contains {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    if not text.isascii():
        # Only the pure-Python scanner's number pattern reads other digits.
        raise _Refused("the body is not valid JSON")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("the body contains a number too large to represent")
    return value


# The largest double has 309 digits; a longer integer is beyond any (and
# Python's own int() stops at 4300 digits).
_MAX_INT_DIGITS = 309

# Arrays and objects in one body.  Far beyond any real request (a long
# conversation with tools has a few per message); a 20 MB body of C{[],}
# would be 6.6 million lists.
MAX_CONTAINERS = 100_000
# Values in arrays and objects of one body, counted by the pure-Python
# scanner; a tool schema with a million keys would cost the reactor a third
# of a second to encode again for Ollama.
MAX_ELEMENTS = 200_000
# Separators (C{,} and C{:}) beyond which a body goes to the pure-Python
# scanner: the C scanner holds the interpreter lock for a whole object or
# array of keys, C{null}s and strings (0.7 s for a million keys), the
# Python one lets other threads in between values.
DENSE = 50_000
# Levels of nesting in one body.  A JSON schema of a tool is a dozen deep at
# most; what is parsed must also be encoded again (for Ollama, for a log
# line) by recursive code, which needs the headroom.
MAX_DEPTH = 128


def _bounded_int(text: str) -> int:
    if not text.isascii():
        raise _Refused("the body is not valid JSON")
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused("the body contains a number too large to represent")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Refused("the body contains a number too large to represent") from None
    return value


# A \u escape of a UTF-16 surrogate (U+D800-U+DFFF), and of a low one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LOW_ESCAPE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def has_lone_surrogate(text: str) -> bool:
    """
    C{text}, a valid JSON document, has a C{\\u} escape of a UTF-16
    surrogate that is not half of a pair: a high one (C{\\ud800}-C{\\udbff})
    not followed at once by an escaped low one, or a low one alone.  The
    same rule as C{json}'s decoder, which joins exactly such pairs, read off
    the text.  C{\\\\ud800} is an escaped backslash and the text C{ud800}:
    a backslash escapes C{u} only after an even run of backslashes.
    """
    pos = 0
    while True:
        match = _SURROGATE_ESCAPE.search(text, pos)
        if match is None:
            return False
        start = match.start()
        run = start
        while run > 0 and text[run - 1] == "\\":
            run -= 1
        if (start - run) % 2:
            pos = start + 1  # this backslash is escaped: not an escape
            continue
        if match.group()[3] in "cdefCDEF":
            return True  # a low half with no high half just before it
        low = _LOW_ESCAPE.match(text, match.end())
        if low is None:
            return True
        pos = low.end()


def _python_decoder(hooks: dict[str, Any]) -> json.JSONDecoder:
    """
    A decoder on json's pure-Python scanner (strings still go through the
    C string scanner) that refuses the body at its L{MAX_CONTAINERS}+1st
    array or object, before allocating the rest; every value is a chance
    for the parsing thread to let others run.
    """
    # The scanner's internals set below (memo, parse_object, scan_once...) have no types.
    decoder: Any = json.JSONDecoder(**hooks)
    count = [0]
    elements = [0]

    def counted(parse: Callable[..., tuple[Any, int]]) -> Callable[..., tuple[Any, int]]:
        def parse_container(*args: Any, **kwargs: Any) -> tuple[Any, int]:
            count[0] += 1
            if count[0] > MAX_CONTAINERS:
                raise _Refused(f"the body has more than {MAX_CONTAINERS} arrays and objects")
            result = parse(*args, **kwargs)
            if isinstance(result[0], list):
                # (An object's keys were counted as they were read.)
                elements[0] += len(result[0])
            if elements[0] > MAX_ELEMENTS:
                raise _Refused(f"the body has more than {MAX_ELEMENTS} values in its arrays and objects")
            return result

        return parse_container

    class KeyCounter(dict):
        # The scanner interns every object key through memo.setdefault: a
        # chance to refuse an object of a million keys while it is read.
        def setdefault(self, key: Any, default: Any = None) -> Any:
            elements[0] += 1
            if elements[0] > MAX_ELEMENTS:
                raise _Refused(f"the body has more than {MAX_ELEMENTS} values in its arrays and objects")
            return super().setdefault(key, default)

    decoder.memo = KeyCounter()
    decoder.parse_object = counted(json.decoder.JSONObject)  # type: ignore[attr-defined]
    decoder.parse_array = counted(json.decoder.JSONArray)  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def parse_json(raw: bytes) -> Any:
    """
    Parse a JSON request body (UTF-8 bytes) strictly: no C{NaN} or
    C{Infinity}, no number beyond a double's range, no lone UTF-16
    surrogate (C{"\\ud800"}) in any key or value, at most L{MAX_CONTAINERS}
    arrays and objects.

    @raise APIError: INVALID_REQUEST with a curated reason.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid("the body is not valid UTF-8") from None
    if not text.strip(" \t\r\n"):
        raise invalid("the body is empty; a JSON object is expected")
    hooks: dict[str, Any] = {"parse_constant": _no_constant, "parse_float": _finite_float, "parse_int": _bounded_int}
    try:
        # Each [ or { outside a string opens a container, so their count in
        # the whole text bounds the containers from above: under the cap,
        # the fast C scanner; else the counting one.
        if text.count("[") + text.count("{") <= MAX_CONTAINERS and text.count(",") + text.count(":") <= DENSE:
            value = json.loads(text, **hooks)
        else:
            value = _python_decoder(hooks).decode(text)
        # Only an escape can put a surrogate in a string (the text is valid UTF-8).
        surrogate = has_lone_surrogate(text)
    except _Refused as e:
        raise invalid(str(e)) from None
    except ValueError:
        raise invalid("the body is not valid JSON") from None
    except RecursionError:
        raise invalid("the body is nested too deeply") from None
    if surrogate:
        raise invalid("the body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not a character")
    if _too_deep(value):
        raise invalid(f"the body is nested too deeply (more than {MAX_DEPTH} levels)")
    if "\\u0000" in text and _has_nul(value):
        # JSON forbids a raw NUL in a string, so only an escape puts one
        # there; PostgreSQL cannot store it and no chat needs it.
        raise invalid("the body contains a NUL character (\\u0000)")
    return value


def _too_deep(value: Any) -> bool:
    """Whether arrays and objects nest more than L{MAX_DEPTH} levels in a parsed value."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


# The exact parser for what orjson would change: it refuses what orjson
# refuses (non-finite numbers, NaN and Infinity; lone surrogates, below).
_CHECKED = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
# orjson keeps integers exact from -2**63 to 2**64 - 1 only.  Twenty digits
# in a row, or a minus and nineteen (in a number or in a string; a regular
# expression costs eight times as much), may be beyond that.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TWENTY_DIGITS = b"0" * 20
_MINUS_NINETEEN_DIGITS = b"-" + b"0" * 19


def loads_checked(raw: str | bytes) -> Any:
    """
    Parse JSON another party sent (the model backend's replies, stream
    lines and tool arguments, an identity provider's documents, a body
    being logged): standard JSON only (no C{NaN} or C{Infinity}, which
    clients' parsers refuse), nested at most L{MAX_DEPTH} levels, so that
    what is parsed can be encoded again.

    @raise ValueError: for anything else (the caller's curated error).
    """
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    digits = data.translate(_DIGITS_AS_ZERO)
    if digits.find(_TWENTY_DIGITS) < 0 and digits.find(_MINUS_NINETEEN_DIGITS) < 0:
        # orjson: the stream's hot path (a line per token), a fifth of the
        # standard parser's time.  It refuses what the standard one would
        # take with a hook (NaN, Infinity, numbers beyond a double) and more
        # (lone surrogates, which no UTF-8 writer could encode later).
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ValueError("not standard JSON") from None
    else:
        # Such an integer would come back as a float: the standard parser keeps it exact.
        try:
            # (One decoder for every call: json.loads with a hook builds a new one each time.)
            if isinstance(raw, bytes):
                text = raw.decode("utf-8")
            else:
                raw.encode("utf-8")  # (refuses a lone surrogate character; the escapes are read below)
                text = raw
            if has_lone_surrogate(text):
                raise ValueError("not standard JSON")
            value = _CHECKED.decode(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
    # Each level opens a bracket: a text with few cannot be too deep.
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets >= MAX_DEPTH and _too_deep(value):
        raise ValueError("nested too deeply")
    return value


def _has_nul(value: Any) -> bool:
    """Whether a NUL character is in any key or string of a parsed value."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
