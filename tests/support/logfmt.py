"""A small strict logfmt reader for tests: a line that a logfmt library would misread fails here.

Grammar (go-logfmt's): pairs separated by single spaces; a key is one or more of letters,
digits, `_ - . /`; a value is bare (no space, `=`, `"` or control character) or a double-quoted
string with JSON escapes. Every line kproxy writes must also carry ts (RFC 3339), level and
event, and keys may not repeat.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

_KEY = re.compile(r"[A-Za-z0-9_\-./]+")
_BARE = re.compile(r'[^\s="\x00-\x1f\x7f]+')
_QUOTED = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")


class LogfmtError(ValueError):
    pass


def parse(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        k = _KEY.match(line, i)
        if k is None:
            raise LogfmtError(f"bad key at column {i}: {line!r}")
        key = k.group()
        i = k.end()
        if i >= n or line[i] != "=":
            raise LogfmtError(f"key {key!r} has no '=' at column {i}: {line!r}")
        i += 1
        if i < n and line[i] == '"':
            q = _QUOTED.match(line, i)
            if q is None:
                raise LogfmtError(f"bad quoted value for {key!r} at column {i}: {line!r}")
            value = json.loads(q.group())
            i = q.end()
        else:
            b = _BARE.match(line, i)
            value = "" if b is None else b.group()
            i = i if b is None else b.end()
        if key in out:
            raise LogfmtError(f"key {key!r} repeated: {line!r}")
        out[key] = value
        if i < n:
            if line[i] != " " or i + 1 >= n or line[i + 1] == " ":
                raise LogfmtError(f"pairs must be separated by one space (column {i}): {line!r}")
            i += 1
    return out


def parse_kproxy(line: str) -> dict[str, str]:
    """A kproxy log line: valid logfmt with ts (RFC 3339), level and event first."""
    fields = parse(line)
    if list(fields)[:3] != ["ts", "level", "event"]:
        raise LogfmtError(f"ts, level, event must come first: {line!r}")
    if not RFC3339.fullmatch(fields["ts"]):
        raise LogfmtError(f"ts is not RFC 3339: {line!r}")
    datetime.fromisoformat(fields["ts"].replace("Z", "+00:00"))
    return fields
