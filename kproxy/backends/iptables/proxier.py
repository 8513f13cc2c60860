"""iptables mode as the node agent sees it: one SyncEngine per family over one backend."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from kproxy import log
from kproxy.agent import SyncReport
from kproxy.backends.iptables.restore import CommandRestorer, Restorer, detect_backend
from kproxy.backends.iptables.sync import SyncEngine
from kproxy.changes import PortEntry
from kproxy.config import RenderConfig
from kproxy.state.model import Family, ServicePortName


class IptablesProxier:
    mode = "iptables"

    def __init__(self, restorer: Restorer, *, full_sync_period: float = 3600.0) -> None:
        self.restorer = restorer
        self.full_sync_period = full_sync_period
        self.engines: dict[Family, SyncEngine] = {}

    @classmethod
    def for_host(cls, backend: str = "auto", *, full_sync_period: float = 3600.0) -> IptablesProxier:
        chosen = detect_backend(None if backend == "auto" else backend)
        log.info("iptables_backend", backend=chosen)
        return cls(CommandRestorer(chosen), full_sync_period=full_sync_period)

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        engine = self.engines.get(family)
        if engine is None:
            engine = SyncEngine(cfg, self.restorer, full_sync_interval_s=self.full_sync_period)
            self.engines[family] = engine
        else:
            engine.set_config(cfg)
        result = await asyncio.to_thread(engine.sync, ports, changed)
        if result.restores:
            log.info(
                "iptables_synced",
                family=family,
                full=result.full,
                reason=result.reason,
                chains_written=result.chains_written,
                chains_deleted=result.chains_deleted,
                payload_bytes=result.payload_bytes,
                restore_s=f"{result.restore_s:.4f}",
            )
        return SyncReport(
            full=result.full,
            chains_written=result.chains_written,
            chains_deleted=result.chains_deleted,
            rules=dict(engine.rule_counts),
            rules_written=dict(result.rules_written),
        )

    async def close(self) -> None:
        """Rules stay in the kernel: traffic keeps flowing across a restart."""
