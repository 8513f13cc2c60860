"""Random (and hostile) Services and EndpointSlices, through the parser, into the kernel.

Whatever an API object says, the rendered payload must be accepted by iptables-restore,
and each chain must hold exactly the rules its inputs imply: a name, annotation or
address crafted to smuggle in `-j ACCEPT` or a newline must be refused by the parser
or neutralised by the renderer, never turned into a rule.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from kproxy.backends.iptables.render import builtin_jumps, render_port, render_view
from kproxy.config import RenderConfig
from kproxy.netfilter.ruleset import restore_payload
from kproxy.state.build import Snapshot, view
from kproxy.state.model import Endpoint, ServicePort
from kproxy.state.topology import categorize, external_local, uses_cluster, uses_local
from tests.support.fuzz import clusters, configs, parse_all
from tests.support.netns import create_netns, delete_netns, restore_command, run


def expected_own(sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig) -> Counter[str]:
    """Rules per own chain kind the inputs imply, counted without looking at the rules."""
    sel = categorize(sp, eps, cfg.node_zone)
    want: Counter[str] = Counter()
    if not sel.has_any:
        return want
    aff = 2 if sp.affinity_timeout else 1
    ext_local = external_local(sp)
    has_internal = not sp.internal_local or bool(sel.local)
    has_external = not ext_local or bool(sel.local)
    masq = int(has_internal and (cfg.masquerade_all or bool(cfg.local_cidrs)))
    if sel.cluster and uses_cluster(sp):
        want["KUBE-SVC"] = len(sel.cluster) * aff + (0 if sp.internal_local else masq)
    if sel.local and uses_local(sp):
        want["KUBE-SVL"] = len(sel.local) * aff + (masq if sp.internal_local else 0)
    if sp.has_external:
        want["KUBE-EXT"] = (2 + bool(cfg.local_cidrs) if ext_local else 1) + has_external
    if sp.load_balancer_ips and sp.load_balancer_source_ranges:
        want["KUBE-FW"] = (
            len(sp.load_balancer_source_ranges) + 1
        )  # node 203.0.113.5 is not in 2001:db8:1::/48
        if cfg.family == 4:
            want["KUBE-FW"] += len(sp.load_balancer_ips)  # ... but is in 203.0.113.0/24
    want["KUBE-SEP"] = 2 * len(sel.reachable)
    return +want


@given(clusters())
@settings(max_examples=150, deadline=None)
def test_rule_counts_match_inputs(raw: list[dict[str, Any]]) -> None:
    snapshot = Snapshot.from_objects(parse_all(raw), "node-a")
    for cfg in configs(snapshot):
        v = view(snapshot, "node-a", cfg.family)
        for sp, eps in v.values():
            got: Counter[str] = Counter()
            for chain in render_port(sp, eps, cfg).own:
                got[chain.name.rsplit("-", 1)[0]] += len(chain.rules)
            assert got == expected_own(sp, eps, cfg), sp
        chains = render_view(v, cfg)
        payload = restore_payload(chains, builtin_jumps=builtin_jumps(cfg))
        declared = {line[1:].split()[0] for line in payload.splitlines() if line.startswith(":")}
        appended = [line for line in payload.splitlines() if line.startswith("-A ")]
        assert len(appended) == sum(map(len, chains.values())) + sum(map(len, builtin_jumps(cfg).values()))
        for line in payload.splitlines():
            assert line[:1] in ("*", ":", "-") or line == "COMMIT", line
            if line.startswith("-A "):
                assert line.split()[1] in declared
                assert line.count('"') % 2 == 0, line


@pytest.fixture(scope="module")
def shared_netns() -> Iterator[str]:
    name = f"krenderfz{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


def saved_rule_counts(text: str) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            counts[table, line.split()[1]] += 1
    return counts


@pytest.mark.privileged
@given(raw=clusters())
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_accepts_random_rulesets(shared_netns: str, raw: list[dict[str, Any]]) -> None:
    snapshot = Snapshot.from_objects(parse_all(raw), "node-a")
    for cfg in configs(snapshot):
        chains = render_view(view(snapshot, "node-a", cfg.family), cfg)
        jumps = builtin_jumps(cfg)
        payload = restore_payload(chains, builtin_jumps=jumps)
        ns_exec = ["ip", "netns", "exec", shared_netns]
        run([*ns_exec, restore_command("nft", cfg.family), "--test"], input=payload)
        # A real restore, read back: the kernel holds exactly our rules, chain by chain.
        run([*ns_exec, restore_command("legacy", cfg.family)], input=payload)
        saved = run([*ns_exec, restore_command("legacy", cfg.family).replace("-restore", "-save")]).stdout
        want = Counter({key: len(rules) for key, rules in (chains | jumps).items() if rules})
        assert saved_rule_counts(saved) == want
