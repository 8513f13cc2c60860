"""Stale UDP conntrack cleanup: the decision table, and real entries deleted through netlink in a namespace."""

from __future__ import annotations

import select
import socket
from collections.abc import Sequence

import pytest

from kproxy.netfilter.conntrack import (
    ConntrackClient,
    Flow,
    NetlinkConntrack,
    clean_stale_entries,
    serving_sets,
    stale_flows,
)
from kproxy.state.model import Endpoint, Family, ServiceKey, ServicePort
from tests.support.conntrack import (
    NEW_POD_IP,
    NEW_POD_IP6,
    NODE_IP,
    NODE_PORT,
    POD_IP,
    POD_IP6,
    VIP6,
    VIP_DEAD,
    VIP_LIVE,
    FakeConntrack,
    PyrouteConntrack,
    cleanup_needed,
    ep,
    node_and_pod,
    sp,
)
from tests.support.netns import entered, exec_in

VIP = "10.96.0.10"
EXT = "203.0.113.7"
LB = "198.51.100.9"
NODE = "192.168.1.5"
POD_A = "10.244.1.10"
POD_B = "10.244.1.11"
CLIENT = "10.244.2.50"


def flow(
    dst: str,
    reply_src: str,
    dport: int = 53,
    src: str = CLIENT,
    sport: int = 40000,
    reply_sport: int = 5353,
) -> Flow:
    return Flow(6 if ":" in dst else 4, src, dst, sport, dport, reply_src, reply_sport=reply_sport)


DNS_NP = sp(node_port=30053, external=[EXT], lb=[LB])
View = list[tuple[ServicePort, tuple[Endpoint, ...]]]

# (id, ports view, flow, stale?)
TABLE: list[tuple[str, View, Flow, bool]] = [
    ("endpoint still serving keeps its flow", [(DNS_NP, (ep(POD_A),))], flow(VIP, POD_A), False),
    ("removed endpoint loses its flow", [(DNS_NP, (ep(POD_B),))], flow(VIP, POD_A), True),
    ("no endpoints left: flows are left alone", [(DNS_NP, ())], flow(VIP, POD_A), False),
    (
        "only non-serving endpoints: left alone",
        [(DNS_NP, (ep(POD_A, serving=False),))],
        flow(VIP, POD_A),
        False,
    ),
    (
        "not serving any more, another one is",
        [(DNS_NP, (ep(POD_A, serving=False), ep(POD_B)))],
        flow(VIP, POD_A),
        True,
    ),
    ("target port changed, same pod IP", [(DNS_NP, (ep(POD_A, port=5354),))], flow(VIP, POD_A), True),
    (
        "target port changed, node port flow",
        [(DNS_NP, (ep(POD_A, port=5354),))],
        flow(NODE, POD_A, dport=30053),
        True,
    ),
    (
        "target port changed, external IP flow",
        [(DNS_NP, (ep(POD_A, port=5354),))],
        flow(EXT, POD_A),
        True,
    ),
    (
        "other port of the service IP is not judged by this one",
        [(DNS_NP, (ep(POD_B),))],
        flow(VIP, POD_A, dport=5000),
        False,
    ),
    (
        "other port of an external IP is not judged",
        [(DNS_NP, (ep(POD_B),))],
        flow(EXT, POD_A, dport=80),
        False,
    ),
    (
        "terminating but still serving keeps its flow",
        [(DNS_NP, (ep(POD_A, serving=True, ready=False, terminating=True),))],
        flow(VIP, POD_A),
        False,
    ),
    ("flow made before any rule (never DNATed)", [(DNS_NP, (ep(POD_A),))], flow(VIP, VIP), True),
    ("external IP", [(DNS_NP, (ep(POD_B),))], flow(EXT, POD_A), True),
    ("load-balancer IP", [(DNS_NP, (ep(POD_B),))], flow(LB, POD_A), True),
    ("node port, any destination address", [(DNS_NP, (ep(POD_B),))], flow(NODE, POD_A, dport=30053), True),
    ("node port with live endpoint", [(DNS_NP, (ep(POD_A),))], flow(NODE, POD_A, dport=30053), False),
    ("unrelated destination", [(DNS_NP, ())], flow("10.0.0.99", POD_A), False),
    ("unrelated port on the node", [(DNS_NP, ())], flow(NODE, POD_A, dport=30054), False),
    ("TCP service is not judged", [(sp(proto="TCP"), ())], flow(VIP, POD_A), False),
    ("service gone altogether: left to age out", [], flow(VIP, POD_A), False),
    (
        "two ports of one IP: each judged by its own endpoints",
        [(sp(name="a", port=53), (ep(POD_A),)), (sp(name="b", port=54), (ep(POD_B),))],
        flow(VIP, POD_A, dport=54),
        True,
    ),
    (
        "two ports of one IP: the right port keeps its flow",
        [(sp(name="a", port=53), (ep(POD_A),)), (sp(name="b", port=54), (ep(POD_B, port=6000),))],
        flow(VIP, POD_B, dport=54, reply_sport=6000),
        False,
    ),
    (
        "one frontend claimed twice: union of their endpoints",
        [(sp(name="a"), (ep(POD_A),)), (sp(name="b"), (ep(POD_B),))],
        flow(VIP, POD_A),
        False,
    ),
    (
        "IPv6 addresses compared in canonical form",
        [(sp(ip="fd00:10:96::000a"), (ep("fd00:10:244:1::000b"),))],
        flow("fd00:10:96::a", "fd00:10:244:1::b"),
        False,
    ),
    (
        "IPv6 removed endpoint",
        [(sp(ip="fd00:10:96::a"), (ep("fd00:10:244:1::c"),))],
        flow("fd00:10:96::a", "fd00:10:244:1::b"),
        True,
    ),
]


