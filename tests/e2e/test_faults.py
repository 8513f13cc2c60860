"""Fault injection with counts: `kproxy run` in a node namespace, fed by the API stand-in through
the real `kubernetes` client, while the test breaks what production breaks.

1. The API server dies and comes back 20 times during a churn of Services and EndpointSlices
   (sometimes with its history compacted, so the agent's watch gets 410 Gone and must relist).
2. 50 iptables-restore runs fail at random during churn (some refused before anything is
   written, some after the real restore applied its payload, some between the chunks of one
   full sync), plus one sustained outage during
   which /healthz must turn 503 and then 200 again, as the README promises.
3. The agent is SIGKILLed 10 times in the middle of its start-up full sync of a few thousand
   services (at a random moment, or exactly around a random restore chunk), then started again.

Each ends with the same check: the kernel's nat and filter rules in the node namespace equal a
fresh `kproxy dry-run` of the API's final objects, both families, compared chain by chain after
both sides went through iptables-nft-save; the number of chains that differ is the count of lost
updates, and must be 0. Services also have to answer. Every test prints one summary line with
its seed and counts (`pytest -s` shows it; a failure message repeats it), and asserts on it.

Restore faults are injected at the real binary's edge: the agent's PATH starts with a directory
holding `iptables-nft-restore`/`ip6tables-nft-restore` wrappers that number each call and act on
a plan the test writes (run the real tool, fail, SIGKILL the calling agent before or after the
real tool ran). Nothing in the package knows about it.

Set KPROXY_FAULT_SEED to replay a run. Nothing here asserts a duration: waits are bounded polls.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_node import (
    HEALTHZ,
    NS,
    POD_PORT,
    Agent,
    Node,
    eventually,
    expected_rules,
    kernel_vs_expected,
    module_topology,
    node,
    node_obj,
)
from tests.support.apiserver_standin import ApiServerStandIn
from tests.support.netns import Family, Host, exec_in, netns_guard

pytestmark = pytest.mark.privileged

__all__ = ["module_topology", "netns_guard", "node"]

SETTLE = 60.0
"""Bound for "the agent has caught up after the last fault": generous, the VM is shared."""


def seed_for() -> int:
    """KPROXY_FAULT_SEED replays a run; otherwise a fresh seed, printed in the summary line."""
    env = os.environ.get("KPROXY_FAULT_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def report(line: str) -> str:
    print(f"\nfaults: {line}", flush=True)
    return line


# ------------------------------------------------------------------ restore wrapper


@dataclass
class RestoreFaults:
    """`iptables-nft-restore` and `ip6tables-nft-restore` wrappers, first on the agent's PATH.

    Each call takes the next number n (under flock, both families share one counter) and reads
    line n of `plan`: `ok` (or nothing) runs the real tool; `fail` exits 1 before writing
    anything; `fail-after` runs the real tool and then exits 1 (the kernel changed, the agent is
    told it did not); `kill` / `kill-after` SIGKILL the calling agent before / after the real
    tool ran. While the file `hold` exists every call fails without taking a number. Each call
    appends "n action" to `calls`.
    """

    dir: Path

    @classmethod
    def install(cls, tmp: Path) -> RestoreFaults:
        ctl = tmp / "restore-faults"
        bindir = ctl / "bin"
        bindir.mkdir(parents=True)
        (ctl / "plan").write_text("")
        for name in ("iptables-nft-restore", "ip6tables-nft-restore"):
            real = shutil.which(name)
            assert real, f"{name} not found"
            script = bindir / name
            script.write_text(_WRAPPER.format(ctl=ctl, real=real))
            script.chmod(0o755)
        return cls(ctl)

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}"}

    @property
    def calls(self) -> list[tuple[int, str]]:
        path = self.dir / "calls"
        lines = path.read_text().split("\n") if path.exists() else []
        return [(int(n), a) for n, _, a in (ln.partition(" ") for ln in lines if ln)]

    @property
    def numbered(self) -> int:
        """How many calls took a number so far (held calls do not)."""
        path = self.dir / "count"
        return int(path.read_text() or 0) if path.exists() else 0

    def count(self, *actions: str) -> int:
        return sum(1 for _, a in self.calls if a in actions)

    def plan(self, actions: dict[int, str]) -> None:
        """Call number -> action; every other call runs the real tool."""
        last = max(actions, default=0)
        text = "".join(f"{actions.get(n, 'ok')}\n" for n in range(1, last + 1))
        tmp = self.dir / ".plan.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / "plan")

    def hold(self, on: bool) -> None:
        flag = self.dir / "hold"
        if on:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)


_WRAPPER = """#!/bin/sh
# test wrapper (tests/e2e/test_faults.py): numbers each call and acts on the test's plan
ctl={ctl}
real={real}
if [ -e "$ctl/hold" ]; then
    cat >/dev/null
    echo "0 hold" >>"$ctl/calls"
    echo "injected failure (held)" >&2
    exit 1
