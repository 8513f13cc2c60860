"""kube-proxy's chain names one at a time, written straight from its proxier: the oracle the
renderer's batched, cached naming (`naming.sep_chains`, `hash16`) is checked against."""

from __future__ import annotations

from functools import lru_cache

from kproxy.backends.iptables.naming import hash16 as _hash
from kproxy.state.model import ServicePortName


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
