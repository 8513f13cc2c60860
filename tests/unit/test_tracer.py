"""Where packets end up: rendered rules walked by the tracer, one row per kind of traffic."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxy.backends.iptables.render import render_view
from kproxy.config import RenderConfig
from kproxy.state.model import Endpoint, ServicePort, ServicePortName
from tests.support.tracer import TraceError, Tracer

NODE_IP = "192.168.0.10"
POD = "10.180.5.5"  # a pod on some node, inside the cluster CIDR
OUTSIDE = "198.18.0.1"  # a client outside the cluster
ALLOWED = "203.0.113.99"  # outside, but inside service D's source ranges

CFG = RenderConfig(family=4, node_name="node1", cluster_cidr=("10.0.0.0/8",), node_ip=NODE_IP)


def sp(name: str, vip: str, port: int = 80, proto: str = "TCP", **kw: object) -> ServicePort:
    return ServicePort(ServicePortName("ns", name, "", proto), 4, vip, port, **kw)  # type: ignore[arg-type]


def ep(ip: str, port: int = 8080, *, local: bool = False) -> Endpoint:
    return Endpoint(ip, port, is_local=local)


REMOTE_A, LOCAL_A = ep("10.180.1.1"), ep("10.180.0.3", local=True)
REMOTE_B, LOCAL_B = ep("10.180.1.2"), ep("10.180.0.4", local=True)

SERVICES = [
    (sp("a", "172.30.0.41", node_port=3001), (LOCAL_A, REMOTE_A)),
    (
        sp(
            "b",
            "172.30.0.42",
            node_port=3002,
            external_local=True,
            load_balancer_ips=("192.0.2.20",),
            external_ips=("198.51.100.20",),
        ),
        (LOCAL_B, REMOTE_B),
    ),
    (sp("c", "172.30.0.43", node_port=3003, external_ips=("198.51.100.30",)), ()),
    (
        sp(
            "d",
            "172.30.0.44",
            load_balancer_ips=("192.0.2.30",),
            load_balancer_source_ranges=("203.0.113.0/25",),
        ),
        (ep("10.180.1.5"),),
    ),
    (sp("e", "172.30.0.45", node_port=3005, external_local=True), (ep("10.180.1.6"),)),
    (sp("f", "172.30.0.46", internal_local=True), (ep("10.180.1.7"), ep("10.180.0.7", local=True))),
    (sp("g", "172.30.0.47", port=53, proto="UDP"), (ep("10.180.1.8", 53), ep("10.180.1.9", 53))),
    (sp("h", "172.30.0.48", internal_local=True), (ep("10.180.1.10"),)),
]


@pytest.fixture(scope="module")
def tracer() -> Tracer:
    view = {s.name: (s, eps) for s, eps in SERVICES}
    return Tracer(render_view(view, CFG), node_ips=[NODE_IP])


A = {"10.180.0.3:8080", "10.180.1.1:8080"}
B = {"10.180.0.4:8080", "10.180.1.2:8080"}

# (id, src, proto, dst, port, endpoints, masquerade, verdict)
ROWS = [
    ("pod to cluster IP reaches every endpoint unmasqueraded", POD, "tcp", "172.30.0.41", 80, A, False, ""),
    ("outside to cluster IP is masqueraded", OUTSIDE, "tcp", "172.30.0.41", 80, A, True, ""),
    (
        "endpoint to its own service is hairpin-masqueraded",
        "10.180.1.1",
        "tcp",
        "172.30.0.41",
        80,
        A,
        True,
        "",
    ),
    ("wrong port misses the service", POD, "tcp", "172.30.0.41", 81, set(), False, ""),
    ("wrong protocol misses the service", POD, "udp", "172.30.0.41", 80, set(), False, ""),
    ("outside to node port, cluster policy", OUTSIDE, "tcp", NODE_IP, 3001, A, True, ""),
    (
        "node port on a non-local address is not captured",
        OUTSIDE,
        "tcp",
        "192.168.0.99",
        3001,
        set(),
        False,
        "",
    ),
    ("node port on loopback is not captured", "127.0.0.1", "tcp", "127.0.0.1", 3001, set(), False, ""),
    (
        "outside to node port, local policy: local endpoint only, source kept",
        OUTSIDE,
        "tcp",
        NODE_IP,
        3002,
        {"10.180.0.4:8080"},
        False,
        "",
    ),
    (
        "pod to node port, local policy: short-circuits to all endpoints",
        POD,
        "tcp",
        NODE_IP,
        3002,
        B,
        False,
        "",
    ),
    (
        "node to its own node port, local policy: all endpoints, masqueraded",
        NODE_IP,
        "tcp",
        NODE_IP,
        3002,
        B,
        True,
        "",
    ),
    ("outside to LB IP, local policy", OUTSIDE, "tcp", "192.0.2.20", 80, {"10.180.0.4:8080"}, False, ""),
    (
        "outside to external IP, local policy",
        OUTSIDE,
        "tcp",
        "198.51.100.20",
        80,
        {"10.180.0.4:8080"},
        False,
        "",
    ),
    ("pod to cluster IP, local external policy: all endpoints", POD, "tcp", "172.30.0.42", 80, B, False, ""),
    ("no endpoints: cluster IP rejected", POD, "tcp", "172.30.0.43", 80, set(), False, "REJECT"),
    ("no endpoints: node port rejected", OUTSIDE, "tcp", NODE_IP, 3003, set(), False, "REJECT"),
    ("no endpoints: external IP rejected", OUTSIDE, "tcp", "198.51.100.30", 80, set(), False, "REJECT"),
    ("LB source range admits", ALLOWED, "tcp", "192.0.2.30", 80, {"10.180.1.5:8080"}, True, ""),
    ("LB source range refuses", OUTSIDE, "tcp", "192.0.2.30", 80, set(), False, "DROP"),
    (
        "the node outside the source ranges is refused too",
        NODE_IP,
        "tcp",
        "192.0.2.30",
        80,
        set(),
        False,
        "DROP",
    ),
    (
        "cluster IP of a firewalled LB service is open",
        OUTSIDE,
        "tcp",
        "172.30.0.44",
        80,
        {"10.180.1.5:8080"},
        True,
        "",
    ),
    ("local policy, no local endpoint: outside dropped", OUTSIDE, "tcp", NODE_IP, 3005, set(), False, "DROP"),
    (
        "local policy, no local endpoint: pods still served",
        POD,
        "tcp",
        NODE_IP,
        3005,
        {"10.180.1.6:8080"},
        False,
        "",
    ),
    (
        "internal local policy: only the local endpoint",
        POD,
        "tcp",
        "172.30.0.46",
        80,
        {"10.180.0.7:8080"},
        False,
        "",
    ),
    ("internal local policy, none local: dropped", POD, "tcp", "172.30.0.48", 80, set(), False, "DROP"),
    ("udp service", POD, "udp", "172.30.0.47", 53, {"10.180.1.8:53", "10.180.1.9:53"}, False, ""),
]


@pytest.mark.parametrize(
    ("src", "proto", "dst", "port", "endpoints", "masq", "verdict"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_trace(
    tracer: Tracer, src: str, proto: str, dst: str, port: int, endpoints: set[str], masq: bool, verdict: str
) -> None:
    got = tracer.trace(src, proto, dst, port)
    assert (set(got.endpoints), got.masquerade, got.verdict) == (endpoints, masq, verdict), "\n".join(
        got.path
    )


def test_node_in_lb_source_range_reaches_lb() -> None:
    d = replace(SERVICES[3][0], load_balancer_source_ranges=("192.168.0.0/24",))
    t = Tracer(render_view({d.name: (d, SERVICES[3][1])}, CFG), node_ips=[NODE_IP])
    # Traffic the LB loops back from the node arrives with the LB IP as its source.
    got = t.trace("192.0.2.30", "tcp", "192.0.2.30", 80)
    assert set(got.endpoints) == {"10.180.1.5:8080"}
    assert t.trace(OUTSIDE, "tcp", "192.0.2.30", 80).verdict == "DROP"


def test_tracer_refuses_unknown_matches_and_dangling_jumps() -> None:
    with pytest.raises(TraceError):
        Tracer({("nat", "KUBE-SERVICES"): ("-A KUBE-SERVICES -m string --string x -j ACCEPT",)})
    with pytest.raises(TraceError):
        Tracer({("nat", "KUBE-SERVICES"): ("-A KUBE-SERVICES -j KUBE-SVC-NOWHERE",)})
