"""The sync engine against an in-memory kernel: what each sync writes, and what it never loses."""

from __future__ import annotations

import random

import pytest

from kproxy.backends.iptables.render import builtin_jumps, render_view
from kproxy.backends.iptables.sync import SyncEngine
from kproxy.config import RenderConfig
from kproxy.errors import ConfigError, RestoreError
from kproxy.netfilter import restore
from kproxy.netfilter.restore import detect_backend, failed_line
from kproxy.netfilter.ruleset import Table
from kproxy.state.model import Family
from tests.support.naming import sep_chain, svc_chain
from tests.support.restorer import FakeRestorer
from tests.support.sync_cases import View, cluster, port_name, service, with_endpoints

CFG = RenderConfig(family=4, node_name="node-a", cluster_cidr=("10.0.0.0/8",))


def declared(payload: str) -> set[str]:
    return {line[1:].split(" ", 1)[0] for line in payload.splitlines() if line.startswith(":")}


def deleted(payload: str) -> set[str]:
    return {line[3:] for line in payload.splitlines() if line.startswith("-X ")}


def kernel(fake: FakeRestorer) -> dict[tuple[int, str], dict[str, list[str]]]:
    return {key: {name: list(rules) for name, rules in chains.items()} for key, chains in fake.tables.items()}


def fresh_state(view: View, chunk: int | None = None) -> dict[tuple[int, str], dict[str, list[str]]]:
    fake = FakeRestorer(chunk)
    SyncEngine(CFG, fake).sync(view, None)
    return kernel(fake)


def started(view: View, chunk: int | None = None) -> tuple[SyncEngine, FakeRestorer]:
    fake = FakeRestorer(chunk)
    engine = SyncEngine(CFG, fake)
    first = engine.sync(view, set())
    assert first.full and first.reason == "start"
    fake.payloads.clear()
    return engine, fake


def test_first_sync_is_full_and_writes_exactly_the_rendered_ruleset() -> None:
    view = cluster(20, 3, node_ports=True)
    fake = FakeRestorer()
    engine = SyncEngine(CFG, fake)
    result = engine.sync(view, set())
    assert result.full and result.reason == "start"
    assert dict(engine.applied) == render_view(view, CFG)
    nat = fake.tables[(4, "nat")]
    assert nat[svc_chain(port_name(3))] == list(render_view(view, CFG)[("nat", svc_chain(port_name(3)))])
    for (table, chain), rules in builtin_jumps(CFG).items():
        assert fake.tables[(4, table)][chain][: len(rules)] == list(rules)
    assert result.restores == 1 and result.chains_deleted == 0


def test_one_endpoint_added_writes_that_service_only() -> None:
    view = cluster(50, 3)
    engine, fake = started(view)
    name = port_name(7)
    view[name] = with_endpoints(view[name], 4)
    result = engine.sync(view, {name})
    assert not result.full
    ((_, payload),) = fake.payloads
    new_sep = sep_chain(name, view[name][1][-1].hostport)
    assert declared(payload) == {svc_chain(name), new_sep}
    assert deleted(payload) == set()
    assert result.chains_written == 2 and result.restores == 1
    assert kernel(fake) == fresh_state(view)


def test_one_endpoint_removed_deletes_its_sep_chain() -> None:
    view = cluster(50, 3)
    engine, fake = started(view)
    name = port_name(9)
    gone = view[name][1][0]
    view[name] = (view[name][0], view[name][1][1:])
    engine.sync(view, {name})
    ((_, payload),) = fake.payloads
    assert deleted(payload) == {sep_chain(name, gone.hostport)}
    assert declared(payload) == {svc_chain(name), sep_chain(name, gone.hostport)}
    assert kernel(fake) == fresh_state(view)


@pytest.mark.parametrize("changed", [set(), {port_name(1), port_name(2)}], ids=["empty", "unchanged-names"])
def test_nothing_changed_writes_nothing(changed: set) -> None:  # type: ignore[type-arg]
    view = cluster(10, 2)
    engine, fake = started(view)
    result = engine.sync(view, changed)
    assert fake.payloads == []
    assert result.restores == 0 and result.payload_bytes == 0 and not result.full


def test_deleted_service_is_flushed_and_removed_with_its_cluster_ip_rule() -> None:
    view = cluster(10, 2)
    engine, fake = started(view)
    name = port_name(4)
    seps = {sep_chain(name, ep.hostport) for ep in view[name][1]}
    del view[name]
    result = engine.sync(view, {name})
    ((_, payload),) = fake.payloads
    assert deleted(payload) == {svc_chain(name), *seps}
    assert "KUBE-SERVICES" in declared(payload)
    assert result.chains_deleted == 3
    assert svc_chain(name) not in fake.tables[(4, "nat")]
    assert kernel(fake) == fresh_state(view)


