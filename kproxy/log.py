"""Structured logs: one event per line, `key=value`, the object's namespace/name among them."""

from __future__ import annotations

import logging
import sys
from typing import Any

_logger = logging.getLogger("kproxy")


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(level: int, name: str, **fields: Any) -> None:
    if not _logger.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts.extend(f"{k}={_fmt(v)}" for k, v in fields.items())
    _logger.log(level, " ".join(parts))


def info(name: str, **fields: Any) -> None:
    event(logging.INFO, name, **fields)


def warn(name: str, **fields: Any) -> None:
    event(logging.WARNING, name, **fields)


def error(name: str, **fields: Any) -> None:
    event(logging.ERROR, name, **fields)


def debug(name: str, **fields: Any) -> None:
    event(logging.DEBUG, name, **fields)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Send kproxy's events to stderr; `fmt` is "text" (logfmt) or "json" (kube-proxy's --logging-format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ts=%(asctime)s level=%(levelname)s %(message)s"))
    root = logging.getLogger("kproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
