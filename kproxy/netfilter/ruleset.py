"""The shape of rendered rules, shared by the renderer and the sync engine.

A ruleset is a set of chains, each a tuple of complete `-A CHAIN ...` lines. Chains
owned by one service port (`PortRules.own`) can be diffed and rewritten alone;
top-level chains are the concatenation of every port's `PortRules.shared` lines for
that chain, wrapped by fixed head and tail rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

Table = Literal["nat", "filter"]
TABLES: tuple[Table, ...] = ("filter", "nat")
ChainKey = tuple[Table, str]

OWNED_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
"""Per-service chains kproxy (and kube-proxy) own outright and may flush or delete."""


class Chain(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: a cold render makes 110,000 of them at
    10,000 services, and a tuple is built in a third of the time."""

    table: Table
    name: str
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PortRules:
    """Everything one service port contributes to one family's ruleset."""

    own: tuple[Chain, ...]
    shared: tuple[Chain, ...]
    """Lines for top-level chains (e.g. nat KUBE-SERVICES), in the order they are to appear."""


def restore_payload(
    chains: Mapping[ChainKey, tuple[str, ...]],
    deleted: Iterable[ChainKey] = (),
    builtin_jumps: Mapping[ChainKey, tuple[str, ...]] | None = None,
) -> str:
    """iptables-restore input: declare (and so flush) each chain in `chains`, write its
    rules, then delete `deleted`. `builtin_jumps` adds built-in chains (PREROUTING...)
    with their policy, for a full non-`--noflush` restore such as dry-run's."""
    out: list[str] = []
    dead = sorted(deleted)
    for table in TABLES:
        names = [name for (t, name) in chains if t == table]
        gone = [name for (t, name) in dead if t == table]
        jumps = {name: rules for (t, name), rules in (builtin_jumps or {}).items() if t == table}
        if not names and not gone and not jumps:
            continue
        out.append(f"*{table}")
        out.extend(f":{name} ACCEPT [0:0]" for name in jumps)
        out.extend(f":{name} - [0:0]" for name in names)
        out.extend(f":{name} - [0:0]" for name in gone)
        for rules in jumps.values():
            out.extend(rules)
        for name in names:
            out.extend(chains[(table, name)])
        out.extend(f"-X {name}" for name in gone)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
