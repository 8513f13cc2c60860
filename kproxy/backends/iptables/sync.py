"""The rule-diffing sync engine: the kernel gets only what changed since the last sync.

The engine remembers, per service port, the inputs and `PortRules` it last applied, and
per chain the rules in the kernel. A partial sync re-renders only the ports it is told
changed (`render_port` is cached, so an unchanged port costs a dict lookup), compares
their chains with what is applied, and writes one `--noflush` payload holding just the
chains that differ, the chains that are new, and flush + `-X` for chains no longer
wanted. Top-level chains (nat KUBE-SERVICES ...) are the ports' shared lines in port
order; they are rebuilt only when some port's shared lines changed, from an ordered
index, so a one-endpoint change costs the same at 100 services as at 10,000.

A full sync rewrites every chain of ours, deletes stale ones found in the kernel (a node
taken over from kube-proxy is cleaned) and ensures the jumps from the built-in chains.
It happens at start, after any failed restore, when the canary chain vanished (someone
flushed the tables), every `full_sync_interval_s`, and when asked (`changed=None`).

A failed restore changes nothing in the kernel for the failing table and loses nothing:
the changed names stay pending, and the next sync is full, computed from the view.

On nft, very large writes (a full sync, a churn of thousands of services) are split into
several restores, because iptables-nft-restore slows down quadratically with payload
size (see kproxy/netfilter/restore.py). Each restore is atomic and their order keeps every intermediate
ruleset consistent: no rule ever jumps to a chain that is not there yet.
"""

from __future__ import annotations

import bisect
import gc
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain as concat
from typing import NamedTuple

from kproxy.backends.iptables.adopt import chains_in_save, same_rules
from kproxy.backends.iptables.render import CANARY, assemble, builtin_jumps, render_port
from kproxy.config import RenderConfig
from kproxy.errors import RestoreError
from kproxy.infra import log
from kproxy.infra.gcpause import gc_paused
from kproxy.netfilter.restore import Restorer
from kproxy.netfilter.ruleset import OWNED_PREFIXES, TABLES, ChainKey, PortRules, restore_payload
from kproxy.state.model import Endpoint, ServicePort, ServicePortName, View, port_order