fi
exec 9>>"$ctl/lock"
flock 9
n=$(cat "$ctl/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >"$ctl/count"
action=$(sed -n "${{n}}p" "$ctl/plan")
echo "$n ${{action:-ok}}" >>"$ctl/calls"
flock -u 9
exec 9>&-
case "$action" in
    fail)
        cat >/dev/null
        echo "injected failure before restore" >&2
        exit 1 ;;
    fail-after)
        "$real" "$@"
        echo "injected failure after restore (exit $?)" >&2
        exit 1 ;;
    kill)
        cat >/dev/null
        kill -KILL "$PPID"
        exit 1 ;;
    kill-after)
        "$real" "$@"
        rc=$?
        kill -KILL "$PPID"
        exit $rc ;;
esac
exec "$real" "$@"
"""


# ------------------------------------------------------------------ churn


@dataclass
class Churn:
    """Random, seeded changes to `size` Services (a few dual-stack) and their EndpointSlices."""

    api: ApiServerStandIn
    rng: random.Random
    node_name: str
    pods: list[Host]
    size: int = 24
    ops: int = 0
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Service index -> its current config (port, type, endpoints...)."""
    retired: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for i in range(self.size):
            self._create(i)

    @staticmethod
    def vip(i: int, family: Family = 4) -> str:
        return f"10.96.8.{i + 1}" if family == 4 else f"fd00:10:96::8:{i + 1:x}"

    def _dual(self, i: int) -> bool:
        return i % 6 == 0

    def _service(self, i: int) -> dict[str, Any]:
        c = self.live[i]
        families: list[Family] = [4, 6] if self._dual(i) else [4]
        ips = [self.vip(i, f) for f in families]
        port: dict[str, Any] = {"name": "p", "port": c["port"], "protocol": "TCP", "targetPort": POD_PORT}
        if c["type"] == "NodePort":
            port["nodePort"] = 30100 + i
        spec: dict[str, Any] = {
            "type": c["type"],
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ipFamilies": [f"IPv{f}" for f in families],
            "ipFamilyPolicy": "RequireDualStack" if len(families) == 2 else "SingleStack",
            "ports": [port],
        }
        if c["local"]:
            spec["internalTrafficPolicy"] = "Local"
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"c{i}", "namespace": NS},
            "spec": spec,
        }

    def _slice(self, i: int, family: Family) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"c{i}-v{family}",
                "namespace": NS,
                "labels": {"kubernetes.io/service-name": f"c{i}"},
            },
            "addressType": f"IPv{family}",
            "ports": [{"name": "p", "port": POD_PORT, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [p.ip(family)],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": self.node_name,
                }
                for p in self.live[i]["eps"][family]
            ],
        }

    def _families(self, i: int) -> tuple[Family, ...]:
        return (4, 6) if self._dual(i) else (4,)

    def _pods(self) -> list[Host]:
        return sorted(self.rng.sample(self.pods, self.rng.randint(0, len(self.pods))), key=lambda p: p.name)

    def _create(self, i: int) -> None:
        self.live[i] = {
            "port": self.rng.choice([80, 81, 8000]),
            "type": self.rng.choice(["ClusterIP", "ClusterIP", "NodePort"]),
            "local": self.rng.random() < 0.2,
            "eps": {f: self._pods() for f in self._families(i)},
        }
        self.api.apply(self._service(i))
        for f in self._families(i):
            self.api.apply(self._slice(i, f))

    def retire(self) -> int:
        """Delete a random live service for good: no later step brings it back."""
        self.ops += 1
        i = self.rng.choice(sorted(self.live))
        self.retired.add(i)
        del self.live[i]
        self.api.delete("Service", NS, f"c{i}")
        for f in self._families(i):
            self.api.delete("EndpointSlice", NS, f"c{i}-v{f}")
        return i

    def step(self, delete_weight: int = 1) -> tuple[str, int]:
        """One random change: its name and the service's index."""
        self.ops += 1
        i = self.rng.choice([n for n in range(self.size) if n not in self.retired])
        if i not in self.live:
            self._create(i)
            return "create", i
        weights = [6, 2, 1, 1, delete_weight]
        op = self.rng.choices(["scale", "port", "type", "local", "delete"], weights=weights)[0]
        c = self.live[i]
        if op == "scale":
            f = self.rng.choice(self._families(i))
            c["eps"][f] = self._pods()
            self.api.apply(self._slice(i, f))
        elif op == "port":
            c["port"] = self.rng.choice([p for p in (80, 81, 8000) if p != c["port"]])
            self.api.apply(self._service(i))
        elif op == "type":
            c["type"] = "ClusterIP" if c["type"] == "NodePort" else "NodePort"
            self.api.apply(self._service(i))
        elif op == "local":
            c["local"] = not c["local"]
            self.api.apply(self._service(i))
        else:
            del self.live[i]
            self.api.delete("Service", NS, f"c{i}")
            for f in self._families(i):
                self.api.delete("EndpointSlice", NS, f"c{i}-v{f}")
        return op, i

    def answering(self) -> list[tuple[str, int, set[str]]]:
        """(ip, port, pod names) of up to three live services with endpoints, for a traffic check."""
        out = []
        for i, c in sorted(self.live.items()):
            if c["eps"][4]:
                out.append((self.vip(i), c["port"], {p.name for p in c["eps"][4]}))
        return out[:3]


