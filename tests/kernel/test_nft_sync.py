"""nftables mode's sync engine: partial syncs write only what changed, failures lose nothing,
and any sequence of partial syncs leaves the kernel's table equal to a fresh full sync.

The first tests read the scripts the engine writes (a recording writer); the kernel tests
apply every script with `nft -f` inside a namespace they create, then read the table back.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from kproxy.backends.nftables.sync import NftSyncEngine
from kproxy.backends.nftables.writer import NftCommand
from kproxy.config import render_config
from kproxy.errors import NftablesError
from kproxy.state.model import Endpoint, ServicePort, ServicePortName
from tests.support.netns import create_netns, delete_netns, exec_in, netns_guard
from tests.support.sync_cases import View, cluster, port_name, service, with_endpoints

__all__ = ["netns_guard"]

CFG = render_config(4, "node-a", cluster_cidr=("10.244.0.0/16",))


class Recorder:
    """A writer that keeps every script; `fail` makes the next apply raise, as nft would."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail = False

    def apply(self, family: int, script: str) -> None:
        if self.fail:
            self.fail = False
            raise NftablesError(family, 1, "Error: Could not process rule: No such file or directory")
        self.scripts.append(script)

    def table_present(self, family: int) -> bool:
        return bool(self.scripts)

    def read(self, family: int, command: str) -> str:
        raise NftablesError(family, 1, "Error: No such file or directory")


@pytest.fixture
def engine() -> tuple[NftSyncEngine, Recorder, View]:
    rec = Recorder()
    eng = NftSyncEngine(CFG, rec)
    view = cluster(100, 3, node_ports=True)
    eng.sync(view, None)
    return eng, rec, view


def test_first_sync_replaces_the_whole_table(engine: tuple[NftSyncEngine, Recorder, View]) -> None:
    _, rec, _ = engine
    (script,) = rec.scripts
    assert script.startswith("add table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {")


def test_one_endpoint_change_is_element_updates_only(engine: tuple[NftSyncEngine, Recorder, View]) -> None:
    """A plain service is map elements only: 3 -> 4 endpoints moves it from the 3-endpoint
    map to the 4-endpoint one, and no chain is written (none for the kernel to re-validate)."""
    eng, rec, view = engine
    name = port_name(7)
    view[name] = with_endpoints(view[name], 4)
    result = eng.sync(view, {name})
    assert not result.full and result.chains_written == 0 and result.chains_deleted == 0
    lines = rec.scripts[-1].splitlines()
    assert [ln.split(" {")[0] for ln in lines] == [
        "delete element ip kube-proxy endpoints-3",
        "add element ip kube-proxy endpoints-4",
        "delete element ip kube-proxy sync-state",
        "add element ip kube-proxy sync-state",
    ]
    assert lines[1].count("10.96.0.8 . tcp . 80 . ") == 4


def test_change_to_a_service_with_a_chain_rewrites_that_chain_only(
    engine: tuple[NftSyncEngine, Recorder, View],
) -> None:
    eng, rec, view = engine
    name = port_name(7)
    sp, eps = view[name]
    view[name] = (replace(sp, affinity_timeout=60), eps)
    eng.sync(view, {name})
    view[name] = (replace(sp, affinity_timeout=60), with_endpoints(view[name], 4)[1])
    result = eng.sync(view, {name})
    assert result.chains_written == 2  # the new endpoint's chain, and the service chain
    script = rec.scripts[-1]
    assert script.count("flush chain") == 1 and "bench/svc-7/" in script
    assert "svc-8/" not in script


def test_new_and_deleted_services_touch_only_their_elements(
    engine: tuple[NftSyncEngine, Recorder, View],
) -> None:
    eng, rec, view = engine
    new, gone = port_name(500), port_name(3)
    view[new] = service(500, 2)
    del view[gone]
    eng.sync(view, {new, gone})
    script = rec.scripts[-1]
    assert "chain" not in script and script.count("sync-state") == 2
    assert "delete element ip kube-proxy plain-cluster-ips { 10.96.0.4 . tcp . 80 }" in script
    assert "add element ip kube-proxy plain-cluster-ips { 10.96.2.1 . tcp . 80 }" in script
    assert "10.96.0.8 " not in script


def test_nothing_changed_writes_nothing(engine: tuple[NftSyncEngine, Recorder, View]) -> None:
    eng, rec, view = engine
    result = eng.sync(view, {port_name(1)})
    assert result.transactions == 0 and len(rec.scripts) == 1


