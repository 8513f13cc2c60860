"""kube-proxy's metric names, types, labels and buckets, scraped over loopback and parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kproxy.configz import configz, go_duration
from kproxy.health import ProxierHealth, healthz_response
from kproxy.metrics import (
    NETWORK_PROGRAMMING_BUCKETS,
    SYNC_BUCKETS,
    Metrics,
    MetricsServer,
    NoLocalEndpoints,
    no_local_flags,
)
from kproxy.settings import Settings
from kproxy.state.model import Endpoint, ServicePort, ServicePortName
from tests.support.httpclient import get

# name (as a scraper sees the family) -> (type, label names besides le)
EXPECTED: dict[str, tuple[str, frozenset[str]]] = {
    "kubeproxy_sync_proxy_rules_duration_seconds": ("histogram", frozenset({"ip_family"})),
    "kubeproxy_sync_full_proxy_rules_duration_seconds": ("histogram", frozenset({"ip_family"})),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": ("histogram", frozenset({"ip_family"})),
    "kubeproxy_network_programming_duration_seconds": ("histogram", frozenset({"ip_family"})),
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": ("histogram", frozenset({"ip_family"})),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": ("gauge", frozenset({"ip_family"})),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": ("gauge", frozenset({"ip_family"})),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": ("gauge", frozenset()),
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": ("counter", frozenset()),
    "kubeproxy_sync_proxy_rules_service_changes_pending": ("gauge", frozenset()),
    "kubeproxy_sync_proxy_rules_service_changes_total": ("counter", frozenset()),
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": ("counter", frozenset({"ip_family"})),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": (
        "counter",
        frozenset({"ip_family"}),
    ),
    "kubeproxy_sync_proxy_rules_iptables_total": ("gauge", frozenset({"ip_family", "table"})),
    "kubeproxy_sync_proxy_rules_iptables_last": ("gauge", frozenset({"ip_family", "table"})),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": (
        "gauge",
        frozenset({"ip_family", "traffic_policy"}),
    ),
    "kubeproxy_conntrack_reconciler_deleted_entries_total": ("counter", frozenset({"ip_family"})),
    "kubeproxy_proxy_healthz_total": ("counter", frozenset({"code"})),
    "kubeproxy_proxy_livez_total": ("counter", frozenset({"code"})),
}


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 30))


def _scrape(server: MetricsServer, path: str = "/metrics") -> Any:
    async def go() -> Any:
        await server.start()
        try:
            return await get(server.port, path)
        finally:
            await server.close()

    return _run(go())


def _families(text: str) -> dict[str, Any]:
    out = {}
    for fam in text_string_to_metric_families(text):
        # The parser drops a counter's _total from the family name; scrapers query the sample name.
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def _samples(fam: Any) -> list[Sample]:
    return list(fam.samples)


@pytest.fixture
def busy_metrics() -> Metrics:
    m = Metrics(families=(4, 6))
    m.sync_queued(4, now=1_700_000_000)
    m.observe_sync(4, 0.003, full=True)
    m.observe_sync(4, 0.0004, full=False)
    m.synced(4, now=1_700_000_001)
    m.restore_failed(6, partial=True)
    m.set_rules(4, "nat", total=120, last=12)
    m.set_no_local_endpoints(4, internal=1, external=2)
    m.observe_network_programming(4, [1_700_000_000.0, 1_700_000_009.0], now=1_700_000_010.0)
    m.count_changes(services=2, endpoints=5)
    m.set_pending(services=1, endpoints=3)
    m.conntrack_cleaned(4, deleted=2, seconds=0.01)
    m.count_healthz(200)
    return m


def test_every_kube_proxy_metric_is_exposed_with_its_type_and_labels(busy_metrics: Metrics) -> None:
    got = _scrape(MetricsServer(busy_metrics, "iptables", host="127.0.0.1", port=0))
    assert got.status == 200
    assert got.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = got.body.decode()
    fams = _families(text)
    for name, (kind, labels) in EXPECTED.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, f"{name} is a {fams[name].type}, kube-proxy has a {kind}"
        for s in _samples(fams[name]):
            assert set(s.labels) - {"le"} == labels, f"{s.name} labels {sorted(s.labels)}"
    assert "_created" not in text, "kube-proxy exposes no _created series"
    others = [n for n in fams if not n.startswith(("kubeproxy_", "kproxy_", "process_", "python_"))]
    assert not others, "only kube-proxy's names, our own and the standard collectors in this registry"


def test_counter_sample_names_are_exact(busy_metrics: Metrics) -> None:
    text = busy_metrics.exposition().decode()
    assert "\nkubeproxy_sync_proxy_rules_endpoint_changes_total 5.0\n" in text
    assert '\nkubeproxy_proxy_healthz_total{code="200"} 1.0\n' in text
    assert '\nkubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv6"} 1.0\n' in text
    assert (
        '\nkubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family="IPv6"} 1.0\n' in text
    )


def _bucket_bounds(fam: Any, family: str = "IPv4") -> list[float]:
    return [
        float(s.labels["le"])
        for s in fam.samples
        if s.name.endswith("_bucket") and s.labels["ip_family"] == family
    ]


def test_sync_histograms_use_kube_proxys_exponential_buckets(busy_metrics: Metrics) -> None:
    fams = _families(busy_metrics.exposition().decode())
    want = [0.001 * 2**i for i in range(15)]
    assert list(SYNC_BUCKETS) == pytest.approx(want)
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    ):
        bounds = _bucket_bounds(fams[name])
        assert bounds[:-1] == pytest.approx(want), name
        assert math.isinf(bounds[-1])


def test_network_programming_buckets() -> None:
    want = [0.0, 0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30)]
    assert list(NETWORK_PROGRAMMING_BUCKETS) == pytest.approx(want)
    fams = _families(Metrics().exposition().decode())
    bounds = _bucket_bounds(fams["kubeproxy_network_programming_duration_seconds"])
    assert bounds[:-1] == pytest.approx(want)


def _value(m: Metrics, sample: str, **labels: str) -> float:
    v = m.registry.get_sample_value(sample, labels)
    assert v is not None, f"{sample}{labels} not exposed"
    return v


def test_sync_observations_land_in_full_or_partial(busy_metrics: Metrics) -> None:
    m = busy_metrics
    assert _value(m, "kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv4") == 2
    assert _value(m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", ip_family="IPv4") == 1
    assert _value(m, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ip_family="IPv4") == 1
    assert (
        _value(m, "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket", ip_family="IPv4", le="0.001")
        == 1
    )
    assert _value(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4") == 1_700_000_001
    assert (
        _value(m, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ip_family="IPv4")
        == 1_700_000_000
    )
    assert _value(m, "kubeproxy_sync_proxy_rules_iptables_total", ip_family="IPv4", table="nat") == 120
    assert _value(m, "kubeproxy_sync_proxy_rules_iptables_last", ip_family="IPv4", table="nat") == 12
    assert (
        _value(
            m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            ip_family="IPv4",
            traffic_policy="external",
        )
        == 2
    )
    assert _value(m, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert _value(m, "kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv4") == 2


def test_network_programming_latency_from_trigger_times(busy_metrics: Metrics) -> None:
    m = busy_metrics
    assert _value(m, "kubeproxy_network_programming_duration_seconds_count", ip_family="IPv4") == 2
    assert _value(m, "kubeproxy_network_programming_duration_seconds_sum", ip_family="IPv4") == 11.0
    assert _value(m, "kubeproxy_network_programming_duration_seconds_bucket", ip_family="IPv4", le="1.0") == 1
    m.observe_network_programming(4, [1_700_000_100.0], now=1_700_000_010.0)
    assert _value(m, "kubeproxy_network_programming_duration_seconds_sum", ip_family="IPv4") == 11.0, (
        "a trigger time from the future (clock skew) must not pull the sum down"
    )


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.count_changes(services=3)
    assert _value(a, "kubeproxy_sync_proxy_rules_service_changes_total") == 3
    assert _value(b, "kubeproxy_sync_proxy_rules_service_changes_total") == 0


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_proxy_mode(mode: str) -> None:
    got = _scrape(MetricsServer(Metrics(), mode, host="127.0.0.1", port=0), "/proxyMode")
    assert (got.status, got.body) == (200, mode.encode())


def test_metrics_port_healthz_defaults_to_ok_and_can_be_the_proxier_health() -> None:
    got = _scrape(MetricsServer(Metrics(), "iptables", host="127.0.0.1", port=0), "/healthz")
    assert (got.status, got.body) == (200, b"ok"), "kube-proxy's generic component healthz"
    now = [0.0]
    state = ProxierHealth(60, clock=lambda: now[0])
    state.queued_update(4)
    now[0] = 61.0
    server = MetricsServer(
        Metrics(), "iptables", host="127.0.0.1", port=0, healthz=lambda _: healthz_response(state)
    )
    assert _scrape(server, "/healthz").status == 503


def test_unknown_path_is_404() -> None:
    assert _scrape(MetricsServer(Metrics(), "iptables", host="127.0.0.1", port=0), "/debug").status == 404


def test_process_and_runtime_collectors_sit_beside_kube_proxys_metrics() -> None:
    """Dashboards built for kube-proxy graph process_* (CPU, memory, descriptors) too."""
    fams = _families(Metrics().exposition().decode())
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "python_gc_collections_total",
        "python_info",
    ):
        assert name in fams, f"{name} missing from /metrics"
    assert _value(Metrics(), "process_resident_memory_bytes") > 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (30, "30s"), (1.5, "1.5s"), (0.1, "100ms"), (90, "1m30s"), (3600, "1h0m0s"), (1e-6, "1µs")],
)
def test_durations_print_like_go(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_configz_serves_the_effective_configuration_as_kube_proxy_does() -> None:
    s = Settings(
        node_name="node-a",
        cluster_cidr=("10.244.0.0/16", "fd00:10:244::/56"),
        sync_period=30,
        min_sync_period=1,
        masquerade_bit=14,
        nodeport_addresses=("primary",),
    )
    server = MetricsServer(Metrics(), "iptables", host="127.0.0.1", port=0, configz=lambda: configz(s))
    got = _scrape(server, "/configz")
    assert got.status == 200 and got.headers["content-type"] == "application/json"
    doc = got.json()
    assert list(doc) == ["kubeproxy.config.k8s.io"], "one entry, under kube-proxy's API group"
    cfg = doc["kubeproxy.config.k8s.io"]
    assert cfg["mode"] == "iptables" and cfg["hostnameOverride"] == "node-a"
    assert cfg["clusterCIDR"] == "10.244.0.0/16,fd00:10:244::/56"
    assert cfg["syncPeriod"] == "30s" and cfg["minSyncPeriod"] == "1s"
    assert cfg["iptables"]["masqueradeBit"] == 14
    assert cfg["nodePortAddresses"] == ["primary"]
    assert cfg["metricsBindAddress"] == "127.0.0.1:10249"


def test_configz_is_404_when_not_configured() -> None:
    assert _scrape(MetricsServer(Metrics(), "iptables", host="127.0.0.1", port=0), "/configz").status == 404


# ------------------------------------------------------ no local endpoints

_LOCAL = Endpoint("10.244.1.2", 8080, is_local=True)
_REMOTE = Endpoint("10.244.2.9", 8080)
_LOCAL_TERM = Endpoint("10.244.1.3", 8080, ready=False, serving=True, terminating=True, is_local=True)
_REMOTE_DOWN = Endpoint("10.244.2.8", 8080, ready=False, serving=False)
_NAME = ServicePortName("shop", "web", "", "TCP")


def _port(itp: bool = False, etp: bool = False, node_port: int = 0) -> ServicePort:
    return ServicePort(_NAME, 4, "10.96.0.1", 80, node_port=node_port, internal_local=itp, external_local=etp)


@pytest.mark.parametrize(
    ("sp", "eps", "flags"),
    [
        (_port(), (_REMOTE,), (False, False)),
        (_port(itp=True), (_REMOTE,), (True, False)),
        (_port(itp=True), (_LOCAL, _REMOTE), (False, False)),
        (_port(itp=True), (), (False, False)),
        (_port(itp=True), (_REMOTE_DOWN,), (False, False)),
        (_port(itp=True), (_LOCAL_TERM, _REMOTE), (False, False)),
        (_port(itp=True), (_LOCAL_TERM,), (False, False)),
        (_port(etp=True, node_port=30080), (_REMOTE,), (False, True)),
        (_port(etp=True), (_REMOTE,), (False, False)),
        (_port(itp=True, etp=True, node_port=30080), (_REMOTE,), (True, True)),
        (_port(itp=True, etp=True, node_port=30080), (_LOCAL,), (False, False)),
    ],
    ids=[
        "cluster policies never count",
        "internal Local, endpoints only elsewhere",
        "internal Local, one local endpoint",
        "no endpoints at all: rejected, not counted",
        "no usable endpoint anywhere: not counted",
        "a terminating local one serves Local even with ready ones elsewhere",
        "terminating local fallback serves",
        "external Local with a node port, endpoints elsewhere",
        "external Local without any external access: policy means nothing",
        "both Local",
        "both Local, local endpoint",
    ],
)
def test_no_local_endpoints_as_kube_proxy_counts(
    sp: ServicePort, eps: tuple[Endpoint, ...], flags: tuple[bool, bool]
) -> None:
    assert no_local_flags(sp, eps) == flags


_NAMES = [ServicePortName("shop", svc, "", "TCP") for svc in ("a", "b", "c")]
_entry = st.tuples(
    st.booleans(),
    st.booleans(),
    st.lists(st.sampled_from([_LOCAL, _REMOTE, _LOCAL_TERM, _REMOTE_DOWN]), max_size=3, unique=True),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([4, 6]), st.sampled_from(_NAMES), st.none() | _entry), max_size=25))
def test_no_local_index_matches_a_full_recount(steps: list[tuple[int, ServicePortName, Any]]) -> None:
    """The gauge is kept per changed port; it must always equal a walk over everything."""
    views: dict[int, dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]] = {4: {}, 6: {}}
    index = NoLocalEndpoints()
    for family, name, entry in steps:
        view = views[family]
        if entry is None:
            view.pop(name, None)
        else:
            itp, etp, eps = entry
            sp = ServicePort(
                name, 4, "10.96.0.1", 80, node_port=30080, internal_local=itp, external_local=etp
            )
            view[name] = (sp, tuple(eps))
        got = index.update(family, view, [name])
        flags = [no_local_flags(sp, eps) for sp, eps in view.values()]
        assert got == (sum(f[0] for f in flags), sum(f[1] for f in flags))
        assert index.counts(family) == got
