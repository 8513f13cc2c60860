"""Network namespaces for kernel tests: nodes, their pods, outside clients; always torn down.

`Topology(nodes=N, pods=P, clients=C)` builds, entirely inside fresh namespaces (the root
namespace is never touched):

    lan ns         bridge lan0: the LAN every node and client is plugged into
    client-I ns    eth0 192.168.77.(100+I)/24, fd00:77::(64+I)/64, default route via node 1
    node K ns      eth0 192.168.77.K/24, fd00:77::K/64 (the node IP, on the LAN)
                   vpI  10.244.K.1/32, fd00:10:244:K::1/128 (gateway, the same on every pod link)
                   ksvc0 (a veth end standing in for a dummy device): routes service CIDRs, default
                   routes to the other nodes' pod CIDRs via their LAN IPs (like flannel host-gw)
    pod-I ns       eth0 10.244.K.(10+I)/32, fd00:10:244:K::(a+I)/128, default route via gateway

Routed pod links (no bridge) make hairpin traffic simply leave the veth it arrived on, as with
Calico or ptp, so a hairpin test exercises kproxy's masquerade rule and not a bridge setting.
Nodes forward IPv4 and IPv6 and do not rate-limit ICMP errors; DAD is off so addresses work at
once. A packet from a node to a service IP finds a route (via ksvc0), so it reaches nat OUTPUT.

Names are `kpt` + random hex + a role, so concurrent test runs never collide. Everything a
Topology made is removed on exit, also on failure; `cleanup_leftovers` (run at interpreter exit
and by the `netns_guard` fixture) deletes whatever this process created and did not remove.
Podservers exit by themselves when the test process dies (they watch their stdin pipe).

Clients need no process per request: `request` moves the calling thread into the namespace just
long enough to create a socket (`setns(2)` affects only that thread, and a socket stays in the
namespace it was made in), then talks over it from the test process. Threads may do this in
parallel.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

PREFIX = "kpt"
PODSERVER = Path(__file__).with_name("podserver.py")

Family = Literal[4, 6]
Backend = Literal["legacy", "nft"]
Proto = Literal["tcp", "udp"]
Outcome = Literal["ok", "refused", "blocked", "timeout", "unreachable", "reset", "error"]
"""`refused`: RST or ICMP port unreachable; `blocked`: the sender's own netfilter dropped the packet
(EPERM, how a REJECT or DROP in OUTPUT shows up for UDP sent from that namespace)."""

BACKENDS: tuple[Backend, ...] = ("legacy", "nft")
FAMILIES: tuple[Family, ...] = (4, 6)

CLUSTER_CIDR: dict[Family, str] = {4: "10.244.0.0/16", 6: "fd00:10:244::/48"}
SERVICE_CIDR: dict[Family, str] = {4: "10.96.0.0/16", 6: "fd00:10:96::/112"}
LAN_CIDR: dict[Family, str] = {4: "192.168.77.0/24", 6: "fd00:77::/64"}

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_created: set[str] = set()
_procs: list[subprocess.Popen[bytes]] = []


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def restore_command(backend: Backend, family: Family) -> str:
    """The restore binary is chosen explicitly: `iptables-restore` alone could be either backend."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}-restore"


def save_command(backend: Backend, family: Family) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}-save"


# ------------------------------------------------------------------ namespaces


def create_netns(name: str) -> None:
    if not _created:
        atexit.register(cleanup_leftovers)
    run(["ip", "netns", "add", name])
    _created.add(name)


def delete_netns(name: str) -> None:
    run(["ip", "netns", "delete", name], check=False)
    _created.discard(name)


def cleanup_leftovers() -> list[str]:
    """Kill the servers and delete the namespaces this process made and has not removed yet."""
    for proc in list(_procs):
        _stop(proc)
    gone = sorted(n for n in _created if Path("/run/netns", n).exists())
    for name in gone:
        delete_netns(name)
    _created.clear()
    return gone