def test_failed_write_loses_no_change_and_next_sync_is_full(
    engine: tuple[NftSyncEngine, Recorder, View],
) -> None:
    eng, rec, view = engine
    name = port_name(9)
    view[name] = with_endpoints(view[name], 1)
    rec.fail = True
    with pytest.raises(NftablesError):
        eng.sync(view, {name})
    # nothing was applied, so nothing is recorded as applied
    assert len(rec.scripts) == 1
    result = eng.sync(view, set())
    assert result.full and result.reason == "failure"
    assert len(eng.applied) == len(view)
    full = rec.scripts[-1]
    assert "add element ip kube-proxy endpoints-1 {" in full
    assert "10.96.0.10 . tcp . 80 . 0 : " in full and "10.96.0.10 . tcp . 80 . 1 : " not in full


# ------------------------------------------------------------------ kernel


def normalised(ns: str, family: str = "ip") -> dict[str, Any]:
    """The table as the kernel holds it: chains with their rules in order, sets and maps
    with their elements as a set (insertion order is not behaviour); handles dropped."""
    out = exec_in(ns, ["nft", "-j", "list", "table", family, "kube-proxy"]).stdout
    chains: dict[str, list[str]] = {}
    sets: dict[str, Any] = {}
    for obj in json.loads(out)["nftables"]:
        if "chain" in obj:
            c = obj["chain"]
            chains.setdefault(c["name"], [])
            sets[f"chain-hook:{c['name']}"] = (c.get("hook"), c.get("prio"), c.get("type"))
        elif "rule" in obj:
            chains.setdefault(obj["rule"]["chain"], []).append(
                json.dumps(obj["rule"]["expr"], sort_keys=True)
            )
        elif "set" in obj or "map" in obj:
            s = obj.get("set") or obj.get("map")
            elems = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
            sets[s["name"]] = (json.dumps(s["type"]), s.get("flags"), s.get("timeout"), elems)
    return {"chains": chains, "sets": sets}


@pytest.fixture
def two_nodes(netns_guard: None) -> Iterator[tuple[str, str]]:
    suffix = random.randbytes(3).hex()
    names = (f"kpt{suffix}-nfta", f"kpt{suffix}-nftb")
    try:
        for ns in names:
            create_netns(ns)
        yield names
    finally:
        for ns in names:
            delete_netns(ns)


CFG6 = render_config(6, "node-a", cluster_cidr=("fd00:10:244::/48",))


def _addr(family: int, v4: str) -> str:
    """The IPv6 twin of an IPv4 test address (same last groups), or the address itself."""
    if family == 4:
        return v4
    a, b, c, d = (int(x) for x in v4.split("."))
    return f"fd00:{a:x}:{b:x}::{c:x}:{d:x}"


def _random_entry(rng: random.Random, i: int, family: int = 4) -> tuple[ServicePort, tuple[Endpoint, ...]]:
    """Service i in one of the shapes whose objects differ: affinity, node port, Local
    policies, external and load-balancer IPs (some shared between services), 0..4 or 17
    endpoints (17: more than a map-only service may have)."""
    sp, _ = service(i, 1)
    sp = replace(
        sp,
        family=4 if family == 4 else 6,
        cluster_ip=_addr(family, sp.cluster_ip),
        node_port=30000 + i if rng.random() < 0.4 else 0,
        affinity_timeout=rng.choice([0, 0, 0, 60, 600]),
        external_ips=(_addr(family, "192.0.2.1"),) if rng.random() < 0.2 else (),
        load_balancer_ips=(_addr(family, f"198.51.100.{i % 5}"),) if rng.random() < 0.2 else (),
        load_balancer_source_ranges=(
            ("203.0.113.0/24" if family == 4 else "2001:db8::/64",) if rng.random() < 0.5 else ()
        ),
    )
    if sp.has_external:
        sp = replace(sp, external_local=rng.random() < 0.4)
    sp = replace(sp, internal_local=rng.random() < 0.15)
    eps = tuple(
        Endpoint(
            _addr(family, f"10.244.{j % 2}.{(i * 7 + j) % 200 + 1}"),
            8080,
            is_local=j % 2 == 0,
            ready=rng.random() < 0.9,
        )
        for j in range(rng.choice([0, 1, 2, 3, 4, 17]))
    )
    return sp, tuple(sorted(set(eps), key=lambda e: e.hostport))


