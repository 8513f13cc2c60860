"""The node agent's sync decisions, with a recording backend instead of a kernel."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace

import pytest

from kproxy.agent import NodeAgent, make_backend
from kproxy.metrics import Metrics
from kproxy.settings import Settings, add_run_arguments, from_args
from kproxy.state.model import Node
from tests.support.objects import eps, svc
from tests.support.recorder import Recorder


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


def _latency_count(a: NodeAgent, family: str) -> float:
    value = a.metrics.registry.get_sample_value(
        "kubeproxy_network_programming_duration_seconds_count", {"ip_family": family}
    )
    return 0.0 if value is None else value


def test_network_programming_latency_counts_plausible_triggers_under_their_family() -> None:
    """Upstream's rules: a trigger time from before the agent started (the bundled example's
    years-old annotation) or from the future is no latency anyone had; an IPv4 slice's change
    is observed under IPv4 only, even on a dual-stack node."""
    import time

    settings = Settings(node_name="node-a", families=(4, 6), healthz_bind_address="", metrics_bind_address="")
    a = NodeAgent(settings, Recorder())
    a.tracker.replace("Service", [svc("web")])
    a.tracker.replace("EndpointSlice", [])
    a.tracker.replace("Node", [])
    run(a._sync())
    now = time.time()
    a.tracker.upsert(replace(eps("web", ("10.244.0.5",), name="old"), trigger_time=now - 8.15e7))
    a.tracker.upsert(replace(eps("web", ("10.244.0.6",), name="future"), trigger_time=now + 3600))
    a.tracker.upsert(
        replace(eps("web", ("10.244.0.7",), name="fresh"), trigger_time=a.tracker.started + 0.001)
    )
    run(a._sync())
    assert (_latency_count(a, "IPv4"), _latency_count(a, "IPv6")) == (1.0, 0.0)
    total = a.metrics.registry.get_sample_value(
        "kubeproxy_network_programming_duration_seconds_sum", {"ip_family": "IPv4"}
    )
    assert total is not None and 0 <= total < 8e7


def test_sync_log_line_names_the_services_it_changed() -> None:
    from kproxy.agent import name_some

    assert name_some([]) == ""
    assert name_some(["b/x", "a/y"]) == "a/y,b/x"
    assert name_some([f"ns/s{i}" for i in range(8)]) == "ns/s0,ns/s1,ns/s2,ns/s3,ns/s4,+3 more"


def test_userspace_mode_gets_the_engine_flag_and_metric_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy.backends.userspace import mode

    monkeypatch.setattr(mode, "detect_backend", lambda override=None: "nft")
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    settings = from_args(
        p.parse_args(["--node-name=n", "--proxy-mode=userspace", "--userspace-tcp-engine=protocol"])
    )
    metrics = Metrics()
    backend = make_backend(settings, metrics)
    assert isinstance(backend, mode.UserspaceMode)
    assert backend.engine == "protocol"
    assert backend.hooks is not None
    backend.hooks.connection_limit("default/web")
    label = {"service_port": "default/web"}
    assert metrics.registry.get_sample_value("kproxy_userspace_connections_refused_total", label) == 1
