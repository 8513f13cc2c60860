"""Stale UDP conntrack cleanup: make UDP clients notice at once that an endpoint went away.

UDP has no connection for the kernel to tear down, so a conntrack entry that
DNATs a client's flow to a deleted pod keeps black-holing it (a DNS client
reusing its source port waits out the whole UDP timeout) unless someone deletes
the entry. kproxy does what kube-proxy's conntrack reconciler
(pkg/proxy/conntrack/cleanup.go) does after a sync that changed the endpoints of
a service with a UDP port: walk every UDP entry of the family and delete

  * those whose original destination IP *and port* are a UDP service port's
    cluster IP, external IP or load-balancer IP with its port, and whose reply
    source IP and port are not a serving endpoint of it;
  * those whose original destination port is a UDP service's node port, and
    whose reply source IP and port are not a serving endpoint of it.

Matching on the port on both sides means a flow to another port of the same IP
is never judged by the wrong service port, and a changed targetPort is noticed:
the flow DNATed to the pod's old port is deleted although the pod IP stayed.
A UDP service port with no serving endpoint at all is left alone: its flows
have nowhere better to go, and deleting them would only make clients resend
into the REJECT rule.

Deliberately not considered, as in kube-proxy: traffic policies, topology and
terminating state (a serving terminating endpoint keeps its flows, as TCP
connections would), and services that were deleted altogether (their flows age
out, as TCP ones would). The decision needs only the current state, so there is
no old/new diff: a missed run is repaired by the next one. One refinement: if
two service ports ever claim the same frontend (IP and port, or node port),
kproxy uses the union of their serving endpoints, so the outcome does not depend
on iteration order as kube-proxy's map visit does.

Pure part: `serving_sets(ports)` and `stale_flows(flows, serving)`.
I/O part: `ConntrackClient` (list UDP flows of a family, delete some), with
`NetlinkConntrack` speaking ctnetlink on a netlink socket (no `conntrack`
binary; optionally in a named network namespace, opened through pyroute2).
(tests/support/conntrack.py holds a pyroute2-based cross-check and an in-memory fake.)
The agent calls, after a sync of `family` that changed a UDP service port:

    result = await clean_stale_entries_async(client, family, view.values())
    metrics.conntrack_cleaned(family, deleted=result.deleted, seconds=result.seconds)
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK

from kproxy.infra import log
from kproxy.state.model import Family, PortEntry

"""`build.view(...).values()`: each service port of one family with all its endpoints (before topology)."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One UDP conntrack entry: the client's original tuple and who the kernel expects replies from."""

    family: Family
    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    zone: int = 0
    """Conntrack zone; Kubernetes nodes normally use only zone 0."""
    reply_sport: int = 0
    """The reply tuple's source port: the endpoint's port after DNAT."""


EndpointAddr = tuple[str, int]
"""An endpoint as conntrack's reply tuple shows it: (IP, port)."""


@dataclass(frozen=True, slots=True)
class ServingSets:
    by_frontend: Mapping[tuple[str, int], frozenset[EndpointAddr]]
    """(service IP, port) for cluster, external and load-balancer IPs -> serving endpoints."""
    by_node_port: Mapping[int, frozenset[EndpointAddr]]
    """UDP node port -> serving endpoints."""


def _norm(ip: str) -> str:
    return ipaddress.ip_address(ip).compressed if ":" in ip else ip


def serving_sets(ports: Iterable[PortEntry]) -> ServingSets:
    """The frontends of UDP service ports that have at least one serving endpoint."""
    by_frontend: dict[tuple[str, int], set[EndpointAddr]] = {}
    by_node_port: dict[int, set[EndpointAddr]] = {}
    for sp, endpoints in ports:
        if sp.protocol != "UDP":
            continue
        serving = {(_norm(ep.ip), ep.port) for ep in endpoints if ep.serving}
        if not serving:
            continue
        for ip in (sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips):
            if ip:
                by_frontend.setdefault((_norm(ip), sp.port), set()).update(serving)
        if sp.node_port:
            by_node_port.setdefault(sp.node_port, set()).update(serving)
    return ServingSets(
        {k: frozenset(v) for k, v in by_frontend.items()},
        {k: frozenset(v) for k, v in by_node_port.items()},
    )


def stale_flows(flows: Iterable[Flow], serving: ServingSets) -> list[Flow]:
    out = []
    for f in flows:
        backend = (f.reply_src, f.reply_sport)
        eps = serving.by_frontend.get((f.dst, f.dport))
        if eps is not None and backend not in eps:
            out.append(f)
            continue
        eps = serving.by_node_port.get(f.dport)
        if eps is not None and backend not in eps:
            out.append(f)
    return out


# ------------------------------------------------------------------ I/O


