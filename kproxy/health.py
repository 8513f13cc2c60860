"""Is the proxy keeping up? kube-proxy's answer on :10256, and per-service answers on health-check node ports.

Two parts, both with kube-proxy's observable behaviour (pkg/proxy/healthcheck):

`ProxierHealth` is pure state with an injectable clock. The agent calls
`queued_update(family)` whenever a Service/EndpointSlice change needs a rule
write, `updated(family, started=t)` after every successful sync of that family
(`t = state.now()` taken when the sync read its input), and `sync_node(node)`
when this node's object changes. `health()` judges it:

  * a family is unhealthy when an update has been queued for at least
    `timeout` seconds without a successful sync since (kube-proxy: 2 x syncPeriod,
    see `for_sync_period`); `updated` clears the pending mark, so it recovers at once;
  * the proxy is healthy when every family is; at start nothing is pending, so
    it is healthy;
  * /healthz additionally needs the node to be eligible: its Node object known,
    not being deleted and not tainted ToBeDeletedByClusterAutoscaler (the parser
    folds both into `Node.deleting`), so a load balancer drains a node that is
    going away. `node_required=False` (manifests mode, where there may be no Node
    at all) makes "no Node object" eligible; with the API, the node is not
    eligible until its Node arrives, nor after it is deleted.
  * every configured family is in the body's `status` from the start, healthy
    and never updated, so a probe sees the families before the first sync.

  One deliberate difference: kube-proxy >= 1.29 only judges a family once it has
  synced at least once, so a proxy whose first sync never succeeds stays "healthy"
  forever. kproxy judges a family from its first queued update, as kube-proxy did
  before per-family health (and as its own doc comments promise).

`HealthServer` serves /healthz and /livez with kube-proxy's JSON body
(`lastUpdated`, `currentTime`, `nodeEligible` on /healthz only, `healthy`,
`status` per family) and counts answers through an optional `ProbeCounter`
(kproxy.metrics.Metrics implements it: kubeproxy_proxy_healthz_total{code}).

`ServiceHealthServer` opens one listener per LoadBalancer service with
externalTrafficPolicy Local on its healthCheckNodePort. The agent hands it the
whole wanted set after each sync, as kube-proxy does, from a `ServiceHealthIndex`
kept up to date port by port:

    await shs.sync_services(index.wanted)
    shs.sync_endpoints(index.local_ready)

Any path answers 200 when the service has local endpoints and the proxy is
healthy, else 503, with header X-Load-Balancing-Endpoint-Weight: <count> and a
JSON body {"service": {"namespace", "name"}, "localEndpoints", "serviceProxyHealthy"}.
A port that cannot be bound is logged and retried on the next sync_services.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from kproxy.infra import log
from kproxy.infra.httpd import HttpServer, Request, Response, not_found
from kproxy.state.model import (
    FAMILIES,
    Endpoint,
    Family,
    Node,
    ServiceKey,
    ServicePort,
    ServicePortName,
    port_order,
)

Clock = Callable[[], float]
"""Wall-clock seconds since the epoch (time.time); bodies show it as a date."""

FAMILY_NAMES: Mapping[Family, str] = {4: "IPv4", 6: "IPv6"}
DEFAULT_HEALTHZ_PORT = 10256


def go_time(ts: float | None) -> str:
    """A Unix time as Go's encoding/json writes a UTC time.Time (RFC 3339, trailing zeros trimmed)."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    dt = datetime.fromtimestamp(ts, UTC)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass(frozen=True, slots=True)
class FamilyHealth:
    last_updated: float | None
    healthy: bool


@dataclass(frozen=True, slots=True)
class ProxyHealth:
    healthy: bool
    last_updated: float | None
    """The most recent successful sync of any family (None: never)."""
    current_time: float
    status: Mapping[Family, FamilyHealth]

    def body(self, *, node_eligible: bool | None = None) -> bytes:
        """kube-proxy's JSON; a healthy answer reports lastUpdated = now, as kube-proxy does for old clients."""
        last = self.current_time if self.healthy and node_eligible is not False else self.last_updated
        doc: dict[str, object] = {"lastUpdated": go_time(last), "currentTime": go_time(self.current_time)}
        if node_eligible is not None:
            doc["nodeEligible"] = node_eligible
        doc["healthy"] = self.healthy
        if self.status:
            doc["status"] = {
                FAMILY_NAMES[f]: {"lastUpdated": go_time(h.last_updated), "healthy": h.healthy}
                for f, h in sorted(self.status.items())
            }
        return json.dumps(doc, separators=(",", ":")).encode()


