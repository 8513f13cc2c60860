"""Chain names, computed exactly as kube-proxy computes them.

Matching names is what lets a node move between kube-proxy and kproxy without a
single per-service chain being rewritten.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from kproxy.state.model import ServicePortName


def _fastest_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 beats OpenSSL's on 40-byte inputs (less set-up per call)."""
    for module in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _fastest_sha256()
_from_bytes = int.from_bytes
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def hash16(text: str) -> str:
    """kube-proxy's hash (base32 of SHA-256, first 16 characters), several times faster than
    base64.b32encode: 16 base32 characters are exactly the first 10
    digest bytes, encoded here 10 bits (two characters) at a time. Equality with naming is tested."""
    n = _from_bytes(_sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return "".join(
        [
            p[n >> 70],
            p[(n >> 60) & 1023],
            p[(n >> 50) & 1023],
            p[(n >> 40) & 1023],
            p[(n >> 30) & 1023],
            p[(n >> 20) & 1023],
            p[(n >> 10) & 1023],
            p[n & 1023],
        ]
    )


_hash = hash16


@lru_cache(maxsize=65536)
def port_proto_hash(port_name: ServicePortName) -> str:
    return _hash(str(port_name) + port_name.protocol.lower())


def svc_chain(port_name: ServicePortName) -> str:
    return "KUBE-SVC-" + port_proto_hash(port_name)


def svl_chain(port_name: ServicePortName) -> str:
    return "KUBE-SVL-" + port_proto_hash(port_name)


def ext_chain(port_name: ServicePortName) -> str:
    return "KUBE-EXT-" + port_proto_hash(port_name)


def fw_chain(port_name: ServicePortName) -> str:
    return "KUBE-FW-" + port_proto_hash(port_name)


def sep_chain(port_name: ServicePortName, hostport: str) -> str:
    """`hostport` is `Endpoint.hostport` (IPv6 in brackets)."""
    return "KUBE-SEP-" + _hash(str(port_name) + port_name.protocol.lower() + hostport)


# Chains kproxy (and kube-proxy) own outright and may flush or delete.
OWNED_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
