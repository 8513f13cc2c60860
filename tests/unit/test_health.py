"""kube-proxy's health semantics: the pure state machine, /healthz and /livez over loopback, health-check node ports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.health import (
    HealthServer,
    ProxierHealth,
    ServiceHealthIndex,
    ServiceHealthServer,
    go_time,
    healthz_response,
    livez_response,
)
from kproxy.metrics import Metrics
from kproxy.state.model import Endpoint, Node, ServiceKey, ServicePort, ServicePortName
from tests.support.health import health_check_ports, local_ready_endpoints
from tests.support.httpclient import get, refused

T0 = 1_700_000_000.0
SYNC_PERIOD = 30.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on the stdlib loop and on uvloop (what the agent uses)."""

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(asyncio.wait_for(coro, 30))

    return runner


# ------------------------------------------------------------------ pure state

# Each step: (op, arg). ops: "queue" family, "update" family, "advance" seconds, "expect" bool,
# "sync_from" (family, seconds since T0 when the sync read its input).
CASES: list[tuple[str, list[tuple[str, Any]]]] = [
    ("healthy at start", [("expect", True)]),
    ("healthy at start, long after", [("advance", 3600), ("expect", True)]),
    ("queued but young", [("queue", 4), ("advance", 59.9), ("expect", True)]),
    ("queued and 2x sync period old", [("queue", 4), ("advance", 60), ("expect", False)]),
    (
        "recovers after a sync",
        [("queue", 4), ("advance", 61), ("expect", False), ("update", 4), ("expect", True)],
    ),
    (
        "only the oldest queue time counts",
        [("queue", 4), ("advance", 40), ("queue", 4), ("advance", 21), ("expect", False)],
    ),
    (
        "a sync resets the clock for later queues",
        [("queue", 4), ("advance", 50), ("update", 4), ("queue", 4), ("advance", 50), ("expect", True)],
    ),
    ("synced and idle stays healthy", [("update", 4), ("advance", 3600), ("expect", True)]),
    (
        "one stalled family makes the proxy unhealthy",
        [
            ("update", 4),
            ("update", 6),
            ("queue", 6),
            ("queue", 4),
            ("update", 4),
            ("advance", 61),
            ("expect", False),
        ],
    ),
    (
        "each family recovers on its own sync",
        [
            ("queue", 4),
            ("queue", 6),
            ("advance", 61),
            ("update", 4),
            ("expect", False),
            ("update", 6),
            ("expect", True),
        ],
    ),
    ("never synced but queued long ago is unhealthy", [("queue", 6), ("advance", 120), ("expect", False)]),
    (
        "a change queued during a sync stays pending",
        [
            ("queue", 4),
            ("advance", 1),
            ("queue", 4),
            ("sync_from", (4, 0.5)),
            ("advance", 61),
            ("expect", False),
        ],
    ),
    (
        "changes queued before the sync read its input are done",
        [("queue", 4), ("advance", 1), ("sync_from", (4, 1)), ("advance", 600), ("expect", True)],
    ),
]


@pytest.mark.parametrize("steps", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_proxier_health_table(steps: list[tuple[str, Any]]) -> None:
    clock = FakeClock()
    state = ProxierHealth.for_sync_period(SYNC_PERIOD, clock)
    for i, (op, arg) in enumerate(steps):
        if op == "queue":
            state.queued_update(arg)
        elif op == "update":
            state.updated(arg)
        elif op == "sync_from":
            state.updated(arg[0], started=T0 + arg[1])
        elif op == "advance":
            clock.now += arg
        else:
            assert state.is_healthy() is arg, f"step {i}: expected healthy={arg}"


def test_health_reports_per_family_status_and_latest_update() -> None:
    clock = FakeClock()
    state = ProxierHealth(60, clock)
    state.updated(4)
    clock.now += 5
    state.updated(6)
    state.queued_update(6)
    clock.now += 100
    h = state.health()
    assert not h.healthy
    assert h.last_updated == T0 + 5
    assert h.status[4].healthy and not h.status[6].healthy
    assert h.status[4].last_updated == T0


@pytest.mark.parametrize(
    ("required", "node", "eligible"),
    [
        (False, None, True),
        (False, Node("n1"), True),
        (False, Node("n1", deleting=True), False),
        (True, None, False),
        (True, Node("n1"), True),
        (True, Node("n1", deleting=True), False),
    ],
    ids=[
        "manifests: no node object",
        "manifests: node present",
        "manifests: node being deleted",
        "api: node deleted or unknown",
        "api: node present",
        "api: node being deleted",
    ],
)
def test_node_eligibility(required: bool, node: Node | None, eligible: bool) -> None:
    state = ProxierHealth(60, FakeClock(), node_required=required)
    state.sync_node(Node("n1", deleting=True))
    state.sync_node(node)
    assert state.node_eligible is eligible


def test_with_an_api_the_node_is_not_eligible_until_its_node_object_arrives() -> None:
    state = ProxierHealth(60, FakeClock(), families=(4,), node_required=True)
    assert healthz_response(state).status == 503
    assert livez_response(state).status == 200, "livez ignores the node"
    state.sync_node(Node("n1"))
    assert healthz_response(state).status == 200


def test_every_family_has_a_status_before_the_first_sync() -> None:
    clock = FakeClock()
    state = ProxierHealth(60, clock, families=(4, 6))
    doc = json.loads(healthz_response(state).body)
    assert doc["status"] == {
        "IPv4": {"lastUpdated": "0001-01-01T00:00:00Z", "healthy": True},
        "IPv6": {"lastUpdated": "0001-01-01T00:00:00Z", "healthy": True},
    }
    state.queued_update(6)
    clock.now += 61
    doc = json.loads(healthz_response(state).body)
    assert doc["status"]["IPv4"]["healthy"] is True and doc["status"]["IPv6"]["healthy"] is False


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (None, "0001-01-01T00:00:00Z"),
        (0.0, "1970-01-01T00:00:00Z"),
        (T0, "2023-11-14T22:13:20Z"),
        (T0 + 0.5, "2023-11-14T22:13:20.5Z"),
        (T0 + 0.000123, "2023-11-14T22:13:20.000123Z"),
    ],
    ids=["zero time", "epoch", "whole second", "trailing zeros trimmed", "microseconds"],
)
def test_times_render_like_go_json(ts: float | None, text: str) -> None:
    assert go_time(ts) == text


