"""`kproxy run` end to end: a real agent process in a node namespace, fed by the API-server
stand-in (or a manifests directory), carrying real packets from a client namespace to pods.

One Topology for the module (one node, three pods, one outside client); every test starts
its own stand-in and agent, and the node's tables and conntrack are wiped in between. The
stand-in runs in this process on a listening socket made inside the node namespace (a socket
stays in the namespace it was created in), so the agent reaches it at 127.0.0.1 like a
kubelet-local apiserver and the test drives it directly (create, compact, stop, start).

Nothing here asserts a duration. "Soon" means a generous bounded wait (SOON seconds, far
above the 2 s the issue asks for on an idle node) because the machine is shared and noisy;
a failure says what was awaited and shows the tail of the agent's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_node import (
    AGENT_CMD,
    HEALTHZ,
    METRICS,
    NS,
    ROOT,
    Agent,
    Node,
    eventually,
    expected_rules,
    kernel_vs_expected,
    module_topology,
    node,
    node_obj,
    scrape,
    slice_obj,
    svc_obj,
    vip,
    write_objects,
)
from tests.support.netns import (
    CLUSTER_CIDR,
    Reply,
    entered,
    exec_in,
    netns_guard,
    start_podservers,
)
from tests.support.netns import _stop as stop_process

MODES = ("iptables", "nftables")
MODE = {m: ("--proxy-mode", m) for m in MODES}
"""Tests of kernel traffic run once per proxy mode that programs the kernel."""

pytestmark = pytest.mark.privileged

__all__ = ["module_topology", "netns_guard", "node"]

# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("mode", MODES)
def test_service_carries_traffic_and_follows_scale_update_delete(mode: str, node: Node) -> None:
    """Create, scale, re-port, empty and delete a Service through the API; clients notice each step
    soon (bounded wait, SOON seconds). Also one dual-stack service: its IPv6 cluster IP works too.

    What a client sees after each step, as kube-proxy gives it: no endpoints -> connection refused
    (REJECT), service deleted -> nothing matches the cluster IP, and the packet follows the node's
    route for the service range, which leads nowhere: no answer at all."""
    api = node.api()
    agent = node.agent(*MODE[mode], api=api)
    pod1, pod2, pod3 = node.pod(1), node.pod(2), node.pod(3)
    api.create(svc_obj("web", 1, dual=True))
    api.create(slice_obj("web", [pod1], node.topo.node_name))
    api.create(slice_obj("web", [pod3], node.topo.node_name, family=6))
    node.wait_answer(vip(1), 80, {pod1.name}, agent)
    node.wait_answer(vip(1, 6), 80, {pod3.name}, agent)

    api.update(slice_obj("web", [pod1, pod2], node.topo.node_name))
    node.wait_answer(vip(1), 80, {pod1.name, pod2.name}, agent)

    api.update(svc_obj("web", 1, port=81, dual=True))
    node.wait_answer(vip(1), 81, {pod1.name, pod2.name}, agent)
    assert not node.hit(vip(1), 80).ok, "the old service port must stop working"

    api.update(slice_obj("web", [], node.topo.node_name))
    node.wait_outcome(vip(1), 81, "refused", agent)

    api.delete("Service", NS, "web")
    api.delete("EndpointSlice", NS, "web-v4")
    reply = node.wait_outcome(vip(1), 81, "timeout", agent)
    assert not reply.ok
    assert agent.alive(), agent.tail()


def test_apiserver_restart_with_compaction_converges_to_final_state(node: Node, tmp_path: Path) -> None:
    """The API server dies mid-churn and comes back with its history compacted: the agent's watch
    resumes from a resourceVersion that is gone (410), so it must relist; whatever was deleted
    while it was away must vanish, and the kernel must end up exactly as `kproxy dry-run`
    renders the final objects (both families), not merely carrying traffic."""
    api = node.api()
    agent = node.agent(api=api)
    name = node.topo.node_name
    pod1, pod2, pod3 = node.pod(1), node.pod(2), node.pod(3)
    for i, pods in enumerate(([pod1], [pod1, pod2], [pod2], [pod3]), 1):
        api.create(svc_obj(f"s{i}", 10 + i, dual=(i == 4)))
        api.create(slice_obj(f"s{i}", pods, name))
    api.create(slice_obj("s4", [pod1], name, family=6))
    node.wait_answer(vip(11), 80, {pod1.name}, agent)
    node.wait_answer(vip(14, 6), 80, {pod1.name}, agent)

    # churn the agent has to follow, then the crash in the middle of more churn
    api.update(slice_obj("s1", [pod1, pod3], name))
    api.update(svc_obj("s2", 12, port=8000))
    api.stop()
    api.delete("Service", NS, "s3")
    api.delete("EndpointSlice", NS, "s3-v4")
    api.delete("EndpointSlice", NS, "s4-v6")
    api.update(slice_obj("s2", [pod3], name))
    api.create(svc_obj("s5", 15, proto="UDP", port=53))
    api.create(slice_obj("s5", [pod2], name, proto="UDP"))
    restarted_at = time.monotonic()
    api.compact()
    node.start_api(api)
    api.update(svc_obj("s4", 14, port=8443, dual=True))

    final = [node_obj(node.topo)] + [o for kind in ("Service", "EndpointSlice") for o in api.objects(kind)]
    for family in (4, 6):
        want = expected_rules(node.topo, final, tmp_path, family)
        eventually(
            partial(kernel_vs_expected, node.ns, family, want),
            lambda diff: diff == "",
            f"IPv{family} rules equal to dry-run of the final objects (diff shown)",
            log=agent.log,
        )

    relists = [
        r for r in api.requests if r.at > restarted_at and not r.watch and r.path.endswith("/services")
    ]
    assert relists, "the agent must list again after its watch's resourceVersion was compacted away"
    node.wait_answer(vip(15), 53, {pod2.name}, agent, proto="udp")
    node.wait_answer(vip(12), 8000, {pod3.name}, agent)
    assert node.hit(vip(13), 80).outcome == "timeout", "a service deleted during the outage must be gone"
    assert agent.alive(), agent.tail()


class UdpClient:
    """A DNS-like client: one socket, one source port for its whole life, as resolvers often keep."""

    def __init__(self, ns: str, ip: str, port: int) -> None:
        with entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.3)
        self.sock.connect((ip, port))
        self.port = self.sock.getsockname()[1]

    def ask(self) -> str:
        """The answering pod's name, or what went wrong."""
        try:
            self.sock.send(b"?\n")
            return self.sock.recv(2048).decode().split()[0]
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return f"{e.__class__.__name__}: {e}"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_udp_service_keeps_answering_after_its_only_endpoint_is_replaced(mode: str, node: Node) -> None:
    """The DNS pod is replaced (old one gone, new one elsewhere) while a client keeps asking from the
    same source port. Its conntrack entry still points at the old pod and every query refreshes it,
    so only the agent deleting that stale entry lets the client reach the new pod; the check is that
    it does, soon (bounded wait), with the client's source port unchanged."""
    api = node.api()
    agent = node.agent(*MODE[mode], api=api)
    old, new = node.pod(1), node.pod(2)
    dns = start_podservers([(old.ns, old.name), (new.ns, new.name)], [5353])
    client = UdpClient(node.client.ns, vip(53), 53)
    try:
        api.create(svc_obj("dns", 53, port=53, proto="UDP", target=5353))
        api.create(slice_obj("dns", [old], node.topo.node_name, port=5353, proto="UDP"))
        eventually(client.ask, lambda got: got == old.name, "the first DNS pod answers", log=agent.log)
        flows = exec_in(node.ns, ["conntrack", "-L", "-p", "udp", "--orig-dst", vip(53)], check=False).stdout
        assert f"src={old.ipv4}" in flows and f"sport={client.port}" in flows, (
            f"premise: the client's flow is tracked towards the old pod:\n{flows}"
        )

        stop_process(dns[0])  # the old pod is gone
        api.update(slice_obj("dns", [new], node.topo.node_name, port=5353, proto="UDP"))
        eventually(client.ask, lambda got: got == new.name, "the replacement DNS pod answers", log=agent.log)
        assert client.sock.getsockname()[1] == client.port
    finally:
        client.close()
        for proc in dns:
            stop_process(proc)


