"""From parsed objects to the per-family view: which endpoints each service port gets, in what order."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.state.build import Snapshot, excluded_endpoints, merge_endpoints, service_ports, view
from kproxy.state.model import (
    Endpoint,
    EndpointSlice,
    Family,
    Service,
    ServiceKey,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
    SlicePort,
)

HTTP = SlicePort("http", "TCP", 8080)
SPN_HTTP = ServicePortName("demo", "web", "http", "TCP")


def sl(
    name: str,
    *eps: SliceEndpoint,
    family: Family = 4,
    ports: tuple[SlicePort, ...] = (HTTP,),
    legacy: bool = False,
    service: str = "web",
) -> EndpointSlice:
    return EndpointSlice(
        namespace="demo",
        name=name,
        service_name=service,
        address_type="IPv6" if family == 6 else "IPv4",
        ports=ports,
        endpoints=eps,
        legacy=legacy,
    )


def ep(ip: str, node: str = "node-b", **kw: Any) -> SliceEndpoint:
    return SliceEndpoint(ip, node_name=node, **kw)


def hostports(got: dict[ServicePortName, tuple[Endpoint, ...]], spn: ServicePortName = SPN_HTTP) -> list[str]:
    return [e.hostport for e in got.get(spn, ())]


# ------------------------------------------------------------------ merge_endpoints

MERGE_CASES: list[tuple[str, list[EndpointSlice], Family, list[str]]] = [
    (
        "sorted-as-text-like-kube-proxy",
        [sl("a", ep("10.0.0.9"), ep("10.0.0.10"), ep("10.0.0.1"))],
        4,
        ["10.0.0.10:8080", "10.0.0.1:8080", "10.0.0.9:8080"],
    ),  # ":" sorts after "0"
    (
        "slices-merge",
        [sl("a", ep("10.0.0.2")), sl("b", ep("10.0.0.1"))],
        4,
        ["10.0.0.1:8080", "10.0.0.2:8080"],
    ),
    (
        "other-family-skipped",
        [sl("a", ep("10.0.0.2")), sl("b", ep("fd00::1"), family=6)],
        4,
        ["10.0.0.2:8080"],
    ),
    ("ipv6-view", [sl("a", ep("10.0.0.2")), sl("b", ep("fd00::1"), family=6)], 6, ["[fd00::1]:8080"]),
    ("legacy-used-alone", [sl("web", ep("10.0.0.3"), legacy=True)], 4, ["10.0.0.3:8080"]),
    (
        "legacy-ignored-beside-real-slice",
        [sl("web", ep("10.0.0.3"), legacy=True), sl("web-x", ep("10.0.0.4"))],
        4,
        ["10.0.0.4:8080"],
    ),
    (
        "legacy-ignored-beside-other-family-slice",
        [sl("web", ep("10.0.0.3"), legacy=True), sl("web-x", ep("fd00::4"), family=6)],
        4,
        [],
    ),
    ("duplicate-ip-port-once", [sl("a", ep("10.0.0.5")), sl("b", ep("10.0.0.5"))], 4, ["10.0.0.5:8080"]),
    ("no-endpoints-no-entry", [sl("a")], 4, []),
]


@pytest.mark.parametrize(
    ("slices", "family", "want"), [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES]
)
def test_merge_endpoints(slices: list[EndpointSlice], family: Family, want: list[str]) -> None:
    got = merge_endpoints(slices, "node-a", family)
    assert hostports(got) == want
    if not want:
        assert SPN_HTTP not in got


@pytest.mark.parametrize(
    "order",
    [("live", "dying"), ("dying", "live")],
    ids=["live-slice-first", "terminating-slice-first"],
)
def test_terminating_copy_never_replaces_a_live_one(order: tuple[str, str]) -> None:
    copies = {
        "live": ep("10.0.0.5", node="node-b"),
        "dying": ep("10.0.0.5", node="node-a", ready=False, serving=True, terminating=True),
    }
    slices = [sl(f"{i}-{name}", copies[name]) for i, name in enumerate(order)]
    (got,) = merge_endpoints(slices, "node-a", 4)[SPN_HTTP]
    assert not got.terminating and got.ready and got.node_name == "node-b"


def test_endpoint_conditions_locality_and_zone_hints_carried() -> None:
    slices = [
        sl(
            "a",
            ep("10.0.0.1", node="node-a", zone="zone-a", zone_hints=frozenset({"zone-a"})),
            ep("10.0.0.2", node="node-b", zone="zone-b", ready=False, serving=True, terminating=True),
            ep("10.0.0.3", node=""),
        )
    ]
    e1, e2, e3 = merge_endpoints(slices, "node-a", 4)[SPN_HTTP]
    assert e1 == Endpoint(
        "10.0.0.1", 8080, is_local=True, zone="zone-a", zone_hints=frozenset({"zone-a"}), node_name="node-a"
    )
    assert (e2.is_local, e2.ready, e2.serving, e2.terminating, e2.zone) == (
        False,
        False,
        True,
        True,
        "zone-b",
    )
    assert not e3.is_local
    assert all(not e.is_local for e in merge_endpoints(slices, "", 4)[SPN_HTTP]), (
        "no node name: nothing is local"
    )


def test_ports_group_by_name_and_protocol() -> None:
    dns = (SlicePort("dns", "UDP", 53), SlicePort("dns-tcp", "TCP", 53), SlicePort("", "TCP", 9153))
    got = merge_endpoints([sl("a", ep("10.0.0.1"), ports=dns, service="kube-dns")], "node-a", 4)
    assert sorted(got) == [
        ServicePortName("demo", "kube-dns", "", "TCP"),
        ServicePortName("demo", "kube-dns", "dns", "UDP"),
        ServicePortName("demo", "kube-dns", "dns-tcp", "TCP"),
    ]
    assert str(ServicePortName("demo", "kube-dns", "", "TCP")) == "demo/kube-dns"


def test_same_endpoint_with_different_ports_per_slice() -> None:
    """A port named the same in two slices with different numbers (a rollout changing targetPort)."""
    got = merge_endpoints(
        [sl("a", ep("10.0.0.1")), sl("b", ep("10.0.0.2"), ports=(SlicePort("http", "TCP", 9090),))],
        "node-a",
        4,
    )
    assert hostports(got) == ["10.0.0.1:8080", "10.0.0.2:9090"]


# ------------------------------------------------------------------ service_ports

DUAL = Service(
    namespace="demo",
    name="web",
    type="LoadBalancer",
    cluster_ips=("10.96.0.10", "fd00:10:96::a"),
    ports=(ServicePortSpec("http", "TCP", 80, 30080, 8080), ServicePortSpec("dns", "UDP", 53, 30053, 53)),
    external_ips=("192.168.50.100", "fd00:50::100"),
    load_balancer_ips=("192.0.2.10", "2001:db8::10"),
    load_balancer_source_ranges=("203.0.113.0/24", "2001:db8:1::/48"),
    affinity_timeout=600,
    external_local=True,
    internal_local=True,
    health_check_node_port=32000,
    lb_algorithm="random",
)


@pytest.mark.parametrize(
    ("family", "cluster_ip", "external", "lb", "ranges"),
    [
        (4, "10.96.0.10", ("192.168.50.100",), ("192.0.2.10",), ("203.0.113.0/24",)),
        (6, "fd00:10:96::a", ("fd00:50::100",), ("2001:db8::10",), ("2001:db8:1::/48",)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_service_ports_filter_addresses_to_the_family(
    family: Family, cluster_ip: str, external: tuple[str, ...], lb: tuple[str, ...], ranges: tuple[str, ...]
) -> None:
    http, dns = service_ports(DUAL, family)
    assert http.name == ServicePortName("demo", "web", "http", "TCP") and dns.protocol == "UDP"
    for sp in (http, dns):
        assert (
            sp.family,
            sp.cluster_ip,
            sp.external_ips,
            sp.load_balancer_ips,
            sp.load_balancer_source_ranges,
        ) == (
            family,
            cluster_ip,
            external,
            lb,
            ranges,
        )
        assert (sp.affinity_timeout, sp.external_local, sp.internal_local, sp.health_check_node_port) == (
            600,
            True,
            True,
            32000,
        )
        assert sp.lb_algorithm == "random"
    assert (http.port, http.node_port) == (80, 30080)


def test_no_cluster_ip_in_family_means_no_ports() -> None:
    v4only = Service("demo", "web", "ClusterIP", ("10.96.0.10",), (ServicePortSpec("http", "TCP", 80),))
    assert service_ports(v4only, 6) == ()
    assert len(service_ports(v4only, 4)) == 1


# ------------------------------------------------------------------ Snapshot / view


def test_view_pairs_every_port_with_its_endpoints_in_order() -> None:
    web = Service(
        "demo",
        "web",
        "ClusterIP",
        ("10.96.0.10",),
        (ServicePortSpec("http", "TCP", 80), ServicePortSpec("https", "TCP", 443)),
    )
    api = Service("apps", "api", "ClusterIP", ("10.96.0.20", "fd00::20"), (ServicePortSpec("", "TCP", 80),))
    snap = Snapshot.from_objects(
        [
            web,
            api,
            sl("web-1", ep("10.0.0.2"), ep("10.0.0.1", node="node-a")),
            sl("orphan", ep("10.0.0.9"), service="gone"),
        ],
        node_name="node-a",
    )
    v4 = view(snap, "node-a", 4)
    assert list(v4) == [
        ServicePortName("apps", "api", "", "TCP"),
        ServicePortName("demo", "web", "http", "TCP"),
        ServicePortName("demo", "web", "https", "TCP"),
    ]
    sp, eps = v4[SPN_HTTP]
    assert sp.cluster_ip == "10.96.0.10"
    assert [(e.hostport, e.is_local) for e in eps] == [("10.0.0.1:8080", True), ("10.0.0.2:8080", False)]
    assert v4[ServicePortName("demo", "web", "https", "TCP")][1] == ()
    assert list(view(snap, "node-a", 6)) == [ServicePortName("apps", "api", "", "TCP")]


def test_snapshot_later_objects_win_and_keeps_only_its_node() -> None:
    from kproxy.state.model import Node

    old = Service("demo", "web", "ClusterIP", ("10.96.0.10",), (ServicePortSpec("http", "TCP", 80),))
    new = Service("demo", "web", "ClusterIP", ("10.96.0.11",), (ServicePortSpec("http", "TCP", 80),))
    snap = Snapshot.from_objects(
        [
            old,
            new,
            sl("a", ep("10.0.0.1")),
            sl("a", ep("10.0.0.2")),
            Node("node-b"),
            Node("node-a", (("topology.kubernetes.io/zone", "zone-a"),)),
        ],
        node_name="node-a",
    )
    assert snap.services[ServiceKey("demo", "web")] is new
    assert [s.endpoints[0].address for s in snap.slices[ServiceKey("demo", "web")]] == ["10.0.0.2"]
    assert snap.node is not None and snap.node.zone == "zone-a"
    with pytest.raises(TypeError):
        snap.services[ServiceKey("x", "y")] = new  # type: ignore[index]


def test_excluded_endpoints_explain_what_a_family_leaves_out() -> None:
    web = Service("demo", "web", "ClusterIP", ("10.96.0.10",), (ServicePortSpec("http", "TCP", 80),))
    snap = Snapshot.from_objects(
        [
            web,
            sl("web-v4", ep("10.0.0.1"), ports=(HTTP, SlicePort("metrics", "TCP", 9100))),
            sl("web-v6", ep("fd00::1"), family=6),
            sl("web", ep("10.0.0.7"), legacy=True),
        ]
    )
    got = [
        (x.port_name.port_name, x.endpoint.hostport, x.reason.split(",")[0])
        for x in excluded_endpoints(snap, ServiceKey("demo", "web"), "node-a", 4)
    ]
    assert got == [
        ("http", "[fd00::1]:8080", "IPv6 endpoint"),
        ("metrics", "10.0.0.1:9100", "no service port of that name and protocol"),
        ("http", "10.0.0.7:8080", "from legacy Endpoints"),
    ]
