"""The node agent: sources in, backend out, health and metrics beside.

`Settings` says what to do; `NodeAgent` holds the running state (as uvicorn splits
Config from Server). One event loop (uvloop when present) runs everything that
waits; rendering and iptables-restore run in a worker thread so probes and metrics
keep answering during a long full sync.

A sync takes the pending changes from the tracker, brings each family's view up to
date for just the services that changed, and hands the changed port names to the
backend. A failed sync gives every change back and the backend's next sync is full; the
rules already in the kernel keep serving meanwhile. SIGTERM stops the loop and
leaves the rules in place, so traffic flows across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kproxy.backends.base import ProxyBackend, SyncReport
from kproxy.config import RenderConfig, localhost_in_effect, render_config, sized
from kproxy.configz import configz
from kproxy.errors import KproxyError
from kproxy.health import (
    HealthServer,
    ProxierHealth,
    ServiceHealthIndex,
    ServiceHealthServer,
    healthz_response,
)
from kproxy.infra import log
from kproxy.infra.httpd import split_host_port
from kproxy.infra.runner import BoundedFrequencyRunner
from kproxy.metrics import Metrics, MetricsServer, NoLocalEndpoints
from kproxy.settings import Settings, bind_override
from kproxy.sources.dirwatch import watch_directory
from kproxy.state.model import Family
from kproxy.tracking.changes import ChangeTracker, FamilyView
from kproxy.tracking.events import apply_event

if TYPE_CHECKING:
    from kproxy.backends.userspace.proxier import Engine
    from kproxy.backends.userspace.tcp import Hooks
    from kproxy.netfilter.conntrack import ConntrackClient


NAMED_IN_LOGS = 5


def name_some(keys: Iterable[object], limit: int = NAMED_IN_LOGS) -> str:
    """`a/x,b/y,c/z` for a log line: the first few in order, then how many more."""
    names = sorted(map(str, keys))
    shown = ",".join(names[:limit])
    return f"{shown},+{len(names) - limit} more" if len(names) > limit else shown


class NodeAgent:
    def __init__(
        self,
        settings: Settings,
        backend: ProxyBackend,
        *,
        node_ips: tuple[str, ...] = (),
        follow_addresses: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.node_ips = node_ips
        self.follow_addresses = follow_addresses
        self._addresses_changed = False
        # The Node too: rendering before its pod CIDRs and zone are known means a second full sync.
        wait = {"Service", "Endpoints" if settings.use_endpoints else "EndpointSlice", "Node"}
        self.tracker = ChangeTracker(node_name=settings.node_name, wait_for=frozenset(wait))
        self.families = families_of(settings)
        self.views = {f: FamilyView(f, settings.node_name) for f in self.families}
        # With an API server the Node must be known for /healthz to pass, as kube-proxy's.
        self.health = ProxierHealth.for_sync_period(
            settings.sync_period, families=self.families, node_required=not settings.manifests
        )
        self._health_node: object = None
        self.metrics = metrics if metrics is not None else Metrics(families=self.families, mode=backend.mode)
        self.runner = BoundedFrequencyRunner(self._sync, settings.min_sync_period, settings.sync_period)
        self._cfgs: dict[Family, RenderConfig] = {}
        self._stopping = asyncio.Event()
        self._servers: list[HealthServer | MetricsServer] = []
        self.service_health = ServiceHealthServer(self.health.is_healthy, node_name=settings.node_name)
        self.health_index = ServiceHealthIndex()
        self.no_local = NoLocalEndpoints()
        self._health_stale = False
        self.syncs = 0
        self.conntrack: ConntrackClient | None = None

    # ------------------------------------------------------------ changes in

    def changed(self) -> None:
        """Sources call this after giving the tracker something new."""
        if self.tracker.node is not self._health_node:
            self._health_node = self.tracker.node
            self.health.sync_node(self.tracker.node)
        if self.tracker.has_pending:
            for f in self.families:
                self.health.queued_update(f)
                self.metrics.sync_queued(f)
            services, endpoints = self.tracker.pending_counts
            self.metrics.set_pending(services=services, endpoints=endpoints)
            self.runner.request()

    def addresses_changed(self, ips: tuple[str, ...]) -> None:
        """The node gained or lost an address: node-port and source-range rules depend on them."""
        self.node_ips = ips
        self._addresses_changed = True
        self.runner.request()

    # ----------------------------------------------------------------- sync

    def _render_configs(self) -> dict[Family, RenderConfig]:
        s, node = self.settings, self.tracker.node
        ips = self.node_ips or (node.addresses if node else ())
        primary = node.addresses if node else ()  # InternalIPs first: kube-proxy's primary IPs
        if bind_override(s):  # --bind-address names the node's primary IP of its family
            ips = (bind_override(s), *(ip for ip in ips if ip != bind_override(s)))
            primary = (bind_override(s), *(ip for ip in primary if ip != bind_override(s)))
        return {
            f: render_config(
                f,
                s.node_name,
                node_zone=node.zone if node else "",
                node_pod_cidrs=node.pod_cidrs if node else (),
                cluster_cidr=s.cluster_cidr,
                detect_local_mode=s.detect_local_mode,
                masquerade_all=s.masquerade_all,
                masquerade_bit=s.masquerade_bit,
                nodeport_addresses=s.nodeport_addresses,
                node_ips=ips,
                bridge_interface=s.bridge_interface,
                interface_name_prefix=s.interface_name_prefix,
                localhost_nodeports=s.localhost_nodeports,
                primary_ips=primary,
            )
            for f in self.families
        }

    async def _sync(self) -> bool:
        if not self.tracker.ready:
            return True
        pending = self.tracker.take()
        taken_at = self.health.now()
        first = not self._cfgs
        if pending.node_changed or first or self._addresses_changed:
            self._addresses_changed = False
            self._cfgs = self._render_configs()
        started = time.perf_counter()
        any_changed = first
        try:
            for family in self.families:
                view = self.views[family]
                changed = view.rebuild(self.tracker) if first else view.update(self.tracker, pending.services)
                any_changed = any_changed or bool(changed)
                # Before the backend: the view has moved on whether or not its sync succeeds.
                if self.health_index.update(family, view.ports, changed):
                    self._health_stale = True
                self.no_local.update(family, view.ports, changed)
                t0 = time.perf_counter()
                # None asks the backend for a full sync; it also goes full on its own after a
                # failure, a config change, a vanished canary or the periodic deadline.
                cfg = self._cfgs[family] = sized(self._cfgs[family], view.endpoint_total)
                report = await self.backend.sync(family, view.ports, None if first else changed, cfg)
                self._after_family_sync(
                    family, report, time.perf_counter() - t0, taken_at, pending.trigger_times
                )
                if self.conntrack is not None and any(n.protocol == "UDP" for n in changed):
                    await self._clean_conntrack(family)
        except (KproxyError, OSError) as e:
            self.tracker.requeue(pending)
            if first:
                self._cfgs = {}
            for family in self.families:
                self.metrics.restore_failed(family, partial=not first)
            log.error("sync_failed", error=str(e))
            return False
        self.syncs += 1
        if self._health_stale:
            self._health_stale = False
            await self.service_health.sync_services(self.health_index.wanted)
            self.service_health.sync_endpoints(self.health_index.local_ready)
        self.metrics.count_changes(services=pending.service_changes, endpoints=pending.endpoint_changes)
        services, endpoints = self.tracker.pending_counts
        self.metrics.set_pending(services=services, endpoints=endpoints)
        if any_changed:
            log.info(
                "synced",
                first=first,
                services_changed=len(pending.services),
                services=name_some(pending.services),
                node_changed=pending.node_changed,
                seconds=f"{time.perf_counter() - started:.3f}",
            )
        return True

    def _after_family_sync(
        self,
        family: Family,
        report: SyncReport,
        seconds: float,
        started: float,
        triggers: tuple[tuple[Family, float], ...],
    ) -> None:
        self.health.updated(family, started=started)
        self.metrics.synced(family)
        self.metrics.observe_sync(family, seconds, full=report.full)
        if report.cleanup_failed:
            self.metrics.cleanup_failed(family)
        internal, external = self.no_local.counts(family)
        self.metrics.set_no_local_endpoints(family, internal=internal, external=external)
        mine = [t for f, t in triggers if f == family]
        if mine:
            self.metrics.observe_network_programming(family, mine, time.time())
        if report.rules:
            for table, total in report.rules.items():
                self.metrics.set_rules(
                    family, table, total=total, last=(report.rules_written or {}).get(table, 0)
                )

    async def _clean_conntrack(self, family: Family) -> None:
        """Stale UDP flows black-hole clients after an endpoint goes; clear them (never fatal)."""
        from kproxy.netfilter.conntrack import clean_stale_entries_async

        if self.conntrack is None:
            return
        try:
            result = await clean_stale_entries_async(
                self.conntrack, family, self.views[family].ports.values()
            )
        except OSError as e:
            log.warn("conntrack_cleanup_failed", family=family, error=str(e))
            return
        self.metrics.conntrack_cleaned(family, deleted=result.deleted, seconds=result.seconds)

    # ----------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Run until stop(): servers up, source feeding the tracker, runner syncing."""
        s = self.settings
        for server in self._make_servers():
            await server.start()
            self._servers.append(server)
        tasks = [
            asyncio.create_task(self.runner.loop(), name="kproxy-sync"),
            asyncio.create_task(self._run_source(), name="kproxy-source"),
        ]
        if self.follow_addresses:
            from kproxy.infra.nodeaddr import follow_node_addresses

            tasks.append(
                asyncio.create_task(
                    follow_node_addresses(self.node_ips, self.addresses_changed), name="kproxy-addresses"
                )
            )
        log.info(
            "agent_started",
            node=s.node_name,
            mode=self.backend.mode,
            families=",".join(f"IPv{f}" for f in self.families),
        )
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception() is not None:
                log.error("agent_task_failed", task=task.get_name(), error=repr(task.exception()))
        self.runner.stop()
        for task in [stop, *tasks]:
            task.cancel()
        for task in [stop, *tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.service_health.close()
        for server in self._servers:
            await server.close()
        await self.backend.close()
        log.info("agent_stopped", node=s.node_name, rules="left in place")

    def _make_servers(self) -> list[HealthServer | MetricsServer]:
        s = self.settings
        out: list[HealthServer | MetricsServer] = []
        if s.healthz_bind_address:
            host, port = split_host_port(s.healthz_bind_address)
            out.append(HealthServer(self.health, host, port, counter=self.metrics))
        if s.metrics_bind_address:
            host, port = split_host_port(s.metrics_bind_address)
            out.append(
                MetricsServer(
                    self.metrics,
                    self.backend.mode,
                    host,
                    port,
                    healthz=lambda _req: healthz_response(self.health),
                    configz=lambda: configz(s),
                )
            )
        return out

    async def _run_source(self) -> None:
        if self.settings.manifests:
            await watch_directory(
                self.settings.manifests,
                lambda ev: apply_event(self.tracker, ev),
                self.changed,
                report=self.metrics.manifest_files_in_error.set,
            )
            return
        from kproxy.sources.apiwatch import ApiSource, WatchConfig, make_api_client

        client = make_api_client(
            kubeconfig=self.settings.kubeconfig or None, master=self.settings.master or None
        )
        cfg = WatchConfig(
            node_name=self.settings.node_name,
            endpoint_slices=not self.settings.use_endpoints,
            legacy_endpoints=self.settings.use_endpoints,
        )
        async with ApiSource(client, cfg) as source:
            while True:
                apply_event(self.tracker, await source.events.get())
                while not source.events.empty():
                    apply_event(self.tracker, source.events.get_nowait())
                self.changed()

    def stop(self) -> None:
        self._stopping.set()
        self.runner.stop()


def families_of(settings: Settings) -> tuple[Family, ...]:
    return tuple(f for f in (4, 6) if f in settings.families)


def userspace_hooks(metrics: Metrics) -> Hooks:
    """The userspace forwarder's events, counted on /metrics."""
    from kproxy.backends.userspace.tcp import Hooks

    metrics.track_userspace()
    return Hooks(
        connection_limit=metrics.userspace_connection_refused, dial_failure=metrics.userspace_dial_failed
    )


def make_backend(settings: Settings, metrics: Metrics | None = None) -> ProxyBackend:
    if settings.proxy_mode == "userspace":
        from kproxy.backends.nftables.leftovers import NftablesLeftovers
        from kproxy.backends.userspace.mode import UserspaceMode

        engine: Engine = "protocol" if settings.userspace_tcp_engine == "protocol" else "raw"
        hooks = userspace_hooks(metrics) if metrics is not None else None
        userspace = UserspaceMode.for_host(settings.iptables_backend, engine=engine, hooks=hooks)
        userspace.after_full_sync = NftablesLeftovers().after_full_sync
        return userspace
    if settings.proxy_mode == "nftables":
        from kproxy.backends.nftables.proxier import NftablesProxier

        return NftablesProxier.for_host(full_sync_period=settings.full_sync_period)
    from kproxy.backends.iptables.proxier import IptablesProxier
    from kproxy.backends.nftables.leftovers import NftablesLeftovers

    iptables = IptablesProxier.for_host(
        settings.iptables_backend,
        full_sync_period=settings.full_sync_period,
        route_localnet=4 in settings.families
        and localhost_in_effect(settings.localhost_nodeports, settings.nodeport_addresses),
    )
    # Switching modes: nftables mode's table goes once this mode's rules serve.
    iptables.after_full_sync = NftablesLeftovers().after_full_sync
    return iptables


def run_agent(settings: Settings) -> int:
    """`kproxy run`: build the agent for this host and serve until SIGTERM."""
    from kproxy.infra.nodeaddr import node_addresses

    log.setup(settings.effective_log_level, fmt=settings.logging_format)
    metrics = Metrics(families=families_of(settings), mode=settings.proxy_mode)
    try:
        backend = make_backend(settings, metrics)
    except KproxyError as e:
        log.error("startup_failed", error=str(e))
        sys.stderr.write(f"kproxy: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 1
    agent = NodeAgent(settings, backend, node_ips=node_addresses(), follow_addresses=True, metrics=metrics)
    if settings.proxy_mode in ("iptables", "nftables"):
        from kproxy.netfilter.conntrack import NetlinkConntrack

        agent.conntrack = NetlinkConntrack()

    async def main() -> None:
        install_signal_handlers(agent)
        await agent.serve()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - a declared dependency
        asyncio.run(main())
    return 0


def install_signal_handlers(agent: NodeAgent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.stop)
