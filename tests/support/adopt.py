"""The adoption question in one call, as tests ask it of `same_rules`."""

from __future__ import annotations

from collections.abc import Mapping

from kproxy.backends.iptables.adopt import same_rules
from kproxy.state.model import Family


def adoptable(
    saved: Mapping[str, list[str]], wanted: Mapping[str, tuple[str, ...]], family: Family
) -> set[str]:
    """Names of the wanted chains the kernel already holds exactly."""
    return {
        name for name, rules in wanted.items() if name in saved and same_rules(saved[name], rules, family)
    }