@pytest.fixture(scope="session")
def netns_guard() -> Iterator[None]:
    """Session-wide safety net; import it into a test module that builds topologies."""
    yield
    cleanup_leftovers()


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread, and only it, inside namespace `name` for the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def sysctl(ns: str, values: dict[str, str]) -> None:
    """Write net.* sysctls of `ns` without a process: /proc/sys/net follows the opener's namespace."""
    with entered(ns):
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value)


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def exec_in(
    ns: str, argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], input=input, check=check)


# --------------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class Reply:
    """What one request got: on "ok", the answering pod and the client host it saw."""

    outcome: Outcome
    name: str = ""
    peer: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name} saw {self.peer}"
        return f"{self.outcome} {self.detail}".strip()


def _parse(data: bytes) -> Reply:
    text = data.decode(errors="replace").strip()
    name, _, hostport = text.partition(" ")
    host = hostport.rsplit(":", 1)[0].strip("[]")
    if not name or not host:
        return Reply("error", detail=f"unexpected reply {text!r}")
    return Reply("ok", name=name, peer=host)


def request(ns: str, ip: str, port: int, proto: Proto = "tcp", timeout: float = 3.0) -> Reply:
    """One TCP connection or UDP datagram from namespace `ns`; failures come back typed, never raised."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with entered(ns):
        sock = socket.socket(family, kind)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            if proto == "udp":
                sock.send(b"?\n")
                return _parse(sock.recv(2048))
            chunks = []
            while chunk := sock.recv(2048):
                chunks.append(chunk)
            return _parse(b"".join(chunks))
        except TimeoutError:
            return Reply("timeout", detail=f"no answer in {timeout}s")
        except ConnectionRefusedError:
            return Reply("refused")
        except ConnectionResetError:
            return Reply("reset")
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return Reply("unreachable", detail=exc.strerror or "")
            if exc.errno in (errno.EPERM, errno.EACCES):
                return Reply("blocked", detail=exc.strerror or "")
            return Reply("error", detail=f"{exc.__class__.__name__}: {exc}")


def sample(
    ns: str,
    ip: str,
    port: int,
    proto: Proto = "tcp",
    *,
    limit: int,
    until: Callable[[list[Reply]], bool] | None = None,
    timeout: float = 3.0,
    stop_on_failure: bool = True,
) -> list[Reply]:
    """Up to `limit` requests, stopping early once `until(replies)` holds or, by default, at the first
    failed one (a broken service then costs one timeout, not `limit` of them)."""
    replies: list[Reply] = []
    for _ in range(limit):
        reply = request(ns, ip, port, proto, timeout)
        replies.append(reply)
        if (stop_on_failure and not reply.ok) or (until is not None and until(replies)):
            break
    return replies


# --------------------------------------------------------------------- servers


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    if proc in _procs:
        _procs.remove(proc)


def start_podservers(
    servers: Sequence[tuple[str, str]], ports: Sequence[int], deadline: float = 15.0
) -> list[subprocess.Popen[bytes]]:
    """Start one podserver per (namespace, name) and wait until each says its sockets listen.

    All start at once and readiness is read from their stdout, so startup costs one
    interpreter launch, not one per pod. A server exits when its stdin (our pipe) closes.
    """
    procs: list[subprocess.Popen[bytes]] = []
    for ns, name in servers:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-S", "-E", str(PODSERVER), "--name", name]
        argv += ["--exit-on-stdin-eof", "--port", *map(str, ports)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _procs.append(proc)
        procs.append(proc)
    end = time.monotonic() + deadline
    for proc in procs:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            err = b""
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read()
            raise NetnsError(f"podserver {proc.args!r} not ready: {line!r} {err.decode(errors='replace')}")
    return procs


# -------------------------------------------------------------------- topology


@dataclass(frozen=True, slots=True)
class Host:
    """A pod or client: its logical name (what a podserver answers), namespace and addresses."""

    name: str
    ns: str
    ipv4: str
    ipv6: str

    def ip(self, family: Family) -> str:
        return self.ipv4 if family == 4 else self.ipv6


@dataclass(frozen=True, slots=True)
class NodeHost:
    """Node `index` (from 1): its Kubernetes name, namespace, LAN address (the node IP) and pods."""

    name: str
    ns: str
    index: int
    pods: tuple[Host, ...]

    @property
    def ipv4(self) -> str:
        return f"192.168.77.{self.index}"

    @property
    def ipv6(self) -> str:
        return f"fd00:77::{self.index:x}"

    def ip(self, family: Family) -> str:
        return self.ipv4 if family == 4 else self.ipv6

    def gateway(self, family: Family) -> str:
        """The node's address on every pod link, and so what a masqueraded packet comes from."""
        return f"10.244.{self.index}.1" if family == 4 else f"fd00:10:244:{self.index:x}::1"

    def pod_cidr(self, family: Family) -> str:
        return f"10.244.{self.index}.0/24" if family == 4 else f"fd00:10:244:{self.index:x}::/64"


