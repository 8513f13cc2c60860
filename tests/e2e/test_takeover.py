"""Moving a node off kube-proxy: kproxy takes over the rules kube-proxy left, or starts clean.

The node's tables are loaded from tests/data/kube-proxy-rules-ipv{4,6}.txt: what kube-proxy
v1.29 writes for the objects in tests/data/takeover-objects.yaml, hand-written from its source
(not rendered by kproxy), next to kubelet's marker chains. Traffic through those rules is checked
first, so the fixture is known to behave as kube-proxy's rules do.

Two ways off kube-proxy, per iptables backend:
Agents run with --iptables-backend auto, as the DaemonSet does, so they must find the backend
kube-proxy used by themselves.
- in place: `kproxy run` with the same state while connections are open and new ones keep
  coming. Nothing may fail, and kproxy's first sync should leave every per-service chain
  (KUBE-SVC/SVL/EXT/FW/SEP) as it found it: on nft the rules keep their kernel handles, on
  legacy their packet counters (a rewritten rule starts again from zero).
- clean: `kproxy cleanup` removes every chain kube-proxy or kproxy owns in both families,
  leaving kubelet's alone; then `kproxy run` serves again.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster import Agent, EchoPods, Load, Prober, Stream, agent_args
from tests.support.netns import (
    BACKENDS,
    FAMILIES,
    Backend,
    Host,
    Proto,
    Topology,
    exec_in,
    netns_guard,
    restore_command,
    sample,
    save_command,
)

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]

DATA = Path(__file__).resolve().parents[1] / "data"
NODE = "node-a"
WEB, API, LOCAL, DNS, STICKY, GONE, LB, STREAM = (f"10.96.0.{i}" for i in range(10, 18))
LB_IP = "192.168.89.16"
ECHO_PORT = 7070
PER_SERVICE = re.compile(r"^KUBE-(SVC|SVL|EXT|FW|SEP)-")
KUBELET_CHAINS = {"KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-FIREWALL"}
"""Kubelet's chains (KUBE-FIREWALL is kubelet's too; kube-proxy only duplicates it)."""


# ------------------------------------------------------------------ observing the kernel


def nat_counters(topo: Topology, backend: Backend) -> dict[str, list[tuple[int, str]]]:
    """Per per-service nat chain: (packets, rule) for each of its rules, in order."""
    out: dict[str, list[tuple[int, str]]] = {}
    text = exec_in(topo.node_ns, [save_command(backend, 4), "-c", "-t", "nat"]).stdout
    for line in text.splitlines():
        if line.startswith(":") and PER_SERVICE.match(line[1:]):
            out.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("[") and " -A " in line:
            counters, _, rule = line.partition(" ")
            chain = rule.split(" ", 2)[1]
            if PER_SERVICE.match(chain):
                out.setdefault(chain, []).append((int(counters[1:].split(":")[0]), rule))
    return out


def nft_handles(topo: Topology) -> dict[str, list[int]]:
    """Per per-service nat chain (nft backend): the kernel handles of its rules, in order."""
    out: dict[str, list[int]] = {}
    chain = ""
    for line in exec_in(topo.node_ns, ["nft", "-a", "list", "table", "ip", "nat"]).stdout.splitlines():
        words = line.split()
        if words[:1] == ["chain"]:
            chain = words[1] if PER_SERVICE.match(words[1]) else ""
            if chain:
                out[chain] = []
        elif chain and "# handle" in line:
            out[chain].append(int(line.rsplit("# handle", 1)[1]))
    return out


def ruleset(topo: Topology, backend: Backend) -> dict[tuple[int, str, str], list[str]]:
    """Every chain of nat and filter per family, as iptables-save prints its rules (no counters).

    Rules of top-level KUBE- chains are sorted: kube-proxy writes services in Go map order,
    kproxy in name order, and both orders are right (one rule per service and address)."""
    out: dict[tuple[int, str, str], list[str]] = {}
    for family in FAMILIES:
        table = ""
        for line in exec_in(topo.node_ns, [save_command(backend, family)]).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif table in ("nat", "filter") and line.startswith(":"):
                out.setdefault((family, table, line[1:].split(" ", 1)[0]), [])
            elif table in ("nat", "filter") and line.startswith("-A "):
                out.setdefault((family, table, line.split(" ", 2)[1]), []).append(line)
    for (_, _, chain), rules in out.items():
        if chain.startswith("KUBE-") and not PER_SERVICE.match(chain):
            rules.sort()
    return out


def kube_chains(topo: Topology, backend: Backend) -> dict[int, set[str]]:
    """Every KUBE-* chain per family, whatever the table."""
    found: dict[int, set[str]] = {}
    for family in FAMILIES:
        text = exec_in(topo.node_ns, [save_command(backend, family)]).stdout
        found[family] = {ln[1:].split(" ", 1)[0] for ln in text.splitlines() if ln.startswith(":KUBE-")}
    return found


# ------------------------------------------------------------------ traffic


def load_kube_proxy_rules(topo: Topology, backend: Backend) -> None:
    """--noflush as kube-proxy restores: the file's second part must not wipe its first."""
    for family in FAMILIES:
        text = (DATA / f"kube-proxy-rules-ipv{family}.txt").read_text()
        exec_in(topo.node_ns, [restore_command(backend, family), "--noflush"], input=text)


