"""The diffing sync engine of nftables mode: one transaction per family, only what changed.

The engine remembers, per service port, the `PortObjects` last applied; per chain and
set of ours, what the kernel holds; per map element, which ports want it and with
what value (the first port in name order wins, so two services claiming one address
never make a write fail). A partial sync re-renders only the ports it is told changed
and writes, in one `nft -f` transaction: deleted and changed map elements, flushed and
deleted chains, new sets and chains, the rules of new and changed chains, new
elements. Unchanged ports cost nothing, so a one-endpoint change costs the same at 10
services as at 10,000.

A full sync replaces the whole table in one transaction (`add table; delete table;
table {...}`): at start, after any failed write, when the config changed, when the
table has vanished (a canary set listed before each partial sync, well under a
millisecond), and every `full_sync_interval_s`. A failed transaction applies nothing: the previous rules keep
serving, the engine's record is untouched, and the next sync is full, computed from
the view, so no pending change is lost.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from kproxy.backends.nftables.render import (
    SYNC_STATE,
    TABLE,
    PortObjects,
    element_commands,
    family_words,
    fixed_part,
    render_port,
    table_script,
)
from kproxy.backends.nftables.writer import NftWriter
from kproxy.config import RenderConfig
from kproxy.infra import log
from kproxy.infra.gcpause import gc_paused
from kproxy.state.model import ServicePortName, View, port_order

ElementKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class NftSyncResult:
    full: bool
    reason: str
    """Why the sync was full ("start", "failure", "config", "periodic", "requested", "tampered");
    "" if partial."""
    chains_written: int
    chains_deleted: int
    elements_written: int
    script_bytes: int
    transactions: int
    render_s: float
    write_s: float


_EMPTY = PortObjects(())


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")


def port_digest(name: ServicePortName, po: PortObjects) -> int:
    """Stable across processes (unlike hash()): what one port contributes to the table."""
    return _digest(f"{name!r}{po!r}")


class NftSyncEngine:
    """One family's `kube-proxy` table: what is applied, and how to get the kernel to the next view."""

    def __init__(
        self,
        cfg: RenderConfig,
        writer: NftWriter,
        *,
        full_sync_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.family = cfg.family
        self.fam = family_words(cfg.family)[0]
        self.writer = writer
        self.full_sync_interval_s = full_sync_interval_s
        self._clock = clock
        self._full_reason = "start"
        self._last_full = clock()
        self.applied: dict[ServicePortName, PortObjects] = {}
        self.chains: dict[str, tuple[str, ...]] = {}
        self.sets: dict[str, str] = {}
        self.owners: dict[ElementKey, dict[ServicePortName, str]] = {}
        self.elements: dict[ElementKey, str] = {}
        """What the kernel holds: the winning value of every owned element."""
        self.digests: dict[ServicePortName, int] = {}
        self._xor = 0
        """XOR of the applied ports' digests: kept per change, so the state digest written with
        every transaction costs O(changed ports), not a pass over the table."""

    def set_config(self, cfg: RenderConfig) -> None:
        if cfg != self.cfg:
            self.cfg = cfg
            self._full_reason = self._full_reason or "config"

    def sync(self, view: View, changed: Collection[ServicePortName] | None) -> NftSyncResult:
        """Bring the table to `view`. `changed` names every service port whose entry differs
        from the previous call's view; None asks for a full sync."""
        reason = self._full_reason
        if not reason and changed is None:
            reason = "requested"
        if not reason and self._clock() - self._last_full >= self.full_sync_interval_s:
            reason = "periodic"
        if not reason and not self.writer.table_present(self.family):
            log.warn("nftables_table_missing", family=self.family, table=f"{self.fam} {TABLE}")
            reason = "tampered"
        try:
            if reason:
                return self._full(view, reason)
            assert changed is not None
            return self._partial(view, changed)
        except Exception as exc:
            self._full_reason = "failure"
            log.error("nftables_sync_failed", family=self.family, full=bool(reason), error=str(exc))
            raise

    # ------------------------------------------------------------------ full

    def _state(self, xor: int) -> str:
        """The digest of the whole table (config and every port) as the element of SYNC_STATE."""
        return str(ipaddress.IPv6Address(xor ^ _digest(fixed_part(self.cfg))))

    def _adoptable(self, state: str) -> bool:
        """At start: the kernel's table was written (last) for exactly this state."""
        try:
            listing = self.writer.read(self.family, f"list set {self.fam} {TABLE} {SYNC_STATE}\n")
        except Exception:  # no table, an old table without the set: rewrite
            return False
        return f"{{ {state} }}" in listing

    def _full(self, view: View, reason: str) -> NftSyncResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        with gc_paused():
            names = sorted(view, key=port_order)
            ports = [render_port(*view[name], cfg) for name in names]
            digests = {name: port_digest(name, po) for name, po in zip(names, ports, strict=True)}
            xor = 0
            for d in digests.values():
                xor ^= d
            state = self._state(xor)
            adopt = reason == "start" and self._adoptable(state)
            script = "" if adopt else table_script(ports, cfg)
            script += f"add element {self.fam} {TABLE} {SYNC_STATE} {{ {state} }}\n" if not adopt else ""
        t1 = time.perf_counter()
        if not adopt:
            self.writer.apply(self.family, script)
        else:
            log.info("nftables_table_adopted", family=self.family, ports=len(ports))
        t2 = time.perf_counter()
        self.digests, self._xor = digests, xor
        applied = dict(zip(names, ports, strict=True))
        chains: dict[str, tuple[str, ...]] = {}
        sets: dict[str, str] = {}
        owners: dict[ElementKey, dict[ServicePortName, str]] = {}
        elements: dict[ElementKey, str] = {}
        for name, po in applied.items():
            chains.update(po.chains)
            sets.update(po.sets)
            for m, k, v in po.elements:
                owners.setdefault((m, k), {})[name] = v
                elements.setdefault((m, k), v)
        self.applied, self.chains, self.sets, self.owners, self.elements = (
            applied,
            chains,
            sets,
            owners,
            elements,
        )
        self._full_reason = ""
        self._last_full = self._clock()
        if adopt:
            return NftSyncResult(True, "adopted", 0, 0, 0, 0, 0, t1 - t0, t2 - t1)
        return NftSyncResult(True, reason, len(chains), 0, len(elements), len(script), 1, t1 - t0, t2 - t1)

    # --------------------------------------------------------------- partial

    def _partial(self, view: View, changed: Collection[ServicePortName]) -> NftSyncResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        updates: dict[ServicePortName, PortObjects | None] = {}
        for name in changed:
            entry = view.get(name)
            new = render_port(*entry, cfg) if entry is not None else None
            if new is not self.applied.get(name):
                updates[name] = new
        if not updates:
            return NftSyncResult(False, "", 0, 0, 0, 0, 0, time.perf_counter() - t0, 0.0)

        old_chains: dict[str, tuple[str, ...]] = {}
        new_chains: dict[str, tuple[str, ...]] = {}
        old_sets: dict[str, str] = {}
        new_sets: dict[str, str] = {}
        touched: set[ElementKey] = set()
        for name, new in updates.items():
            old = self.applied.get(name, _EMPTY)
            new_po = new or _EMPTY
            old_chains.update(old.chains)
            new_chains.update(new_po.chains)
            old_sets.update(old.sets)
            new_sets.update(new_po.sets)
            touched.update((m, k) for m, k, _ in old.elements)
            touched.update((m, k) for m, k, _ in new_po.elements)

        # Element owners after this sync, for the touched keys only.
        owners: dict[ElementKey, dict[ServicePortName, str]] = {}
        for key in touched:
            owners[key] = {n: v for n, v in self.owners.get(key, {}).items() if n not in updates}
        for name, new in updates.items():
            for m, k, v in new.elements if new else ():
                owners[(m, k)][name] = v
        elem_del: list[tuple[ElementKey, str]] = []
        elem_add: list[tuple[ElementKey, str]] = []
        for key in touched:
            want = owners[key][min(owners[key], key=port_order)] if owners[key] else None
            have = self.elements.get(key)
            if want == have:
                continue
            if have is not None:
                elem_del.append((key, have))
            if want is not None:
                elem_add.append((key, want))

        chain_del = [c for c in old_chains if c not in new_chains]
        chain_new = [c for c in new_chains if c not in old_chains]
        chain_rewrite = [c for c in new_chains if c in old_chains and old_chains[c] != new_chains[c]]
        set_del = [s for s in old_sets if new_sets.get(s) != old_sets[s]]
        set_new = [s for s in new_sets if old_sets.get(s) != new_sets[s]]
        if set_del:
            # A set is only deleted with no rule left using it: rewrite its users too.
            used = tuple(f"@{s} " for s in set_del)
            chain_rewrite += [
                c
                for c in new_chains
                if c in old_chains
                and c not in chain_rewrite
                and any(u in rule for rule in old_chains[c] for u in used)
            ]

        fam, tbl = self.fam, f"{self.fam} {TABLE}"
        out: list[str] = element_commands(fam, "delete", sorted(elem_del))
        out += [f"flush chain {tbl} {c}\n" for c in (*chain_rewrite, *chain_del)]
        out += [f"delete chain {tbl} {c}\n" for c in chain_del]
        out += [f"delete set {tbl} {s}\n" for s in set_del]
        out += [f"add set {tbl} {s} {{ {new_sets[s]} }}\n" for s in set_new]
        out += [f"add chain {tbl} {c}\n" for c in chain_new]
        for c in (*chain_new, *chain_rewrite):
            out += [f"add rule {tbl} {c} {rule}\n" for rule in new_chains[c]]
        out += element_commands(fam, "add", sorted(elem_add))
        xor = self._xor
        digests: dict[ServicePortName, int | None] = {}
        for name, new in updates.items():
            xor ^= self.digests.get(name, 0)
            digests[name] = port_digest(name, new) if new is not None else None
            xor ^= digests[name] or 0
        if out or xor != self._xor:
            tbl_state = f"{tbl} {SYNC_STATE}"
            out.append(f"delete element {tbl_state} {{ {self._state(self._xor)} }}\n")
            out.append(f"add element {tbl_state} {{ {self._state(xor)} }}\n")
        script = "".join(out)
        t1 = time.perf_counter()
        if script:
            self.writer.apply(self.family, script)
        t2 = time.perf_counter()

        for name, new in updates.items():
            if new is None:
                self.applied.pop(name, None)
            else:
                self.applied[name] = new
        for name, digest in digests.items():
            if digest is None:
                self.digests.pop(name, None)
            else:
                self.digests[name] = digest
        self._xor = xor
        for c in chain_del:
            del self.chains[c]
        self.chains.update(new_chains)
        for s in old_sets:
            self.sets.pop(s, None)
        self.sets.update(new_sets)
        for key, _value in elem_del:
            del self.elements[key]
        self.elements.update(elem_add)
        for key, who in owners.items():
            if who:
                self.owners[key] = who
            else:
                self.owners.pop(key, None)
        return NftSyncResult(
            False,
            "",
            len(chain_new) + len(chain_rewrite),
            len(chain_del),
            len(elem_add) + len(elem_del),
            len(script),
            1 if script else 0,
            t1 - t0,
            t2 - t1,
        )