def final_objects(api: ApiServerStandIn, node: Node) -> list[dict[str, Any]]:
    return [node_obj(node.topo)] + [o for kind in ("Service", "EndpointSlice") for o in api.objects(kind)]


Wants = dict[Family, dict[tuple[str, str], list[str]]]


def expected(node: Node, objs: list[dict[str, Any]], tmp: Path) -> Wants:
    return {family: expected_rules(node.topo, objs, tmp, family) for family in (4, 6)}


def settle(node: Node, wants: Wants, agent: Agent, *, timeout: float = SETTLE) -> str:
    """Wait (bounded) until the kernel equals `wants`; the diff left, if any, per family."""
    diffs = {}
    deadline = time.monotonic() + timeout
    # a save of thousands of rules is not free: compare once the agent says it synced, then slowly
    while not agent.events("synced") and agent.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for family, want in wants.items():
        while True:
            diff = kernel_vs_expected(node.ns, family, want)
            if not diff or time.monotonic() >= deadline or not agent.alive():
                break
            time.sleep(0.5)
        if diff:
            diffs[family] = diff
    return "\n".join(f"IPv{f}: {d}" for f, d in diffs.items())


def lost_updates(node: Node, api: ApiServerStandIn, agent: Agent, tmp: Path) -> str:
    """The kernel against a dry-run of the API's objects of now, once the agent settled."""
    return settle(node, expected(node, final_objects(api, node), tmp), agent)


