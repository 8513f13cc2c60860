"""Which endpoints each userspace listener forwards to: the same sets the kernel modes use
(state/topology.py), split into the internal listener and, under externalTrafficPolicy
Local, the external one."""

from __future__ import annotations

import pytest

from kproxy.backends.userspace.proxier import Choice, choose
from kproxy.state.model import Endpoint, ServicePort, ServicePortName

NAME = ServicePortName("default", "web", "", "TCP")
LOCAL = Endpoint("10.0.0.1", 80, is_local=True, zone_hints=frozenset({"a"}))
REMOTE = Endpoint("10.0.0.2", 80, zone_hints=frozenset({"b"}))
LOCAL_TERM = Endpoint("10.0.0.3", 80, ready=False, terminating=True, is_local=True)
REMOTE_TERM = Endpoint("10.0.0.4", 80, ready=False, terminating=True)


def sp(**kw: object) -> ServicePort:
    return ServicePort(NAME, 4, "10.96.0.1", 80, **kw)  # type: ignore[arg-type]


def c(*eps: Endpoint, has_any: bool = True) -> Choice:
    return Choice(tuple((e.ip, e.port) for e in eps), has_any)


CASES = [
    ("cluster policy: every ready endpoint", sp(), (LOCAL, REMOTE), "", c(LOCAL, REMOTE), None),
    ("terminating unused while one is ready", sp(), (LOCAL, REMOTE_TERM), "", c(LOCAL), None),
    ("terminating fallback", sp(), (LOCAL_TERM, REMOTE_TERM), "", c(LOCAL_TERM, REMOTE_TERM), None),
    ("zone hints for this node's zone", sp(), (LOCAL, REMOTE), "a", c(LOCAL), None),
    ("internal Local", sp(internal_local=True), (LOCAL, REMOTE), "", c(LOCAL), None),
    ("internal Local, none here", sp(internal_local=True), (REMOTE,), "", c(), None),
    (
        "external Local: own listener",
        sp(node_port=30080, external_local=True),
        (LOCAL, REMOTE),
        "",
        c(LOCAL, REMOTE),
        c(LOCAL),
    ),
    ("external Local, none here", sp(node_port=30080, external_local=True), (REMOTE,), "", c(REMOTE), c()),
    (
        "external Local without external traffic: no listener",
        sp(external_local=True),
        (LOCAL, REMOTE),
        "",
        c(LOCAL, REMOTE),
        None,
    ),
    (
        "no endpoints at all",
        sp(node_port=30080, external_local=True),
        (),
        "",
        c(has_any=False),
        c(has_any=False),
    ),
]


@pytest.mark.parametrize(
    ("sp_", "eps", "zone", "internal", "external"), [x[1:] for x in CASES], ids=[x[0] for x in CASES]
)
def test_choice(
    sp_: ServicePort, eps: tuple[Endpoint, ...], zone: str, internal: Choice, external: Choice | None
) -> None:
    assert choose(sp_, eps, zone) == (internal, external)
