"""The node agent's sync decisions, with a recording backend instead of a kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace

from kproxy.agent import NodeAgent, SyncReport
from kproxy.changes import PortEntry
from kproxy.config import RenderConfig
from kproxy.errors import RestoreError
from kproxy.settings import Settings
from kproxy.state.model import Family, Node, ServicePortName
from tests.test_changes import eps, svc


class Recorder:
    mode = "iptables"

    def __init__(self) -> None:
        self.calls: list[tuple[Family, set[str] | None, int]] = []
        self.fail_next = False

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        if self.fail_next:
            self.fail_next = False
            raise RestoreError(family, 1, "iptables-restore: line 3 failed", 3)
        self.calls.append((family, None if changed is None else {str(n) for n in changed}, len(ports)))
        return SyncReport(full=changed is None)

    async def close(self) -> None:
        pass


def agent() -> tuple[NodeAgent, Recorder]:
    settings = Settings(node_name="node-a", families=(4,), healthz_bind_address="", metrics_bind_address="")
    backend = Recorder()
    return NodeAgent(settings, backend), backend


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_nothing_is_written_before_the_initial_lists() -> None:
    a, backend = agent()
    a.tracker.upsert(svc())
    assert run(a._sync()) is True
    assert backend.calls == []


def test_first_sync_is_full_then_only_changed_ports_are_passed() -> None:
    a, backend = agent()
    a.tracker.replace("Service", [svc("web"), svc("api", "10.96.0.11")])
    a.tracker.replace("EndpointSlice", [eps("web"), eps("api")])
    a.tracker.replace("Node", [])
    run(a._sync())
    a.tracker.upsert(eps("api", ("10.244.0.9",)))
    run(a._sync())
    assert backend.calls == [(4, None, 2), (4, {"default/api:http"}, 2)]


def test_a_failed_sync_loses_no_change_and_health_reports_pending() -> None:
    a, backend = agent()
    a.tracker.replace("Service", [svc("web")])
    a.tracker.replace("EndpointSlice", [eps("web")])
    a.tracker.replace("Node", [])
    run(a._sync())
    a.tracker.upsert(eps("web", ("10.244.0.7",)))
    a.changed()
    backend.fail_next = True
    assert run(a._sync()) is False
    assert a.tracker.has_pending, "the failed batch must be given back"
    assert run(a._sync()) is True
    assert not a.tracker.has_pending


def test_node_change_rebuilds_render_config() -> None:
    a, _backend = agent()
    a.tracker.replace("Service", [svc("web")])
    a.tracker.replace("EndpointSlice", [eps("web")])
    a.tracker.replace("Node", [])
    run(a._sync())
    assert a._cfgs[4].node_zone == ""
    a.tracker.upsert(replace(Node(name="node-a"), labels=(("topology.kubernetes.io/zone", "z9"),)))
    run(a._sync())
    assert a._cfgs[4].node_zone == "z9"