def diff_count(diff: str) -> int:
    return sum(1 for line in diff.splitlines() if line.startswith(("IPv4: (", "IPv6: (", "(")))


def check_traffic(node: Node, churn: Churn, agent: Agent) -> None:
    for ip, port, pods in churn.answering():
        node.wait_answer(ip, port, pods, agent)


# ------------------------------------------------------------------ 1. API server restarts


API_RESTARTS = 20


def test_apiserver_killed_and_restarted_20_times_during_churn_loses_no_update(
    node: Node, tmp_path: Path
) -> None:
    """The API server crashes 20 times while Services and EndpointSlices keep changing: before the
    crash, while it is down (the agent cannot see those), and right after it returns. Every other
    restart it comes back with its history compacted, so the agent's resumed watch gets 410 Gone
    and must relist and treat whatever vanished as deleted. After the last restart the kernel must
    equal a dry-run of the final objects (0 lost updates) and services must answer."""
    seed = seed_for()
    rng = random.Random(seed)
    api = node.api()
    agent = node.agent(api=api)
    churn = Churn(api, rng, node.topo.node_name, list(node.topo.node.pods))
    agent.wait_event("synced")
    watches = api.open_watches()
    assert watches >= 3, f"premise: the agent watches services, slices and its node ({watches} open)"

    compactions = reconnected = 0
    unseen: set[int] = set()
    """Services deleted during an outage whose history was then compacted, and never recreated."""
    for k in range(API_RESTARTS):
        for _ in range(rng.randint(2, 6)):
            op, i = churn.step()
            if op == "create":
                unseen.discard(i)
            time.sleep(rng.uniform(0, 0.05))
        api.stop()
        compacting = k % 2 == 1
        for _ in range(rng.randint(2, 8)):
            op, i = churn.step(delete_weight=4)
            if op == "delete" and compacting:
                unseen.add(i)  # the agent can learn of it only from a relist: no DELETED event survives
            elif op == "create":
                unseen.discard(i)
        if compacting:
            if k == API_RESTARTS - 1:  # at least these deletions are known only from a relist
                unseen.update(churn.retire() for _ in range(2))
            api.compact()
            compactions += 1
        node.start_api(api)
        for _ in range(rng.randint(0, 3)):
            op, i = churn.step()
            if op == "create":
                unseen.discard(i)
        # the next crash must hit a connected agent, or the restarts would blur into one outage
        reconnected += api.wait_for_watches(watches, timeout=SETTLE)
    expired = len(agent.events("watch_expired"))
    listed = agent.events("listed")
    relists = len(listed) - len({e.get("resource") for e in listed})  # each resource's first list is not one

    diff = lost_updates(node, api, agent, tmp_path)
    line = report(
        f"seed={seed} api_restarts={API_RESTARTS} compactions={compactions} churn_ops={churn.ops} "
        f"reconnected={reconnected} watch_expired={expired} relists={relists} "
        f"deleted_unseen={len(unseen)} lost_updates={diff_count(diff)}"
    )
    assert agent.alive(), f"{line}\n{agent.tail()}"
    assert reconnected == API_RESTARTS, line
    assert expired > 0 and relists > 0, f"premise: compaction forced relists: {line}"
    assert unseen, f"premise: some deletions reach the agent only through a relist: {line}"
    assert diff == "", f"{line}\n{diff}\nagent log:\n{agent.tail()}"
    check_traffic(node, churn, agent)


# ------------------------------------------------------------------ 2. failing restores


RESTORE_FAILURES = 50
STATIC = 400
"""Services that do not change: enough chains that a full sync (every failure causes one) is
written in several restore chunks, so a failure can also land after some chunks went in."""


