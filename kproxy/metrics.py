"""kube-proxy's Prometheus metrics, same names, types, labels and buckets, on :10249.

Existing dashboards and alerts (sync latency, network programming latency,
restore failures, "last sync long ago") keep working when a node moves from
kube-proxy to kproxy. Names and shapes follow pkg/proxy/metrics/metrics.go of a
recent release (1.33+), where most sync metrics carry `ip_family` ("IPv4"/"IPv6").

Everything lives in one `CollectorRegistry` per `Metrics` object (never the
global one), so tests and several agents in one process do not collide. The
agent calls plain methods; it never touches prometheus_client itself:

    m = Metrics(families=(4, 6))
    m.sync_queued(4)                                # a change needs a rule write
    m.observe_sync(4, seconds, full=True)           # after each sync attempt
    m.synced(4)                                     # after a successful one
    m.restore_failed(4, partial=False)
    m.set_rules(4, "nat", total=1234, last=56)      # rules owned / written this sync
    m.set_no_local_endpoints(4, internal=0, external=2)
    m.observe_network_programming(4, trigger_times, now)
    m.count_changes(services=1, endpoints=3); m.set_pending(services=0, endpoints=0)
    m.conntrack_cleaned(4, deleted=2, seconds=0.004)
    m.count_healthz(200); m.count_livez(503)        # HealthServer does this itself

`MetricsServer` serves /metrics (text exposition), /proxyMode ("iptables" or
"userspace") and /healthz. kube-proxy's /healthz on this port is the generic
component healthz (always "ok"); pass `healthz=` to serve something else, e.g.
`lambda req: kproxy.health.healthz_response(state)`.

Metrics kube-proxy has that kproxy leaves out: the nftables ones (no nftables
mode) and the two nfacct packet counters (ct_state_invalid_dropped,
localhost_nodeports_accepted). kproxy-only metrics, e.g. for the userspace
forwarder, belong in `_kproxy_metrics` with the prefix `kproxy_`, never `kubeproxy_`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kproxy import log
from kproxy.health import FAMILY_NAMES
from kproxy.httpd import HttpServer, Request, Response, not_found, text
from kproxy.state.model import Family

# kube-proxy exposes no `<name>_created` series; without this every counter would grow one.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

DEFAULT_METRICS_PORT = 10249
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What client_golang sends; Prometheus 2 and 3 both read it."""


def exponential_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    return tuple(start * factor**i for i in range(count))


def linear_buckets(start: float, width: float, count: int) -> tuple[float, ...]:
    return tuple(start + width * i for i in range(count))


SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
"""1 ms .. 16.384 s, as kube-proxy's sync histograms."""

NETWORK_PROGRAMMING_BUCKETS = (
    0.0,
    *linear_buckets(0.25, 0.25, 2),
    *linear_buckets(1, 1, 59),
    *linear_buckets(60, 5, 12),
    *linear_buckets(120, 30, 7),
)
"""kube-proxy's: 0 (component-base's MergeBuckets starts with a zero bucket), 0.25 s, 0.5 s,
1..59 s, 60..115 s by 5, 120..300 s by 30; +Inf is added by the client library."""

TABLES = ("filter", "nat")
TRAFFIC_POLICIES = ("internal", "external")
PROBE_CODES = ("200", "503")


