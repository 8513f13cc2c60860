"""One node namespace running `kproxy run` as a process, fed by the API-server stand-in or a
manifests directory: the helpers and fixtures the end-to-end tests share."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.backends.userspace import handover
from tests.support.apiserver_standin import ApiServerStandIn
from tests.support.netns import (
    CLUSTER_CIDR,
    PREFIX,
    Family,
    Host,
    Proto,
    Reply,
    Topology,
    create_netns,
    delete_netns,
    entered,
    exec_in,
    request,
)
from tests.support.netns import _stop as stop_process

MODES = ("iptables", "nftables")
MODE = {m: ("--proxy-mode", m) for m in MODES}
"""Tests of kernel traffic run once per proxy mode that programs the kernel."""


T = TypeVar("T")

NS = "e2e"
POD_PORT = 8080
SOON = 15.0
"""Upper bound for "the change shows in the kernel": generous on purpose (a shared 2-core VM)."""
HEALTHZ = 10256
METRICS = 10249
ROOT = Path(__file__).resolve().parents[2]
AGENT_CMD = ["-m", "kproxy"]
"""How the agent is launched (after the interpreter); swap in a wrapper script to debug it."""


# ------------------------------------------------------------------ polling


def eventually(
    probe: Callable[[], T],
    ok: Callable[[T], bool],
    what: str,
    *,
    timeout: float = SOON,
    log: Path | None = None,
) -> T:
    """Probe until `ok(value)`; on timeout fail naming what was awaited, the last value and the agent's log."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            tail = ""
            if log is not None and log.exists():
                tail = "\nagent log (tail):\n" + "\n".join(log.read_text().splitlines()[-40:])
            pytest.fail(f"{what}: not within {timeout:.0f}s; last seen: {value!r}{tail}", pytrace=False)
        time.sleep(0.1)


# ------------------------------------------------------------------ objects


def vip(n: int, family: Family = 4) -> str:
    return f"10.96.7.{n}" if family == 4 else f"fd00:10:96::7:{n:x}"


def svc_obj(
    name: str, n: int, *, port: int = 80, proto: str = "TCP", target: int = POD_PORT, dual: bool = False
) -> dict[str, Any]:
    ips = [vip(n, 4), vip(n, 6)] if dual else [vip(n, 4)]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ipFamilies": ["IPv4", "IPv6"] if dual else ["IPv4"],
            "ipFamilyPolicy": "RequireDualStack" if dual else "SingleStack",
            "ports": [{"name": "p", "port": port, "protocol": proto, "targetPort": target}],
        },
    }


def slice_obj(
    svc: str,
    pods: Sequence[Host],
    node: str,
    *,
    family: Family = 4,
    port: int = POD_PORT,
    proto: str = "TCP",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-v{family}",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": f"IPv{family}",
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [
            {
                "addresses": [p.ip(family)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": node,
            }
            for p in pods
        ],
    }


def node_obj(topo: Topology) -> dict[str, Any]:
    node = topo.node
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "spec": {"podCIDR": node.pod_cidr(4), "podCIDRs": [node.pod_cidr(4), node.pod_cidr(6)]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ipv4},
                {"type": "InternalIP", "address": node.ipv6},
            ]
        },
    }