class ConntrackClient(Protocol):
    def list_udp(self, family: Family) -> list[Flow]: ...

    def delete(self, flows: Sequence[Flow]) -> int:
        """Delete these entries; returns how many existed and went away (vanished ones are not errors)."""
        ...


@dataclass(frozen=True, slots=True)
class CleanupResult:
    family: Family
    examined: int
    deleted: int
    seconds: float
    error: str = ""


def clean_stale_entries(client: ConntrackClient, family: Family, ports: Iterable[PortEntry]) -> CleanupResult:
    """One reconciler pass; never raises for kernel errors (it reports them; the next pass retries)."""
    start = time.monotonic()
    try:
        flows = client.list_udp(family)
        stale = stale_flows(flows, serving_sets(ports))
        deleted = client.delete(stale) if stale else 0
    except (OSError, NetlinkError) as exc:
        took = time.monotonic() - start
        log.error("conntrack_cleanup_failed", family=family, error=str(exc))
        return CleanupResult(family, 0, 0, took, str(exc))
    took = time.monotonic() - start
    if stale:
        log.info(
            "conntrack_cleaned", family=family, examined=len(flows), deleted=deleted, seconds=round(took, 4)
        )
    return CleanupResult(family, len(flows), deleted, took)


async def clean_stale_entries_async(
    client: ConntrackClient, family: Family, ports: Iterable[PortEntry]
) -> CleanupResult:
    """The same in a worker thread: a dump of a big table takes a while, and pyroute2's
    synchronous API runs an event loop of its own, which cannot nest."""
    snapshot = list(ports)
    return await asyncio.to_thread(clean_stale_entries, client, family, snapshot)


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

# Netlink and ctnetlink wire constants (linux/netlink.h, linux/netfilter/nfnetlink_conntrack.h).
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF
_CT_NEW = NFNL_SUBSYS_CTNETLINK << 8
"""Also the type of each entry a dump returns."""
_CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | 1
_CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | 2
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_ZONE, _CTA_FILTER = 1, 2, 18, 25
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3
_CTA_FILTER_ORIG_FLAGS = 1
_FILTER_PROTO_NUM = 1 << 3
_IP_ATTRS = {4: (1, 2), 6: (3, 4)}  # CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST
_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_BE16 = struct.Struct("!H")
_BATCH = 256


def _nla(kind: int, payload: bytes) -> bytes:
    pad = -len(payload) % 4
    return _NLA.pack(4 + len(payload), kind) + payload + b"\0" * pad


def _nest(kind: int, *parts: bytes) -> bytes:
    return _nla(kind | _NLA_F_NESTED, b"".join(parts))


def _message(msg_type: int, flags: int, seq: int, family: Family, attrs: bytes) -> bytes:
    body = _NFGEN.pack(_AF[family], 0, 0) + attrs
    return _HDR.pack(_HDR.size + len(body), msg_type, flags, seq, 0) + body


def _udp_tuple(family: Family, src: str, dst: str, sport: int, dport: int) -> bytes:
    a_src, a_dst = _IP_ATTRS[family]
    af = _AF[family]
    return _nest(
        _CTA_TUPLE_ORIG,
        _nest(_CTA_TUPLE_IP, _nla(a_src, socket.inet_pton(af, src)), _nla(a_dst, socket.inet_pton(af, dst))),
        _nest(
            _CTA_TUPLE_PROTO,
            _nla(_CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP])),
            _nla(_CTA_PROTO_SRC_PORT, _BE16.pack(sport)),
            _nla(_CTA_PROTO_DST_PORT, _BE16.pack(dport)),
        ),
    )


def _messages(view: memoryview, n: int) -> Iterator[tuple[int, int, int, int]]:
    """(offset, length, type, seq) of each netlink message in the first `n` bytes of one read."""
    off = 0
    while off + _HDR.size <= n:
        length, kind, _flags, seq, _pid = _HDR.unpack_from(view, off)
        if length < _HDR.size:
            return
        yield off, length, kind, seq
        off += (length + 3) & ~3


