"""Userspace mode restarts under steady load, in the namespace lab.

A client opens new connections to a service at a bounded rate (four threads, each at most
one connection per 10 ms: up to 400 a second) while `kproxy run --proxy-mode userspace`
on the node is stopped and started again. A keeper process holds a copy of every listening
socket and hands them to the next kproxy (kproxy/backends/userspace/handover.py), so after
SIGTERM not one connection may be refused, reset or left unanswered. After SIGKILL the
connections the killed process had accepted die with it (at most one per client thread per
kill); none may be refused, and the test prints what was lost.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kproxy.backends.userspace import handover
from tests.support.cluster import Agent, agent_args
from tests.support.netns import Reply, Topology, entered, netns_guard, request
from tests.support.userspace_lab import SERVICES, TARGET_PORT, manifest, vip

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]

RESTARTS = 5
WORKERS = 4
PACE = 0.01
LIMIT = 60_000
"""Connections at most, whatever happens: the load is bounded."""


@dataclass
class Load:
    """New connections from one namespace to ip:port until stopped; every outcome is counted."""

    ns: str
    ip: str
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, float, Reply]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                if sum(self.outcomes.values()) >= LIMIT:
                    return
            began = time.monotonic()
            reply = request(self.ns, self.ip, self.port, timeout=5.0)
            with self.lock:
                self.outcomes[reply.outcome] += 1
                if not reply.ok:
                    self.failures.append((began, time.monotonic(), reply))
            rest = PACE - (time.monotonic() - began)
            if rest > 0:
                time.sleep(rest)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(WORKERS)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def ok(self) -> int:
        with self.lock:
            return self.outcomes["ok"]

    def wait_more_ok(self, n: int, timeout: float = 30.0) -> None:
        want = self.ok() + n
        deadline = time.monotonic() + timeout
        while self.ok() < want:
            assert time.monotonic() < deadline, f"traffic stalled: {dict(self.outcomes)}"
            time.sleep(0.02)

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.outcomes)


@dataclass
class Node:
    topo: Topology
    agent: Agent


@pytest.fixture
def node(netns_guard: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # a keeper nobody claims (a failed test) gives up soon; teardown claims it anyway
    monkeypatch.setenv(handover.TIMEOUT_ENV, "20")
    with Topology(pods=3, clients=2) as topo:
        topo.start_servers([TARGET_PORT])
        (tmp_path / "manifests").mkdir()
        text = "".join(f"---\n{json.dumps(o)}\n" for o in manifest(topo))
        (tmp_path / "manifests" / "cluster.yaml").write_text(text)
        args = agent_args(
            topo.node_name, manifests=str(tmp_path / "manifests"), extra=["--proxy-mode", "userspace"]
        )
        agent = Agent(topo, topo.node, args, tmp_path)
        try:
            agent.start()
            agent.wait_synced(1)
            yield Node(topo, agent)
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()
            with entered(topo.node_ns):
                handover.release()


def _load(node: Node) -> Load:
    return Load(node.topo.client_hosts[0].ns, vip(SERVICES["lb"], 4), SERVICES["lb"].port)


def test_sigterm_restarts_refuse_no_connection(node: Node) -> None:
    agent = node.agent
    with _load(node) as load:
        load.wait_more_ok(200)
        for _ in range(RESTARTS):
            agent.stop()
            agent.start()
            agent.wait_synced(1)
            assert "event=userspace_rules_adopted" in agent.log_text(), agent.tail(40)
            load.wait_more_ok(200)
    got = load.snapshot()
    print(f"\nSIGTERM x{RESTARTS}: {dict(got)}")
    assert got["ok"] >= 200 * (RESTARTS + 1)
    assert load.failures == [], f"{dict(got)}: {[str(r) for _, _, r in load.failures[:10]]}"
    assert agent.runs == RESTARTS + 1


def test_sigkill_restarts_lose_only_connections_in_flight(node: Node) -> None:
    agent = node.agent
    per_restart: list[dict[str, int]] = []
    serving: list[tuple[float, float]] = []
    """Windows in which the proxy was up: from a sync to the next kill."""
    up_since = time.monotonic()
    with _load(node) as load:
        load.wait_more_ok(200)
        for _ in range(RESTARTS):
            before = load.snapshot()
            proc = agent.proc
            assert proc is not None
            serving.append((up_since, time.monotonic()))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            agent.start()
            agent.wait_synced(1)
            assert "event=userspace_rules_adopted" in agent.log_text(), agent.tail(40)
            up_since = time.monotonic()
            load.wait_more_ok(200)
            after = load.snapshot()
            per_restart.append({k: after[k] - before[k] for k in after if after[k] != before[k]})
    got = load.snapshot()
    lost = sum(n for k, n in got.items() if k != "ok")
    print(f"\nSIGKILL x{RESTARTS}: {dict(got)}; lost {lost}; per restart {per_restart}")
    assert got["ok"] >= 200 * (RESTARTS + 1)
    assert got["refused"] == 0 and lost <= WORKERS * RESTARTS, [str(r) for _, _, r in load.failures[:10]]
    serving.append((up_since, time.monotonic()))
    # every loss is a kill's: a connection begun and ended while a synced kproxy lived succeeded
    in_service = [str(r) for t, end, r in load.failures if any(a <= t and end < b for a, b in serving)]
    assert in_service == [], in_service[:10]