_QUIET = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_ROUTER = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv6.conf.default.forwarding": "1",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    # a REJECT's ICMP error must answer every attempt, not one per second per client
    "net.ipv4.icmp_ratelimit": "0",
    "net.ipv6.icmp.ratelimit": "0",
}


@dataclass
class Topology:
    """`nodes` nodes with `pods` routed pods each, and `clients` outside clients, on one LAN.

    Use as a context manager (or through the `topology` fixture); `start_servers` then runs a
    podserver in every pod. Pods are named `pod-I` on a single node, `nK-pod-I` with several.
    Nodes route each other's pod CIDRs over the LAN (like flannel host-gw); clients send
    everything that is not on the LAN (service, external and load-balancer IPs) to node 1.
    """

    nodes: int = 1
    pods: int = 3
    clients: int = 1
    id: str = field(default_factory=lambda: PREFIX + secrets.token_hex(4))
    node_hosts: list[NodeHost] = field(init=False)
    client_hosts: list[Host] = field(init=False)
    lan_ns: str = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 9 or not 0 <= self.pods <= 200 or not 0 <= self.clients <= 100:
            raise ValueError(
                f"unsupported size: {self.nodes} nodes, {self.pods} pods, {self.clients} clients"
            )
        self.lan_ns = f"{self.id}-lan"
        self.node_hosts = []
        for k in range(1, self.nodes + 1):
            prefix = "" if self.nodes == 1 else f"n{k}-"
            ns = f"{self.id}-node" if self.nodes == 1 else f"{self.id}-node{k}"
            pods = tuple(
                Host(
                    f"{prefix}pod-{i}",
                    f"{ns}-pod{i}",
                    f"10.244.{k}.{10 + i}",
                    f"fd00:10:244:{k:x}::{10 + i:x}",
                )
                for i in range(1, self.pods + 1)
            )
            self.node_hosts.append(NodeHost(ns, ns, k, pods))
        self.client_hosts = [
            Host(f"client-{i}", f"{self.id}-cl{i}", f"192.168.77.{100 + i}", f"fd00:77::{100 + i:x}")
            for i in range(1, self.clients + 1)
        ]

    @property
    def node(self) -> NodeHost:
        """Node 1, the one a single-node test renders rules for."""
        return self.node_hosts[0]

    @property
    def node_ns(self) -> str:
        return self.node.ns

    @property
    def node_name(self) -> str:
        """The Kubernetes Node name of node 1 (`--node-name`, and `nodeName` of its endpoints)."""
        return self.node.name

    @property
    def pod_hosts(self) -> list[Host]:
        return [pod for node in self.node_hosts for pod in node.pods]

    @property
    def namespaces(self) -> list[str]:
        hosts = [n.ns for n in self.node_hosts] + [h.ns for h in self.pod_hosts + self.client_hosts]
        return [self.lan_ns, *hosts]

    def pod(self, name: str) -> Host:
        return next(h for h in self.pod_hosts if h.name == name)

    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        for ns in self.namespaces:
            create_netns(ns)
            sysctl(ns, _QUIET)
        lan = ["link set lo up", "link add lan0 type bridge mcast_snooping 0", "link set lan0 up"]
        for peer, ns in [(f"n{n.index}", n.ns) for n in self.node_hosts] + [
            (f"c{i}", c.ns) for i, c in enumerate(self.client_hosts, 1)
        ]:
            lan += [f"link add {peer} type veth peer name eth0 netns {ns}", f"link set {peer} master lan0"]
            lan.append(f"link set {peer} up")
        ip_batch(self.lan_ns, lan)
        for node in self.node_hosts:
            sysctl(node.ns, _ROUTER)
            ip_batch(node.ns, self._node_commands(node))
            for pod in node.pods:
                ip_batch(
                    pod.ns,
                    [
                        "link set lo up",
                        f"addr add {pod.ipv4}/32 dev eth0",
                        f"addr add {pod.ipv6}/128 dev eth0 nodad",
                        "link set eth0 up",
                        f"route add {node.gateway(4)}/32 dev eth0",
                        f"route add default via {node.gateway(4)} dev eth0",
                        f"route add {node.gateway(6)}/128 dev eth0",
                        f"route add default via {node.gateway(6)} dev eth0",
                    ],
                )
        for client in self.client_hosts:
            ip_batch(
                client.ns,
                [
                    "link set lo up",
                    f"addr add {client.ipv4}/24 dev eth0",
                    f"addr add {client.ipv6}/64 dev eth0 nodad",
                    "link set eth0 up",
                    f"route add default via {self.node.ipv4}",
                    f"route add default via {self.node.ipv6}",
                ],
            )

    def _node_commands(self, node: NodeHost) -> list[str]:
        cmds = [
            "link set lo up",
            f"addr add {node.ipv4}/24 dev eth0",
            f"addr add {node.ipv6}/64 dev eth0 nodad",
            "link set eth0 up",
            # ksvc0 stands in for a dummy device (not built into this kernel): a route for
            # service IPs, so the node's own packets to them reach nat OUTPUT
            "link add ksvc0 type veth peer name ksvc1",
            "link set ksvc1 up",
            "link set ksvc0 up",
            f"route add {SERVICE_CIDR[4]} dev ksvc0",
            f"route add {SERVICE_CIDR[6]} dev ksvc0",
            "route add default dev ksvc0",
            "route add ::/0 dev ksvc0",
        ]
        for other in self.node_hosts:
            if other is not node:
                cmds.append(f"route add {other.pod_cidr(4)} via {other.ipv4}")
                cmds.append(f"route add {other.pod_cidr(6)} via {other.ipv6}")
        for i, pod in enumerate(node.pods, 1):
            cmds += [
                f"link add vp{i} type veth peer name eth0 netns {pod.ns}",
                f"addr add {node.gateway(4)}/32 dev vp{i}",
                f"addr add {node.gateway(6)}/128 dev vp{i} nodad",
                f"link set vp{i} up",
                f"route add {pod.ipv4}/32 dev vp{i}",
                f"route add {pod.ipv6}/128 dev vp{i}",
            ]
        return cmds

    def start_servers(self, ports: Sequence[int]) -> None:
        """A podserver in every pod, answering TCP and UDP on `ports` with the pod's name."""
        self._procs += start_podservers([(p.ns, p.name) for p in self.pod_hosts], ports)

    def spawn(self, ns: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Run `argv` in namespace `ns` (e.g. an agent on a node); it is stopped on close."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen)
        _procs.append(proc)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for ns in self.namespaces:
            if ns in _created:
                delete_netns(ns)

    # ---------------------------------------------------------------- rules

    def load_rules(
        self, text: str, backend: Backend, family: Family, *, node: NodeHost | None = None, test: bool = False
    ) -> None:
        """Feed iptables-restore input to a node (default node 1) through the chosen backend and family."""
        argv = [restore_command(backend, family)] + (["--test"] if test else [])
        exec_in((node or self.node).ns, argv, input=text)

    def save_rules(self, backend: Backend, family: Family, *, node: NodeHost | None = None) -> str:
        return exec_in((node or self.node).ns, [save_command(backend, family)]).stdout

    def flush_conntrack(self, *, node: NodeHost | None = None) -> None:
        exec_in((node or self.node).ns, ["conntrack", "-F"], check=False)


@pytest.fixture
def topology(netns_guard: None) -> Iterator[Topology]:
    """A fresh single-node Topology (three pods, one client) per test."""
    with Topology() as topo:
        yield topo
