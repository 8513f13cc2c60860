"""nftables mode as the node agent sees it: one NftSyncEngine per family over one writer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from kproxy.backends.base import SyncReport
from kproxy.backends.nftables.sync import NftSyncEngine
from kproxy.backends.nftables.writer import NftWriter, host_writer
from kproxy.config import RenderConfig
from kproxy.infra import log
from kproxy.state.model import Family, PortEntry, ServicePortName


class NftablesProxier:
    mode = "nftables"

    def __init__(
        self,
        writer: NftWriter,
        *,
        full_sync_period: float = 3600.0,
        clean_iptables: Callable[[Family], int] | None = None,
    ) -> None:
        self.writer = writer
        self.full_sync_period = full_sync_period
        self.engines: dict[Family, NftSyncEngine] = {}
        self.clean_iptables = clean_iptables
        """Removes iptables mode's rules of one family (switching modes, as kube-proxy does)."""
        self._iptables_clean: set[Family] = set()

    @classmethod
    def for_host(cls, *, full_sync_period: float = 3600.0) -> NftablesProxier:
        writer = host_writer()
        log.info("nftables_writer", writer=type(writer).__name__)
        return cls(writer, full_sync_period=full_sync_period, clean_iptables=iptables_leftovers)

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        engine = self.engines.get(family)
        if engine is None:
            engine = NftSyncEngine(cfg, self.writer, full_sync_interval_s=self.full_sync_period)
            self.engines[family] = engine
        else:
            engine.set_config(cfg)
        result = await asyncio.to_thread(engine.sync, ports, changed)
        if result.transactions:
            log.info(
                "nftables_synced",
                family=family,
                full=result.full,
                reason=result.reason,
                chains_written=result.chains_written,
                chains_deleted=result.chains_deleted,
                elements_written=result.elements_written,
                script_bytes=result.script_bytes,
                write_s=f"{result.write_s:.4f}",
            )
        cleanup_failed = False
        if result.full and family not in self._iptables_clean and self.clean_iptables is not None:
            # Only once this family's table serves: a node switching from iptables mode never
            # has a moment with neither mode's rules.
            removed = await asyncio.to_thread(self.clean_iptables, family)
            cleanup_failed = removed < 0
            if removed >= 0:
                self._iptables_clean.add(family)
                if removed:
                    log.info("iptables_mode_rules_removed", family=family, chains=removed)
        return SyncReport(
            full=result.full,
            chains_written=result.chains_written,
            chains_deleted=result.chains_deleted,
            cleanup_failed=cleanup_failed,
        )

    async def close(self) -> None:
        """The table stays in the kernel: traffic keeps flowing across a restart."""


def iptables_leftovers(family: Family) -> int:
    """Remove iptables mode's chains and jumps of one family from both iptables backends;
    the chains removed, or -1 when something could not be removed (retried at the next full sync)."""
    from kproxy.netfilter.cleanup import CleanupHost, _iptables
    from kproxy.netfilter.restore import BACKENDS

    failures: list[tuple[str, str]] = []
    host = CleanupHost(None)
    removed = sum(_iptables(host, backend, family, failures) for backend in BACKENDS)
    for what, why in failures:
        log.warn("iptables_mode_cleanup_failed", family=family, what=what, error=why)
    return -1 if failures else removed
