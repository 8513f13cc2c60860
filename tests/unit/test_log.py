"""Log lines a person and a parser can trust: logfmt or JSON, same fields, families by name."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator

import pytest

from kproxy.infra import log
from tests.support.logfmt import LogfmtError, parse, parse_kproxy


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    logger = logging.getLogger("kproxy")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield buf
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _setup(buf: io.StringIO, fmt: str) -> None:
    log.setup("DEBUG", fmt=fmt)
    handler = logging.getLogger("kproxy").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)


HOSTILE = {
    "object": "Service demo/web",
    "reason": 'has "quotes", = signs and\na newline\ttab \x1b[31m',
    "empty": "",
    "unicode": "léast-connections",
    "none": None,
    "flag": True,
    "count": 3,
    "ratio": 0.5,
    "bad key!": "x",
}


def test_every_line_is_strict_logfmt_with_an_rfc3339_timestamp(stream: io.StringIO) -> None:
    _setup(stream, "text")
    log.warn("object_skipped", **HOSTILE)
    (line,) = stream.getvalue().splitlines()
    got = parse_kproxy(line)
    assert got["level"] == "WARNING" and got["event"] == "object_skipped"
    assert got["ts"].endswith("Z") and "T" in got["ts"]
    assert got["reason"] == HOSTILE["reason"] and got["unicode"] == "léast-connections"
    assert (got["empty"], got["none"], got["flag"], got["count"]) == ("", "", "true", "3")
    assert got["bad_key_"] == "x"


def test_json_format_has_the_same_fields_one_object_per_line(stream: io.StringIO) -> None:
    _setup(stream, "json")
    log.info("synced", services="demo/web,demo/api", family=4, count=2)
    log.warn("object_skipped", **HOSTILE)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["event"] == "synced" and first["family"] == "IPv4" and first["count"] == 2
    assert list(first)[:3] == ["ts", "level", "event"]
    assert second["reason"] == HOSTILE["reason"] and second["flag"] is True


@pytest.mark.parametrize(
    ("value", "shown"), [(4, "IPv4"), (6, "IPv6"), (socket.AF_INET, "IPv4"), (socket.AF_INET6, "IPv6")]
)
def test_families_are_named_as_kube_proxy_names_them(stream: io.StringIO, value: int, shown: str) -> None:
    _setup(stream, "text")
    log.info("iptables_synced", family=value, ip_family=value)
    got = parse_kproxy(stream.getvalue().strip())
    assert (got["family"], got["ip_family"]) == (shown, shown)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="logging format"):
        log.setup("INFO", fmt="xml")


@pytest.mark.parametrize(
    "line",
    [
        "ts=2026-11-30 22:13:01,143 level=INFO event=x",  # the old timestamp: an unquoted space
        'a="unterminated',
        "a=1  b=2",
        "a=1 a=2",
        "=x",
        'a=b"c',
    ],
)
def test_the_strict_reader_refuses_what_a_logfmt_library_would_misread(line: str) -> None:
    with pytest.raises(LogfmtError):
        parse_kproxy(line) if line.startswith("ts=") else parse(line)
