"""What a proxy mode is to the node agent, and what it reports back after a sync.

The agent and every mode import this module; no mode imports the agent, so a new mode
plugs in without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from kproxy.config import RenderConfig
from kproxy.state.model import Family, PortEntry, ServicePortName


@dataclass(frozen=True, slots=True)
class SyncReport:
    full: bool
    chains_written: int = 0
    chains_deleted: int = 0
    rules: Mapping[str, int] | None = None
    """Rule count per table after the sync, for kubeproxy_sync_proxy_rules_iptables_total."""
    rules_written: Mapping[str, int] | None = None
    """Rules this sync wrote per table, for kubeproxy_sync_proxy_rules_iptables_last."""
    cleanup_failed: bool = False
    """A cleanup beside the sync failed (kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total)."""


class ProxyBackend(Protocol):
    """What the agent needs of a proxy mode: apply one family's view."""

    mode: str

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport: ...

    async def close(self) -> None: ...
