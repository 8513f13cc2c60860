"""Userspace mode as the node agent sees it: listeners per family, and the rules steering to them.

Each sync first brings the listeners in line with the view (so every service port has a
listener and knows its port), then rewrites the steering chains in one `--noflush`
restore through the same edge as iptables mode. The steering chains hold a handful of
rules per service port, so rewriting them whole costs less than diffing them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kproxy.backends.base import SyncReport
from kproxy.backends.userspace import handover, steering
from kproxy.backends.userspace.proxier import Choice, Engine, UserspaceProxier
from kproxy.backends.userspace.tcp import Hooks
from kproxy.config import RenderConfig
from kproxy.infra import log
from kproxy.netfilter.restore import CommandRestorer, Restorer, detect_backend
from kproxy.netfilter.ruleset import ChainKey, restore_payload
from kproxy.state.model import Family, PortEntry, ServicePortName


class UserspaceMode:
    mode = "userspace"

    def __init__(self, restorer: Restorer, *, engine: Engine = "raw", hooks: Hooks | None = None) -> None:
        """`engine` picks the TCP forwarder (see `UserspaceProxier`); `hooks` carry its metrics."""
        self.restorer = restorer
        self.engine: Engine = engine
        self.hooks = hooks
        self.proxiers: dict[Family, UserspaceProxier] = {}
        self._jumps_ensured: set[Family] = set()
        self._applied: dict[Family, dict[ChainKey, tuple[str, ...]]] = {}
        self._received: handover.Received | None = None
        self._handover_checked = False
        self._keeper = handover.Keeper()
        self.after_full_sync: Callable[[Family], Awaitable[None]] | None = None
        """Run after each family's first sync (the agent removes nftables mode's table with it)."""

    @classmethod
    def for_host(
        cls, backend: str = "auto", *, engine: Engine = "raw", hooks: Hooks | None = None
    ) -> UserspaceMode:
        chosen = detect_backend(None if backend == "auto" else backend)
        return cls(CommandRestorer(chosen), engine=engine, hooks=hooks)

    @staticmethod
    def _host_ip(family: Family, cfg: RenderConfig) -> str:
        """The node's first address of the family, as the agent follows it (loopback if none)."""
        return cfg.node_ip or ("127.0.0.1" if family == 4 else "::1")

    async def sync(
        self,
        family: Family,
        ports: Mapping[ServicePortName, PortEntry],
        changed: set[ServicePortName] | None,
        cfg: RenderConfig,
    ) -> SyncReport:
        if not self._handover_checked:
            self._handover_checked = True
            self._received = await asyncio.to_thread(handover.receive)
        proxier = self.proxiers.get(family)
        if proxier is None:
            proxier = self.proxiers[family] = UserspaceProxier(
                family=family, engine=self.engine, hooks=self.hooks
            )
            if self._received is not None:
                prefix = f"{family}|"
                proxier.inherit({k: v for k, v in self._received.sockets.items() if k.startswith(prefix)})
        await proxier.sync(ports, cfg.node_zone)
        listening = proxier.listener_ports()
        external = proxier.external_ports()
        scfg = steering.SteeringConfig(
            family=family,
            listen_ip=proxier.bind_ip,
            host_ip=self._host_ip(family, cfg),
            comments=cfg.comments,
            local_cidrs=cfg.local_cidrs,
        )
        policies: dict[object, tuple[steering.Verdict, tuple[int, steering.Verdict] | None]] = {}
        for n in listening:
            inner, outer = proxier.choices(n)
            ext_port = external.get(n)
            ext = (ext_port, _verdict(outer)) if ext_port is not None and outer is not None else None
            if inner is not None and (not inner.targets or ext is not None):
                policies[n] = (_verdict(inner), ext)
        chains = steering.render_all(
            {n: (ports[n][0], p) for n, p in listening.items() if n in ports}, scfg, policies
        )
        full = family not in self._jumps_ensured
        wrote = full or chains != self._applied.get(family)
        if full and await asyncio.to_thread(self._adoptable, family, chains):
            wrote = False
            self._applied[family] = chains
            log.info("userspace_rules_adopted", family=family, chains=len(chains))
        if wrote:
            payload = restore_payload(chains)
            await asyncio.to_thread(self.restorer.apply, family, payload, True)
            self._applied[family] = chains
        opened, closed = proxier.listener_changes()
        if opened or closed or wrote or full:
            self._keeper.update(opened, closed, self._state() if wrote or full else None)
        if full:
            await asyncio.to_thread(self.restorer.ensure_jumps, family, steering.builtin_jumps(scfg))
            self._jumps_ensured.add(family)
            if self.after_full_sync is not None:
                await self.after_full_sync(family)
        log.debug("userspace_synced", family=family, listeners=len(listening))
        rules = {"nat": 0, "filter": 0}
        for (table, _), lines in chains.items():
            rules[table] += len(lines)
        written = rules if wrote else {"nat": 0, "filter": 0}
        return SyncReport(full=full, chains_written=len(chains), rules=rules, rules_written=written)

    def _adoptable(self, family: Family, chains: dict[ChainKey, tuple[str, ...]]) -> bool:
        """The previous kproxy wrote exactly these rules, and the kernel still has them all."""
        prev = self._received.state.get(str(family)) if self._received is not None else None
        if not isinstance(prev, dict) or prev.get("digest") != _digest(chains):
            return False
        try:
            live = {t: self.restorer.save(family, t) for t in ("nat", "filter")}
        except Exception as e:  # a failed read only costs the rewrite adoption would have saved
            log.warn("userspace_rules_unreadable", family=family, error=repr(e))
            return False
        for (table, chain), lines in chains.items():
            head = f"-A {chain} "
            if sum(1 for line in live[table].splitlines() if line.startswith(head)) != len(lines):
                return False
        return True

    def _state(self) -> dict[str, Any]:
        return {str(f): {"digest": _digest(c)} for f, c in self._applied.items()}

    async def close(self) -> None:
        """Listeners close (their connections get a deadline to finish) while the keeper keeps
        them open for the next kproxy (see `handover`); steering rules stay until the next
        kproxy adopts them or `kproxy cleanup` removes them."""
        self._keeper.close()
        for proxier in self.proxiers.values():
            await proxier.close()
        if self._received is not None:
            for sock in self._received.sockets.values():
                sock.close()


def _digest(chains: Mapping[ChainKey, tuple[str, ...]]) -> str:
    items = sorted((f"{t} {c}", list(lines)) for (t, c), lines in chains.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _verdict(choice: Choice | None) -> steering.Verdict:
    """No endpoint anywhere: reject, as for a service without endpoints; none on this node under a
    Local policy: drop, as kube-proxy's KUBE-MARK-DROP."""
    if choice is None or choice.targets:
        return "forward"
    return "drop" if choice.has_any else "reject"
