"""Userspace proxy benchmark: the same namespaces and the same load for every contender.

    sudo .venv/bin/python bench/userspace_bench.py            # full run (~3 min)
    sudo .venv/bin/python bench/userspace_bench.py --quick    # smoke run (~1 min)

Topology (all fresh namespaces, removed at exit even on failure):

    client 10.77.1.2 --veth-- 10.77.1.1 node 10.77.2.1 --veth-- 10.77.2.2 pod1 (nginx, iperf3 -s, udp echo)
                                            10.77.3.1 --veth-- 10.77.3.2 pod2 (nginx, udp echo)

Contenders: `direct` (client to pod1, routed through the node), `dnat` (kernel DNAT in the
node, iptables rules shaped as kproxy's iptables mode writes them, statistic over both
pods), `haproxy` (Debian's HAProxy, one thread, TCP mode, round robin), `kproxy` (the
userspace proxier in the node namespace on uvloop). Cases: HTTP keep-alive (wrk -t1 -c50),
a new connection per request (wrk with `Connection: close`), bulk TCP (iperf3, one stream,
to pod1 only since iperf3's control and data connections must meet the same server), UDP
request/response (a bounded client with 16 sockets, one datagram in flight each).
HAProxy has no UDP proxying, so its UDP cell is empty.

Needs: apt-get install -y nginx wrk haproxy iperf3; matplotlib in the venv for the chart.
Writes bench/results/userspace-<time>.{json,md,png} and copies the Markdown and the chart to
bench/RESULTS-userspace.md and bench/RESULTS-userspace.png (committed; bench/results/ is not).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VIP = "10.96.77.10"
NODE_IP = "10.77.1.1"
CLIENT_IP = "10.77.1.2"
PODS = ("10.77.2.2", "10.77.3.2")
HTTP_PORT, IPERF_PORT, UDP_PORT = 80, 5201, 9000
CONTENDERS = ("direct", "dnat", "haproxy", "kproxy")
VARIANTS = {"kproxy": [], "kproxy-copy": ["--no-splice"], "kproxy-protocol": ["--engine", "protocol"]}
"""kproxy: the default raw-socket engine (copies through one buffer, splice(2) once a direction is bulk);
-copy: the same engine never splicing; -protocol: the uvloop Protocol/transport engine."""
CASES = ("keepalive", "close", "bulk", "udp")

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
r, w = s.recvfrom, s.sendto
while True:
    d, a = r(2048)
    w(d, a)
"""

UDP_CLIENT = r"""
import json, selectors, socket, sys, time
host, port, dur, nsock = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
sel = selectors.EpollSelector()
socks, sent = [], {}
for i in range(nsock):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect((host, port))
    sel.register(s, selectors.EVENT_READ)
    socks.append(s)
lat, lost = [], 0
payload = b"x" * 64
now = time.perf_counter
end = now() + dur
for s in socks:
    s.send(payload); sent[s] = now()
while True:
    t = now()
    if t >= end:
        break
    ev = sel.select(0.2)
    t = now()
    if not ev:
        for s in socks:
            if t - sent[s] > 0.2:
                lost += 1; s.send(payload); sent[s] = t
        continue
    for key, _ in ev:
        s = key.fileobj
        try:
            while True:
                s.recv(2048)
                lat.append(t - sent[s])
        except BlockingIOError:
            pass
        s.send(payload); sent[s] = now()
lat.sort()
n = len(lat)
q = lambda p: lat[min(n - 1, int(p * n))] * 1000 if n else None
print(json.dumps({"rate": n / dur, "p50_ms": q(0.5), "p99_ms": q(0.99), "lost": lost}))
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}.err warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {dir}/cb-{name};
  proxy_temp_path {dir}/px-{name};
  fastcgi_temp_path {dir}/fc-{name};
  uwsgi_temp_path {dir}/uw-{name};
  scgi_temp_path {dir}/sc-{name};
  server {{
    listen {port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

HAPROXY_CONF = """
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind {node}:8080
  default_backend web
backend web
  balance roundrobin
  server p1 {p1}:{http}
  server p2 {p2}:{http}
frontend bulk
  bind {node}:{iperf}
  default_backend bulk
backend bulk
  server p1 {p1}:{iperf}
