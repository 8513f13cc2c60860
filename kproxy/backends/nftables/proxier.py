"""nftables mode as the node agent sees it: one NftSyncEngine per family over one writer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from kproxy import log
from kproxy.agent import SyncReport
from kproxy.backends.nftables.sync import NftSyncEngine
from kproxy.backends.nftables.writer import NftWriter, host_writer
from kproxy.changes import PortEntry
from kproxy.config import RenderConfig
from kproxy.state.model import Family, ServicePortName


class NftablesProxier:
    mode = "nftables"

    def __init__(self, writer: NftWriter, *, full_sync_period: float = 3600.0) -> None:
        self.writer = writer
        self.full_sync_period = full_sync_period
        self.engines: dict[Family, NftSyncEngine] = {}

    @classmethod
    def for_host(cls, *, full_sync_period: float = 3600.0) -> NftablesProxier:
        writer = host_writer()
        log.info("nftables_writer", writer=type(writer).__name__)
        return cls(writer, full_sync_period=full_sync_period)

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
        return SyncReport(
            full=result.full, chains_written=result.chains_written, chains_deleted=result.chains_deleted
        )

    async def close(self) -> None:
        """The table stays in the kernel: traffic keeps flowing across a restart."""