def write_objects(path: Path, objs: Sequence[dict[str, Any]]) -> Path:
    """Multi-document YAML made of JSON documents, written atomically (as an editor or a ConfigMap swap would)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"---\n{json.dumps(o)}\n" for o in objs))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ the agent


_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_line(line: str) -> dict[str, str]:
    return {
        k: (v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v[:1] == '"' else v)
        for k, v in _KV.findall(line)
    }


@dataclass
class Agent:
    """One `kproxy run` process in the node namespace; its stderr goes to `log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    def events(self, name: str) -> list[dict[str, str]]:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return [e for e in map(parse_line, lines) if e.get("event") == name]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_event(self, name: str, count: int = 1, timeout: float = SOON) -> list[dict[str, str]]:
        def probe() -> list[dict[str, str]]:
            if not self.alive():
                pytest.fail(f"agent exited {self.proc.returncode} waiting for {name}:\n{self.tail()}")
            return self.events(name)

        return eventually(
            probe, lambda evs: len(evs) >= count, f"{count} x event={name}", timeout=timeout, log=self.log
        )

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, and the exit code once it has gone (killed, and the test failed, if it hangs)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            pytest.fail(f"agent ignored SIGTERM for {timeout:.0f}s:\n{self.tail()}")


@dataclass
class Node:
    """The module's topology plus per-test helpers: start agents and stand-ins, reach the node's ports."""

    topo: Topology
    tmp: Path
    agents: list[Agent] = field(default_factory=list)
    apis: list[ApiServerStandIn] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.topo.node_ns

    @property
    def client(self) -> Host:
        return self.topo.client_hosts[0]

    def pod(self, i: int) -> Host:
        return self.topo.node.pods[i - 1]

    def api(self) -> ApiServerStandIn:
        """A stand-in listening on 127.0.0.1 inside the node namespace, with the Node object in it."""
        api = ApiServerStandIn(bookmark_interval=0.5)
        self.start_api(api)
        self.apis.append(api)
        api.create(node_obj(self.topo))
        return api

    def start_api(self, api: ApiServerStandIn) -> None:
        with entered(self.ns):  # the listening socket, and so every accepted one, lives in the node ns
            api.start()

    def agent(
        self, *args: str, api: ApiServerStandIn | None = None, env: dict[str, str] | None = None
    ) -> Agent:
        argv = [sys.executable, *AGENT_CMD, "run", "--hostname-override", self.topo.node_name]
        if api is not None:
            kubeconfig = api.write_kubeconfig(self.tmp / f"kubeconfig-{api.port}")
            argv += ["--kubeconfig", str(kubeconfig)]
        argv += [
            "--cluster-cidr",
            f"{CLUSTER_CIDR[4]},{CLUSTER_CIDR[6]}",
            "--iptables-backend",
            "nft",
            "--iptables-min-sync-period",
            "100ms",
            "--iptables-sync-period",
            "2s",
            "--healthz-bind-address",
            f"127.0.0.1:{HEALTHZ}",
            "--metrics-bind-address",
            f"127.0.0.1:{METRICS}",
            "--log-level",
            "DEBUG",
            *args,
        ]
        log = self.tmp / f"agent-{len(self.agents)}.log"
        with log.open("ab") as err:
            proc = self.topo.spawn(
                self.ns,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        agent = Agent(proc, log)
        self.agents.append(agent)
        return agent

    def get(self, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
        """HTTP GET to 127.0.0.1:port of the node namespace; (0, reason) when nothing answers."""
        with entered(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except OSError as e:
                return 0, f"{e.__class__.__name__}: {e}"
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        return (int(status_line[1]) if len(status_line) > 1 else 0), body.decode(errors="replace")

    def reset(self) -> None:
        """Stop this test's agents and stand-ins, wipe the node's rules and flows."""
        for agent in self.agents:
            stop_process(agent.proc)
        self.agents.clear()
        with entered(self.ns):
            handover.release()  # a userspace agent's socket keeper
        for api in self.apis:
            api.stop()
        self.apis.clear()
        exec_in(self.ns, ["nft", "flush", "ruleset"], check=False)
        self.topo.flush_conntrack()

    # -------------------------------------------------------------- traffic

    def hit(self, ip: str, port: int, proto: Proto = "tcp") -> Reply:
        return request(self.client.ns, ip, port, proto, timeout=1.0)

    def wait_answer(
        self, ip: str, port: int, pods: set[str], agent: Agent | None, proto: Proto = "tcp"
    ) -> None:
        """Until requests to ip:port have been answered by every pod in `pods` and by no other."""
        seen: set[str] = set()
        wrong: list[str] = []

        def probe() -> tuple[set[str], list[str]]:
            reply = self.hit(ip, port, proto)
            if reply.ok:
                if reply.name in pods:
                    seen.add(reply.name)
                else:
                    wrong.append(reply.name)
                    seen.clear()
            return set(seen), list(wrong)

        eventually(
            probe,
            lambda v: v[0] == pods,
            f"{proto} {ip}:{port} answered by exactly {sorted(pods)}",
            log=agent.log if agent else None,
        )

    def wait_outcome(
        self, ip: str, port: int, outcome: str, agent: Agent | None, proto: Proto = "tcp"
    ) -> Reply:
        return eventually(
            lambda: self.hit(ip, port, proto),
            lambda r: r.outcome == outcome,
            f"{proto} {ip}:{port} -> {outcome}",
            log=agent.log if agent else None,
        )


@pytest.fixture(scope="module")
def module_topology(netns_guard: None) -> Iterator[Topology]:
    with Topology(nodes=1, pods=3, clients=1) as topo:
        topo.start_servers([POD_PORT, POD_PORT + 1])
        yield topo


@pytest.fixture
def node(module_topology: Topology, tmp_path: Path) -> Iterator[Node]:
    n = Node(module_topology, tmp_path)
    n.reset()
    try:
        yield n
    finally:
        n.reset()


@dataclass(frozen=True)
class Scrape:
    types: dict[str, str]
    """Metric family name (as prometheus_client's parser names it) -> type."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(node: Node) -> Scrape:
    status, body = node.get(METRICS, "/metrics")
    assert status == 200, f"/metrics answered {status}: {body[:200]}"
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(body):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(types, samples)


# ------------------------------------------------------------------ kernel state


def normalised_save(ns: str, family: Family) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> its rules in order, policies included; counters and comments dropped."""
    out: dict[tuple[str, str], list[str]] = {}
    binary = "ip6tables-nft-save" if family == 6 else "iptables-nft-save"
    for table in ("filter", "nat"):
        text = exec_in(ns, [binary, "-t", table]).stdout
        for line in text.splitlines():
            if line.startswith(":"):
                name, policy = line[1:].split()[:2]
                out.setdefault((table, name), []).insert(0, f"policy {policy}")
            elif line.startswith("-A "):
                out.setdefault((table, line.split()[1]), []).append(line)
    # built-in chains nobody added a rule to exist on one side only, depending on who touched the table
    return {k: v for k, v in out.items() if k[1].startswith("KUBE-") or len(v) > 1}


def expected_rules(
    topo: Topology, objs: Sequence[dict[str, Any]], tmp: Path, family: Family
) -> dict[tuple[str, str], list[str]]:
    """What `kproxy dry-run` renders for `objs`, loaded into a scratch namespace and saved back by the
    same tools, so both sides of the comparison are formatted by iptables-nft-save."""
    manifest = write_objects(tmp / f"final-v{family}.yaml", objs)
    argv = [sys.executable, "-m", "kproxy", "dry-run", "-f", str(manifest), "--node-name", topo.node_name]
    argv += ["--ip-family", str(family), "--cluster-cidr", f"{CLUSTER_CIDR[4]},{CLUSTER_CIDR[6]}"]
    rendered = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT, timeout=60).stdout
    scratch = f"{PREFIX}{secrets.token_hex(4)}-scratch"
    create_netns(scratch)
    try:
        restore = "ip6tables-nft-restore" if family == 6 else "iptables-nft-restore"
        exec_in(scratch, [restore], input=rendered)
        return normalised_save(scratch, family)
    finally:
        delete_netns(scratch)


def kernel_vs_expected(ns: str, family: Family, want: dict[tuple[str, str], list[str]]) -> str:
    """Every chain whose rules differ between the node's kernel and `want`; empty when none does."""
    got = normalised_save(ns, family)
    lines = []
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            lines.append(f"{key}: kernel {got.get(key)} != expected {want.get(key)}")
    return "\n".join(lines)
