"""iptables mode as the node agent sees it: one SyncEngine per family over one backend.

What kube-proxy's iptables proxier learns about the host once, at start, this one
learns from a `HostProbe` before its first sync: whether iptables can write
`MASQUERADE --random-fully` (iptables 1.6.2 and later), whether
nf_conntrack_tcp_be_liberal is set (then no `--ctstate INVALID` drop). Like
NewProxier, it sets route_localnet when it is built, if localhost node ports are on. It keeps kube-proxy's canary chain in
mangle, beside the nat and filter ones every full sync writes.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Protocol

from kproxy.backends.base import SyncReport
from kproxy.backends.iptables.render import CANARY
from kproxy.backends.iptables.sync import SyncEngine
from kproxy.config import RenderConfig
from kproxy.errors import ConfigError, RestoreError
from kproxy.infra import log
from kproxy.netfilter.restore import (
    CommandRestorer,
    Restorer,
    XtablesBackend,
    call_in_netns,
    detect_backend,
    tool,
)
from kproxy.state.model import Family, PortEntry, ServicePortName

ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
TCP_BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"
RANDOM_FULLY_MIN = (1, 6, 2)
"""The first iptables release with MASQUERADE --random-fully (kube-proxy checks the same)."""
_VERSION = re.compile(r"v(\d+)\.(\d+)(?:\.(\d+))?")


class HostProbe(Protocol):
    """The host facts the iptables proxier reads or sets once, in its network namespace."""

    def iptables_version(self) -> str:
        """`iptables --version` output; "" when it cannot be run."""

    def read_sysctl(self, name: str) -> str | None:
        """A sysctl's value (`net/...` path form), None when it does not exist."""

    def write_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl, or raise OSError."""

    def ensure_mangle_canary(self, family: Family) -> None:
        """Create KUBE-PROXY-CANARY in the mangle table if it is missing."""


def supports_random_fully(version_text: str) -> bool:
    m = _VERSION.search(version_text)
    if not m:
        return False
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) >= RANDOM_FULLY_MIN


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class CommandProbe:
    """The real host (or the network namespace `netns`), through the backend's tools and /proc/sys."""

    def __init__(self, backend: XtablesBackend, *, netns: str | None = None) -> None:
        self.backend: XtablesBackend = backend
        self.netns = netns
        self._prefix: tuple[str, ...] = ("nsenter", f"--net=/run/netns/{netns}") if netns else ()

    def iptables_version(self) -> str:
        try:
            done = subprocess.run(
                [tool(self.backend, 4), "--version"], capture_output=True, text=True, check=False, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    def read_sysctl(self, name: str) -> str | None:
        path = "/proc/sys/" + name
        if self.netns:  # /proc/sys/net is the reading thread's namespace's
            return call_in_netns(self.netns, _read, path)
        return _read(path)

    def write_sysctl(self, name: str, value: str) -> None:
        path = "/proc/sys/" + name
        if self.netns:
            try:
                call_in_netns(self.netns, _write, path, value)
            except RestoreError as e:
                raise OSError(str(e)) from e
        else:
            _write(path, value)

    def ensure_mangle_canary(self, family: Family) -> None:
        argv = [*self._prefix, tool(self.backend, family, "-restore"), "--wait=5", "--noflush"]
        done = subprocess.run(
            argv, input=f"*mangle\n:{CANARY} - [0:0]\nCOMMIT\n", capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RestoreError(family, done.returncode, done.stderr)


class IptablesProxier:
    mode = "iptables"

    def __init__(
        self,
        restorer: Restorer,
        *,
        full_sync_period: float = 3600.0,
        probe: HostProbe | None = None,
        route_localnet: bool = False,
    ) -> None:
        """With `route_localnet` (IPv4 localhost node ports in effect), sets that sysctl now,
        as kube-proxy's NewProxier does, and refuses to start when it cannot."""
        self.restorer = restorer
        self.full_sync_period = full_sync_period
        self.engines: dict[Family, SyncEngine] = {}
        self.probe = probe
        self._facts: tuple[bool, bool] | None = None
        self._adjusted: dict[Family, tuple[RenderConfig, RenderConfig]] = {}
        self.after_full_sync: Callable[[Family], Awaitable[None]] | None = None
        """Run after each successful full sync of a family (the agent removes nftables mode's
        table with it when switching modes)."""
        if route_localnet and probe is not None:
            try:
                probe.write_sysctl(ROUTE_LOCALNET, "1")
            except OSError as e:
                raise ConfigError(
                    "iptables.localhostNodePorts",
                    f"cannot set {ROUTE_LOCALNET}=1 ({e}); turn localhost node ports off "
                    "(--iptables-localhost-nodeports=false) or leave 127.0.0.0/8 out of nodePortAddresses",
                ) from e
            log.info("route_localnet_set", reason="localhost node ports (issue 90259)")

    @classmethod
    def for_host(
        cls, backend: str = "auto", *, full_sync_period: float = 3600.0, route_localnet: bool = False
    ) -> IptablesProxier:
        chosen = detect_backend(None if backend == "auto" else backend)
        log.info("iptables_backend", backend=chosen)
        return cls(
            CommandRestorer(chosen),
            full_sync_period=full_sync_period,
            probe=CommandProbe(chosen),
            route_localnet=route_localnet,
        )

    def _host_facts(self) -> tuple[bool, bool]:
        """(random_fully, drop_invalid), read once."""
        if self._facts is None:
            assert self.probe is not None
            version = self.probe.iptables_version()
            random_fully = supports_random_fully(version)
            liberal = (self.probe.read_sysctl(TCP_BE_LIBERAL) or "0") != "0"
            log.info(
                "iptables_host_features",
                iptables=version.strip() or "unknown",
                random_fully=random_fully,
                tcp_be_liberal=liberal,
            )
            if liberal:
                log.info("iptables_invalid_drop_off", reason="nf_conntrack_tcp_be_liberal is set")
            self._facts = (random_fully, not liberal)
        return self._facts

    def _config(self, cfg: RenderConfig) -> RenderConfig:
        """`cfg` as this host can have it; the same object for the same input, so the engine
        sees a change only when the agent's config changes."""
        if self.probe is None:
            return cfg
        known = self._adjusted.get(cfg.family)
        if known is not None and known[0] == cfg:
            return known[1]
        random_fully, drop_invalid = self._host_facts()
        adjusted = replace(cfg, random_fully=random_fully, drop_invalid=drop_invalid)
        self._adjusted[cfg.family] = (cfg, adjusted)
        return adjusted

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        cfg = self._config(cfg)
        engine = self.engines.get(family)
        if engine is None:
            engine = SyncEngine(cfg, self.restorer, full_sync_interval_s=self.full_sync_period)
            self.engines[family] = engine
        else:
            engine.set_config(cfg)
        result = await asyncio.to_thread(engine.sync, ports, changed)
        if result.full and self.probe is not None:
            # kube-proxy's monitor keeps its canary in mangle too; a full sync follows a flush.
            await asyncio.to_thread(self.probe.ensure_mangle_canary, family)
        if result.full and self.after_full_sync is not None:
            await self.after_full_sync(family)
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