def test_added_service_rewrites_services_chain_and_writes_its_own_chains() -> None:
    view = cluster(10, 2)
    engine, fake = started(view)
    name = port_name(99)
    view[name] = service(99, 2)
    engine.sync(view, {name})
    ((_, payload),) = fake.payloads
    assert declared(payload) == {
        "KUBE-SERVICES",
        svc_chain(name),
        *(sep_chain(name, e.hostport) for e in view[name][1]),
    }
    assert kernel(fake) == fresh_state(view)


def test_failed_restore_keeps_kernel_and_next_sync_recovers_everything() -> None:
    view = cluster(10, 2)
    engine, fake = started(view)
    before = kernel(fake)
    a, b = port_name(1), port_name(2)
    view[a] = with_endpoints(view[a], 5)
    del view[b]
    fake.fail_next = 1
    with pytest.raises(RestoreError):
        engine.sync(view, {a, b})
    assert kernel(fake) == before
    assert engine.pending == {a, b}
    # The caller already forgot these changes; the engine has not.
    result = engine.sync(view, set())
    assert result.full and result.reason == "failure"
    assert engine.pending == frozenset()
    assert kernel(fake) == fresh_state(view)


def test_vanished_canary_triggers_full_sync_that_repairs_flushed_chains() -> None:
    view = cluster(10, 2)
    engine, fake = started(view)
    nat = fake.tables[(4, "nat")]
    nat["KUBE-SERVICES"] = []
    del nat["KUBE-PROXY-CANARY"]
    result = engine.sync(view, set())
    assert result.full and result.reason == "canary"
    assert kernel(fake) == fresh_state(view)


def test_full_sync_is_forced_after_the_interval() -> None:
    now = [0.0]
    fake = FakeRestorer()
    engine = SyncEngine(CFG, fake, full_sync_interval_s=3600, clock=lambda: now[0])
    view = cluster(3, 1)
    engine.sync(view, set())
    now[0] = 3599.0
    assert not engine.sync(view, set()).full
    now[0] = 3600.0
    assert engine.sync(view, set()).reason == "periodic"


def test_full_sync_deletes_stale_chains_left_by_another_proxy() -> None:
    view = cluster(3, 1)
    fake = FakeRestorer()
    stale = "KUBE-SVC-AAAAAAAAAAAAAAAA"
    fake.apply(
        4,
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n"
        f":{stale} - [0:0]\n-A KUBE-SERVICES -d 10.96.9.9/32 -j {stale}\n"
        f"-A {stale} -j KUBE-SEP-BBBBBBBBBBBBBBBB\n-A KUBE-SEP-BBBBBBBBBBBBBBBB -j DNAT --to-destination 10.9.9.9:80\n"
        ":KUBE-CNI-OTHER - [0:0]\nCOMMIT\n",
    )
    result = SyncEngine(CFG, fake).sync(view, set())
    assert result.chains_deleted == 2
    nat = fake.tables[(4, "nat")]
    assert stale not in nat and "KUBE-SEP-BBBBBBBBBBBBBBBB" not in nat
    assert "KUBE-CNI-OTHER" in nat  # not ours: left alone


@pytest.mark.parametrize("op", ["add", "delete"])
def test_changed_set_missing_an_added_or_deleted_port_still_converges(op: str) -> None:
    view = cluster(10, 2)
    engine, fake = started(view)
    if op == "add":
        view[port_name(50)] = service(50, 2)
    else:
        del view[port_name(0)]
    engine.sync(view, set())  # the caller forgot to say what changed; the port count gives it away
    assert kernel(fake) == fresh_state(view)


def test_config_change_forces_full_sync() -> None:
    view = cluster(3, 1)
    engine, fake = started(view)
    cfg = RenderConfig(family=4, node_name="node-a", masquerade_all=True)
    engine.set_config(cfg)
    result = engine.sync(view, set())
    assert result.full and result.reason == "config"
    assert dict(engine.applied) == render_view(view, cfg)
    assert fake.tables[(4, "nat")][svc_chain(port_name(0))] == list(
        render_view(view, cfg)[("nat", svc_chain(port_name(0)))]
    )


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-payload", "chunked"])
def test_random_partial_syncs_match_a_fresh_full_sync(chunk: int | None) -> None:
    rng = random.Random(7)
    view = cluster(12, 2, node_ports=True)
    engine, fake = started(view, chunk)
    next_id = 100
    for _ in range(40):
        changed = set()
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(["scale", "add", "delete", "empty"])
            names = sorted(view)
            if op == "add" or not names:
                view[port_name(next_id)] = service(next_id, rng.randint(0, 4), node_port=rng.random() < 0.5)
                changed.add(port_name(next_id))
                next_id += 1
            elif op == "delete":
                victim = rng.choice(names)
                del view[victim]
                changed.add(victim)
            else:
                victim = rng.choice(names)
                count = 0 if op == "empty" else rng.randint(1, 6)
                view[victim] = with_endpoints(view[victim], count, rng.randint(0, 3))
                changed.add(victim)
        engine.sync(view, changed)
        assert kernel(fake) == fresh_state(view, chunk)
        recount = {"nat": 0, "filter": 0}
        for (table, _), rules in engine.applied.items():
            recount[table] += len(rules)
        assert dict(engine.rule_counts) == recount
    if chunk:
        assert any(len(declared(p)) <= chunk for _, p in fake.payloads)