# ------------------------------------------------------------------ health and metrics


def failing_restore(tmp: Path) -> tuple[Path, Path]:
    """A PATH directory whose iptables-nft-restore (both families) fails while `flag` exists and is
    the real one otherwise: syncs of this one agent stall, nothing else on the machine notices."""
    bindir, flag = tmp / "bin", tmp / "restore-fails"
    bindir.mkdir()
    for name in ("iptables-nft-restore", "ip6tables-nft-restore"):
        real = shutil.which(name)
        assert real, f"{name} not found"
        script = bindir / name
        script.write_text(
            f'#!/bin/sh\nif [ -e "{flag}" ]; then echo "injected failure" >&2; exit 4; fi\nexec {real} "$@"\n'
        )
        script.chmod(0o755)
    return bindir, flag


def test_healthz_turns_503_while_syncs_fail_and_200_once_they_recover(node: Node, tmp_path: Path) -> None:
    """With every iptables-restore of this agent failing, a queued change stays unsynced: /healthz
    and /livez answer 503 once it is older than 2 x the sync period (1 s here) and the rules already
    in the kernel keep serving; when restores work again the change lands and both answer 200."""
    bindir, flag = failing_restore(tmp_path)
    api = node.api()
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    agent = node.agent("--iptables-sync-period", "1s", api=api, env=env)
    pod1, pod2 = node.pod(1), node.pod(2)
    api.create(svc_obj("hz", 30))
    api.create(slice_obj("hz", [pod1], node.topo.node_name))
    node.wait_answer(vip(30), 80, {pod1.name}, agent)
    eventually(
        lambda: node.get(HEALTHZ, "/healthz")[0], lambda s: s == 200, "/healthz 200 after the first sync"
    )

    flag.touch()
    api.update(slice_obj("hz", [pod2], node.topo.node_name))
    _, body = eventually(
        lambda: node.get(HEALTHZ, "/healthz"),
        lambda r: r[0] == 503,
        "/healthz 503 while syncs fail",
        log=agent.log,
    )
    doc = json.loads(body)
    assert {"lastUpdated", "currentTime"} <= doc.keys(), doc
    assert node.get(HEALTHZ, "/livez")[0] == 503
    assert node.hit(vip(30), 80).name == pod1.name, "the rules in the kernel keep serving while syncs fail"
    assert (
        scrape(node).value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family="IPv4") > 0
    )

    flag.unlink()
    eventually(
        lambda: node.get(HEALTHZ, "/healthz")[0], lambda s: s == 200, "/healthz 200 again", log=agent.log
    )
    assert node.get(HEALTHZ, "/livez")[0] == 200
    node.wait_answer(vip(30), 80, {pod2.name}, agent)


