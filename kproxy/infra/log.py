"""Structured logs: one event per line, the object's namespace/name among the fields.

Two encodings of the same fields, so a parser never has to guess:

- text (the default): logfmt, `ts=2026-12-04T17:30:00.123Z level=INFO event=synced key=value ...`.
  Keys are made of letters, digits, `_`, `-`, `.` and `/`; a value is written bare only when
  it holds nothing a logfmt reader would split on, otherwise quoted with JSON's escapes.
- json (kube-proxy's `--logging-format json`): one JSON object per line, same keys, numbers
  and booleans kept as such.

Address families are written as kube-proxy writes them, `IPv4` / `IPv6`, whether the caller
passed 4/6 or a socket family (AF_INET is 2, which once reached the logs as `family=2`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import sys
from datetime import UTC, datetime
from typing import Any

_logger = logging.getLogger("kproxy")

_FIELDS = "kproxy_fields"
"""LogRecord attribute carrying the event's fields for the formatters."""

_BARE: re.Pattern[str] = re.compile(r"[\w.:/@+,\-\[\]()*]+", re.ASCII)
_KEY_BAD: re.Pattern[str] = re.compile(r"[^\w.\-/]", re.ASCII)
_FAMILY_NAMES: dict[int, str] = {
    4: "IPv4",
    6: "IPv6",
    int(socket.AF_INET): "IPv4",
    int(socket.AF_INET6): "IPv6",
}


def _family(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return _FAMILY_NAMES.get(int(value), value)
    return value


def _plain(key: str, value: Any) -> Any:
    """A field value as it is logged: JSON scalars kept, families named, anything else as text."""
    if key == "family" or key.endswith("_family"):
        value = _family(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _key(key: str) -> str:
    return _KEY_BAD.sub("_", key) or "_"


def _fmt(value: Any) -> str:
    """One logfmt value: bare when safe, else a JSON-quoted string (every logfmt reader takes its escapes)."""
    if value is None:
        return '""'
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: `2026-12-04T17:30:00.123Z`."""
    t = datetime.fromtimestamp(created, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    got = getattr(record, _FIELDS, None)
    if got is None:
        return "log", {"msg": record.getMessage()}
    name, fields = got
    return name, fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name, fields = _fields(record)
        parts = [f"ts={timestamp(record.created)}", f"level={record.levelname}", f"event={_fmt(name)}"]
        parts.extend(f"{k}={_fmt(v)}" for k, v in fields.items())
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name, fields = _fields(record)
        out: dict[str, Any] = {"ts": timestamp(record.created), "level": record.levelname, "event": name}
        for k, v in fields.items():
            out.setdefault(k, v)
        return json.dumps(out, ensure_ascii=False, allow_nan=False, default=str)


def event(level: int, name: str, **fields: Any) -> None:
    if not _logger.isEnabledFor(level):
        return
    clean = {_key(k): _plain(k, v) for k, v in fields.items()}
    for k, v in clean.items():
        if isinstance(v, float) and not math.isfinite(v):
            clean[k] = str(v)
    # The message is the logfmt body, for handlers that only read getMessage().
    body = " ".join([f"event={_fmt(name)}", *(f"{k}={_fmt(v)}" for k, v in clean.items())])
    _logger.log(level, "%s", body, extra={_FIELDS: (name, clean)})


def info(name: str, **fields: Any) -> None:
    event(logging.INFO, name, **fields)


def warn(name: str, **fields: Any) -> None:
    event(logging.WARNING, name, **fields)


def error(name: str, **fields: Any) -> None:
    event(logging.ERROR, name, **fields)


def debug(name: str, **fields: Any) -> None:
    event(logging.DEBUG, name, **fields)


FORMATS = ("text", "json")


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Send kproxy's events to stderr; `fmt` is "text" (logfmt) or "json" (kube-proxy's --logging-format)."""
    if fmt not in FORMATS:
        raise ValueError(f"logging format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger("kproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