def _names(topo: Topology, *idx: int) -> set[str]:
    return {topo.pod_hosts[i - 1].name for i in idx}


def exercise_every_service(topo: Topology) -> dict[str, str]:
    """Traffic through every service and every endpoint chain; a mismatch per check, by name."""
    client, pods, node_ip = topo.client_hosts[0], topo.pod_hosts, topo.node.ipv4
    problems: dict[str, str] = {}

    def expect(check: str, src: Host, ip: str, port: int, names: set[str], proto: Proto = "tcp") -> None:
        got = sample(src.ns, ip, port, proto, limit=60, until=lambda rs: {r.name for r in rs} >= names)
        if not all(r.ok for r in got) or {r.name for r in got} != names:
            problems[check] = f"wanted {sorted(names)}, got {[str(r) for r in got][-5:]}"

    expect("web cluster IP", client, WEB, 80, _names(topo, 1, 2, 3))
    expect("api node port", client, node_ip, 30011, _names(topo, 1, 2))
    expect("local cluster IP", pods[1], LOCAL, 80, _names(topo, 1, 3))
    expect("local node port (Local: node-a's pod only)", client, node_ip, 30012, _names(topo, 3))
    expect("dns over udp", client, DNS, 53, _names(topo, 1, 2), "udp")
    expect("load balancer IP, allowed source", client, LB_IP, 80, _names(topo, 2))
    for src in (client, *pods):
        one = sample(src.ns, STICKY, 80, limit=1)
        if not one[0].ok:
            problems[f"sticky from {src.name}"] = str(one[0])
    sticky = sample(client.ns, STICKY, 80, limit=5, stop_on_failure=False)
    if len({r.name for r in sticky}) != 1:
        problems["sticky keeps one endpoint"] = str([str(r) for r in sticky])
    gone = sample(client.ns, GONE, 80, limit=1)
    if [r.outcome for r in gone] != ["refused"]:
        problems["no endpoints: rejected"] = str(gone[0])
    local_peer = sample(client.ns, node_ip, 30012, limit=1)
    if local_peer[0].peer != client.ipv4:
        problems["Local node port keeps the client address"] = str(local_peer[0])
    return problems


def start_load(topo: Topology) -> Load:
    client, pods, node_ip = topo.client_hosts[0], topo.pod_hosts, topo.node.ipv4
    probers = [
        Prober(client.ns, WEB, 80),
        Prober(client.ns, node_ip, 30011),
        Prober(pods[0].ns, DNS, 53, "udp"),
    ]
    streams = [
        Stream(client.ns, STREAM, 7000),
        Stream(pods[1].ns, STREAM, 7000),
        Stream(pods[2].ns, STREAM, 7000),
    ]
    return Load(probers, streams)


# ------------------------------------------------------------------ the takeover, once per backend


@dataclass
class Takeover:
    backend: Backend
    before_fixture: dict[str, str]
    after: dict[str, str]
    failures: list[str]
    exchanges: int
    counters_before: dict[str, list[tuple[int, str]]]
    counters_after: dict[str, list[tuple[int, str]]]
    ruleset_before: dict[tuple[int, str, str], list[str]]
    ruleset_after: dict[tuple[int, str, str], list[str]]
    handles_before: dict[str, list[int]]
    handles_after: dict[str, list[int]]
    log: str


def _manifests(tmp: Path) -> str:
    d = tmp / "manifests"
    d.mkdir()
    shutil.copy(DATA / "takeover-objects.yaml", d / "objects.yaml")
    return str(d)


@pytest.fixture(scope="module", params=BACKENDS)
def takeover(
    request: pytest.FixtureRequest, netns_guard: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Takeover]:
    backend: Backend = request.param
    tmp = tmp_path_factory.mktemp(f"takeover-{backend}")
    with Topology(nodes=1, pods=3, clients=1) as topo:
        topo.start_servers([8080])
        with EchoPods([(p.ns, p.name) for p in topo.pod_hosts], ECHO_PORT):
            load_kube_proxy_rules(topo, backend)
            before_fixture = exercise_every_service(topo)
            # the fixture is kube-proxy run with --iptables-localhost-nodeports=false (its header)
            args = agent_args(
                NODE,
                manifests=_manifests(tmp),
                backend="auto",
                extra=["--iptables-localhost-nodeports=false"],
            )
            agent = Agent(topo, topo.node, args, tmp)
            with start_load(topo) as load:
                try:
                    load.wait_progress(connections=10, exchanges=10)
                    counters_before = nat_counters(topo, backend)
                    ruleset_before = ruleset(topo, backend)
                    handles_before = nft_handles(topo) if backend == "nft" else {}
                    agent.start()
                    agent.wait_synced()
                    counters_after = nat_counters(topo, backend)
                    ruleset_after = ruleset(topo, backend)
                    handles_after = nft_handles(topo) if backend == "nft" else {}
                    load.wait_progress(connections=10, exchanges=10)
                finally:
                    load.stop()
                failures = load.failures()
                exchanges = load.progress()[1]
            try:
                after = exercise_every_service(topo)
            finally:
                agent.stop()
    yield Takeover(
        backend,
        before_fixture,
        after,
        failures,
        exchanges,
        counters_before,
        counters_after,
        ruleset_before,
        ruleset_after,
        handles_before,
        handles_after,
        agent.log_text(),
    )