@pytest.mark.parametrize(("view", "f", "stale"), [c[1:] for c in TABLE], ids=[c[0] for c in TABLE])
def test_stale_decision(view: View, f: Flow, stale: bool) -> None:
    assert stale_flows([f], serving_sets(view)) == ([f] if stale else [])


DNS_KEY = ServiceKey("kube-system", "dns")
WEB = sp(name="web", proto="TCP", ip="10.96.0.20", port=80)


@pytest.mark.parametrize(
    ("changed", "before", "after", "needed"),
    [
        ([], [(DNS_NP, ())], [(DNS_NP, ())], False),
        ([DNS_KEY], [(DNS_NP, ())], [(DNS_NP, ())], True),
        ([ServiceKey("kube-system", "web")], [(WEB, ())], [(WEB, ())], False),
        ([DNS_KEY], [(DNS_NP, ())], [], True),
        ([DNS_KEY], [], [(DNS_NP, ())], True),
    ],
    ids=[
        "nothing changed",
        "UDP service changed",
        "only TCP changed",
        "UDP service deleted",
        "UDP service added",
    ],
)
def test_cleanup_needed(changed: list[ServiceKey], before: View, after: View, needed: bool) -> None:
    assert cleanup_needed(changed, before, after) is needed


def test_cleanup_with_fake_client_deletes_only_stale() -> None:
    keep = flow(VIP, POD_B, sport=1)
    gone = flow(VIP, POD_A, sport=2)
    other_family = flow("fd00::1", "fd00::2")
    fake = FakeConntrack([keep, gone, other_family])
    result = clean_stale_entries(fake, 4, [(DNS_NP, (ep(POD_B),))])
    assert (result.examined, result.deleted, result.error) == (2, 1, "")
    assert fake.flows == [keep, other_family]


class _Broken(FakeConntrack):
    def list_udp(self, family: Family) -> list[Flow]:
        raise OSError(1, "Operation not permitted")


def test_kernel_errors_are_reported_not_raised() -> None:
    result = clean_stale_entries(_Broken(), 4, [(DNS_NP, ())])
    assert result.deleted == 0 and "not permitted" in result.error


# ------------------------------------------------------------------ kernel


def _send(ns: str, targets: Sequence[tuple[str, int]]) -> None:
    with entered(ns):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in targets]
    for s, target in zip(socks, targets, strict=True):
        with s:
            s.sendto(b"q", target)


def _by_dst(flows: Sequence[Flow]) -> dict[tuple[str, int], str]:
    return {(f.dst, f.dport): f.reply_src for f in flows}


CLIENTS: dict[str, type[NetlinkConntrack] | type[PyrouteConntrack]] = {
    "netlink": NetlinkConntrack,
    "pyroute2": PyrouteConntrack,
}


