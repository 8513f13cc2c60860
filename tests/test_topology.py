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