"""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = "usb" + secrets.token_hex(3)
        self.ns = {"client": f"{tag}-cl", "node": f"{tag}-node", "p1": f"{tag}-p1", "p2": f"{tag}-p2"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="kproxy-usbench-"))
        self.created: list[str] = []
        self.proxy_pid = 0

    # ------------------------------------------------------------- plumbing

    def sh(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60) -> str:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()[:500]}")
        return res.stdout

    def nsx(self, ns: str, argv: Sequence[str], **kw: Any) -> str:
        return self.sh(["ip", "netns", "exec", self.ns[ns], *argv], **kw)

    def spawn(self, ns: str, argv: Sequence[str], *, ready: str | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[ns], *argv],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(p)
        if ready is not None:
            assert p.stdout is not None
            line = p.stdout.readline().decode()
            if ready not in line:
                raise RuntimeError(
                    f"{argv[0]} in {ns} did not start: {line!r} {p.stderr.read(2000) if p.stderr else ''!r}"
                )
            self._last_line = line
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()
        if p in self.procs:
            self.procs.remove(p)

    def wait_port(self, ns: str, ip: str, port: int, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            res = subprocess.run(
                ["ip", "netns", "exec", self.ns[ns], "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}"],
                capture_output=True,
                timeout=5,
            )
            if res.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{ip}:{port} not reachable from {ns}")

    # ------------------------------------------------------------- topology

    def build(self) -> None:
        for ns in self.ns.values():
            self.sh(["ip", "netns", "add", ns])
            self.created.append(ns)
        n, c, p1, p2 = (self.ns[k] for k in ("node", "client", "p1", "p2"))
        batch = [
            f"link add veth-cl netns {n} type veth peer name eth0 netns {c}",
            f"link add veth-p1 netns {n} type veth peer name eth0 netns {p1}",
            f"link add veth-p2 netns {n} type veth peer name eth0 netns {p2}",
        ]
        self.sh(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        self.sh(
            ["ip", "-n", n, "-batch", "-"],
            input="\n".join(
                [
                    "link set lo up",
                    f"addr add {NODE_IP}/24 dev veth-cl",
                    "addr add 10.77.2.1/24 dev veth-p1",
                    "addr add 10.77.3.1/24 dev veth-p2",
                    "link set veth-cl up",
                    "link set veth-p1 up",
                    "link set veth-p2 up",
                ]
            )
            + "\n",
        )
        for key, ip, gw in (
            ("client", CLIENT_IP, NODE_IP),
            ("p1", PODS[0], "10.77.2.1"),
            ("p2", PODS[1], "10.77.3.1"),
        ):
            self.sh(
                ["ip", "-n", self.ns[key], "-batch", "-"],
                input=f"link set lo up\naddr add {ip}/24 dev eth0\nlink set eth0 up\nroute add default via {gw}\n",
            )
        common = {
            "net.core.somaxconn": "8192",
            "net.ipv4.tcp_max_syn_backlog": "8192",
            "net.ipv4.ip_local_port_range": "1024 65000",
            "net.ipv4.tcp_tw_reuse": "1",
        }
        for key in self.ns:
            vals = dict(common)
            if key == "node":
                vals["net.ipv4.ip_forward"] = "1"
            args = [f"{k}={v}" for k, v in vals.items()]
            self.nsx(key, ["sysctl", "-q", "-w", *args])

    def start_pods(self) -> None:
        for key, ip in (("p1", PODS[0]), ("p2", PODS[1])):
            conf = self.tmp / f"nginx-{key}.conf"
            conf.write_text(NGINX_CONF.format(dir=self.tmp, name=key, port=HTTP_PORT))
            self.spawn(key, ["nginx", "-c", str(conf), "-e", str(self.tmp / f"nginx-{key}.early")])
            self.spawn(key, [sys.executable, "-S", "-c", UDP_ECHO, str(UDP_PORT)], ready="ready")
            self.wait_port("node", ip, HTTP_PORT)
        self.spawn("p1", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        self.wait_port("node", PODS[0], IPERF_PORT)

    # ------------------------------------------------------------ contenders

    @contextlib.contextmanager
    def contender(self, name: str) -> Iterator[dict[str, tuple[str, int]]]:
        """Set a contender up; yield the (ip, port) clients use for each case; tear it down."""
        if name == "direct":
            yield {"http": (PODS[0], HTTP_PORT), "bulk": (PODS[0], IPERF_PORT), "udp": (PODS[0], UDP_PORT)}
        elif name == "dnat":
            self.nsx("node", ["iptables-nft-restore"], input=dnat_rules())
            try:
                yield {"http": (VIP, HTTP_PORT), "bulk": (VIP, IPERF_PORT), "udp": (VIP, UDP_PORT)}
            finally:
                self.nsx("node", ["iptables-nft-restore"], input="*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
                self.nsx("node", ["conntrack", "-F"])
        elif name == "haproxy":
            conf = self.tmp / "haproxy.cfg"
            conf.write_text(
                HAPROXY_CONF.format(node=NODE_IP, p1=PODS[0], p2=PODS[1], http=HTTP_PORT, iperf=IPERF_PORT)
            )
            p = self.spawn("node", ["haproxy", "-f", str(conf), "-db"])
            self.proxy_pid = p.pid
            try:
                try:
                    self.wait_port("client", NODE_IP, 8080)
                except RuntimeError:
                    err = p.stderr.read(4000) if p.poll() is not None and p.stderr else b""
                    raise RuntimeError(f"haproxy did not start: {err.decode(errors='replace')}") from None
                yield {"http": (NODE_IP, 8080), "bulk": (NODE_IP, IPERF_PORT)}
            finally:
                self.stop(p)
        elif name in VARIANTS:
            argv = [
                sys.executable,
                "-m",
                "bench.userspace_server",
                "--bind",
                NODE_IP,
                "--exit-on-stdin-eof",
                "--service",
                f"web/TCP={PODS[0]}:{HTTP_PORT},{PODS[1]}:{HTTP_PORT}",
                "--service",
                f"bulk/TCP={PODS[0]}:{IPERF_PORT}",
                "--service",
                f"echo/UDP={PODS[0]}:{UDP_PORT},{PODS[1]}:{UDP_PORT}",
                *VARIANTS[name],
            ]
            p = self.spawn("node", argv, ready="{")
            ports = json.loads(self._last_line)
            self.proxy_pid = p.pid
            try:
                yield {
                    "http": (NODE_IP, ports["web/TCP"]),
                    "bulk": (NODE_IP, ports["bulk/TCP"]),
                    "udp": (NODE_IP, ports["echo/UDP"]),
                }
            finally:
                self.stop(p)
        else:
            raise ValueError(name)

    # ----------------------------------------------------------------- cases

    def wrk(self, ip: str, port: int, close: bool) -> dict[str, float | None]:
        d = self.args.duration
        argv = ["wrk", "-t1", "-c50", f"-d{d}s", "--latency", "--timeout", "2s"]
        if close:
            argv += ["-H", "Connection: close"]
        out = self.nsx("client", [*argv, f"http://{ip}:{port}/"], timeout=d + 30)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Socket errors: (.*)", out)
        return {
            "rate": rps,
            "p50_ms": _ms(re.search(r"\s50%\s+([\d.]+\w+)", out)),
            "p99_ms": _ms(re.search(r"\s99%\s+([\d.]+\w+)", out)),
            "errors": errors.group(1).strip() if errors else "",  # type: ignore[dict-item]
        }

    def bulk(self, ip: str, port: int) -> dict[str, float | None]:
        d = self.args.duration
        out = self.nsx("client", ["iperf3", "-c", ip, "-p", str(port), "-t", str(d), "-J"], timeout=d + 30)
        res = json.loads(out)
        return {"gbps": res["end"]["sum_received"]["bits_per_second"] / 1e9}

    def udp(self, ip: str, port: int) -> dict[str, float | None]:
        d = self.args.duration
        out = self.nsx(
            "client", [sys.executable, "-S", "-c", UDP_CLIENT, ip, str(port), str(d), "16"], timeout=d + 30
        )
        return dict(json.loads(out))

    def run_case(self, case: str, t: dict[str, tuple[str, int]]) -> dict[str, Any] | None:
        if case in ("keepalive", "close"):
            return self.wrk(*t["http"], close=case == "close")
        if case == "bulk":
            return self.bulk(*t["bulk"])
        if case == "udp" and "udp" in t:
            return self.udp(*t["udp"])
        return None

    # ---------------------------------------------------------------- driver

    def run(self) -> dict[str, Any]:
        self.build()
        self.start_pods()
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(self.args.rounds):
            order = list(self.args.contenders)
            if r % 2:
                order.reverse()
            got: dict[str, dict[str, Any]] = {}
            for name in order:
                self.proxy_pid = 0
                with self.contender(name) as targets:
                    got[name] = {}
                    for case in self.args.cases:
                        cpu0 = _cpu_seconds(self.proxy_pid)
                        res = self.run_case(case, targets)
                        cpu = _cpu_seconds(self.proxy_pid) - cpu0
                        if res is not None:
                            if self.proxy_pid:
                                res["proxy_cpu_s"] = cpu
                                work = res.get("rate", 0.0) * self.args.duration
                                if work:
                                    res["proxy_cpu_us_per_req"] = cpu / work * 1e6
                                if res.get("gbps"):
                                    res["proxy_cpu_s_per_gb"] = cpu / (res["gbps"] * self.args.duration / 8)
                            got[name][case] = res
                        print(f"round {r + 1} {name:8s} {case:9s} {_short(res)}", file=sys.stderr, flush=True)
                        if case == "close":
                            time.sleep(1.0)  # let TIME_WAIT settle between contenders
            rounds.append(got)
        return {"rounds": rounds, "median": _median(rounds)}

    def cleanup(self) -> None:
        for p in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        for ns in self.created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        self.created.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (the proxy), to compare CPU cost per request, which is less noisy than rates."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnat_rules() -> str:
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    rules = ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    for svc, proto, port, pods in (
        ("WEB", "tcp", HTTP_PORT, PODS),
        ("BULK", "tcp", IPERF_PORT, PODS[:1]),
        ("ECHO", "udp", UDP_PORT, PODS),
    ):
        chain = f"KUBE-SVC-{svc}"
        lines.append(f":{chain} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {VIP}/32 -p {proto} -m {proto} --dport {port} -j {chain}")
        for i, pod in enumerate(pods):
            sep = f"KUBE-SEP-{svc}{i}"
            lines.append(f":{sep} - [0:0]")
            left = len(pods) - i
            prob = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f"-A {chain} {prob}-j {sep}")
            rules.append(f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {pod}:{port}")
    return "\n".join([*lines, *rules, "COMMIT", ""])


def _ms(m: re.Match[str] | None) -> float | None:
    if m is None:
        return None
    v = m.group(1)
    num = float(re.match(r"[\d.]+", v).group(0))  # type: ignore[union-attr]
    unit = v[len(re.match(r"[\d.]+", v).group(0)) :]  # type: ignore[union-attr]
    return num * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}.get(unit, 1.0)


def _short(res: dict[str, Any] | None) -> str:
    if res is None:
        return "n/a"
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())


def _median(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in rounds[0]:
        out[name] = {}
        for case in rounds[0][name]:
            keys = [k for k, v in rounds[0][name][case].items() if isinstance(v, (int, float))]
            out[name][case] = {
                k: statistics.median(r[name][case][k] for r in rounds if r[name][case].get(k) is not None)
                for k in keys
                if any(r[name][case].get(k) is not None for r in rounds)
            }
    return out


NOTES = """## How to read this