class Metrics:
    """Every kubeproxy_* series, one registry. Families not listed still work; listed ones show zeros from the start."""

    def __init__(self, families: Sequence[Family] = (4,), registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        fam = ["ip_family"]

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"kubeproxy_{name}", doc, fam, buckets=buckets, registry=r)

        self.sync_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS
        )
        self.sync_full_duration = hist(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_BUCKETS,
        )
        self.sync_partial_duration = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_BUCKETS,
        )
        self.network_programming = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.conntrack_duration = hist(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            SYNC_BUCKETS,
        )
        self.last_synced = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            fam,
            registry=r,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            fam,
            registry=r,
        )
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=r,
        )
        self.endpoint_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            registry=r,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=r,
        )
        self.service_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            registry=r,
        )
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
            fam,
            registry=r,
        )
        self.partial_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
            fam,
            registry=r,
        )
        self.rules_total = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["ip_family", "table"],
            registry=r,
        )
        self.rules_last = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ["ip_family", "table"],
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy", "ip_family"],
            registry=r,
        )
        self.conntrack_deleted = Counter(
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            fam,
            registry=r,
        )
        self.healthz_total = Counter(
            "kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], registry=r
        )
        self.livez_total = Counter(
            "kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], registry=r
        )
        self._kproxy_metrics(r)
        for f in families:
            self._init_family(f)
        for code in PROBE_CODES:
            self.healthz_total.labels(code)
            self.livez_total.labels(code)

    def _kproxy_metrics(self, registry: CollectorRegistry) -> None:
        """Metrics kube-proxy does not have (prefix kproxy_); none yet."""

    def _init_family(self, family: Family) -> None:
        """Create the labelled children so a scrape shows every series before the first sync."""
        name = FAMILY_NAMES[family]
        for h in (
            self.sync_duration,
            self.sync_full_duration,
            self.sync_partial_duration,
            self.network_programming,
            self.conntrack_duration,
        ):
            h.labels(name)
        for g in (self.last_synced, self.last_queued):
            g.labels(name)
        for c in (self.restore_failures, self.partial_restore_failures, self.conntrack_deleted):
            c.labels(name)
        for table in TABLES:
            self.rules_total.labels(name, table)
            self.rules_last.labels(name, table)
        for policy in TRAFFIC_POLICIES:
            self.no_local_endpoints.labels(policy, name)

    # ------------------------------------------------------------ agent API

    def observe_sync(self, family: Family, seconds: float, *, full: bool) -> None:
        """One sync attempt of `family`, successful or not, as kube-proxy measures it."""
        name = FAMILY_NAMES[family]
        self.sync_duration.labels(name).observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).labels(name).observe(seconds)

    def synced(self, family: Family, now: float | None = None) -> None:
        self.last_synced.labels(FAMILY_NAMES[family]).set(time.time() if now is None else now)

    def sync_queued(self, family: Family, now: float | None = None) -> None:
        self.last_queued.labels(FAMILY_NAMES[family]).set(time.time() if now is None else now)

    def restore_failed(self, family: Family, *, partial: bool) -> None:
        """A failed iptables-restore; a partial one (which forces a full retry) counts in both series."""
        name = FAMILY_NAMES[family]
        self.restore_failures.labels(name).inc()
        if partial:
            self.partial_restore_failures.labels(name).inc()

    def set_rules(self, family: Family, table: str, *, total: int, last: int) -> None:
        """Rules kproxy owns in `table` after the sync, and how many it wrote in it."""
        name = FAMILY_NAMES[family]
        self.rules_total.labels(name, table).set(total)
        self.rules_last.labels(name, table).set(last)

    def set_no_local_endpoints(self, family: Family, *, internal: int, external: int) -> None:
        """Services whose Local internal/external policy found no local endpoint this sync."""
        name = FAMILY_NAMES[family]
        self.no_local_endpoints.labels("internal", name).set(internal)
        self.no_local_endpoints.labels("external", name).set(external)

    def observe_network_programming(self, family: Family, trigger_times: Iterable[float], now: float) -> None:
        """Trigger times (EndpointSlice last-change-trigger-time annotations, Unix seconds) just programmed.

        A trigger time in the future (clock skew between node and control plane) counts as 0 s
        rather than a negative observation, which would make the histogram's sum go backwards.
        """
        h = self.network_programming.labels(FAMILY_NAMES[family])
        for t in trigger_times:
            h.observe(max(0.0, now - t))

    def count_changes(self, *, services: int = 0, endpoints: int = 0) -> None:
        if services:
            self.service_changes_total.inc(services)
        if endpoints:
            self.endpoint_changes_total.inc(endpoints)

    def set_pending(self, *, services: int, endpoints: int) -> None:
        self.service_changes_pending.set(services)
        self.endpoint_changes_pending.set(endpoints)

    def conntrack_cleaned(self, family: Family, *, deleted: int, seconds: float) -> None:
        name = FAMILY_NAMES[family]
        self.conntrack_duration.labels(name).observe(seconds)
        if deleted:
            self.conntrack_deleted.labels(name).inc(deleted)

    def count_healthz(self, code: int) -> None:
        self.healthz_total.labels(str(code)).inc()

    def count_livez(self, code: int) -> None:
        self.livez_total.labels(str(code)).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def _ok(_: Request) -> Response:
    return text(200, "ok")


class MetricsServer:
    """:10249 /metrics, /proxyMode and /healthz. `host` None or "" binds every address."""

    def __init__(
        self,
        metrics: Metrics,
        proxy_mode: str,
        host: str | None = None,
        port: int = DEFAULT_METRICS_PORT,
        healthz: Callable[[Request], Response] | None = None,
    ) -> None:
        self.metrics = metrics
        self.proxy_mode = proxy_mode
        self._healthz = healthz or _ok
        self._http = HttpServer(self.handle, [host] if host else None, port, name="metrics")

    @property
    def port(self) -> int:
        return self._http.port

    def handle(self, req: Request) -> Response:
        if req.path == "/metrics":
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        if req.path == "/proxyMode":
            return Response(200, self.proxy_mode.encode(), headers=(("X-Content-Type-Options", "nosniff"),))
        if req.path == "/healthz":
            return self._healthz(req)
        return not_found(req)

    async def start(self) -> None:
        await self._http.start()
        log.info("metrics_listening", port=self.port, proxy_mode=self.proxy_mode)

    async def close(self) -> None:
        await self._http.close()
