"""Conntrack helpers for tests and bench/conntrack_bench.py: the pyroute2 client that cross-checks
`NetlinkConntrack`, an in-memory table, the "does this sync warrant a cleanup" predicate, service
ports and endpoints in one line, and a node namespace with a pod behind it and kube-proxy-style DNAT."""

from __future__ import annotations

import contextlib
import errno
import secrets
import socket
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from kproxy.netfilter.conntrack import _AF, Flow
from kproxy.state.model import (
    Endpoint,
    Family,
    L4Protocol,
    PortEntry,
    ServiceKey,
    ServicePort,
    ServicePortName,
)
from tests.support.netns import create_netns, delete_netns, exec_in, ip_batch


def udp_services(ports: Iterable[PortEntry]) -> frozenset[ServiceKey]:
    return frozenset(sp.name.service for sp, _ in ports if sp.protocol == "UDP")


def cleanup_needed(
    changed: Iterable[ServiceKey], before: Iterable[PortEntry], after: Iterable[PortEntry]
) -> bool:
    """kube-proxy runs the reconciler when a service whose endpoints changed had or has a UDP port."""
    changed = set(changed)
    if not changed:
        return False
    return not changed.isdisjoint(udp_services(before) | udp_services(after))


class PyrouteConntrack:
    """The same through pyroute2's high-level Conntrack API: simple, but slow on big tables (see above).

    Kept as a cross-check for `NetlinkConntrack` and as a fallback.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _open(self, family: Family) -> Any:
        from pyroute2 import Conntrack

        kwargs: dict[str, Any] = {"nfgen_family": _AF[family]}
        if self.netns is not None:
            kwargs.update(netns=self.netns, flags=0)  # flags=0: never create the namespace
        return Conntrack(**kwargs)

    def list_udp(self, family: Family) -> list[Flow]:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        ct = self._open(family)
        try:
            match = NFCTAttrTuple(family=_AF[family], proto=socket.IPPROTO_UDP)
            out = []
            for e in ct.dump_entries(tuple_orig=match):
                o, r = e.tuple_orig, e.tuple_reply
                if o.proto == socket.IPPROTO_UDP:
                    out.append(
                        Flow(family, o.saddr, o.daddr, o.sport, o.dport, r.saddr, e.zone or 0, r.sport)
                    )
            return out
        finally:
            ct.close()

    def delete(self, flows: Sequence[Flow]) -> int:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        by_family: dict[Family, list[Flow]] = {}
        for f in flows:
            by_family.setdefault(f.family, []).append(f)
        deleted = 0
        for family, group in by_family.items():
            ct = self._open(family)
            try:
                for f in group:
                    tup = NFCTAttrTuple(
                        family=_AF[family],
                        saddr=f.src,
                        daddr=f.dst,
                        proto=socket.IPPROTO_UDP,
                        sport=f.sport,
                        dport=f.dport,
                    )
                    try:
                        ct.entry("del", tuple_orig=tup)
                    except NetlinkError as exc:
                        if exc.code == errno.ENOENT:
                            continue
                        raise OSError(exc.code, f"conntrack delete {f}: {exc}") from exc
                    deleted += 1
            finally:
                ct.close()
        return deleted


@dataclass
class FakeConntrack:
    """An in-memory table: tests put flows in and look at what is left."""

    flows: list[Flow] = field(default_factory=list)
    deleted: list[Flow] = field(default_factory=list)

    def list_udp(self, family: Family) -> list[Flow]:
        return [f for f in self.flows if f.family == family]

    def delete(self, flows: Sequence[Flow]) -> int:
        n = 0
        for f in flows:
            if f in self.flows:
                self.flows.remove(f)
                self.deleted.append(f)
                n += 1
        return n


VIP = "10.96.0.10"


def sp(
    name: str = "dns",
    proto: L4Protocol = "UDP",
    ip: str = VIP,
    port: int = 53,
    node_port: int = 0,
    external: Sequence[str] = (),
    lb: Sequence[str] = (),
) -> ServicePort:
    return ServicePort(
        name=ServicePortName("kube-system", name, "", proto),
        family=6 if ":" in ip else 4,
        cluster_ip=ip,
        port=port,
        node_port=node_port,
        external_ips=tuple(external),
        load_balancer_ips=tuple(lb),
    )


def ep(
    ip: str, serving: bool = True, ready: bool | None = None, terminating: bool = False, port: int = 5353
) -> Endpoint:
    return Endpoint(
        ip=ip, port=port, ready=serving if ready is None else ready, serving=serving, terminating=terminating
    )


NODE_IP, POD_IP, NEW_POD_IP = "10.250.0.1", "10.250.0.2", "10.250.0.3"
VIP_DEAD, VIP_LIVE, NODE_PORT = "10.96.0.10", "10.96.0.11", 30053
NODE_IP6, POD_IP6, NEW_POD_IP6, VIP6 = "fd00:250::1", "fd00:250::2", "fd00:250::3", "fd00:96::a"


@contextlib.contextmanager
def node_and_pod() -> Iterator[tuple[str, str]]:
    """A node namespace with a pod namespace behind a veth; DNAT rules as kube-proxy would write them.

    The pod namespace holds both the old endpoint's address and its replacement's.
    """
    tag = "kphc" + secrets.token_hex(3)
    node, pod = f"{tag}-node", f"{tag}-pod"
    try:
        create_netns(node)
        create_netns(pod)
        subprocess.run(
            ["ip", "-n", node, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", pod],
            check=True,
            capture_output=True,
            timeout=30,
        )
        ip_batch(
            node,
            [
                "link set lo up",
                "link set veth0 up",
                f"addr add {NODE_IP}/24 dev veth0",
                "route add default dev veth0",
                f"addr add {NODE_IP6}/64 dev veth0 nodad",
                "route add ::/0 dev veth0",
            ],
        )
        ip_batch(
            pod,
            [
                "link set lo up",
                "link set eth0 up",
                f"addr add {POD_IP}/24 dev eth0",
                f"addr add {NEW_POD_IP}/24 dev eth0",
                f"addr add {POD_IP6}/64 dev eth0 nodad",
            ],
        )
        for rule in (
            f"-d {VIP_DEAD}/32 -p udp --dport 53 -j DNAT --to-destination {POD_IP}:5353",
            f"-d {VIP_LIVE}/32 -p udp --dport 53 -j DNAT --to-destination {POD_IP}:5353",
            f"-d {NODE_IP}/32 -p udp --dport {NODE_PORT} -j DNAT --to-destination {POD_IP}:5353",
        ):
            exec_in(node, ["iptables-nft", "-t", "nat", "-A", "OUTPUT", *rule.split()])
        v6 = f"-d {VIP6}/128 -p udp --dport 53 -j DNAT --to-destination [{POD_IP6}]:5353"
        exec_in(node, ["ip6tables-nft", "-t", "nat", "-A", "OUTPUT", *v6.split()])
        yield node, pod
    finally:
        delete_netns(pod)
        delete_netns(node)
