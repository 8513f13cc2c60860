"""An in-memory kernel for the sync engine's unit tests (`kproxy.netfilter.restore.Restorer`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kproxy.errors import RestoreError
from kproxy.netfilter.ruleset import ChainKey, Table
from kproxy.state.model import Family

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


class FakeRestorer:
    """An in-memory kernel for unit tests: applies restore payloads with iptables-restore's
    rules (a chain is declared before use, `-X` needs an empty unreferenced chain, a jump
    needs its target, a failed payload changes nothing) and records every call."""

    def __init__(self, chunk_chains: int | None = None) -> None:
        self.chunk_chains = chunk_chains
        self.tables: dict[tuple[Family, str], dict[str, list[str]]] = {}
        self.payloads: list[tuple[Family, str]] = []
        self.fail_next = 0
        self.jump_calls = 0

    def chunk_limit(self, table_chains: int) -> int | None:
        return self.chunk_chains

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        self.payloads.append((family, payload))
        if self.fail_next:
            self.fail_next -= 1
            raise RestoreError(family, 1, "injected failure: line 1 failed", 1)
        staged = {
            key: {name: list(rules) for name, rules in chains.items()} for key, chains in self.tables.items()
        }
        current: dict[str, list[str]] | None = None
        for number, line in enumerate(payload.splitlines(), 1):
            try:
                current = self._line(staged, family, current, line, noflush)
            except ValueError as exc:
                raise RestoreError(family, 1, f"line {number} failed: {exc}", number) from None
        self.tables = staged

    def _line(
        self,
        staged: dict[tuple[Family, str], dict[str, list[str]]],
        family: Family,
        current: dict[str, list[str]] | None,
        line: str,
        noflush: bool,
    ) -> dict[str, list[str]] | None:
        if not line or line.startswith("#"):
            return current
        if line.startswith("*"):
            table = staged.setdefault((family, line[1:]), {})
            if not noflush:
                for name in list(table):
                    if name in BUILTIN_CHAINS:
                        table[name] = []
                    else:
                        del table[name]
            return table
        if current is None:
            raise ValueError("no table")
        if line == "COMMIT":
            return None
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name not in BUILTIN_CHAINS or name not in current:
                current[name] = []
            return current
        op, _, rest = line.partition(" ")
        name = rest.split(" ", 1)[0]
        if op == "-A":
            if name not in current:
                raise ValueError(f"no chain {name}")
            target = _target(line)
            if target and target not in current and target.startswith("KUBE-"):
                raise ValueError(f"no chain {target}")
            current[name].append(line)
        elif op == "-X":
            if name not in current:
                raise ValueError(f"no chain {name}")
            if current[name]:
                raise ValueError(f"chain {name} not empty")
            if any(_target(r) == name for rules in current.values() for r in rules):
                raise ValueError(f"chain {name} still referenced")
            del current[name]
        else:
            raise ValueError(f"unknown command {op}")
        return current

    def save(self, family: Family, table: Table) -> str:
        chains = self.tables.get((family, table), {})
        out = [f"*{table}"]
        out.extend(f":{name} {'ACCEPT' if name in BUILTIN_CHAINS else '-'} [0:0]" for name in sorted(chains))
        for name in sorted(chains):
            out.extend(chains[name])
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def chains(self, family: Family, tables: Sequence[Table]) -> dict[Table, set[str]]:
        return {table: set(self.tables.get((family, table), {})) for table in tables}

    def has_chain(self, family: Family, table: Table, chain: str) -> bool:
        return chain in self.tables.get((family, table), {})

    def generation(self, family: Family, table: Table) -> object | None:
        return None

    def ensure_jumps(self, family: Family, jumps: Mapping[ChainKey, tuple[str, ...]]) -> int:
        self.jump_calls += 1
        inserted = 0
        for (table, chain), rules in jumps.items():
            present = self.tables.setdefault((family, table), {}).setdefault(chain, [])
            for line in reversed(rules):
                if line not in present:
                    present.insert(0, line)
                    inserted += 1
        return inserted


def _target(line: str) -> str:
    _, sep, rest = line.partition(" -j ")
    return rest.split(" ", 1)[0] if sep else ""
