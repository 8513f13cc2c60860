"""Endpoint choice: which backends get Cluster and Local traffic on this node."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from kproxy.state.model import Endpoint, ServicePort, ServicePortName
from kproxy.state.topology import Reason, categorize, exclusion

NAME = ServicePortName("ns1", "svc1", "p80", "TCP")
CLUSTER_IP = ServicePort(NAME, 4, "172.30.0.41", 80)
NODE_PORT = replace(CLUSTER_IP, node_port=3001)
EXT_LOCAL = replace(NODE_PORT, external_local=True)
INT_LOCAL = replace(CLUSTER_IP, internal_local=True)
INT_LOCAL_EXT = replace(NODE_PORT, internal_local=True, external_local=True)
# externalTrafficPolicy: Local on a port nothing external reaches means nothing.
EXT_LOCAL_NO_EXTERNAL = replace(CLUSTER_IP, external_local=True)


def ep(
    last: int,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    hints: tuple[str, ...] = (),
) -> Endpoint:
    return Endpoint(
        f"10.180.0.{last}",
        80,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        is_local=local,
        zone_hints=frozenset(hints),
    )


R1, R2 = ep(1), ep(2)
L3, L4 = ep(3, local=True), ep(4, local=True)
NOT_READY = ep(5, ready=False)
TERM = ep(6, ready=False, serving=True, terminating=True)
TERM_LOCAL = ep(7, ready=False, serving=True, terminating=True, local=True)
TERM_NOT_SERVING = ep(8, ready=False, serving=False, terminating=True)
ZA1, ZA2, ZB = ep(11, hints=("a",)), ep(12, hints=("a",)), ep(13, hints=("b",))


@dataclass(frozen=True)
class Case:
    id: str
    sp: ServicePort
    eps: tuple[Endpoint, ...]
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]
    has_any: bool
    zone: str = "a"


CASES = [
    Case("no endpoints", NODE_PORT, (), (), (), (), False),
    Case("cluster: ready only", CLUSTER_IP, (R1, NOT_READY, R2), (R1, R2), (), (R1, R2), True),
    Case("cluster: ready beat terminating", CLUSTER_IP, (R1, TERM), (R1,), (), (R1,), True),
    Case(
        "cluster: none ready, serving terminating used",
        CLUSTER_IP,
        (NOT_READY, TERM, TERM_NOT_SERVING),
        (TERM,),
        (),
        (TERM,),
        True,
    ),
    Case("cluster: nothing usable", CLUSTER_IP, (NOT_READY, TERM_NOT_SERVING), (), (), (), False),
    Case("external local: remote and local ready", EXT_LOCAL, (R1, L3), (R1, L3), (L3,), (R1, L3), True),
    Case(
        "external local: no local endpoint, still has_any", EXT_LOCAL, (R1, R2), (R1, R2), (), (R1, R2), True
    ),
    Case(
        "external local: local terminating fallback widens reachable",
        EXT_LOCAL,
        (R1, TERM_LOCAL),
        (R1,),
        (TERM_LOCAL,),
        (R1, TERM_LOCAL),
        True,
    ),
    Case(
        "external local ignored without external access",
        EXT_LOCAL_NO_EXTERNAL,
        (R1, L3),
        (R1, L3),
        (),
        (R1, L3),
        True,
    ),
    Case(
        "internal local: only local, no cluster list", INT_LOCAL, (R1, L3, L4), (), (L3, L4), (L3, L4), True
    ),
    Case("internal local: none local but ready elsewhere", INT_LOCAL, (R1,), (), (), (), True),
    Case("internal local: only terminating anywhere counts as has_any", INT_LOCAL, (TERM,), (), (), (), True),
    Case(
        "internal+external local with node port keeps cluster list",
        INT_LOCAL_EXT,
        (R1, L3),
        (R1, L3),
        (L3,),
        (R1, L3),
        True,
    ),
    Case("zone hints: this zone only", CLUSTER_IP, (ZA1, ZA2, ZB), (ZA1, ZA2), (), (ZA1, ZA2), True),
    Case(
        "zone hints: node has no zone -> ignored",
        CLUSTER_IP,
        (ZA1, ZB),
        (ZA1, ZB),
        (),
        (ZA1, ZB),
        True,
        zone="",
    ),
    Case("zone hints: none for this zone -> ignored", CLUSTER_IP, (ZB,), (ZB,), (), (ZB,), True),
    Case(
        "zone hints: one ready endpoint unhinted -> ignored",
        CLUSTER_IP,
        (ZA1, R1),
        (ZA1, R1),
        (),
        (ZA1, R1),
        True,
    ),
    Case(
        "zone hints: unready unhinted endpoint does not disable hints",
        CLUSTER_IP,
        (ZA1, NOT_READY, ZB),
        (ZA1,),
        (),
        (ZA1,),
        True,
    ),
    Case(
        "zone hints filter cluster but local keeps its own endpoint",
        EXT_LOCAL,
        (ZA1, replace(ZB, is_local=True)),
        (ZA1,),
        (replace(ZB, is_local=True),),
        (ZA1, replace(ZB, is_local=True)),
        True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_categorize(case: Case) -> None:
    sel = categorize(case.sp, case.eps, case.zone)
    assert sel.cluster == case.cluster
    assert sel.local == case.local
    assert sel.reachable == case.reachable
    assert sel.has_any == case.has_any


EXCLUSIONS = [
    ("not ready", CLUSTER_IP, (R1, NOT_READY), NOT_READY, False, Reason.NOT_READY),
    ("terminating while ready exist", CLUSTER_IP, (R1, TERM), TERM, False, Reason.TERMINATING),
    (
        "terminating and not serving",
        CLUSTER_IP,
        (TERM, TERM_NOT_SERVING),
        TERM_NOT_SERVING,
        False,
        Reason.NOT_SERVING,
    ),
    ("other zone", CLUSTER_IP, (ZA1, ZB), ZB, False, Reason.OTHER_ZONE),
    ("remote under local policy", EXT_LOCAL, (R1, L3), R1, True, Reason.NOT_LOCAL),
    ("chosen", EXT_LOCAL, (R1, L3), L3, True, None),
]


@pytest.mark.parametrize(
    ("sp", "eps", "which", "local", "want"), [e[1:] for e in EXCLUSIONS], ids=[e[0] for e in EXCLUSIONS]
)
def test_exclusion_reason(
    sp: ServicePort, eps: tuple[Endpoint, ...], which: Endpoint, local: bool, want: Reason | None
) -> None:
    assert exclusion(which, categorize(sp, eps, "a"), local) == want


# ------------------------------------------------ PreferSameNode (hints.forNodes)


def node_ep(last: int, nodes: tuple[str, ...], zones: tuple[str, ...] = (), ready: bool = True) -> Endpoint:
    return replace(ep(last, ready=ready, hints=zones), node_hints=frozenset(nodes))


NA1, NA2, NB = node_ep(21, ("node-a",)), node_ep(22, ("node-a",)), node_ep(23, ("node-b",))
NODE_CASES = [
    # (id, endpoints, expected Cluster endpoints) on node-a in zone a; as kube-proxy's
    # topologyModeFromHints with PreferSameTrafficDistribution (GA, always on)
    ("every ready endpoint hinted, some for this node", (NA1, NA2, NB), (NA1, NA2)),
    ("hints name other nodes only: all endpoints", (NB, node_ep(24, ("node-c",))), None),
    ("one ready endpoint has no node hint: all endpoints", (NA1, R1), None),
    ("a not-ready endpoint without a hint does not count", (NA1, NB, NOT_READY), (NA1,)),
    (
        "node hints win over zone hints",
        (node_ep(25, ("node-a",), ("b",)), node_ep(26, ("node-b",), ("a",))),
        (node_ep(25, ("node-a",), ("b",)),),
    ),
    (
        "node hints unusable: zone hints still apply",
        (node_ep(27, ("node-b",), ("a",)), node_ep(28, ("node-c",), ("b",))),
        (node_ep(27, ("node-b",), ("a",)),),
    ),
]


@pytest.mark.parametrize(("eps", "cluster"), [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES])
def test_prefer_same_node_hints(eps: tuple[Endpoint, ...], cluster: tuple[Endpoint, ...] | None) -> None:
    sel = categorize(CLUSTER_IP, eps, "a", "node-a")
    assert sel.cluster == (eps if cluster is None else cluster)
    assert sel.reachable == sel.cluster
    assert sel.node == (
        "node-a" if cluster is not None and all("node-a" in e.node_hints for e in cluster) else ""
    )
    if sel.node:
        left_out = [e for e in eps if e.ready and e not in sel.cluster]
        assert all(exclusion(e, sel, local_policy=False) is Reason.OTHER_NODE for e in left_out)


def test_node_hints_narrow_cluster_endpoints_but_not_local_ones() -> None:
    local_b = replace(NB, is_local=True)
    sel = categorize(EXT_LOCAL, (NA1, local_b), "a", "node-a")
    assert sel.cluster == (NA1,)
    assert sel.local == (local_b,)
    assert sel.reachable == (NA1, local_b)


def test_for_nodes_is_parsed_from_the_endpoint_slice() -> None:
    from kproxy.state.parse import parse_object

    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": "ns1", "name": "svc1-1", "labels": {"kubernetes.io/service-name": "svc1"}},
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.180.0.1"],
                "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "node-a"}]},
            },
            {"addresses": ["10.180.0.2"]},
        ],
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
    }
    parsed = parse_object(obj)
    first, second = parsed.endpoints  # type: ignore[union-attr]
    assert first.node_hints == frozenset({"node-a"}) and first.zone_hints == frozenset({"a"})
    assert second.node_hints == frozenset()


def test_a_bad_for_nodes_name_skips_the_slice_naming_the_field() -> None:
    from kproxy.errors import ObjectError
    from kproxy.state.parse import parse_object

    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": "ns1", "name": "svc1-1", "labels": {"kubernetes.io/service-name": "svc1"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.180.0.1"], "hints": {"forNodes": [{"name": "Not A Node"}]}}],
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
    }
    with pytest.raises(ObjectError, match=r"forNodes\[0\]\.name"):
        parse_object(obj)


def test_node_hints_reach_the_endpoints_a_backend_sees() -> None:
    from kproxy.state.build import merge_endpoints
    from kproxy.state.model import EndpointSlice, SliceEndpoint, SlicePort

    slice_ = EndpointSlice(
        "ns1",
        "svc1-1",
        "svc1",
        "IPv4",
        (SlicePort("p80", "TCP", 80),),
        (SliceEndpoint("10.180.0.1", node_hints=frozenset({"node-a"})),),
    )
    ((_name, (endpoint,)),) = merge_endpoints([slice_], "node-a", 4).items()
    assert endpoint.node_hints == frozenset({"node-a"})