# ------------------------------------------------------------------ :10256


async def _probe_scenario(clock: FakeClock, state: ProxierHealth, metrics: Metrics) -> None:
    server = HealthServer(state, host="127.0.0.1", port=0, counter=metrics)
    await server.start()
    try:
        port = server.port
        ok = await get(port, "/healthz")
        assert ok.status == 200
        assert ok.headers["content-type"] == "application/json"
        body = ok.json()
        assert set(body) >= {"lastUpdated", "currentTime", "nodeEligible", "healthy"}
        assert body["nodeEligible"] is True and body["healthy"] is True
        assert body["lastUpdated"] == body["currentTime"] == go_time(clock.now)
        assert "nodeEligible" not in (await get(port, "/livez")).json()

        state.updated(4)
        synced_at = clock.now
        state.queued_update(4)
        clock.now += 61
        for path in ("/healthz", "/livez"):
            bad = await get(port, path)
            assert bad.status == 503, path
            doc = bad.json()
            assert doc["healthy"] is False
            assert doc["lastUpdated"] == go_time(synced_at), "an unhealthy answer shows the real last sync"
            assert doc["status"] == {"IPv4": {"lastUpdated": go_time(synced_at), "healthy": False}}

        state.updated(4)
        assert (await get(port, "/healthz")).status == 200

        state.sync_node(Node("n1", deleting=True))
        draining = await get(port, "/healthz")
        assert draining.status == 503 and draining.json()["nodeEligible"] is False
        assert (await get(port, "/livez")).status == 200, "livez ignores the node"

        assert (await get(port, "/nope")).status == 404
    finally:
        await server.close()


