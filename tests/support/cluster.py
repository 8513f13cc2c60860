"""Pieces for multi-process agent tests: an API server every node can reach, `kproxy run` in a
node namespace, in-process echo pods, and bounded background load that records every failure.

Everything that listens or connects is a socket the test process creates inside a namespace
(see `tests.support.netns.entered`): no process per pod or per client, so a test that runs three agents
and a dozen connections still starts only the agents. Agents are stopped, and sockets closed,
when their owner closes, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.apiserver_standin import ApiServerStandIn
from tests.support.netns import NodeHost, Proto, Reply, Topology, entered, ip_batch, request

API_IP = "192.168.77.254"
"""The stand-in's address: on the LAN bridge itself, so every node reaches it directly."""

SYNCED = re.compile(rb"event=synced\b")


# ------------------------------------------------------------------ API server


@contextlib.contextmanager
def lan_apiserver(topo: Topology) -> Iterator[ApiServerStandIn]:
    """An ApiServerStandIn listening on API_IP:port inside the topology's LAN namespace.

    The listening socket is made inside that namespace and served by a thread of this
    process; `restart_in_lan` brings it back on the same port after `stop()`."""
    ip_batch(topo.lan_ns, [f"addr add {API_IP}/24 dev lan0"])
    api = ApiServerStandIn(host=API_IP, bookmark_interval=5.0)
    with entered(topo.lan_ns):
        api.start()
    try:
        yield api
    finally:
        api.stop()


def restart_in_lan(topo: Topology, api: ApiServerStandIn) -> None:
    with entered(topo.lan_ns):
        api.start()


# ------------------------------------------------------------------ agents