KUBE_PROXY_METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_service_changes": "counter",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures": "counter",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures": "counter",
    "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
    "kubeproxy_proxy_healthz": "counter",
}
"""Counters by family name: prometheus_client's parser drops the `_total` suffix of counters."""


def test_metrics_parse_carry_kube_proxy_names_and_move_after_a_change(node: Node) -> None:
    """A Prometheus scrape of :10249 parses with prometheus_client's own parser, has kube-proxy's
    metric names and types, and its sync counters and timestamps move when a change is synced."""
    api = node.api()
    agent = node.agent(api=api)
    pod1, pod2 = node.pod(1), node.pod(2)
    api.create(svc_obj("m", 40))
    api.create(slice_obj("m", [pod1], node.topo.node_name))
    node.wait_answer(vip(40), 80, {pod1.name}, agent)

    # traffic flows as soon as the IPv4 restore is in; the sync's bookkeeping follows a moment later
    before = eventually(
        lambda: scrape(node),
        lambda s: s.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1,
        "the first sync counted",
        log=agent.log,
    )
    missing = {n: t for n, t in KUBE_PROXY_METRICS.items() if before.types.get(n) != t}
    assert not missing, f"missing or mistyped: {missing}; have {sorted(before.types)}"
    assert node.get(METRICS, "/proxyMode") == (200, "iptables")
    syncs = before.value("kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv4")
    changes = before.value("kubeproxy_sync_proxy_rules_endpoint_changes_total")
    last = before.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4")
    assert syncs >= 1 and changes >= 1 and last > 0, before.samples

    api.update(slice_obj("m", [pod1, pod2], node.topo.node_name))
    node.wait_answer(vip(40), 80, {pod1.name, pod2.name}, agent)
    after = eventually(
        lambda: scrape(node),
        lambda s: s.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") > changes,
        "endpoint_changes_total grows after an EndpointSlice update",
        log=agent.log,
    )
    assert after.value("kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv4") > syncs
    assert after.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4") > last
    assert after.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0