- Same namespaces, same load, same run for every contender: client ns -> node ns -> two pod ns
  (nginx 1 worker each, iperf3 server in pod 1, a Python UDP echo in each pod). wrk -t1 -c50,
  iperf3 one stream (to pod 1 only: its control and data connections must meet), UDP: 16
  client sockets, one 64-byte datagram in flight each. HAProxy has no UDP proxying.
- `kproxy` is the default engine (raw sockets, own edge-triggered epoll set, splice(2) once a
  direction is bulk); `kproxy-copy` never splices; `kproxy-protocol` is the uvloop
  Protocol/transport engine. `dnat` is kernel NAT with kproxy's iptables-mode rule shapes.
- The machine is 2 shared vCPUs with other work running: absolute numbers move a lot between
  runs, ratios within one run much less, and the proxy's CPU per request (from
  /proc/PID/stat around each case) least of all.
"""

METRIC = {
    "keepalive": ("rate", "req/s"),
    "close": ("rate", "conn/s"),
    "bulk": ("gbps", "Gbit/s"),
    "udp": ("rate", "req/s"),
}


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    med = result["median"]
    names = list(med)
    lines = [
        "# Userspace proxy benchmark",
        "",
        f"{meta['when']} · {meta['cpus']} CPUs (shared) · duration {meta['duration']} s · rounds {meta['rounds']} (median) · "
        f"`{meta['command']}`",
        "",
        "| case | " + " | ".join(names) + " | kproxy / haproxy |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for case in CASES:
        key, unit = METRIC[case]
        cells = []
        for n in names:
            r = med[n].get(case)
            if not r:
                cells.append("–")
                continue
            cell = f"{r[key]:,.2f}" if key == "gbps" else f"{r[key]:,.0f}"
            if "p50_ms" in r:
                cell += f" (p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms)"
            cells.append(cell)
        ratio = _ratio(med, case, key)
        lines.append(f"| {case} {unit} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "Proxy CPU (user+sys of the proxy process) per request, µs; for bulk, CPU seconds per GB:",
        "",
    ]
    proxies = [n for n in names if n not in ("direct", "dnat")]
    lines += ["| case | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for case in CASES:
        cells = []
        for n in names:
            if n not in proxies:
                continue
            r = med[n].get(case) or {}
            v = r.get("proxy_cpu_s_per_gb") if case == "bulk" else r.get("proxy_cpu_us_per_req")
            cells.append(f"{v:.2f}" if v is not None else "–")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (printed, not asserted)", ""]
    lines += [f"- {t}" for t in targets(med)]
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def _ratio(med: dict[str, Any], case: str, key: str) -> str:
    try:
        return f"{med['kproxy'][case][key] / med['haproxy'][case][key]:.2f}x"
    except (KeyError, ZeroDivisionError):
        return "–"


def targets(med: dict[str, Any]) -> list[str]:
    out = []
    for case, key, want in (("keepalive", "rate", 1.0), ("bulk", "gbps", 1.0), ("close", "rate", 0.8)):
        try:
            r = med["kproxy"][case][key] / med["haproxy"][case][key]
            out.append(
                f"{case}: kproxy/haproxy = {r:.2f}x (target >= {want}x) {'MET' if r >= want else 'MISSED'}"
            )
        except (KeyError, ZeroDivisionError):
            out.append(f"{case}: not measured")
    try:
        r = med["kproxy"]["keepalive"]["p99_ms"] / med["haproxy"]["keepalive"]["p99_ms"]
        out.append(
            f"keep-alive p99 at 50 connections: kproxy/haproxy = {r:.2f}x (target <= 2x) {'MET' if r <= 2 else 'MISSED'}"
        )
    except (KeyError, ZeroDivisionError):
        out.append("keep-alive p99: not measured")
    return out


def chart(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return False
    med = result["median"]
    names = list(med)
    fig, axes = plt.subplots(1, len(CASES), figsize=(4.2 * len(CASES), 4.0))
    for ax, case in zip(axes, CASES, strict=True):
        key, unit = METRIC[case]
        vals = [med[n].get(case, {}).get(key, 0.0) for n in names]
        palette = ["#999999", "#4c72b0", "#dd8452", "#55a868", "#8fd19e", "#c44e52"]
        bars = ax.bar(names, vals, color=palette[: len(names)])
        ax.set_title(f"{case} ({unit})")
        ax.tick_params(axis="x", labelrotation=30)
        for b, v in zip(bars, vals, strict=True):
            if v:
                label = f"{v:.2f}" if key == "gbps" else f"{v / 1000:.1f}k"
                ax.annotate(label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle("kproxy userspace vs kernel DNAT and HAProxy (same namespaces, same load)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per case, one round")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=[*CONTENDERS, *VARIANTS])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--no-copy", action="store_true", help="do not update bench/RESULTS-userspace.md")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rounds = 2, 1
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk", "haproxy", "iperf3", "iptables-nft-restore", "conntrack"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install -y nginx wrk haproxy iperf3", file=sys.stderr)
            return 2
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = bench.run()
    finally:
        bench.cleanup()
    meta = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "duration": args.duration,
        "rounds": args.rounds,
        "command": "python bench/userspace_bench.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    base = RESULTS / f"userspace-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    md = markdown(result, meta)
    charted = chart(result, base.with_suffix(".png"))
    # Each Markdown file points at a chart beside it: bench/results/ is not committed, so the
    # committed RESULTS-userspace.md gets its own copy of the chart.
    base.with_suffix(".md").write_text(md + (f"\n![chart]({base.name}.png)\n" if charted else ""))
    if not args.no_copy:
        committed = ROOT / "bench" / "RESULTS-userspace.png"
        if charted:
            shutil.copyfile(base.with_suffix(".png"), committed)
        else:
            committed.unlink(missing_ok=True)
        (ROOT / "bench" / "RESULTS-userspace.md").write_text(
            md + (f"\n![chart]({committed.name})\n" if charted else "")
        )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