def test_healthz_and_livez_over_loopback(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    clock = FakeClock()
    state = ProxierHealth.for_sync_period(SYNC_PERIOD, clock)
    metrics = Metrics()
    run(_probe_scenario(clock, state, metrics))
    counts = {
        (name, labels["code"]): value
        for name, labels, value in (
            (s.name, s.labels, s.value) for fam in metrics.registry.collect() for s in fam.samples
        )
        if name in ("kubeproxy_proxy_healthz_total", "kubeproxy_proxy_livez_total")
    }
    assert counts[("kubeproxy_proxy_healthz_total", "200")] == 2
    assert counts[("kubeproxy_proxy_healthz_total", "503")] == 2
    assert counts[("kubeproxy_proxy_livez_total", "200")] == 2
    assert counts[("kubeproxy_proxy_livez_total", "503")] == 1


def test_health_server_survives_garbage(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    async def scenario() -> None:
        server = HealthServer(ProxierHealth(60), host="127.0.0.1", port=0)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"NONSENSE\r\n\r\n")
            await writer.drain()
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
            assert (await get(server.port, "/healthz")).status == 200
        finally:
            await server.close()

    run(scenario())


# ------------------------------------------------------------------ health-check node ports

A = ServiceKey("shop", "frontend")
B = ServiceKey("shop", "checkout")


def test_service_health_checks_follow_services_and_endpoints(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    healthy = {"now": True}

    async def scenario() -> None:
        shs = ServiceHealthServer(lambda: healthy["now"], hosts=["127.0.0.1"], node_name="n1")
        try:
            await shs.sync_services({A: 0, B: 0})
            ports = dict(shs.services)
            assert set(ports) == {A, B} and all(ports.values())

            none = await get(ports[A], "/any/path?x=1")
            assert none.status == 503
            assert none.headers["x-load-balancing-endpoint-weight"] == "0"
            assert none.json() == {
                "service": {"namespace": "shop", "name": "frontend"},
                "localEndpoints": 0,
                "serviceProxyHealthy": True,
            }

            shs.sync_endpoints({A: 2, ServiceKey("other", "svc"): 5})
            some = await get(ports[A], "/")
            assert some.status == 200
            assert some.headers["x-load-balancing-endpoint-weight"] == "2"
            assert some.json()["localEndpoints"] == 2
            assert (await get(ports[B], "/")).status == 503, "B has no local endpoints"

            healthy["now"] = False
            stalled = await get(ports[A], "/")
            assert stalled.status == 503 and stalled.json()["serviceProxyHealthy"] is False
            healthy["now"] = True

            shs.sync_endpoints({})
            assert (await get(ports[A], "/")).status == 503, "a service missing from the map has no endpoints"

            await shs.sync_services({B: 0})
            assert set(shs.services) == {B}
            assert await refused(ports[A]), "A's port must be closed once A is gone"
            assert (await get(ports[B], "/")).status == 503, "B keeps its listener"
        finally:
            await shs.close()
        assert await refused(ports[B])

    run(scenario())


def test_service_health_check_port_in_use_is_retried(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    async def scenario() -> None:
        blocker = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        shs = ServiceHealthServer(lambda: True, hosts=["127.0.0.1"])
        try:
            await shs.sync_services({A: port})
            assert A not in shs.services, "a taken port is reported, not fatal"
            blocker.close()
            await blocker.wait_closed()
            await shs.sync_services({A: port})
            assert shs.services == {A: port}
            shs.sync_endpoints({A: 1})
            assert (await get(port, "/healthz")).status == 200
        finally:
            blocker.close()
            await shs.close()

    run(scenario())


def test_service_health_body_is_kube_proxy_shaped() -> None:
    """kube-proxy prints the body as indented JSON; clients parse it, so only the parse must match."""
    shs = ServiceHealthServer(lambda: True)
    handler = shs._handler_for(A)
    shs.sync_endpoints({A: 3})
    from kproxy.infra.httpd import Request

    resp = handler(Request("GET", "/"))
    assert resp.status == 200
    assert json.loads(resp.body)["localEndpoints"] == 3
    assert ("X-Content-Type-Options", "nosniff") in resp.headers


def _port(name: str, port_name: str = "", hc: int = 0, local: bool = False) -> ServicePort:
    return ServicePort(
        ServicePortName("shop", name, port_name, "TCP"),
        4,
        "10.96.0.1",
        80,
        node_port=30080,
        external_local=local,
        health_check_node_port=hc,
    )


def test_health_check_ports_only_for_local_policy_load_balancers() -> None:
    view = [
        (_port("frontend", "http", hc=32000, local=True), ()),
        (_port("frontend", "https", hc=32000, local=True), ()),
        (_port("checkout", hc=0, local=True), ()),
        (_port("cluster-wide", hc=32001, local=False), ()),
    ]
    assert health_check_ports(view) == {A: 32000}


def test_local_ready_endpoints_count_distinct_local_ready_ips() -> None:
    view = [
        (
            _port("frontend", "http"),
            (
                Endpoint("10.244.1.2", 8080, is_local=True),
                Endpoint("10.244.1.3", 8080, ready=False, serving=True, terminating=True, is_local=True),
                Endpoint("10.244.2.9", 8080),
            ),
        ),
        (_port("frontend", "https"), (Endpoint("10.244.1.2", 8443, is_local=True),)),
        (_port("checkout"), (Endpoint("10.244.2.7", 80),)),
    ]
    assert local_ready_endpoints(view) == {A: 1}, (
        "same pod on two ports counts once; terminating and remote never"
    )


# The incremental index must always say what the whole-view functions say, after any
# sequence of per-port changes in either family.
_NAMES = [ServicePortName("shop", svc, pn, "TCP") for svc in ("a", "b") for pn in ("http", "https")]
_EPS = [
    Endpoint("10.244.1.2", 8080, is_local=True),
    Endpoint("10.244.1.3", 8080, is_local=True),
    Endpoint("10.244.1.3", 8080, ready=False, serving=True, terminating=True, is_local=True),
    Endpoint("10.244.2.9", 8080),
]
_entry = st.tuples(
    st.booleans(),  # externalTrafficPolicy Local
    st.booleans(),  # has a health-check node port (one per service, as the API allots it)
    st.lists(st.sampled_from(_EPS), max_size=3, unique=True),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([4, 6]), st.sampled_from(_NAMES), st.none() | _entry), max_size=25))
def test_health_index_matches_a_full_recount(steps: list[tuple[int, ServicePortName, Any]]) -> None:
    views: dict[int, dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]] = {4: {}, 6: {}}
    index = ServiceHealthIndex()
    for family, name, entry in steps:
        view = views[family]
        if entry is None:
            view.pop(name, None)
        else:
            local, has_hc, eps = entry
            hc = {"a": 32000, "b": 32001}[name.name] if has_hc else 0
            sp = ServicePort(name, 4, "10.96.0.1", 80, external_local=local, health_check_node_port=hc)
            view[name] = (sp, tuple(eps))
        before = (dict(index.wanted), dict(index.local_ready))
        changed = index.update(family, view, [name])
        everything = [e for v in views.values() for e in v.values()]
        assert index.wanted == health_check_ports(everything)
        assert index.local_ready == local_ready_endpoints(everything)
        assert changed == (before != (index.wanted, index.local_ready))
