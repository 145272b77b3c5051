"""
Durations and sizes in human units (C{120s}, C{5m}, C{20MB}).

Pure functions: no I/O, so they are tested directly and with hypothesis.
"""

import datetime
import re
import time
import zoneinfo

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """
    Seconds (a float) from C{"120s"}, C{"5m"}, C{"250ms"}, C{"1h"}, C{"2d"} or
    a bare number of seconds.

    @raise ValueError: with a short reason when the value is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '5m'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '30s' or '5m'")
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (use ms, s, m, h or d)")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit]


def parse_size(value: object) -> int:
    """
    Bytes (an int) from C{"20MB"}, C{"512KiB"}, C{"1GB"} or a bare number of
    bytes.  C{KB}/C{MB}/C{GB} are decimal, C{KiB}/C{MiB}/C{GiB} binary.

    @raise ValueError: with a short reason when the value is not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as '20MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as '20MB'")
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (use B, KB, MB, GB, KiB, MiB or GiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def format_duration(seconds: float) -> str:
    """The shortest exact human spelling of C{seconds}, for printing configs."""
    if seconds == int(seconds):
        seconds = int(seconds)
        for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds and seconds % factor == 0:
                return f"{seconds // factor}{unit}"
        return f"{seconds}s"
    millis = seconds * 1000
    if millis == int(millis):
        return f"{int(millis)}ms"
    return f"{seconds}s"


def format_size(size: int) -> str:
    """The shortest exact human spelling of C{size} bytes."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def rfc3339(t: float, digits: int = 3) -> str:
    """
    The UTC time C{t} (seconds since the epoch) as RFC 3339, with C{digits}
    (3 or 6) of the second's fraction.  The time is rounded as a whole
    first, so a fraction that rounds up carries into the seconds.
    """
    scale = 10**digits
    ticks = round(t * scale)
    seconds, fraction = divmod(ticks, scale)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:0{digits}d}Z"


# --- calendar windows (usage by day, quotas by day, week and month) --------

WINDOWS = ("day", "week", "month")


def hour_of(t: float) -> int:
    """The start of the hour the instant C{t} falls in (POSIX seconds)."""
    return int(t // 3600) * 3600


def zone_of(name: str) -> "datetime.tzinfo":
    """
    The time zone an IANA name names (C{UTC}, C{Asia/Shanghai}).

    @raise ValueError: when there is no such zone.
    """
    if name == "UTC":
        return datetime.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ValueError(name) from None


def window_bounds(kind: str, t: float, zone: "datetime.tzinfo") -> tuple[float, float]:
    """
    The calendar C{kind} (C{day}, C{week} from Monday, C{month}) that the
    instant C{t} falls in, in C{zone}: its start and its end (POSIX seconds).
    """
    local = datetime.datetime.fromtimestamp(t, zone)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        end = start + datetime.timedelta(days=1)
    elif kind == "week":
        start -= datetime.timedelta(days=start.weekday())
        end = start + datetime.timedelta(days=7)
    elif kind == "month":
        start = start.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(kind)
    # Midnight is read again in the zone, so a day across a change of
    # offset (summer time) is as long as it really is.
    return _instant(start, zone), _instant(end, zone)


def _instant(local: "datetime.datetime", zone: "datetime.tzinfo") -> float:
    return datetime.datetime(local.year, local.month, local.day, tzinfo=zone).timestamp()


def local_date(t: float, zone: "datetime.tzinfo") -> str:
    """The date (C{YYYY-MM-DD}) of the instant C{t} in C{zone}."""
    return datetime.datetime.fromtimestamp(t, zone).date().isoformat()


def day_start(date: str, zone: "datetime.tzinfo") -> float:
    """
    When the date C{YYYY-MM-DD} begins in C{zone}.

    @raise ValueError: when C{date} is not such a date.
    """
    if not isinstance(date, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(date)
    day = datetime.date.fromisoformat(date)
    return datetime.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
