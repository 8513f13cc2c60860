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
    m.set_no_local_endpoints(4, internal=0, external=2)  # from NoLocalEndpoints.update
    m.observe_network_programming(4, trigger_times, now)
    m.count_changes(services=1, endpoints=3); m.set_pending(services=0, endpoints=0)
    m.conntrack_cleaned(4, deleted=2, seconds=0.004)
    m.count_healthz(200); m.count_livez(503)        # HealthServer does this itself

`MetricsServer` serves /metrics (text exposition, with prometheus_client's
process, platform and GC collectors beside kube-proxy's series, as a Go
binary's registry has process_* and go_*), /proxyMode ("iptables" or
"userspace"), /configz (the effective configuration as JSON, see
kproxy.configz) and /healthz. kube-proxy's /healthz on this port is the generic
component healthz (always "ok"); pass `healthz=` to serve something else, e.g.
`lambda req: kproxy.health.healthz_response(state)`.

As kube-proxy's RegisterMetrics, the mode picks the backend's series: iptables mode
(and userspace) has the iptables_* restore failures and rule counts, nftables mode
(`Metrics(mode="nftables")`) has sync_proxy_rules_nftables_sync_failures_total and
..._cleanup_failures_total instead; `restore_failed` counts under whichever the mode has.

Metrics kube-proxy has that kproxy leaves out: the two nfacct packet counters (ct_state_invalid_dropped,
localhost_nodeports_accepted). kproxy-only metrics, e.g. for the userspace
forwarder, belong in `_kproxy_metrics` with the prefix `kproxy_`, never `kubeproxy_`.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from kproxy.health import FAMILY_NAMES
from kproxy.infra import log
from kproxy.infra.httpd import HttpServer, Request, Response, not_found, text
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName
from kproxy.state.topology import categorize, external_local

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


@dataclass(frozen=True, slots=True)
class _Spec:
    """One kube-proxy metric: its key in `Metrics`, type, name (without `kubeproxy_`), help and labels."""

    key: str
    kind: type[Histogram] | type[Gauge] | type[Counter]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    modes: tuple[str, ...] = ()
    """The proxy modes that register it (empty: every mode), as kube-proxy's RegisterMetrics."""