class ProxierHealth:
    """Queued-versus-synced bookkeeping per family; safe to call from any thread."""

    def __init__(
        self,
        timeout: float,
        clock: Clock = time.time,
        *,
        families: Iterable[Family] = (),
        node_required: bool = False,
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._families = frozenset(families)
        self._last_updated: dict[Family, float] = {}
        self._oldest_pending: dict[Family, float] = {}
        self._latest_queued: dict[Family, float] = {}
        self._node_required = node_required
        self._node_eligible = not node_required

    @classmethod
    def for_sync_period(
        cls,
        sync_period: float,
        clock: Clock = time.time,
        *,
        families: Iterable[Family] = (),
        node_required: bool = False,
    ) -> ProxierHealth:
        """kube-proxy allows twice the sync period (--iptables-sync-period, default 30 s) between queue and sync."""
        return cls(2 * sync_period, clock, families=families, node_required=node_required)

    def now(self) -> float:
        """This object's clock, for the `started` argument of `updated`."""
        return self._clock()

    def queued_update(self, family: Family) -> None:
        """A change arrived for `family`; only the oldest unsynced one counts."""
        with self._lock:
            now = self._clock()
            self._oldest_pending.setdefault(family, now)
            self._latest_queued[family] = now

    def updated(self, family: Family, started: float | None = None) -> None:
        """A sync of `family` succeeded.

        Without `started` (kube-proxy's behaviour) everything queued so far counts as
        synced. With `started` (`now()` taken when the sync read its input), a change
        queued after that stays pending, dated `started`, so a stall right after this
        sync is still noticed (kube-proxy would forget it until the next change).
        """
        with self._lock:
            latest = self._latest_queued.get(family)
            if started is not None and latest is not None and latest > started:
                self._oldest_pending[family] = started
            else:
                self._oldest_pending.pop(family, None)
            self._last_updated[family] = self._clock()

    def sync_node(self, node: Node | None) -> None:
        """This node's object as it now stands; None when there is none (never seen, or deleted)."""
        with self._lock:
            if node is None:
                self._node_eligible = not self._node_required
            else:
                self._node_eligible = not node.deleting

    @property
    def node_eligible(self) -> bool:
        return self._node_eligible

    def health(self) -> ProxyHealth:
        with self._lock:
            now = self._clock()
            status: dict[Family, FamilyHealth] = {}
            for fam in FAMILIES:
                if (
                    fam not in self._families
                    and fam not in self._last_updated
                    and fam not in self._oldest_pending
                ):
                    continue
                pending = self._oldest_pending.get(fam)
                ok = pending is None or now - pending < self.timeout
                status[fam] = FamilyHealth(self._last_updated.get(fam), ok)
            last = max(self._last_updated.values(), default=None)
        return ProxyHealth(all(h.healthy for h in status.values()), last, now, status)

    def is_healthy(self) -> bool:
        """The proxy's own health, ignoring the node (what service health checks use)."""
        return self.health().healthy


class ProbeCounter(Protocol):
    def count_healthz(self, code: int) -> None: ...
    def count_livez(self, code: int) -> None: ...


_JSON = "application/json"
_NOSNIFF = (("X-Content-Type-Options", "nosniff"),)


def healthz_response(state: ProxierHealth) -> Response:
    h = state.health()
    eligible = state.node_eligible
    code = 200 if h.healthy and eligible else 503
    return Response(code, h.body(node_eligible=eligible), _JSON, _NOSNIFF)


def livez_response(state: ProxierHealth) -> Response:
    h = state.health()
    return Response(200 if h.healthy else 503, h.body(), _JSON, _NOSNIFF)


class HealthServer:
    """:10256 /healthz and /livez. `host` None or "" binds every address."""

    def __init__(
        self,
        state: ProxierHealth,
        host: str | None = None,
        port: int = DEFAULT_HEALTHZ_PORT,
        counter: ProbeCounter | None = None,
    ) -> None:
        self.state = state
        self._counter = counter
        self._http = HttpServer(self.handle, [host] if host else None, port, name="healthz")

    @property
    def port(self) -> int:
        return self._http.port

    def handle(self, req: Request) -> Response:
        if req.path == "/healthz":
            resp = healthz_response(self.state)
            if self._counter is not None:
                self._counter.count_healthz(resp.status)
            return resp
        if req.path == "/livez":
            resp = livez_response(self.state)
            if self._counter is not None:
                self._counter.count_livez(resp.status)
            return resp
        return not_found(req)

    async def start(self) -> None:
        await self._http.start()
        log.info("healthz_listening", port=self.port)

    async def close(self) -> None:
        await self._http.close()


class ServiceHealthIndex:
    """Which services want a health-check node port (LoadBalancer, externalTrafficPolicy
    Local), and how many distinct local ready endpoint IPs each has, kept up to date port by port.

    A sync hands over only the port names its view reported changed, so a change to one
    service costs one service's endpoints, not the whole cluster's (recomputing from scratch
    walks every endpoint: 100,000 at 10,000 services). Both results always equal the
    from-scratch answers (tests/support/health.py) applied to the current views; tests hold it to that.
    """

    def __init__(self) -> None:
        self._ports: dict[tuple[int, ServicePortName], tuple[int, frozenset[str]]] = {}
        self._of_service: dict[ServiceKey, set[tuple[int, ServicePortName]]] = {}
        self.wanted: dict[ServiceKey, int] = {}
        """Health-check node port per service that wants one."""
        self.local_ready: dict[ServiceKey, int] = {}
        """Distinct local ready endpoint IPs per service; services with none are absent."""

    def update(
        self,
        family: int,
        ports: Mapping[ServicePortName, tuple[ServicePort, Sequence[Endpoint]]],
        names: Iterable[ServicePortName],
    ) -> bool:
        """Take `names` as they now stand in one family's `ports` (absent: gone). True when
        the wanted listeners or any local count changed."""
        touched: set[ServiceKey] = set()
        for name in names:
            key = (family, name)
            entry = ports.get(name)
            if entry is None:
                if self._ports.pop(key, None) is not None:
                    self._of_service[name.service].discard(key)
                    touched.add(name.service)
                continue
            sp, endpoints = entry
            hc = sp.health_check_node_port if sp.external_local else 0
            ips = frozenset(ep.ip for ep in endpoints if ep.is_local and ep.ready)
            if self._ports.get(key) != (hc, ips):
                self._ports[key] = (hc, ips)
                self._of_service.setdefault(name.service, set()).add(key)
                touched.add(name.service)
        changed = False
        for svc in touched:
            keys = self._of_service.get(svc, set())
            if not keys:
                self._of_service.pop(svc, None)
            entries = [self._ports[k] for k in sorted(keys, key=_family_then_port)]
            hc = next((h for h, _ in entries if h), 0)
            count = len(frozenset().union(*(ips for _, ips in entries)))
            changed |= _set_or_drop(self.wanted, svc, hc)
            changed |= _set_or_drop(self.local_ready, svc, count)
        return changed


def _family_then_port(key: tuple[int, ServicePortName]) -> tuple[int, tuple[str, str, str, str]]:
    return key[0], port_order(key[1])


def _set_or_drop(d: dict[ServiceKey, int], key: ServiceKey, value: int) -> bool:
    if d.get(key, 0) == value:
        return False
    if value:
        d[key] = value
    else:
        del d[key]
    return True


class ServiceHealthServer:
    """One HTTP listener per Local-policy LoadBalancer service, answering by local endpoint count.

    `hosts`: the node addresses to bind (from --nodeport-addresses); None binds every address.
    `proxy_healthy`: usually `ProxierHealth.is_healthy`.
    """

    def __init__(
        self, proxy_healthy: Callable[[], bool], hosts: Sequence[str] | None = None, node_name: str = ""
    ) -> None:
        self._proxy_healthy = proxy_healthy
        self._hosts = list(hosts) if hosts else None
        self._node_name = node_name
        self._servers: dict[ServiceKey, HttpServer] = {}
        self._wanted_ports: dict[ServiceKey, int] = {}
        self._endpoints: dict[ServiceKey, int] = {}
        self._lock = asyncio.Lock()

    @property
    def services(self) -> Mapping[ServiceKey, int]:
        """Services with an open listener, and the port it is bound to."""
        return {k: s.port for k, s in self._servers.items()}

    async def sync_services(self, wanted: Mapping[ServiceKey, int]) -> None:
        """Make the open listeners exactly `wanted`; a changed port means close then reopen."""
        async with self._lock:
            await self._sync_services(wanted)

    async def _sync_services(self, wanted: Mapping[ServiceKey, int]) -> None:
        for key in list(self._servers):
            if wanted.get(key) != self._wanted_ports.get(key):
                server = self._servers.pop(key)
                port = self._wanted_ports.pop(key)
                await server.close()
                log.info("healthcheck_closed", service=str(key), port=port)
        for key, port in sorted(wanted.items()):
            if key in self._servers:
                continue
            server = HttpServer(self._handler_for(key), self._hosts, port, name=f"healthcheck {key}")
            try:
                await server.start()
            except OSError as exc:
                await server.close()
                log.error(
                    "healthcheck_listen_failed",
                    service=str(key),
                    port=port,
                    node=self._node_name,
                    error=str(exc),
                )
                continue
            self._servers[key] = server
            self._wanted_ports[key] = port
            log.info("healthcheck_opened", service=str(key), port=server.port)

    def sync_endpoints(self, local_ready: Mapping[ServiceKey, int]) -> None:
        """Local ready endpoint counts; a service missing from the map has none."""
        self._endpoints = {k: n for k, n in local_ready.items() if n}

    async def close(self) -> None:
        await self.sync_services({})

    def _handler_for(self, key: ServiceKey) -> Callable[[Request], Response]:
        def handle(_: Request) -> Response:
            count = self._endpoints.get(key, 0)
            healthy = self._proxy_healthy()
            body = {
                "service": {"namespace": key.namespace, "name": key.name},
                "localEndpoints": count,
                "serviceProxyHealthy": healthy,
            }
            headers = (*_NOSNIFF, ("X-Load-Balancing-Endpoint-Weight", str(count)))
            code = 200 if count and healthy else 503
            return Response(code, json.dumps(body, indent="\t").encode(), _JSON, headers)

        return handle