@pytest.mark.privileged
@pytest.mark.parametrize("impl", sorted(CLIENTS))
def test_endpoint_removed_entries_deleted_in_namespace(impl: str) -> None:
    with node_and_pod() as (node, pod):
        with entered(pod):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a listener, so no ICMP errors come back
        with sink:
            sink.bind((POD_IP, 5353))
            _send(node, [(VIP_DEAD, 53), (VIP_LIVE, 53), (NODE_IP, NODE_PORT), (POD_IP, 9999)])

            client: ConntrackClient = CLIENTS[impl](netns=node)
            before = _by_dst(client.list_udp(4))
            assert before == {
                (VIP_DEAD, 53): POD_IP,
                (VIP_LIVE, 53): POD_IP,
                (NODE_IP, NODE_PORT): POD_IP,
                (POD_IP, 9999): POD_IP,
            }, "the kernel should hold one DNATed entry per service flow plus the direct one"

            dead = sp(name="dead", ip=VIP_DEAD, node_port=NODE_PORT)
            live = sp(name="live", ip=VIP_LIVE)
            view = [(dead, (ep(NEW_POD_IP),)), (live, (ep(POD_IP),))]
            result = clean_stale_entries(client, 4, view)
            assert (result.deleted, result.error) == (2, "")

            after = _by_dst(client.list_udp(4))
            assert after == {(VIP_LIVE, 53): POD_IP, (POD_IP, 9999): POD_IP}

            listed = exec_in(node, ["conntrack", "-L", "-p", "udp"], check=False).stdout
            assert f"dst={VIP_DEAD}" not in listed and f"dport={NODE_PORT}" not in listed
            assert f"dst={VIP_LIVE}" in listed, "the conntrack tool must agree with netlink"

            assert clean_stale_entries(client, 4, view).deleted == 0, "a second pass finds nothing"


@pytest.mark.privileged
@pytest.mark.parametrize("impl", sorted(CLIENTS))
def test_works_from_inside_the_namespace_too(impl: str) -> None:
    """The agent itself runs in the node's namespace and names none."""
    with node_and_pod() as (node, _pod):
        _send(node, [(VIP_DEAD, 53)])
        with entered(node):
            client: ConntrackClient = CLIENTS[impl]()
            flows = client.list_udp(4)
            assert _by_dst(flows) == {(VIP_DEAD, 53): POD_IP}
            assert client.delete(flows) == 1
            assert client.delete(flows) == 0, "an entry already gone is not an error"
            assert client.list_udp(4) == []


@pytest.mark.privileged
def test_netlink_reader_agrees_with_pyroute2_and_skips_tcp() -> None:
    """The hand-rolled ctnetlink reader must see exactly what pyroute2's full decoder sees, TCP excluded."""
    with node_and_pod() as (node, pod):
        with entered(pod):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            listener.bind((POD_IP, 8080))
            listener.listen(8)
            with entered(node):
                tcp = socket.create_connection((POD_IP, 8080), timeout=5)
            with tcp:
                _send(node, [(VIP_DEAD, 53), (VIP_LIVE, 53), (NODE_IP, NODE_PORT), (POD_IP, 9999)] * 3)
                tcp_listed = exec_in(node, ["conntrack", "-L", "-p", "tcp"], check=False).stdout
                assert "dport=8080" in tcp_listed, (
                    "the table must hold a TCP entry for this test to mean anything"
                )
                fast = sorted(NetlinkConntrack(netns=node).list_udp(4), key=repr)
                slow = sorted(PyrouteConntrack(netns=node).list_udp(4), key=repr)
                assert fast == slow
                assert len(fast) == 12
                assert NetlinkConntrack(netns=node).list_udp(6) == []


def _received(sock: socket.socket, timeout: float = 3.0) -> bool:
    ready, _, _ = select.select([sock], [], [], timeout)
    if ready:
        sock.recv(64)
    return bool(ready)


