"""Conntrack helpers only tests use: the pyroute2 client that cross-checks `NetlinkConntrack`,
an in-memory table, and the "does this sync warrant a cleanup" predicate."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from kproxy.netfilter.conntrack import _AF, Flow
from kproxy.state.model import Family, PortEntry, ServiceKey


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