Rules = tuple[str, ...]
CANARY_KEY: ChainKey = ("nat", CANARY)
TRUST_APPLIED = frozenset({"periodic", "requested", "config"})
"""Full syncs whose kernel state is known (the canary stands, no restore failed): stale
chains are found in what was applied, not by listing the kernel (a second at 10,000
services on nft). At start, after a failure and after a flush, the kernel is listed."""
FREEZE_MIN_PORTS = 1000
"""From this many ports, a full sync freezes the heap (`gc.freeze`) once its render is done."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    full: bool
    reason: str
    """Why the sync was full ("start", "failure", "canary", "periodic", "requested"); "service_ports_changed" if partial."""
    chains_written: int
    chains_deleted: int
    payload_bytes: int
    restores: int
    """iptables-restore calls made (0: nothing changed, nothing written)."""
    render_s: float
    diff_s: float
    restore_s: float
    check_s: float = 0.0
    """Reading the kernel: the canary check, and the chain list on a full sync."""
    jumps_inserted: int = 0
    rules_written: tuple[tuple[str, int], ...] = ()
    """Rules written per table, for kubeproxy_sync_proxy_rules_iptables_last."""

    @property
    def total_s(self) -> float:
        return self.render_s + self.diff_s + self.restore_s + self.check_s


class _AppliedPort(NamedTuple):
    sp: ServicePort
    eps: tuple[Endpoint, ...]
    rules: PortRules


class _Plan:
    """What one sync writes: per-port groups of chains (a port's SVC and its SEPs travel
    together, so a split payload never jumps to a chain not yet written), top-level
    chains, and chains to delete."""

    __slots__ = ("create", "deleted", "groups", "top")

    def __init__(self) -> None:
        self.groups: list[dict[ChainKey, Rules]] = []
        self.top: dict[ChainKey, Rules] = {}
        self.deleted: list[ChainKey] = []
        self.create: list[ChainKey] = []
        """Top-level chains not yet in the kernel (KUBE-MARK-MASQ...), which per-port
        chains jump to: a split payload creates them, empty, before anything else."""

    @property
    def written(self) -> int:
        return sum(map(len, self.groups)) + len(self.top)

    def rules_written(self) -> tuple[tuple[str, int], ...]:
        counts: dict[str, int] = {}
        for chains in (*self.groups, self.top):
            for (table, _), rules in chains.items():
                counts[table] = counts.get(table, 0) + len(rules)
        return tuple(sorted(counts.items()))

    def empty(self) -> bool:
        return not self.top and not self.deleted and not any(self.groups)


class SyncEngine:
    """One address family's rules: what is applied, and how to get the kernel to the next view."""

    def __init__(
        self,
        cfg: RenderConfig,
        restorer: Restorer,
        *,
        full_sync_interval_s: float = 3600.0,
        canary_interval_s: float = 0.0,
        adopt: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.family = cfg.family
        self.restorer = restorer
        self.full_sync_interval_s = full_sync_interval_s
        self.canary_interval_s = canary_interval_s
        self.adopt = adopt
        """At start, keep per-port chains the kernel already holds exactly (see `_adopt`)."""
        self._clock = clock
        self._fixed: dict[ChainKey, Rules] = assemble((), cfg)
        """Top-level chains as they are with no ports: their keys, in order, and tail rules."""
        self._ports: dict[ServicePortName, _AppliedPort] = {}
        self._applied: dict[ChainKey, Rules] = {}
        self._shared: dict[ChainKey, dict[ServicePortName, Rules]] = {}
        self._order: dict[ChainKey, list[ServicePortName]] = {}
        self._full_reason = "start"
        self._last_full = -math.inf
        self._last_canary = -math.inf
        self._pending: set[ServicePortName] = set()
        self._generation: tuple[object, ...] | None = None
        self._rule_counts: dict[str, int] = {table: 0 for table in TABLES}

    # ---------------------------------------------------------------- public

    @property
    def pending(self) -> frozenset[ServicePortName]:
        """Changes not yet in the kernel because a restore failed (the next sync writes them)."""
        return frozenset(self._pending)

    @property
    def applied(self) -> Mapping[ChainKey, Rules]:
        """Every chain of ours as the last successful sync left it."""
        return self._applied

    @property
    def rule_counts(self) -> Mapping[str, int]:
        """Rules per table in our chains (kept up to date per sync, not recounted)."""
        return self._rule_counts

    def force_full(self, reason: str = "requested") -> None:
        self._full_reason = self._full_reason or reason

    def set_config(self, cfg: RenderConfig) -> None:
        """A new config changes every rendered rule: the next sync is full."""
        if cfg == self.cfg:
            return
        if cfg.family != self.family:
            raise ValueError(f"engine for IPv{self.family} given an IPv{cfg.family} config")
        self.cfg = cfg
        self._fixed = assemble((), cfg)
        self.force_full("config")

    def sync(self, view: View, changed: Collection[ServicePortName] | None) -> SyncResult:
        """Bring the kernel to `view`. `changed` names every service port whose entry differs
        from the previous call's view (added, removed or modified); None asks for a full sync."""
        check_s = 0.0
        reason = self._full_reason
        now = self._clock()
        if not reason and changed is None:
            reason = "requested"
        if not reason and now - self._last_full >= self.full_sync_interval_s:
            reason = "periodic"
        if not reason and now - self._last_canary >= self.canary_interval_s:
            t = time.perf_counter()
            present = self._canary_present()
            check_s = time.perf_counter() - t
            self._last_canary = now
            if not present:
                log.warn("iptables_canary_missing", family=self.family, chain=CANARY)
                reason = "canary"
        try:
            if reason:
                result = self._full(view, reason, check_s)
            else:
                assert changed is not None
                result = self._partial(view, changed, check_s)
        except Exception as exc:
            # Whatever broke (a refused payload, a timeout, a missing binary), the kernel's
            # state is no longer known exactly: start over from the view next time.
            self._full_reason = "failure"
            self._generation = None
            if changed is not None:
                self._pending.update(changed)
            log.error(
                "iptables_restore_failed",
                family=self.family,
                line=exc.line if isinstance(exc, RestoreError) else None,
                pending=len(self._pending),
                error=str(exc),
            )
            raise
        self._pending.clear()
        return result

    def _untouched(self) -> bool:
        """True when the tables provably did not change since our last write (legacy only:
        the kernel's table header; nft has no such token here, so this is always False)."""
        return self._generation is not None and self._generations() == self._generation

    def _generations(self) -> tuple[object, ...] | None:
        tokens = tuple(self.restorer.generation(self.family, table) for table in TABLES)
        return None if None in tokens else tokens

    def _canary_present(self) -> bool:
        if self._untouched():
            return True
        return self.restorer.has_chain(self.family, CANARY_KEY[0], CANARY_KEY[1])

    def _remember_generation(self) -> None:
        self._generation = self._generations()

    # --------------------------------------------------------------- partial

    def _partial(self, view: View, changed: Collection[ServicePortName], check_s: float) -> SyncResult:
        t0 = time.perf_counter()
        names, fresh = self._render_changed(view, set(changed) | self._pending)
        t1 = time.perf_counter()
        plan = self._plan_partial(view, names, fresh)
        t2 = time.perf_counter()
        restores, size, restore_s = self._commit(plan)
        if restores:
            self._remember_generation()
        return self._result(
            plan,
            False,
            "service_ports_changed",
            restores,
            size,
            render_s=t1 - t0,
            diff_s=t2 - t1,
            restore_s=restore_s,
            check_s=check_s,
        )

    def _render_changed(
        self, view: View, names: set[ServicePortName]
    ) -> tuple[set[ServicePortName], dict[ServicePortName, PortRules]]:
        """Render the named ports whose entry differs from what is applied. If the names
        cannot account for the view (the caller missed a port), every port is compared
        rather than a wrong ruleset written."""
        ports = self._ports
        fresh: dict[ServicePortName, PortRules] = {}
        for name in names:
            entry = view.get(name)
            old = ports.get(name)
            if entry is None or (old is not None and old.sp == entry[0] and old.eps == entry[1]):
                continue
            fresh[name] = render_port(entry[0], entry[1], self.cfg)
        added = sum(1 for n in fresh if n not in ports)
        removed = sum(1 for n in names if n in ports and n not in view)
        if len(ports) + added - removed == len(view):
            return names, fresh
        log.warn("sync_changed_set_incomplete", family=self.family, ports=len(view), known=len(ports))
        names = set(view) | set(ports)
        fresh = {
            n: render_port(view[n][0], view[n][1], self.cfg)
            for n in names
            if n in view and not (n in ports and ports[n][:2] == view[n])
        }
        return names, fresh

    def _plan_partial(
        self, view: View, names: Iterable[ServicePortName], fresh: Mapping[ServicePortName, PortRules]
    ) -> _Plan:
        """The chains that differ from what is applied, and the top-level chains whose
        shared lines moved; the engine's per-port state is brought to `view` on the way."""
        plan = _Plan()
        dirty: set[ChainKey] = set()
        for name in names:
            if name not in view:
                self._plan_removed(plan, dirty, name)
            elif name in fresh:
                self._plan_changed(plan, dirty, name, view[name], fresh[name])
        applied = self._applied
        for key in dirty:
            rules = self._top(key)
            if applied.get(key) != rules:
                plan.top[key] = rules
        return plan

    def _plan_removed(self, plan: _Plan, dirty: set[ChainKey], name: ServicePortName) -> None:
        old = self._ports.pop(name, None)
        if old is None:
            return
        plan.deleted.extend((c.table, c.name) for c in old.rules.own)
        for c in old.rules.shared:
            self._unshare(name, (c.table, c.name))
            dirty.add((c.table, c.name))

    def _plan_changed(
        self,
        plan: _Plan,
        dirty: set[ChainKey],
        name: ServicePortName,
        entry: tuple[ServicePort, tuple[Endpoint, ...]],
        pr: PortRules,
    ) -> None:
        old = self._ports.get(name)
        self._ports[name] = _AppliedPort(entry[0], entry[1], pr)
        if old is not None and old.rules is pr:
            return
        applied = self._applied
        group = {(c.table, c.name): c.rules for c in pr.own if applied.get((c.table, c.name)) != c.rules}
        if group:
            plan.groups.append(group)
        if old is not None:
            keep = {(c.table, c.name) for c in pr.own}
            plan.deleted.extend((c.table, c.name) for c in old.rules.own if (c.table, c.name) not in keep)
            if old.rules.shared == pr.shared:
                return
            for c in old.rules.shared:
                self._unshare(name, (c.table, c.name))
                dirty.add((c.table, c.name))
        for c in pr.shared:
            self._share(name, (c.table, c.name), c.rules)
            dirty.add((c.table, c.name))

    def _share(self, name: ServicePortName, key: ChainKey, rules: Rules) -> None:
        lines = self._shared.setdefault(key, {})
        if name not in lines:
            bisect.insort(self._order.setdefault(key, []), name)
        lines[name] = rules

    def _unshare(self, name: ServicePortName, key: ChainKey) -> None:
        if self._shared.get(key, {}).pop(name, None) is None:
            return
        order = self._order[key]
        del order[bisect.bisect_left(order, name)]

    def _top(self, key: ChainKey) -> Rules:
        """A top-level chain: every port's lines in port order, then the fixed tail."""
        lines = self._shared.get(key, {})
        order = self._order.get(key, [])
        return (*concat.from_iterable([lines[n] for n in order]), *self._fixed.get(key, ()))

    # ------------------------------------------------------------------ full

    def _full(self, view: View, reason: str, check_s: float) -> SyncResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        ports: dict[ServicePortName, _AppliedPort] = {}
        plan = _Plan()
        # One pause over render and plan, and at 10,000 services the freeze inside it: the
        # render's objects live until the next full sync and form no cycles, so they go out
        # of the collector's sight before it comes back, rather than be scanned once on its
        # return and again by every later full collection.
        with gc_paused():
            for name in sorted(view, key=port_order):
                sp, eps = view[name]
                ports[name] = _AppliedPort(sp, eps, render_port(sp, eps, cfg))
            t1 = time.perf_counter()
            self._ports = ports
            self._shared = {}
            self._order = {}
            for name, port in ports.items():
                for c in port.rules.shared:
                    key = (c.table, c.name)
                    self._shared.setdefault(key, {})[name] = c.rules
                    self._order.setdefault(key, []).append(name)
                if port.rules.own:
                    plan.groups.append({(c.table, c.name): c.rules for c in port.rules.own})
            for key in {**self._fixed, **self._shared}:
                plan.top[key] = self._top(key)
            if len(ports) >= FREEZE_MIN_PORTS:
                gc.freeze()
        t2 = time.perf_counter()
        wanted: set[ChainKey] = set(plan.top)
        for group in plan.groups:
            wanted.update(group)
        if reason in TRUST_APPLIED:
            existing = set(self._applied)
        else:
            listing = self.restorer.chains(self.family, TABLES)
            existing = {(table, name) for table, names in listing.items() for name in names}
        plan.deleted = sorted(
            key for key in existing if key[1].startswith(OWNED_PREFIXES) and key not in wanted
        )
        plan.create = [key for key in plan.top if key not in existing]
        adopted = self._adopt(plan, existing) if reason == "start" and self.adopt else {}
        # Jumps we ensured stand as long as nobody else touched the tables since.
        jumps_stand = reason in TRUST_APPLIED and self._untouched()
        t3 = time.perf_counter()
        restores, size, restore_s = self._commit(plan, start_over=True, adopted=adopted)
        t = time.perf_counter()
        inserted = 0 if jumps_stand else self.restorer.ensure_jumps(self.family, builtin_jumps(cfg))
        self._remember_generation()
        restore_s += time.perf_counter() - t
        self._full_reason = ""
        self._last_full = self._last_canary = self._clock()
        log.info(
            "iptables_full_sync",
            family=self.family,
            reason=reason,
            ports=len(ports),
            chains=len(self._applied),
            deleted=len(plan.deleted),
            adopted=len(adopted),
            jumps_inserted=inserted,
        )
        return self._result(
            plan,
            True,
            reason,
            restores,
            size,
            render_s=t1 - t0,
            diff_s=t2 - t1,
            restore_s=restore_s,
            check_s=check_s + (t3 - t2),
            jumps_inserted=inserted,
        )

    def _adopt(self, plan: _Plan, existing: set[ChainKey]) -> dict[ChainKey, Rules]:
        """Drop from the plan every per-port chain the kernel already holds exactly.

        Only at start: a node taken over from kube-proxy (or a restarted kproxy) keeps its
        per-service chains untouched, counters and all. Reading and comparing costs far less
        than rewriting on nft; any doubt (a table that cannot be read) means rewrite."""
        tables = {key[0] for group in plan.groups for key in group if key in existing}
        saved: dict[str, dict[str, list[str]]] = {}
        for table in tables:
            try:
                saved[table] = chains_in_save(self.restorer.save(self.family, table))
            except RestoreError:
                return {}
        adopted: dict[ChainKey, Rules] = {}
        for group in plan.groups:
            for key, rules in list(group.items()):
                have = saved.get(key[0], {}).get(key[1])
                if have is not None and same_rules(have, rules, self.family):
                    adopted[key] = rules
                    del group[key]
        plan.groups = [group for group in plan.groups if group]
        return adopted

    # ----------------------------------------------------------------- write

    def payloads(self, plan: _Plan) -> Iterator[str]:
        """The restore payloads for a plan: one, unless the restorer asks for chunks.

        Chunked order keeps every intermediate state valid: missing top-level chains
        created empty, then per-port chains (whole
        ports per chunk), then the top-level chains that jump to them, then the chains to
        delete are flushed (dropping their references to each other), then deleted."""
        limit = self.restorer.chunk_limit(max(len(self._applied), plan.written))
        if not limit or plan.written + len(plan.deleted) <= limit:
            merged: dict[ChainKey, Rules] = {}
            for group in plan.groups:
                merged.update(group)
            merged.update(plan.top)
            yield restore_payload(merged, plan.deleted)
            return
        if plan.create:
            yield restore_payload(dict.fromkeys(plan.create, ()))
        for batch in _batches(plan.groups, limit):
            yield restore_payload(batch)
        if plan.top:
            yield restore_payload(plan.top)
        gone = [{key: ()} for key in plan.deleted]
        for batch in _batches(gone, limit):
            yield restore_payload(batch)
        for batch in _batches(gone, limit):
            yield restore_payload({}, batch)

    def _commit(
        self, plan: _Plan, *, start_over: bool = False, adopted: Mapping[ChainKey, Rules] | None = None
    ) -> tuple[int, int, float]:
        """Write the plan, then record it as applied, with the rule count per table kept by
        difference. `start_over` (a full sync) forgets what was applied before; `adopted`
        chains were already in the kernel and are recorded without being written."""
        written = self._write(plan)
        if start_over:
            self._applied = {}
            self._rule_counts = {table: 0 for table in TABLES}
        applied, counts = self._applied, self._rule_counts
        chains = concat((adopted or {}).items(), *(group.items() for group in plan.groups), plan.top.items())
        for key, rules in chains:
            counts[key[0]] = counts.get(key[0], 0) + len(rules) - len(applied.get(key, ()))
            applied[key] = rules
        for key in plan.deleted:
            counts[key[0]] = counts.get(key[0], 0) - len(applied.pop(key, ()))
        return written

    def _result(
        self,
        plan: _Plan,
        full: bool,
        reason: str,
        restores: int,
        size: int,
        *,
        render_s: float,
        diff_s: float,
        restore_s: float,
        check_s: float,
        jumps_inserted: int = 0,
    ) -> SyncResult:
        return SyncResult(
            full=full,
            reason=reason,
            chains_written=plan.written,
            chains_deleted=len(plan.deleted),
            payload_bytes=size,
            restores=restores,
            render_s=render_s,
            diff_s=diff_s,
            restore_s=restore_s,
            check_s=check_s,
            jumps_inserted=jumps_inserted,
            rules_written=plan.rules_written(),
        )

    def _write(self, plan: _Plan) -> tuple[int, int, float]:
        if plan.empty():
            return 0, 0, 0.0
        restores = size = 0
        elapsed = 0.0
        for payload in self.payloads(plan):
            if not payload:
                continue
            size += len(payload)
            restores += 1
            t = time.perf_counter()
            self.restorer.apply(self.family, payload, noflush=True)
            elapsed += time.perf_counter() - t
        return restores, size, elapsed


def _batches(groups: Iterable[Mapping[ChainKey, Rules]], limit: int) -> Iterator[dict[ChainKey, Rules]]:
    batch: dict[ChainKey, Rules] = {}
    for group in groups:
        if batch and len(batch) + len(group) > limit:
            yield batch
            batch = {}
        batch.update(group)
    if batch:
        yield batch