def test_chunked_full_sync_splits_payload_but_not_a_port() -> None:
    view = cluster(10, 3)
    fake = FakeRestorer(chunk_chains=9)
    result = SyncEngine(CFG, fake).sync(view, set())
    assert result.restores > 2
    port_payloads = [declared(p) for _, p in fake.payloads if "KUBE-SERVICES" not in declared(p)]
    assert len(port_payloads) > 1
    for names in port_payloads:
        assert len(names) <= 9
        svcs = [n for n in names if n.startswith("KUBE-SVC-")]
        assert len(names) == 4 * len(svcs)  # each SVC chain travels with its three SEPs
    assert kernel(fake) == fresh_state(view)


# ------------------------------------------------------------------ restore.py


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        ("iptables-restore: line 12 failed\n", 12),
        ("iptables-nft-restore v1.8.9 (nf_tables): Chain 'X' does not exist\nError occurred at line: 4\n", 4),
        ("something else\n", None),
    ],
    ids=["legacy", "nft", "none"],
)
def test_failed_line_is_parsed(stderr: str, line: int | None) -> None:
    assert failed_line(stderr) == line


def _runner(outputs: dict[str, str]):  # type: ignore[no-untyped-def]
    def run(argv):  # type: ignore[no-untyped-def]
        return outputs.get(" ".join(argv), "")

    return run


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ({"iptables-nft-save -t mangle": ":KUBE-IPTABLES-HINT - [0:0]\n"}, "nft"),
        ({"iptables-legacy-save": "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\n"}, "legacy"),
        (
            {
                "iptables-legacy-save": "-A INPUT -j ACCEPT\n-A INPUT -j DROP\n",
                "iptables-nft-save": "-A X -j Y\n",
            },
            "legacy",
        ),
        (
            {"iptables-legacy-save": "-A INPUT -j ACCEPT\n", "iptables-nft-save": "-A X -j Y\n-A X -j Z\n"},
            "nft",
        ),
        ({}, "nft"),
    ],
    ids=["kubelet-hint-nft", "kubelet-canary-legacy", "more-legacy-rules", "more-nft-rules", "empty-host"],
)
def test_backend_detection(outputs: dict[str, str], expected: str) -> None:
    assert detect_backend(run=_runner(outputs)) == expected


def test_backend_flag_overrides_and_is_checked() -> None:
    assert (
        detect_backend("legacy", run=_runner({"iptables-nft-save -t mangle": ":KUBE-IPTABLES-HINT -"}))
        == "legacy"
    )
    with pytest.raises(ConfigError):
        detect_backend("iptables")


def test_rule_args_keep_quoted_comments() -> None:
    line = '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    assert restore.rule_args(line) == [
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    ]


def test_nft_chain_listing_is_parsed_per_table() -> None:
    listing = (
        "table ip nat {\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n"
        "\tchain KUBE-SVC-X {\n\t}\n}\ntable ip filter {\n\tchain KUBE-Y {\n\t}\n}\n"
    )
    assert restore.nft_chain_names(listing) == {"nat": {"PREROUTING", "KUBE-SVC-X"}, "filter": {"KUBE-Y"}}


class CountingChecks(FakeRestorer):
    """A kernel whose tables carry a change counter, like legacy's table header."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = 0
        self.checks = 0

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        super().apply(family, payload, noflush)
        self.gen += 1

    def generation(self, family: Family, table: Table) -> object | None:
        return self.gen

    def has_chain(self, family: Family, table: Table, chain: str) -> bool:
        self.checks += 1
        return super().has_chain(family, table, chain)


def test_canary_check_is_skipped_only_while_nobody_else_touched_the_table() -> None:
    view = cluster(5, 2)
    fake = CountingChecks()
    engine = SyncEngine(CFG, fake)
    engine.sync(view, set())
    view[port_name(1)] = with_endpoints(view[port_name(1)], 3)
    engine.sync(view, {port_name(1)})
    engine.sync(view, set())
    assert fake.checks == 0
    del fake.tables[(4, "nat")]["KUBE-PROXY-CANARY"]
    fake.gen += 1  # someone else changed the table
    result = engine.sync(view, set())
    assert fake.checks == 1 and result.reason == "canary"


def test_periodic_full_sync_skips_jump_check_only_while_tables_are_untouched() -> None:
    now = [0.0]
    fake = CountingChecks()
    engine = SyncEngine(CFG, fake, full_sync_interval_s=10, clock=lambda: now[0])
    view = cluster(3, 1)
    engine.sync(view, set())
    assert fake.jump_calls == 1
    now[0] = 10.0
    assert engine.sync(view, set()).reason == "periodic"
    assert fake.jump_calls == 1
    fake.tables[(4, "nat")]["PREROUTING"].clear()  # someone else rewrote a built-in chain
    fake.gen += 1
    now[0] = 20.0
    result = engine.sync(view, set())
    assert fake.jump_calls == 2 and result.jumps_inserted == 1