def test_healthz_drains_a_node_marked_for_deletion_and_metrics_port_serves_configz(node: Node) -> None:
    """As kube-proxy: /healthz answers 503 (nodeEligible false) while the Node has a deletionTimestamp
    or the cluster autoscaler's ToBeDeleted taint, so load balancers drain it, and 200 once it is
    unmarked; /livez ignores the node. The metrics port has /configz, the process collectors and the
    no-local-endpoints gauge for an internalTrafficPolicy Local service whose pods are elsewhere."""
    api = node.api()
    agent = node.agent(api=api)
    svc = svc_obj("drain", 50)
    svc["spec"]["internalTrafficPolicy"] = "Local"
    api.create(svc)
    api.create(slice_obj("drain", [node.pod(1)], "some-other-node"))

    def healthz() -> tuple[int, dict[str, Any]]:
        code, body = node.get(HEALTHZ, "/healthz")
        return code, (json.loads(body) if code else {})

    code, doc = eventually(healthz, lambda r: r[0] == 200, "/healthz 200 once synced", log=agent.log)
    assert doc["nodeEligible"] is True and set(doc["status"]) == {"IPv4", "IPv6"}, doc

    gauge = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    eventually(
        lambda: scrape(node).value(gauge, ip_family="IPv4", traffic_policy="internal"),
        lambda v: v == 1,
        "no_local_endpoints{internal} counts the Local service with remote pods only",
        log=agent.log,
    )
    api.update(slice_obj("drain", [node.pod(1)], node.topo.node_name))
    eventually(
        lambda: scrape(node).value(gauge, ip_family="IPv4", traffic_policy="internal"),
        lambda v: v == 0,
        "no_local_endpoints{internal} back to 0 once a pod is local",
        log=agent.log,
    )

    marked = node_obj(node.topo)
    marked["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    marked["metadata"]["finalizers"] = ["example.com/hold"]
    api.update(marked)
    code, doc = eventually(healthz, lambda r: r[0] == 503, "/healthz 503 while the Node is being deleted")
    assert doc["nodeEligible"] is False, doc
    assert node.get(HEALTHZ, "/livez")[0] == 200, "/livez ignores the node"

    api.update(node_obj(node.topo))
    eventually(healthz, lambda r: r[0] == 200, "/healthz 200 once the deletion mark is gone", log=agent.log)

    tainted = node_obj(node.topo)
    tainted["spec"]["taints"] = [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
    ]
    api.update(tainted)
    eventually(healthz, lambda r: r[0] == 503, "/healthz 503 under the autoscaler's ToBeDeleted taint")
    api.update(node_obj(node.topo))
    eventually(healthz, lambda r: r[0] == 200, "/healthz 200 once the taint is gone", log=agent.log)

    code, body = node.get(METRICS, "/configz")
    assert code == 200, body
    cfg = json.loads(body)["kubeproxy.config.k8s.io"]
    assert cfg["hostnameOverride"] == node.topo.node_name and cfg["mode"] == "iptables", cfg
    assert cfg["syncPeriod"] == "2s" and cfg["minSyncPeriod"] == "100ms", cfg
    metrics = scrape(node)
    assert metrics.value("process_resident_memory_bytes") > 0
    assert metrics.value("process_cpu_seconds_total") > 0
    assert agent.alive()


# ------------------------------------------------------------------ restart under load


class EchoServer:
    """Echoes every TCP byte back, in this process, on a socket listening inside a pod's namespace."""

    def __init__(self, ns: str, port: int) -> None:
        with entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(timeout=2)


@dataclass
class Talker:
    """One long-lived connection through the cluster IP, exchanging a numbered line every ~20 ms."""

    sock: socket.socket
    exchanged: int = 0
    error: str = ""

    def run(self, stop: threading.Event, limit: int = 5000) -> None:
        buf = b""
        for i in range(limit):
            if stop.is_set():
                return
            line = f"{i}\n".encode()
            try:
                self.sock.sendall(line)
                while b"\n" not in buf:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        self.error = f"closed by peer after {self.exchanged} exchanges"
                        return
                    buf += chunk
            except OSError as e:
                self.error = f"{e.__class__.__name__}: {e} after {self.exchanged} exchanges"
                return
            got, buf = buf.split(b"\n", 1)
            if got + b"\n" != line:
                self.error = f"sent {line!r}, got back {got!r}"
                return
            self.exchanged += 1
            stop.wait(0.02)


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_and_restart_drop_no_connection(mode: str, node: Node) -> None:
    """Established connections through a cluster IP keep exchanging data while the agent is
    SIGTERMed and started again, and new connections made while no agent runs still succeed:
    SIGTERM leaves the rules in place and the new agent's first sync replaces them without a gap."""
    api = node.api()
    agent = node.agent(*MODE[mode], api=api)
    pod1, pod2 = node.pod(1), node.pod(2)
    servers = [EchoServer(pod1.ns, 9000), EchoServer(pod2.ns, 9000)]
    talkers: list[Talker] = []
    threads: list[threading.Thread] = []
    stop, probing = threading.Event(), threading.Event()
    try:
        api.create(svc_obj("echo", 60, port=7, target=9000))
        api.create(slice_obj("echo", [pod1, pod2], node.topo.node_name, port=9000))
        api.create(svc_obj("who", 61))
        api.create(slice_obj("who", [pod1, pod2], node.topo.node_name))
        node.wait_answer(vip(61), 80, {pod1.name, pod2.name}, agent)
        for _ in range(8):
            with entered(node.client.ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(3.0)
            sock.connect((vip(60), 7))
            talkers.append(Talker(sock))
        threads = [threading.Thread(target=t.run, args=(stop,), daemon=True) for t in talkers]
        for t in threads:
            t.start()
        eventually(lambda: min(t.exchanged for t in talkers), lambda n: n >= 5, "all connections exchanging")

        fresh: list[Reply] = []

        def probe_new_connections() -> None:
            while not probing.is_set() and len(fresh) < 2000:
                fresh.append(node.hit(vip(61), 80))

        prober = threading.Thread(target=probe_new_connections, daemon=True)
        threads.append(prober)
        prober.start()
        assert agent.terminate() == 0, agent.tail()
        assert agent.events("agent_stopped"), agent.tail()
        marks = [t.exchanged for t in talkers]

        again = node.agent(*MODE[mode], api=api)
        again.wait_event("synced")
        api.update(slice_obj("who", [pod1], node.topo.node_name))
        node.wait_answer(vip(61), 80, {pod1.name}, again)
        probing.set()
        prober.join(timeout=5)
        failed = [str(r) for r in fresh if not r.ok]
        assert fresh and not failed, (
            f"new connections during the restart failed: {failed[:5]} of {len(fresh)}"
        )
        eventually(
            lambda: (
                [t.exchanged - m for t, m in zip(talkers, marks, strict=True)],
                [t.error for t in talkers],
            ),
            lambda v: min(v[0]) >= 10 or any(v[1]),
            "every connection still exchanging after the restart",
        )
        stop.set()
        for t in threads:
            t.join(timeout=5)
        broken = {i: t.error for i, t in enumerate(talkers) if t.error}
        assert not broken, f"connections broken across the restart: {broken}"
    finally:
        stop.set()
        probing.set()
        for t in threads:
            t.join(timeout=5)
        for talker in talkers:
            talker.sock.close()
        for server in servers:
            server.close()


# ------------------------------------------------------------------ no cluster


@pytest.mark.parametrize("mode", MODES)
def test_manifests_directory_edits_change_the_rules(mode: str, node: Node, tmp_path: Path) -> None:
    """`kproxy run --manifests DIR` with no API server: adding an endpoint, changing a port and
    removing a file each show in the traffic soon after the edit (bounded wait)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    name = node.topo.node_name
    pod1, pod2 = node.pod(1), node.pod(2)
    write_objects(manifests / "node.yaml", [node_obj(node.topo)])
    app = manifests / "app.yaml"
    write_objects(app, [svc_obj("app", 70), slice_obj("app", [pod1], name)])
    agent = node.agent(*MODE[mode], "--manifests", str(manifests))
    node.wait_answer(vip(70), 80, {pod1.name}, agent)

    write_objects(app, [svc_obj("app", 70), slice_obj("app", [pod1, pod2], name)])
    node.wait_answer(vip(70), 80, {pod1.name, pod2.name}, agent)

    write_objects(app, [svc_obj("app", 70, port=8000), slice_obj("app", [pod2], name)])
    node.wait_answer(vip(70), 8000, {pod2.name}, agent)
    assert not node.hit(vip(70), 80).ok, "the old port must stop working"

    write_objects(manifests / "other.yaml", [svc_obj("other", 71), slice_obj("other", [pod1], name)])
    node.wait_answer(vip(71), 80, {pod1.name}, agent)
    app.unlink()
    node.wait_outcome(vip(70), 8000, "timeout", agent)
    assert node.hit(vip(71), 80).ok
    assert agent.alive(), agent.tail()


@pytest.mark.parametrize("mode", MODES)
def test_rules_come_back_after_someone_flushes_the_tables(mode: str, node: Node) -> None:
    """An administrator (or another tool) flushes every table: the agent notices its canary chain
    is gone at its next periodic sync and rewrites everything, with no API change to prompt it."""
    api = node.api()
    agent = node.agent(*MODE[mode], api=api)
    api.create(svc_obj("canary", 80))
    api.create(slice_obj("canary", [node.pod(3)], node.topo.node_name))
    node.wait_answer(vip(80), 80, {node.pod(3).name}, agent)
    agent.wait_event("synced")  # the first sync is complete: no retry of it can repair what follows
    exec_in(node.ns, ["nft", "flush", "ruleset"])
    reply = node.hit(vip(80), 80)
    assert not reply.ok, "premise: with the tables flushed the service is gone"
    node.wait_answer(vip(80), 80, {node.pod(3).name}, agent)


def test_userspace_mode_carries_service_traffic_through_the_agent(node: Node, tmp_path: Path) -> None:
    """`--proxy-mode userspace`: the agent's own listeners carry cluster-IP traffic from a client
    outside the node to the pods, and a scale-up reaches the new pod (bounded wait)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    name = node.topo.node_name
    pod1, pod2 = node.pod(1), node.pod(2)
    write_objects(manifests / "node.yaml", [node_obj(node.topo)])
    app = manifests / "app.yaml"
    write_objects(app, [svc_obj("app", 72), slice_obj("app", [pod1], name)])
    agent = node.agent("--manifests", str(manifests), "--proxy-mode", "userspace")
    node.wait_answer(vip(72), 80, {pod1.name}, agent)
    write_objects(app, [svc_obj("app", 72), slice_obj("app", [pod1, pod2], name)])
    node.wait_answer(vip(72), 80, {pod1.name, pod2.name}, agent)
    saved = exec_in(node.ns, ["iptables-nft-save", "-t", "nat"]).stdout
    assert "KUBE-PORTALS-CONTAINER" in saved and "KUBE-SVC-" not in saved, "steered, not DNATed to pods"
    assert agent.alive(), agent.tail()


def test_node_port_follows_an_address_the_node_gains_and_loses(node: Node) -> None:
    """With --nodeport-addresses, node ports answer only on the node's addresses inside those
    CIDRs, and those addresses are read from the kernel as they change, not once at start:
    an address added to the node after kproxy started takes node-port traffic soon after,
    and stops taking it once removed."""
    extra = "198.51.100.7"
    api = node.api()
    agent = node.agent("--nodeport-addresses", "198.51.100.0/24", api=api)
    pod1 = node.pod(1)
    svc = svc_obj("np", 9)
    svc["spec"]["type"] = "NodePort"
    svc["spec"]["ports"][0]["nodePort"] = 30079
    api.create(svc)
    api.create(slice_obj("np", [pod1], node.topo.node_name))
    node.wait_answer(vip(9), 80, {pod1.name}, agent)
    assert not node.hit(node.topo.node.ipv4, 30079).ok, "the node's LAN IP is outside --nodeport-addresses"
    exec_in(node.ns, ["ip", "addr", "add", f"{extra}/32", "dev", "eth0"])
    try:
        node.wait_answer(extra, 30079, {pod1.name}, agent)
        assert agent.events("node_addresses_changed"), agent.tail()
    finally:
        exec_in(node.ns, ["ip", "addr", "del", f"{extra}/32", "dev", "eth0"], check=False)
    node.wait_outcome(extra, 30079, "timeout", agent)
    assert not node.hit(node.topo.node.ipv4, 30079).ok
    assert agent.alive(), agent.tail()


# ------------------------------------------------------------------ kubeadm's ConfigMap


KUBEADM_DATA = ROOT / "tests" / "data" / "kubeadm"


@pytest.mark.parametrize("payload", ["kubeadm-1.20.yaml", "kubeadm-1.31-dualstack.yaml"])
def test_kubeadm_configmap_payload_runs_as_kube_proxys_daemonset_would(node: Node, payload: str) -> None:
    """`kproxy run --config=<config.conf> --hostname-override=<node>`: kube-proxy's DaemonSet
    arguments, nothing else, with the ConfigMap payload kubeadm writes (only the kubeconfig path
    and pod subnet changed to this lab's). The service answers, /healthz at kube-proxy's default
    address says 200, and /metrics answers at kube-proxy's default address."""
    api = node.api()
    kubeconfig = api.write_kubeconfig(node.tmp / "kubeconfig.conf")
    text = (KUBEADM_DATA / payload).read_text()
    text = text.replace("/var/lib/kube-proxy/kubeconfig.conf", str(kubeconfig))
    cidr = f"{CLUSTER_CIDR[4]},{CLUSTER_CIDR[6]}" if "dualstack" in payload else CLUSTER_CIDR[4]
    text = re.sub(r"(?m)^clusterCIDR: .*$", f"clusterCIDR: {cidr}", text)
    config = node.tmp / "config.conf"
    config.write_text(text)
    argv = [sys.executable, *AGENT_CMD, f"--config={config}", f"--hostname-override={node.topo.node_name}"]
    log = node.tmp / "agent-kubeadm.log"
    with log.open("ab") as err:
        proc = node.topo.spawn(node.ns, argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=ROOT)
    agent = Agent(proc, log)
    node.agents.append(agent)
    pod1, pod2 = node.pod(1), node.pod(2)
    api.create(svc_obj("web", 1))
    api.create(slice_obj("web", [pod1, pod2], node.topo.node_name))
    node.wait_answer(vip(1), 80, {pod1.name, pod2.name}, agent)
    assert node.get(HEALTHZ, "/healthz")[0] == 200
    assert node.get(METRICS, "/metrics")[0] == 200
    assert agent.alive(), agent.tail()
    assert not agent.events("config_ignored"), agent.tail()  # kubeadm's own payload: nothing to warn about