def test_50_restores_failing_at_random_during_churn_lose_no_update(node: Node, tmp_path: Path) -> None:
    """iptables-restore fails at random (50 times) while Services and EndpointSlices keep changing;
    some failures happen after the real restore wrote its payload, so the kernel holds what the agent
    believes failed. 400 unchanging services make every full sync (each failure causes one) several
    restore chunks, so failures also land between chunks of one sync. Midway, restores fail without pause for a while: /healthz turns 503 once a
    change has waited more than twice the sync period (1 s here), the rules already in the kernel
    keep serving, and /healthz is 200 again once restores work. At the end the kernel equals a
    dry-run of the final objects (0 lost updates) and services answer."""
    seed = seed_for()
    rng = random.Random(seed)
    faults = RestoreFaults.install(tmp_path)
    api = node.api()
    pods = list(node.topo.node.pods)
    for i in range(STATIC):
        api.create(big_service(i))
        api.create(big_slice(i, [pods[i % 3], pods[(i + 1) % 3]], node.topo.node_name))
    churn = Churn(api, rng, node.topo.node_name, pods)
    agent = node.agent("--iptables-sync-period", "1s", api=api, env=faults.env)
    agent.wait_event("synced")
    eventually(
        lambda: node.get(HEALTHZ, "/healthz")[0], lambda s: s == 200, "/healthz 200 after the first sync"
    )

    # from the next call on, each fails with probability 0.3 (before or after writing) until 50 did
    start = faults.numbered
    actions: dict[int, str] = {}
    n = start
    while len(actions) < RESTORE_FAILURES:
        n += 1
        if rng.random() < 0.3:
            actions[n] = rng.choice(["fail", "fail-after"])
    faults.plan(actions)

    held = False
    held_503 = held_200 = 0
    for _ in range(3000):
        injected = faults.count("fail", "fail-after")
        if injected >= RESTORE_FAILURES:
            break
        churn.step()
        time.sleep(rng.uniform(0.01, 0.08))
        if not held and injected >= RESTORE_FAILURES // 2:
            held = True
            # from a healthy agent (random failures may have left it 503 for a moment), so
            # the 503 below is this outage's
            eventually(
                lambda: node.get(HEALTHZ, "/healthz")[0], lambda s: s == 200, "/healthz 200", log=agent.log
            )
            faults.hold(True)
            churn.step()
            eventually(
                lambda: (node.get(HEALTHZ, "/healthz")[0], faults.count("hold")),
                lambda v: v[0] == 503 and v[1] > 0,
                "/healthz 503 while every restore fails, after a failed attempt",
                log=agent.log,
            )
            held_503 += 1
            reply = node.hit(big_service(0)["spec"]["clusterIP"], 80)
            assert reply.ok and reply.name in (pods[0].name, pods[1].name), (
                f"the rules in the kernel keep serving while restores fail: {reply}"
            )
            faults.hold(False)
            eventually(
                lambda: node.get(HEALTHZ, "/healthz")[0],
                lambda s: s == 200,
                "/healthz 200 again",
                log=agent.log,
            )
            held_200 += 1
    injected = faults.count("fail", "fail-after")
    failed_syncs = len(agent.events("iptables_restore_failed"))

    diff = lost_updates(node, api, agent, tmp_path)
    line = report(
        f"seed={seed} restore_failures={injected} "
        f"before={faults.count('fail')} after={faults.count('fail-after')} held={faults.count('hold')} "
        f"restores={faults.numbered - start} churn_ops={churn.ops} failed_syncs_logged={failed_syncs} "
        f"healthz_503={held_503} healthz_200={held_200} lost_updates={diff_count(diff)}"
    )
    assert agent.alive(), f"{line}\n{agent.tail()}"
    assert injected == RESTORE_FAILURES, line
    assert held_503 == held_200 == 1, line
    assert diff == "", f"{line}\n{diff}\nagent log:\n{agent.tail()}"
    eventually(lambda: node.get(HEALTHZ, "/healthz")[0], lambda s: s == 200, "/healthz 200 at the end")
    check_traffic(node, churn, agent)


# ------------------------------------------------------------------ 3. SIGKILL during full syncs


