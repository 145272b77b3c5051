"""
Structured logs: one JSON object per line for every twisted.logger event.

Fields of the event that are plain data travel as data; the message is the
formatted text.  Nothing here knows about secrets: the code that logs never
passes them (and the tests grep every line for a canary to prove it).
"""

import json
import sys
import time
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

from clawdbot.units import rfc3339

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
_PLAIN = (str, int, float, bool, type(None))


def event_as_dict(event: LogEvent) -> dict[str, Any]:
    """The JSON-able form of one twisted.logger event."""
    level = event.get("log_level")
    out = {
        "time": rfc3339(event.get("log_time", time.time())),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in out or key == "format":
            continue
        if isinstance(value, _PLAIN):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
            out[key] = list(value)
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["traceback"] = failure.getTraceback()
    return out


class JSONLineObserver:
    """Write each event as one line of JSON to a text file."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        try:
            out = event_as_dict(event)
            line = json.dumps(out, ensure_ascii=False, default=str)
            if not line.isascii():
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:
                    # A string UTF-8 cannot carry (a lone surrogate): escaped.
                    line = json.dumps(out, default=str)
        except Exception:
            line = json.dumps({"level": "error", "message": "unloggable event"})
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (UnicodeError, ValueError, OSError):
            pass  # nowhere left to say it


def open_log(path: str) -> TextIO:
    """C{-} is standard error; anything else a file opened for appending."""
    if path == "-":
        return sys.stderr
    return open(path, "a", encoding="utf-8", buffering=1)


# The level every observer made here filters at: C{log.level}, set at start
# and again at each reload.  (The observers and this predicate provide
# twisted.logger's zope interfaces, which mypy, without a zope plugin, reads
# as base classes: hence the ignores where Twisted's hints name them.)
_LEVEL = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def set_level(level: str) -> None:
    """Log events at C{level} (C{debug}, C{info}, C{warn}, C{error}) and above from now on."""
    _LEVEL.setLogLevelForNamespace("", _LEVELS[level])


def start_logging(level: str = "info", path: str = "-") -> FilteringLogObserver:
    """Send every event from now on to JSON lines at C{path}, at C{level} and above."""
    set_level(level)
    observer = FilteringLogObserver(JSONLineObserver(open_log(path)), [_LEVEL])  # type: ignore[arg-type, list-item]
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)  # type: ignore[list-item]
    return observer


def twistd_observer() -> FilteringLogObserver:
    """
    For C{twistd --logger clawdbot.logs.twistd_observer}: JSON lines on
    standard error at C{log.level} (the config's, once the service is made).
    """
    return FilteringLogObserver(JSONLineObserver(sys.stderr), [_LEVEL])  # type: ignore[arg-type, list-item]
