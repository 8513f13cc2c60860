"""Chain names, computed exactly as kube-proxy computes them.

Matching names is what lets a node move between kube-proxy and kproxy without a
single per-service chain being rewritten.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from kproxy.state.model import ServicePortName


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


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