@pytest.mark.privileged
@pytest.mark.parametrize(("seed", "family"), [(1, 4), (2, 4), (3, 4), (4, 6), (5, 6)])
def test_random_partial_syncs_end_equal_to_a_fresh_full_sync(
    seed: int, family: int, two_nodes: tuple[str, str]
) -> None:
    partial_ns, fresh_ns = two_nodes
    rng = random.Random(seed)
    cfg = CFG if family == 4 else CFG6
    eng = NftSyncEngine(cfg, NftCommand(["ip", "netns", "exec", partial_ns, "nft"]))
    view: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {
        port_name(i): _random_entry(rng, i, family) for i in range(30)
    }
    eng.sync(view, None)
    for _ in range(12):
        changed = set()
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(40)
            name = port_name(i)
            if name in view and rng.random() < 0.25:
                del view[name]
            else:
                view[name] = _random_entry(rng, i, family)
            changed.add(name)
        result = eng.sync(view, changed)
        assert not result.full
    fresh = NftSyncEngine(cfg, NftCommand(["ip", "netns", "exec", fresh_ns, "nft"]))
    fresh.sync(view, None)
    fam = "ip6" if family == 6 else "ip"
    assert normalised(partial_ns, fam) == normalised(fresh_ns, fam)


@pytest.mark.privileged
def test_refused_transaction_leaves_the_previous_table_serving(two_nodes: tuple[str, str]) -> None:
    ns, fresh_ns = two_nodes
    writer = NftCommand(["ip", "netns", "exec", ns, "nft"])
    eng = NftSyncEngine(CFG, writer)
    view = cluster(20, 2)
    eng.sync(view, None)
    # Someone deleted an element the engine believes is there: the next write that
    # deletes it is refused by the kernel.
    exec_in(
        ns, ["nft", "delete", "element", "ip", "kube-proxy", "endpoints-2", "{ 10.96.0.5 . tcp . 80 . 1 }"]
    )
    tampered = normalised(ns)
    view[port_name(4)] = with_endpoints(view[port_name(4)], 3)
    view[port_name(5)] = with_endpoints(view[port_name(5)], 3)
    with pytest.raises(NftablesError):
        eng.sync(view, {port_name(4), port_name(5)})
    assert normalised(ns) == tampered  # all or nothing: svc-5's change was not half-applied
    result = eng.sync(view, set())
    assert result.full
    NftSyncEngine(CFG, NftCommand(["ip", "netns", "exec", fresh_ns, "nft"])).sync(view, None)
    assert normalised(ns) == normalised(fresh_ns)


@pytest.mark.privileged
def test_flushed_ruleset_is_rewritten_at_the_next_sync(two_nodes: tuple[str, str]) -> None:
    ns, _ = two_nodes
    eng = NftSyncEngine(CFG, NftCommand(["ip", "netns", "exec", ns, "nft"]))
    view = cluster(5, 2)
    eng.sync(view, None)
    before = normalised(ns)
    exec_in(ns, ["nft", "flush", "ruleset"])
    result = eng.sync(view, set())
    assert result.full and result.reason == "tampered"
    assert normalised(ns) == before


@pytest.mark.privileged
def test_restart_adopts_a_table_that_matches_and_rewrites_one_that_does_not(
    two_nodes: tuple[str, str],
) -> None:
    """A new engine (an agent restart) over the table the previous one left, partial syncs
    included, writes nothing; with a different view it replaces the table."""
    ns, _ = two_nodes
    writer = NftCommand(["ip", "netns", "exec", ns, "nft"])
    view = cluster(20, 2)
    first = NftSyncEngine(CFG, writer)
    first.sync(view, None)
    view[port_name(3)] = with_endpoints(view[port_name(3)], 3)
    view[port_name(30)] = service(30, 1)
    first.sync(view, {port_name(3), port_name(30)})
    before = normalised(ns)

    restarted = NftSyncEngine(CFG, writer)
    result = restarted.sync(view, None)
    assert result.full and result.reason == "adopted" and result.transactions == 0
    assert normalised(ns) == before
    # the adopted state is the engine's own: partial syncs go on from it
    view[port_name(4)] = with_endpoints(view[port_name(4)], 1)
    assert not restarted.sync(view, {port_name(4)}).full

    view[port_name(5)] = with_endpoints(view[port_name(5)], 4)
    again = NftSyncEngine(CFG, writer)  # a restart that missed a change: the table is rewritten
    result = again.sync(view, None)
    assert result.reason == "start" and result.transactions == 1
