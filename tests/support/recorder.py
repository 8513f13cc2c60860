"""A proxy backend that records what the agent asks of it, instead of touching a kernel."""

from __future__ import annotations

from collections.abc import Mapping

from kproxy.backends.base import SyncReport
from kproxy.config import RenderConfig
from kproxy.errors import RestoreError
from kproxy.state.model import Family, PortEntry, ServicePortName


class Recorder:
    mode = "iptables"

    def __init__(self) -> None:
        self.calls: list[tuple[Family, set[str] | None, int]] = []
        self.fail_next = False

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        if self.fail_next:
            self.fail_next = False
            raise RestoreError(family, 1, "iptables-restore: line 3 failed", 3)
        self.calls.append((family, None if changed is None else {str(n) for n in changed}, len(ports)))
        return SyncReport(full=changed is None)

    async def close(self) -> None:
        pass