_FAM = ("ip_family",)
_IPT = ("iptables",)
"""Every mode but nftables has the iptables series (userspace mode writes its steering rules with
iptables-restore too)."""
_NFT = ("nftables",)
SPECS: tuple[_Spec, ...] = (
    _Spec("sync", Histogram, "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
          _FAM, SYNC_BUCKETS),
    _Spec("sync_full", Histogram, "sync_full_proxy_rules_duration_seconds",
          "SyncProxyRules latency in seconds for full resyncs", _FAM, SYNC_BUCKETS),
    _Spec("sync_partial", Histogram, "sync_partial_proxy_rules_duration_seconds",
          "SyncProxyRules latency in seconds for partial resyncs", _FAM, SYNC_BUCKETS),
    _Spec("network_programming", Histogram, "network_programming_duration_seconds",
          "In Cluster Network Programming Latency in seconds", _FAM, NETWORK_PROGRAMMING_BUCKETS),
    _Spec("conntrack_duration", Histogram, "conntrack_reconciler_sync_duration_seconds",
          "ReconcileConntrackFlowsLatency latency in seconds", _FAM, SYNC_BUCKETS),
    _Spec("last_synced", Gauge, "sync_proxy_rules_last_timestamp_seconds",
          "The last time proxy rules were successfully synced", _FAM),
    _Spec("last_queued", Gauge, "sync_proxy_rules_last_queued_timestamp_seconds",
          "The last time a sync of proxy rules was queued", _FAM),
    _Spec("endpoint_changes_pending", Gauge, "sync_proxy_rules_endpoint_changes_pending",
          "Pending proxy rules Endpoint changes"),
    _Spec("endpoint_changes", Counter, "sync_proxy_rules_endpoint_changes_total",
          "Cumulative proxy rules Endpoint changes"),
    _Spec("service_changes_pending", Gauge, "sync_proxy_rules_service_changes_pending",
          "Pending proxy rules Service changes"),
    _Spec("service_changes", Counter, "sync_proxy_rules_service_changes_total",
          "Cumulative proxy rules Service changes"),
    _Spec("restore_failures", Counter, "sync_proxy_rules_iptables_restore_failures_total",
          "Cumulative proxy iptables restore failures", _FAM, modes=_IPT),
    _Spec("partial_restore_failures", Counter, "sync_proxy_rules_iptables_partial_restore_failures_total",
          "Cumulative proxy iptables partial restore failures", _FAM, modes=_IPT),
    _Spec("rules_total", Gauge, "sync_proxy_rules_iptables_total",
          "Total number of iptables rules owned by kube-proxy", ("ip_family", "table"), modes=_IPT),
    _Spec("rules_last", Gauge, "sync_proxy_rules_iptables_last",
          "Number of iptables rules written by kube-proxy in last sync", ("ip_family", "table"), modes=_IPT),
    _Spec("nft_sync_failures", Counter, "sync_proxy_rules_nftables_sync_failures_total",
          "Cumulative proxy nftables sync failures", _FAM, modes=_NFT),
    _Spec("nft_cleanup_failures", Counter, "sync_proxy_rules_nftables_cleanup_failures_total",
          "Cumulative proxy nftables cleanup failures", _FAM, modes=_NFT),
    _Spec("no_local_endpoints", Gauge, "sync_proxy_rules_no_local_endpoints_total",
          "Number of services with a Local traffic policy and no endpoints", ("traffic_policy", "ip_family")),
    _Spec("conntrack_deleted", Counter, "conntrack_reconciler_deleted_entries_total",
          "Cumulative conntrack flows deleted by conntrack reconciler", _FAM),
    _Spec("healthz", Counter, "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ("code",)),
    _Spec("livez", Counter, "proxy_livez_total", "Cumulative proxy livez HTTP status", ("code",)),
)  # fmt: skip
"""kube-proxy's metrics (pkg/proxy/metrics/metrics.go), one line each."""


class Metrics:
    """Every kubeproxy_* series plus the process collectors, one registry.

    Families not listed still work; listed ones show zeros from the start.
    """

    def __init__(
        self,
        families: Sequence[Family] = (4,),
        registry: CollectorRegistry | None = None,
        mode: str = "iptables",
    ) -> None:
        self.mode = mode
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._h: dict[str, Histogram] = {}
        self._g: dict[str, Gauge] = {}
        self._c: dict[str, Counter] = {}
        values = {
            "ip_family": [FAMILY_NAMES[f] for f in families],
            "table": list(TABLES),
            "traffic_policy": list(TRAFFIC_POLICIES),
            "code": list(PROBE_CODES),
        }
        for spec in SPECS:
            if spec.modes and (mode if mode in _NFT else "iptables") not in spec.modes:
                continue
            name = f"kubeproxy_{spec.name}"
            metric: Histogram | Gauge | Counter
            if spec.kind is Histogram:
                metric = self._h[spec.key] = Histogram(
                    name, spec.doc, spec.labels, buckets=spec.buckets, registry=r
                )
            elif spec.kind is Gauge:
                metric = self._g[spec.key] = Gauge(name, spec.doc, spec.labels, registry=r)
            else:
                metric = self._c[spec.key] = Counter(name, spec.doc, spec.labels, registry=r)
            # The labelled children, so a scrape shows every series before the first sync.
            for combo in itertools.product(*(values[label] for label in spec.labels)):
                if combo:
                    metric.labels(*combo)
        # What a Go binary's default registry has beside kube-proxy's own: process_* (CPU, memory,
        # descriptors, start time), the runtime's GC and build info (python_* here, go_* there).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._kproxy_metrics(r)

    def _kproxy_metrics(self, registry: CollectorRegistry) -> None:
        """Metrics kube-proxy does not have (prefix kproxy_). Userspace mode adds its own (`track_userspace`)."""
        self.manifest_files_in_error = Gauge(
            "kproxy_manifest_files_in_error",
            "Manifest files (--manifests) whose latest content could not be read or parsed; "
            "their last good objects are still served",
            registry=registry,
        )

    def track_userspace(self) -> None:
        """Register the userspace forwarder's counters (idempotent)."""
        if hasattr(self, "userspace_refused"):
            return
        self.userspace_refused = Counter(
            "kproxy_userspace_connections_refused_total",
            "Connections the userspace proxy closed because its connection limit was reached",
            ["service_port"],
            registry=self.registry,
        )
        self.userspace_dial_failures = Counter(
            "kproxy_userspace_dial_failures_total",
            "Failed attempts of the userspace proxy to connect to an endpoint",
            ["service_port"],
            registry=self.registry,
        )

    def userspace_connection_refused(self, service_port: str) -> None:
        self.userspace_refused.labels(service_port).inc()

    def userspace_dial_failed(self, service_port: str, endpoint: str) -> None:
        """Per service port only: an endpoint label would grow a series per pod ever dialled."""
        self.userspace_dial_failures.labels(service_port).inc()

    # ------------------------------------------------------------ agent API

    def observe_sync(self, family: Family, seconds: float, *, full: bool) -> None:
        """One sync attempt of `family`, successful or not, as kube-proxy measures it."""
        name = FAMILY_NAMES[family]
        self._h["sync"].labels(name).observe(seconds)
        self._h["sync_full" if full else "sync_partial"].labels(name).observe(seconds)

    def synced(self, family: Family, now: float | None = None) -> None:
        self._g["last_synced"].labels(FAMILY_NAMES[family]).set(time.time() if now is None else now)

    def sync_queued(self, family: Family, now: float | None = None) -> None:
        self._g["last_queued"].labels(FAMILY_NAMES[family]).set(time.time() if now is None else now)

    def restore_failed(self, family: Family, *, partial: bool) -> None:
        """A failed rule write. iptables-restore: a partial one (which forces a full retry) counts
        in both series. nftables mode: one sync failure, partial or full, as kube-proxy counts it."""
        name = FAMILY_NAMES[family]
        if "nft_sync_failures" in self._c:
            self._c["nft_sync_failures"].labels(name).inc()
            return
        self._c["restore_failures"].labels(name).inc()
        if partial:
            self._c["partial_restore_failures"].labels(name).inc()

    def cleanup_failed(self, family: Family) -> None:
        """nftables mode: a cleanup beside the sync transaction failed (kproxy's: removing the
        previous mode's iptables rules, retried at the next full sync)."""
        if "nft_cleanup_failures" in self._c:
            self._c["nft_cleanup_failures"].labels(FAMILY_NAMES[family]).inc()

    def set_rules(self, family: Family, table: str, *, total: int, last: int) -> None:
        """Rules kproxy owns in `table` after the sync, and how many it wrote in it (iptables
        mode; other modes have no such series)."""
        if "rules_total" not in self._g:
            return
        name = FAMILY_NAMES[family]
        self._g["rules_total"].labels(name, table).set(total)
        self._g["rules_last"].labels(name, table).set(last)

    def set_no_local_endpoints(self, family: Family, *, internal: int, external: int) -> None:
        """Services whose Local internal/external policy found no local endpoint this sync."""
        name = FAMILY_NAMES[family]
        self._g["no_local_endpoints"].labels("internal", name).set(internal)
        self._g["no_local_endpoints"].labels("external", name).set(external)

    def observe_network_programming(self, family: Family, trigger_times: Iterable[float], now: float) -> None:
        """Trigger times (EndpointSlice last-change-trigger-time annotations, Unix seconds) just programmed.

        A trigger time in the future (clock skew between node and control plane) is not a
        latency anyone had: it is left out rather than observed as 0 s or less.
        """
        h = self._h["network_programming"].labels(FAMILY_NAMES[family])
        for t in trigger_times:
            if t <= now:
                h.observe(now - t)

    def count_changes(self, *, services: int = 0, endpoints: int = 0) -> None:
        if services:
            self._c["service_changes"].inc(services)
        if endpoints:
            self._c["endpoint_changes"].inc(endpoints)

    def set_pending(self, *, services: int, endpoints: int) -> None:
        self._g["service_changes_pending"].set(services)
        self._g["endpoint_changes_pending"].set(endpoints)

    def conntrack_cleaned(self, family: Family, *, deleted: int, seconds: float) -> None:
        name = FAMILY_NAMES[family]
        self._h["conntrack_duration"].labels(name).observe(seconds)
        if deleted:
            self._c["conntrack_deleted"].labels(name).inc(deleted)

    def count_healthz(self, code: int) -> None:
        self._c["healthz"].labels(str(code)).inc()

    def count_livez(self, code: int) -> None:
        self._c["livez"].labels(str(code)).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class NoLocalEndpoints:
    """kubeproxy_sync_proxy_rules_no_local_endpoints_total, kept port by port.

    kube-proxy counts, on every sync, the service ports that have usable endpoints
    somewhere but none on this node while their internal (or external) traffic
    policy is Local: their traffic of that kind is dropped here. A sync hands over
    only the port names that changed, so the count costs one service's endpoints per
    change, not a walk over every endpoint of the cluster.
    """

    def __init__(self) -> None:
        self._flags: dict[Family, dict[ServicePortName, tuple[bool, bool]]] = {}
        self._counts: dict[Family, list[int]] = {}

    def update(
        self,
        family: Family,
        ports: Mapping[ServicePortName, tuple[ServicePort, Sequence[Endpoint]]],
        names: Iterable[ServicePortName],
    ) -> tuple[int, int]:
        """Take `names` as they now stand in `ports` (absent: gone); the (internal, external) counts."""
        flags = self._flags.setdefault(family, {})
        counts = self._counts.setdefault(family, [0, 0])
        for name in names:
            old = flags.pop(name, (False, False))
            entry = ports.get(name)
            new = no_local_flags(entry[0], tuple(entry[1])) if entry is not None else (False, False)
            if new != (False, False):
                flags[name] = new
            counts[0] += new[0] - old[0]
            counts[1] += new[1] - old[1]
        return counts[0], counts[1]

    def counts(self, family: Family) -> tuple[int, int]:
        internal, external = self._counts.get(family, (0, 0))
        return internal, external


def no_local_flags(sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> tuple[bool, bool]:
    """(internal, external): Local policy of that kind, usable endpoints elsewhere, none here."""
    if not (sp.internal_local or external_local(sp)):
        return False, False
    sel = categorize(sp, endpoints)
    dropped = sel.has_any and not sel.local
    return dropped and sp.internal_local, dropped and external_local(sp)


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
        configz: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.proxy_mode = proxy_mode
        self._healthz = healthz or _ok
        self._configz = configz
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
        if req.path == "/configz" and self._configz is not None:
            body = json.dumps(self._configz(), separators=(",", ":")).encode()
            return Response(200, body, "application/json", (("X-Content-Type-Options", "nosniff"),))
        return not_found(req)

    async def start(self) -> None:
        await self._http.start()
        log.info("metrics_listening", port=self.port, proxy_mode=self.proxy_mode)

    async def close(self) -> None:
        await self._http.close()