BIG = 2000
"""Services from the stand-in: enough that a start-up full sync takes several restore chunks."""
KILLS = 10


def big_service(i: int) -> dict[str, Any]:
    ip = f"10.96.{20 + i // 250}.{i % 250 + 1}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"b{i}", "namespace": NS},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": POD_PORT}],
        },
    }


def big_slice(i: int, pods: list[Host], node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"b{i}-v4", "namespace": NS, "labels": {"kubernetes.io/service-name": f"b{i}"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": POD_PORT, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [p.ipv4],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": node_name,
            }
            for p in pods
        ],
    }


@dataclass
class BigCluster:
    api: ApiServerStandIn
    rng: random.Random
    node_name: str
    pods: list[Host]
    eps: dict[int, list[Host]] = field(default_factory=dict)
    changed: int = 0

    def fill(self) -> None:
        for i in range(BIG):
            self.api.create(big_service(i))
            self.eps[i] = self._pods()
            self.api.create(big_slice(i, self.eps[i], self.node_name))

    def _pods(self) -> list[Host]:
        return sorted(self.rng.sample(self.pods, self.rng.randint(1, len(self.pods))), key=lambda p: p.name)

    def mutate(self, n: int) -> None:
        """`n` random changes: mostly new endpoints, some services deleted or brought back."""
        for _ in range(n):
            self.changed += 1
            i = self.rng.randrange(BIG)
            if i not in self.eps:
                self.api.create(big_service(i))
                self.eps[i] = self._pods()
                self.api.create(big_slice(i, self.eps[i], self.node_name))
            elif self.rng.random() < 0.2:
                del self.eps[i]
                self.api.delete("Service", NS, f"b{i}")
                self.api.delete("EndpointSlice", NS, f"b{i}-v4")
            else:
                self.eps[i] = self._pods()
                self.api.update(big_slice(i, self.eps[i], self.node_name))

    def sample(self, k: int) -> list[tuple[str, set[str]]]:
        picks = self.rng.sample(sorted(self.eps), k)
        return [(big_service(i)["spec"]["clusterIP"], {p.name for p in self.eps[i]}) for i in picks]


def log_seconds(agent: Agent, event: str) -> float | None:
    """The time of the first `event` in the agent's log, from its logfmt timestamp."""
    for line in agent.log.read_text(errors="replace").splitlines():
        if f"event={event}" in line and line.startswith("ts="):
            stamp = line[3:].split(" level=")[0].strip('"')
            for fmt in ("%Y-%m-%d %H:%M:%S,%f", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
                try:
                    return datetime.strptime(stamp, fmt).timestamp()
                except ValueError:
                    continue
    return None


def sync_window(agent: Agent) -> float:
    """Seconds from the end of the initial list to the end of the first sync, by the agent's log."""
    began, ended = log_seconds(agent, "sources_synced"), log_seconds(agent, "synced")
    return max(0.05, ended - began) if began and ended else 0.0


def killed_or_synced(agent: Agent) -> tuple[bool, bool]:
    return agent.alive(), bool(agent.events("synced"))


def wait_exit(agent: Agent, timeout: float = SETTLE) -> int:
    try:
        return agent.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"agent still running {timeout:.0f}s after it should have been killed:\n{agent.tail()}")