def test_kube_proxy_fixture_behaves_as_kube_proxy(takeover: Takeover) -> None:
    """Guards the hand-written fixture: if this fails, the other results say nothing."""
    assert takeover.before_fixture == {}


def test_takeover_picks_the_backend_kube_proxy_used(takeover: Takeover) -> None:
    """The DaemonSet runs with --iptables-backend auto: it must write where kube-proxy wrote."""
    chosen = re.findall(r"event=iptables_backend backend=(\w+)", takeover.log)
    assert chosen == [takeover.backend]


def test_takeover_interrupts_no_connection(takeover: Takeover) -> None:
    assert takeover.failures == []
    assert takeover.exchanges >= 20
    assert takeover.after == {}, "every service still works once kproxy owns the rules"


def test_takeover_computes_kube_proxys_rules(takeover: Takeover) -> None:
    """The precondition for adopting chains: kproxy wants exactly what kube-proxy wrote, and
    leaves the built-in chains' jumps as they were (no duplicate, none missing)."""
    before, after = takeover.ruleset_before, takeover.ruleset_after
    changed = {
        key: (before.get(key), after.get(key))
        for key in before.keys() | after.keys()
        if before.get(key) != after.get(key)
    }
    assert changed == {}


def test_takeover_rewrites_no_per_service_chain(takeover: Takeover) -> None:
    assert set(takeover.counters_after) == set(takeover.counters_before), "same per-service chains"
    rewritten: list[str] = []
    observable = 0
    if takeover.backend == "nft":
        observable = len(takeover.handles_before)
        rewritten = sorted(
            c for c, handles in takeover.handles_before.items() if takeover.handles_after.get(c) != handles
        )
    else:
        for chain, rules in takeover.counters_before.items():
            if any(n for n, _ in rules):
                observable += 1
                after = takeover.counters_after.get(chain, [])
                if len(after) != len(rules) or any(
                    b > a for (b, _), (a, _) in zip(rules, after, strict=True)
                ):
                    rewritten.append(chain)
    assert observable >= 20, "the check must see (nearly) every per-service chain"
    synced = [ln.split("event=", 1)[1] for ln in takeover.log.splitlines() if "event=iptables_synced" in ln]
    assert rewritten == [], (
        f"{len(rewritten)} of {observable} chains rewritten at kproxy's first sync: {synced}"
    )


# ------------------------------------------------------------------ the clean switch


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_then_run_switches_cleanly(backend: Backend, netns_guard: None, tmp_path: Path) -> None:
    with Topology(nodes=1, pods=3, clients=1) as topo:
        topo.start_servers([8080])
        with EchoPods([(p.ns, p.name) for p in topo.pod_hosts], ECHO_PORT):
            load_kube_proxy_rules(topo, backend)
            client = topo.client_hosts[0]
            stream = Stream(client.ns, STREAM, 7000)
            with Load([], [stream]) as load:
                load.wait_progress(connections=0, exchanges=5)
                res = exec_in(topo.node_ns, [sys.executable, "-m", "kproxy", "cleanup"], check=False)
                assert res.returncode == 0, res.stderr
                left = kube_chains(topo, backend)
                web = sample(client.ns, WEB, 80, limit=1, timeout=0.5)
                agent = Agent(
                    topo,
                    topo.node,
                    agent_args(NODE, manifests=_manifests(tmp_path), backend="auto"),
                    tmp_path,
                )
                agent.start()
                try:
                    agent.wait_synced()
                    other = kube_chains(topo, "nft" if backend == "legacy" else "legacy")
                    load.wait_progress(connections=0, exchanges=5)
                    after = exercise_every_service(topo)
                finally:
                    load.stop()
                    agent.stop()
        for family in (4, 6):
            assert left[family] - {"KUBE-FIREWALL"} == KUBELET_CHAINS - {"KUBE-FIREWALL"}, (family, left)
        assert [r.outcome for r in web] != ["ok"], "after cleanup no service rule is left"
        assert after == {}, "kproxy serves every service after the clean switch"
        assert other == {4: set(), 6: set()}, "auto: kproxy writes where kubelet's markers are"
        assert load.failures() == [], (
            "connections established before the switch survive it (conntrack keeps their NAT)"
        )