def _attrs(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & _NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def _tuple(buf: memoryview, start: int, end: int, family: Family) -> tuple[str, str, int, int, int]:
    """(src, dst, protocol, sport, dport) of a CTA_TUPLE_* payload."""
    src = dst = ""
    proto = sport = dport = 0
    a_src, a_dst = _IP_ATTRS[family]
    af = _AF[family]
    for kind, s, e in _attrs(buf, start, end):
        if kind == _CTA_TUPLE_IP:
            for k2, s2, e2 in _attrs(buf, s, e):
                if k2 == a_src:
                    src = socket.inet_ntop(af, buf[s2:e2])
                elif k2 == a_dst:
                    dst = socket.inet_ntop(af, buf[s2:e2])
        elif kind == _CTA_TUPLE_PROTO:
            for k2, s2, _e2 in _attrs(buf, s, e):
                if k2 == _CTA_PROTO_NUM:
                    proto = buf[s2]
                elif k2 == _CTA_PROTO_SRC_PORT:
                    sport = _BE16.unpack_from(buf, s2)[0]
                elif k2 == _CTA_PROTO_DST_PORT:
                    dport = _BE16.unpack_from(buf, s2)[0]
    return src, dst, proto, sport, dport


def _parse_entry(buf: memoryview, start: int, end: int, family: Family) -> Flow | None:
    """The UDP entry of one conntrack message; None for any other protocol."""
    orig = None
    reply_src = ""
    reply_sport = 0
    zone = 0
    for kind, s, e in _attrs(buf, start, end):
        if kind == _CTA_TUPLE_ORIG:
            orig = _tuple(buf, s, e, family)
            if orig[2] != socket.IPPROTO_UDP:
                return None
        elif kind == _CTA_TUPLE_REPLY:
            reply = _tuple(buf, s, e, family)
            reply_src, reply_sport = reply[0], reply[3]
        elif kind == _CTA_ZONE:
            zone = _BE16.unpack_from(buf, s)[0]
    if orig is None:
        return None
    return Flow(family, orig[0], orig[1], orig[3], orig[4], reply_src, zone, reply_sport)


class NetlinkConntrack:
    """ctnetlink spoken directly on a netlink socket: a dump of the family's UDP entries and batched deletes.

    pyroute2's conntrack API (the cross-check in tests/support/conntrack.py) decodes every attribute of
    every entry into objects, about 1.5 ms an entry here, so a 100,000-entry table
    would take minutes per pass. This reads only the fields the decision needs
    (about 100 times faster) and sends deletes in batches of 256 without a round
    trip each. pyroute2 still provides the socket for a named namespace.

    `netns`: a named namespace (/run/netns/NAME) to work in; None = the caller's.
    A socket is opened per call and closed after, so the object is cheap to keep
    and safe to use from a worker thread.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._seq = 0

    def _socket(self) -> socket.socket:
        if self.netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        else:
            from pyroute2 import netns as pyroute2_netns

            sock = pyroute2_netns.create_socket(
                self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, flags=0
            )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, 0))
        return sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def list_udp(self, family: Family) -> list[Flow]:
        with self._socket() as sock:
            try:
                return self._dump(sock, family, kernel_filter=True)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            return self._dump(sock, family, kernel_filter=False)

    def _dump(self, sock: socket.socket, family: Family, *, kernel_filter: bool) -> list[Flow]:
        attrs = b""
        if kernel_filter:
            # Kernels 5.8+ then send UDP entries only; older ones ignore the filter or refuse it.
            proto = _nla(_CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP]))
            attrs = _nest(_CTA_TUPLE_ORIG, _nest(_CTA_TUPLE_PROTO, proto)) + _nest(
                _CTA_FILTER, _nla(_CTA_FILTER_ORIG_FLAGS, struct.pack("=I", _FILTER_PROTO_NUM))
            )
        seq = self._next_seq()
        sock.send(_message(_CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, seq, family, attrs))
        flows: list[Flow] = []
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            for off, length, kind, mseq in _messages(view, sock.recv_into(buf)):
                if mseq == seq:
                    if kind == _NLMSG_DONE:
                        return flows
                    if kind == _NLMSG_ERROR:
                        code = -_ERR.unpack_from(view, off + _HDR.size)[0]
                        raise OSError(code, f"conntrack dump: {os.strerror(code)}")
                    if kind == _CT_NEW:
                        flow = _parse_entry(view, off + _HDR.size + _NFGEN.size, off + length, family)
                        if flow is not None:
                            flows.append(flow)

    def delete(self, flows: Sequence[Flow]) -> int:
        deleted = 0
        with self._socket() as sock:
            for i in range(0, len(flows), _BATCH):
                deleted += self._delete_batch(sock, flows[i : i + _BATCH])
        return deleted

    def _delete_batch(self, sock: socket.socket, flows: Sequence[Flow]) -> int:
        pending: dict[int, Flow] = {}
        out = []
        for f in flows:
            seq = self._next_seq()
            attrs = _udp_tuple(f.family, f.src, f.dst, f.sport, f.dport)
            if f.zone:
                attrs += _nla(_CTA_ZONE, _BE16.pack(f.zone))
            out.append(_message(_CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, seq, f.family, attrs))
            pending[seq] = f
        sock.send(b"".join(out))
        deleted = 0
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        while pending:
            for off, _length, kind, seq in _messages(view, sock.recv_into(buf)):
                if kind == _NLMSG_ERROR and seq in pending:
                    f = pending.pop(seq)
                    code = -_ERR.unpack_from(view, off + _HDR.size)[0]
                    if code == 0:
                        deleted += 1
                    elif code != errno.ENOENT:
                        raise OSError(code, f"conntrack delete {f}: {os.strerror(code)}")
        return deleted