def test_sigkill_during_full_sync_10_times_converges_each_time(node: Node, tmp_path: Path) -> None:
    """`kproxy run` is SIGKILLed 10 times during its start-up full sync of a few thousand services,
    the API objects change while it is dead, and a new agent starts: each time the kernel ends up
    equal to a dry-run of the objects of that moment and sampled services answer. Half the kills
    fall at a random moment between the end of the initial list and the sync's end (rendering,
    diffing, writing); the other half exactly around a random iptables-restore call of the sync
    (before it, or after it wrote its chunk), which leaves the kernel half old, half new. The new
    agent must get there in one go: none of its restores refused by the kernel it found."""
    seed = seed_for()
    rng = random.Random(seed)
    faults = RestoreFaults.install(tmp_path)
    api = node.api()
    big = BigCluster(api, rng, node.topo.node_name, list(node.topo.node.pods))
    big.fill()

    # a first, undisturbed start on an empty node: how long a full sync takes, how many restore calls
    first = node.agent(api=api, env=faults.env)
    first.wait_event("synced", timeout=SETTLE)
    windows = {"cold": sync_window(first), "warm": sync_window(first)}
    cold_calls = max(1, faults.numbered)
    first.proc.send_signal(signal.SIGKILL)
    wait_exit(first)

    timer_kills = edge_kills = missed = mid_sync = colds = converged = refused = 0
    diffs: list[str] = []
    with ThreadPoolExecutor(1) as pool:  # a dry-run of the next state while the agents run
        for k in range(KILLS):
            big.mutate(rng.randint(20, 200))
            wants = pool.submit(expected, node, final_objects(api, node), tmp_path)
            cold = rng.random() < 0.5
            if cold:  # as after a reboot: the whole ruleset has to be written, in many restore chunks
                colds += 1
                exec_in(node.ns, ["nft", "flush", "ruleset"])
            target = ""
            if k % 2 == 0:
                # a warm start adopts what the kernel holds and writes one restore per family
                at = faults.numbered + rng.randint(1, max(2, cold_calls - 1) if cold else 2)
                target = rng.choice(["kill", "kill-after"])
                faults.plan({at: target})
            victim = node.agent(api=api, env=faults.env)
            if target:
                eventually(
                    partial(killed_or_synced, victim),
                    lambda v: not v[0] or v[1],
                    "the agent killed at its restore call, or synced",
                    timeout=SETTLE,
                    log=victim.log,
                )
                if victim.alive():  # the sync made fewer calls than planned
                    missed += 1
                    victim.proc.send_signal(signal.SIGKILL)
                else:
                    edge_kills += 1
                faults.plan({})
            else:
                victim.wait_event("sources_synced", timeout=SETTLE)
                time.sleep(rng.uniform(0, windows["cold" if cold else "warm"]))
                victim.proc.send_signal(signal.SIGKILL)
                timer_kills += 1
            code = wait_exit(victim)
            assert code == -signal.SIGKILL, f"the agent died of something else: {code}\n{victim.tail()}"
            mid_sync += not victim.events("synced")

            again = node.agent(api=api, env=faults.env)
            diff = settle(node, wants.result(), again)
            if diff:
                diffs.append(
                    f"kill {k + 1} ({target or 'timer'}, {'cold' if cold else 'warm'}):\n{diff}\n{again.tail()}"
                )
                break
            converged += 1
            refused += len(again.events("iptables_restore_failed"))
            windows["warm"] = sync_window(again) or windows["warm"]
            for ip, pods in big.sample(2):
                node.wait_answer(ip, 80, pods, again)
            again.proc.send_signal(signal.SIGKILL)
            wait_exit(again)

    line = report(
        f"seed={seed} services={BIG} cold_restores={cold_calls} cold_window_s={windows['cold']:.2f} "
        f"kills={timer_kills + edge_kills} timer_kills={timer_kills} restore_edge_kills={edge_kills} "
        f"edge_missed={missed} cold_starts={colds} "
        f"killed_before_synced={mid_sync} changes_while_dead={big.changed} converged={converged} "
        f"restart_restores_refused={refused} "
        f"lost_updates={sum(diff_count(d) for d in diffs)}"
    )
    assert not diffs, f"{line}\n" + "\n".join(diffs)
    assert converged == KILLS and timer_kills + edge_kills == KILLS, line
    # the restart plans from a listing of the kernel it found: none of its writes may be refused
    # (a refused one would mean it misread the half-written state and healed only by retrying)
    assert refused == 0, line
    assert mid_sync >= edge_kills, line