@pytest.mark.privileged
def test_replaced_endpoint_gets_the_next_datagram_only_after_cleanup() -> None:
    """The user-visible bug this fixes: a client reusing its port keeps talking to a dead endpoint."""
    with node_and_pod() as (node, pod):
        with entered(pod):
            old, new = (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            )
        with entered(node):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with old, new, client:
            old.bind((POD_IP, 5353))
            new.bind((NEW_POD_IP, 5353))
            client.sendto(b"q1", (VIP_DEAD, 53))
            assert _received(old), "first query should reach the original endpoint"

            # The endpoint is replaced: rewrite the DNAT, as a sync would.
            exec_in(
                node,
                [
                    "iptables-nft", "-t", "nat", "-R", "OUTPUT", "1", "-d", f"{VIP_DEAD}/32", "-p", "udp",
                    "--dport", "53", "-j", "DNAT", "--to-destination", f"{NEW_POD_IP}:5353",
                ],
            )  # fmt: skip
            client.sendto(b"q2", (VIP_DEAD, 53))
            assert _received(old, 1.0), "without cleanup the old conntrack entry still steers to the old pod"
            assert not _received(new, 0.2)

            view = [(sp(name="dead", ip=VIP_DEAD), (ep(NEW_POD_IP),))]
            assert clean_stale_entries(NetlinkConntrack(netns=node), 4, view).deleted == 1
            client.sendto(b"q3", (VIP_DEAD, 53))
            assert _received(new), "after cleanup the next datagram reaches the replacement"


@pytest.mark.privileged
def test_ipv6_entries_listed_alike_and_deleted() -> None:
    with node_and_pod() as (node, pod):
        with entered(pod):
            sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with entered(node):
            client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with sink, client:
            sink.bind((POD_IP6, 5353))
            client.sendto(b"q", (VIP6, 53))
            client.sendto(b"q", (POD_IP6, 9999))
            fast = NetlinkConntrack(netns=node)
            listed = sorted(fast.list_udp(6), key=repr)
            assert listed == sorted(PyrouteConntrack(netns=node).list_udp(6), key=repr)
            assert {(f.dst, f.dport, f.reply_src) for f in listed} == {
                (VIP6, 53, POD_IP6),
                (POD_IP6, 9999, POD_IP6),
            }
            assert fast.list_udp(4) == [], "families never mix"
            view = [(sp(ip=VIP6), (ep(NEW_POD_IP6),))]
            assert clean_stale_entries(fast, 6, view).deleted == 1
            assert [(f.dst, f.dport) for f in fast.list_udp(6)] == [(POD_IP6, 9999)]


@pytest.mark.privileged
def test_target_port_change_moves_the_next_datagram_and_spares_services_without_endpoints() -> None:
    """targetPort 5353 -> 5354 on the same pod: only an IP-and-port match notices the stale flow.

    A second service whose endpoints are all gone keeps its flow: nothing better to send it to.
    """
    with node_and_pod() as (node, pod):
        with entered(pod):
            old, new = (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            )
        with entered(node):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            orphan = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with old, new, client, orphan:
            old.bind((POD_IP, 5353))
            new.bind((POD_IP, 5354))
            client.sendto(b"q1", (VIP_DEAD, 53))
            assert _received(old), "first query should reach the endpoint's old port"
            orphan.sendto(b"q", (VIP_LIVE, 53))
            assert _received(old)

            exec_in(
                node,
                [
                    "iptables-nft", "-t", "nat", "-R", "OUTPUT", "1", "-d", f"{VIP_DEAD}/32", "-p", "udp",
                    "--dport", "53", "-j", "DNAT", "--to-destination", f"{POD_IP}:5354",
                ],
            )  # fmt: skip
            client.sendto(b"q2", (VIP_DEAD, 53))
            assert _received(old, 1.0), "without cleanup the entry still steers to the old port"

            view = [
                (sp(name="moved", ip=VIP_DEAD), (ep(POD_IP, port=5354),)),
                (sp(name="orphan", ip=VIP_LIVE), ()),
            ]
            ct = NetlinkConntrack(netns=node)
            assert clean_stale_entries(ct, 4, view).deleted == 1
            assert _by_dst(ct.list_udp(4)) == {(VIP_LIVE, 53): POD_IP}, (
                "the flow of the service without endpoints must stay"
            )
            client.sendto(b"q3", (VIP_DEAD, 53))
            assert _received(new), "after cleanup the next datagram reaches the new target port"
            assert not _received(old, 0.2)