@dataclass
class Agent:
    """One `kproxy run` on one node; each start writes a fresh log file (run-1.log, run-2.log...)."""

    topo: Topology
    node: NodeHost
    args: Sequence[str]
    logdir: Path
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    log: Path = field(init=False, default=Path("/nonexistent"))

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.log = self.logdir / f"{self.node.name}-run-{self.runs}.log"
        with self.log.open("wb") as err:
            argv = [sys.executable, "-m", "kproxy", "run", *self.args]
            self.proc = self.topo.spawn(
                self.node.ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def synced(self) -> int:
        return len(SYNCED.findall(self.log.read_bytes())) if self.log.exists() else 0

    def wait_synced(self, count: int = 1, timeout: float = 30.0) -> None:
        """Until this run has logged `count` completed syncs; fails with the log if it exits first."""
        deadline = time.monotonic() + timeout
        while self.synced() < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"kproxy on {self.node.name} exited {self.proc.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"kproxy on {self.node.name} did not sync in {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: kproxy leaves its rules in place when it exits."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"kproxy on {self.node.name} ignored SIGTERM:\n{self.tail()}") from None

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def agent_args(
    node_name: str,
    *,
    master: str = "",
    manifests: str = "",
    backend: str = "nft",
    families: str = "4,6",
    extra: Sequence[str] = (),
) -> list[str]:
    """`kproxy run` flags as the DaemonSet would pass them, with fast syncs for tests."""
    source = ["--master", master] if master else ["--manifests", manifests]
    return [
        *source,
        "--hostname-override",
        node_name,
        "--cluster-cidr",
        "10.244.0.0/16,fd00:10:244::/48",
        "--iptables-backend",
        backend,
        "--ip-families",
        families,
        "--iptables-min-sync-period",
        "100ms",
        "--iptables-sync-period",
        "5s",
        "--healthz-bind-address",
        "0.0.0.0:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
        *extra,
    ]


# ------------------------------------------------------------------ echo pods


class EchoPods:
    """In-process TCP servers inside pod namespaces: on accept, one line `NAME HOST:PORT`
    (as the podserver answers), then every chunk received is sent back. For long-lived
    connections, which the one-shot podserver cannot hold."""

    def __init__(self, pods: Sequence[tuple[str, str]], port: int) -> None:
        self._sel = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()
        for ns, name in pods:
            with entered(ns):
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(64)
            sock.setblocking(False)
            self._listeners.append(sock)
            self._sel.register(sock, selectors.EVENT_READ, name)
        self._thread = threading.Thread(target=self._serve, name="echo-pods", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock in self._listeners:
                    with contextlib.suppress(OSError):
                        conn, addr = sock.accept()
                        host = addr[0].removeprefix("::ffff:")
                        conn.sendall(f"{key.data} {host}:{addr[1]}\n".encode())
                        conn.setblocking(False)
                        self._sel.register(conn, selectors.EVENT_READ, key.data)
                    continue
                try:
                    data = sock.recv(4096)
                    if data:
                        sock.setblocking(True)
                        sock.settimeout(2.0)
                        sock.sendall(data)
                        sock.setblocking(False)
                        continue
                except OSError:
                    pass
                self._sel.unregister(sock)
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._sel.close()

    def __enter__(self) -> EchoPods:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ load


@dataclass
class Stream:
    """One long-lived TCP connection through a service, exchanging a line every `interval`."""

    ns: str
    ip: str
    port: int
    interval: float = 0.1
    pod: str = ""
    peer: str = ""
    exchanges: int = 0
    error: str = ""
    sock: socket.socket | None = None

    def open(self) -> None:
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        with entered(self.ns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(3.0)
        sock.connect((self.ip, self.port))
        hello = _readline(sock)
        self.pod, _, hostport = hello.partition(" ")
        self.peer = hostport.rsplit(":", 1)[0]
        self.sock = sock

    def run(self, stop: threading.Event, limit: int) -> None:
        assert self.sock is not None
        try:
            while not stop.is_set() and self.exchanges < limit:
                line = f"ping {self.exchanges}\n"
                self.sock.sendall(line.encode())
                got = _readline(self.sock)
                if got != line.strip():
                    self.error = f"exchange {self.exchanges}: sent {line.strip()!r}, got {got!r}"
                    return
                self.exchanges += 1
                stop.wait(self.interval)
        except OSError as exc:
            self.error = f"exchange {self.exchanges}: {exc.__class__.__name__}: {exc}"
        finally:
            self.sock.close()


def _readline(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError(f"closed after {buf!r}")
        buf += chunk
    return buf.decode().strip()


@dataclass
class Prober:
    """A loop of new connections (or datagrams) from `ns` to ip:port; keeps every reply."""

    ns: str
    ip: str
    port: int
    proto: Proto = "tcp"
    interval: float = 0.02
    replies: list[Reply] = field(default_factory=list)

    def run(self, stop: threading.Event, limit: int) -> None:
        while not stop.is_set() and len(self.replies) < limit:
            self.replies.append(request(self.ns, self.ip, self.port, self.proto, timeout=3.0))
            stop.wait(self.interval)

    @property
    def failures(self) -> list[str]:
        return [
            f"{self.ns} -> {self.ip}:{self.port} #{i}: {r}" for i, r in enumerate(self.replies) if not r.ok
        ]


class Load:
    """Probers and streams in threads until `stop()` (or their count limits); bounded either way."""

    def __init__(self, probers: Sequence[Prober], streams: Sequence[Stream], *, limit: int = 5000) -> None:
        self.probers = list(probers)
        self.streams = list(streams)
        self._stop = threading.Event()
        for s in self.streams:
            s.open()
        workers: list[Prober | Stream] = [*self.probers, *self.streams]
        self._threads = [
            threading.Thread(target=w.run, args=(self._stop, limit), daemon=True, name=f"load-{i}")
            for i, w in enumerate(workers)
        ]
        for t in self._threads:
            t.start()

    def progress(self) -> tuple[int, int]:
        """New connections made so far, exchanges on long-lived ones so far."""
        return sum(len(p.replies) for p in self.probers), sum(s.exchanges for s in self.streams)

    def wait_progress(self, connections: int, exchanges: int, timeout: float = 20.0) -> None:
        """Until at least this many more of each have happened (proof that load runs right now)."""
        c0, e0 = self.progress()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c, e = self.progress()
            if c - c0 >= connections and e - e0 >= exchanges:
                return
            if self.failures():
                return
            time.sleep(0.05)
        raise AssertionError(f"load stalled: {self.progress()} from {(c0, e0)}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def failures(self) -> list[str]:
        out = [f for p in self.probers for f in p.failures]
        out += [f"stream {s.ns} -> {s.ip}:{s.port} ({s.pod}): {s.error}" for s in self.streams if s.error]
        return out

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ HTTP from a namespace


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: dict[str, object]


def http_get(ns: str, ip: str, port: int, path: str = "/", timeout: float = 3.0) -> HttpReply:
    """One GET from inside namespace `ns`; the body is parsed as JSON when it is JSON."""
    with entered(ns):
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {"text": body.decode(errors="replace")}
    return HttpReply(status, parsed if isinstance(parsed, dict) else {"value": parsed})
