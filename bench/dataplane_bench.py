"""Data plane: new connections per second through a service, at 10 and at 10,000 services.

    .venv/bin/python -m bench.dataplane_bench                  # 10 and 10,000 services, 3 rounds
    .venv/bin/python -m bench.dataplane_bench --quick          # 10 and 1,000 services, 1 round

What a user of a big cluster feels: every new connection to a service is matched against
the node's rules before conntrack takes over. iptables mode walks KUBE-SERVICES rule by rule
(one rule per service address), so the cost of a new connection grows with the number of
services; nftables mode looks the destination up in one verdict map.

Per cell (mode, size) a fresh lab of namespaces (created here, deleted at exit even on failure):

    client 192.168.91.2 --veth-- 192.168.91.1 node 10.244.0.1 --veth-- pod 10.244.0.10..19 (nginx :80)

The node's rules are what kproxy's own sync engine writes for `size` services x 10 endpoints
(written by a worker process inside the node namespace: nftables mode through libnftables,
iptables mode through iptables-nft-restore or iptables-legacy-restore). The measured service
is one of them, `ns50/svc-target` (about the middle of KUBE-SERVICES in name order), whose
10 endpoints are the pod's 10 addresses; every other service's endpoints are addresses no
packet reaches. The client sits outside the cluster CIDR, so its connections are masqueraded
as a node port or external client's would be.

Load: wrk in the client namespace, one thread, 50 connections, `Connection: close` (one
HTTP request per TCP connection), --duration seconds per measurement, bounded by wrk's own
timeout. `direct` (the client to one pod address, routed through the node with no service
rules) is measured in every round as the ceiling. Rounds alternate the order of the cells;
the table gives the median of the rounds. Ratios: each mode at the large size against the
same mode at 10 services, and against direct.

Needs: apt-get install -y nginx wrk; matplotlib (the `bench` extra) for the chart. Writes
bench/results/dataplane-<time>.{json,md,png}, copied to bench/RESULTS-dataplane.{md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODES = ("nftables", "iptables-nft", "iptables-legacy")
CLIENT_IP, NODE_LAN_IP, NODE_POD_GW = "192.168.91.2", "192.168.91.1", "10.244.0.1"
POD_IPS = tuple(f"10.244.0.{10 + i}" for i in range(10))
TARGET_VIP = "10.96.255.254"
HTTP_PORT = 80

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}/cb;
  proxy_temp_path {dir}/px;
  fastcgi_temp_path {dir}/fc;
  uwsgi_temp_path {dir}/uw;
  scgi_temp_path {dir}/sc;
  server {{
    listen {port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


# ------------------------------------------------------------------ the worker (in the node namespace)


def load_rules(mode: str, services: int) -> dict[str, Any]:
    """Write kproxy's rules for `services` services into this process's namespace; the seconds."""
    from kproxy.backends.iptables.sync import SyncEngine
    from kproxy.backends.nftables.sync import NftSyncEngine
    from kproxy.backends.nftables.writer import host_writer
    from kproxy.config import RenderConfig
    from kproxy.netfilter.restore import CommandRestorer
    from kproxy.state.model import Endpoint, ServicePort, ServicePortName

    cfg = RenderConfig(family=4, node_name="bench-node", cluster_cidr=("10.244.0.0/16",))
    view: dict[Any, Any] = {}
    for i in range(services - 1):
        name = ServicePortName(f"ns{i % 100}", f"svc-{i}", "http", "TCP")
        eps = tuple(
            Endpoint(f"10.{100 + (i * 16 + j) // 65536}.{(i * 16 + j) // 256 % 256}.{(i * 16 + j) % 256}", 80,
                     node_name=f"node-{j}")
            for j in range(10)
        )  # fmt: skip
        vip = f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}"
        view[name] = (ServicePort(name, 4, vip, HTTP_PORT, node_port=0), eps)
    target = ServicePortName("ns50", "svc-target", "http", "TCP")
    eps = tuple(Endpoint(ip, HTTP_PORT, node_name="bench-node") for ip in POD_IPS)
    view[target] = (ServicePort(target, 4, TARGET_VIP, HTTP_PORT, node_port=0), eps)
    engine: Any
    if mode == "nftables":
        engine = NftSyncEngine(cfg, host_writer())
    else:
        engine = SyncEngine(cfg, CommandRestorer("nft" if mode == "iptables-nft" else "legacy"))
    t0 = time.perf_counter()
    engine.sync(view, None)
    return {"load_s": time.perf_counter() - t0}


# ------------------------------------------------------------------ the lab


class Lab:
    """client -- node -- pod, in fresh namespaces; nginx in the pod."""

    def __init__(self) -> None:
        tag = "dpb" + secrets.token_hex(3)
        self.ns = {"client": f"{tag}-cl", "node": f"{tag}-node", "pod": f"{tag}-pod"}
        self.tmp = Path(tempfile.mkdtemp(prefix="kproxy-dpbench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created: list[str] = []

    def sh(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 120) -> str:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()[:500]}")
        return res.stdout

    def nsx(self, key: str, argv: Sequence[str], **kw: Any) -> str:
        return self.sh(["ip", "netns", "exec", self.ns[key], *argv], **kw)

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        for ns in self.ns.values():
            self.sh(["ip", "netns", "add", ns])
            self.created.append(ns)
        n, c, p = self.ns["node"], self.ns["client"], self.ns["pod"]
        self.sh(
            ["ip", "-batch", "-"],
            input=f"link add veth-cl netns {n} type veth peer name eth0 netns {c}\n"
            f"link add veth-pod netns {n} type veth peer name eth0 netns {p}\n",
        )
        self.sh(
            ["ip", "-n", n, "-batch", "-"],
            input=f"link set lo up\naddr add {NODE_LAN_IP}/24 dev veth-cl\naddr add {NODE_POD_GW}/24 dev veth-pod\n"
            "link set veth-cl up\nlink set veth-pod up\n",
        )
        self.sh(
            ["ip", "-n", c, "-batch", "-"],
            input=f"link set lo up\naddr add {CLIENT_IP}/24 dev eth0\nlink set eth0 up\n"
            f"route add default via {NODE_LAN_IP}\n",
        )
        pod = ["link set lo up", *(f"addr add {ip}/24 dev eth0" for ip in POD_IPS), "link set eth0 up"]
        pod.append(f"route add default via {NODE_POD_GW}")
        self.sh(["ip", "-n", p, "-batch", "-"], input="\n".join(pod) + "\n")
        common = ["net.core.somaxconn=8192", "net.ipv4.tcp_max_syn_backlog=8192",
                  "net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"]  # fmt: skip
        for key in self.ns:
            self.nsx(key, ["sysctl", "-q", "-w", *common])
        # Short connections leave conntrack entries in TIME_WAIT; keep them from filling the table.
        self.nsx("node", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        with contextlib.suppress(RuntimeError):
            self.nsx("node", ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"])
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.tmp, port=HTTP_PORT))
        self.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", p, "nginx", "-c", str(conf), "-e", str(self.tmp / "nginx.early")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        self.wait_http(POD_IPS[0])

    def wait_http(self, ip: str, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            res = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns["client"],
                    "bash",
                    "-c",
                    f"exec 3<>/dev/tcp/{ip}/{HTTP_PORT}",
                ],
                capture_output=True,
                timeout=5,
            )
            if res.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{ip}:{HTTP_PORT} not reachable from the client")

    def load(self, mode: str, services: int) -> float:
        argv = [sys.executable, "-m", "bench.dataplane_bench", "--worker", mode, "--services", str(services)]
        out = self.nsx("node", argv, timeout=900)
        return float(json.loads(out.strip().splitlines()[-1])["load_s"])

    def wrk(self, ip: str, duration: float) -> dict[str, Any]:
        argv = ["wrk", "-t1", "-c50", f"-d{duration:g}s", "--timeout", "2s", "-H", "Connection: close"]
        out = self.nsx("client", [*argv, f"http://{ip}:{HTTP_PORT}/"], timeout=duration + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"wrk printed no rate: {out[-500:]}")
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {
            "rate": float(m.group(1)),
            "errors": errors.group(1).strip() if errors else "",
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        }

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
        self.procs.clear()
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------ the run


def cell(mode: str, services: int, duration: float) -> dict[str, Any]:
    with Lab() as lab:
        direct = lab.wrk(POD_IPS[0], duration)
        load_s = lab.load(mode, services)
        lab.wait_http(TARGET_VIP)
        lab.wrk(TARGET_VIP, 1.0)  # warm-up: caches, conntrack
        got = lab.wrk(TARGET_VIP, duration)
    got.update(mode=mode, services=services, load_s=load_s, direct=direct["rate"])
    print(
        f"{mode:16s} {services:6d} services: {got['rate']:8.0f} conn/s (direct {direct['rate']:.0f}; "
        f"rules loaded in {load_s:.1f} s) {got['errors']}",
        file=sys.stderr,
        flush=True,
    )
    return got


def run(sizes: Sequence[int], rounds: int, duration: float) -> dict[str, Any]:
    cells = [(m, s) for s in sizes for m in MODES]
    results: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        order = cells if r % 2 == 0 else list(reversed(cells))
        for mode, services in order:
            results.setdefault(f"{mode}@{services}", []).append(cell(mode, services, duration))
    median = {
        key: {
            "rate": statistics.median(x["rate"] for x in runs),
            "direct": statistics.median(x["direct"] for x in runs),
            "load_s": statistics.median(x["load_s"] for x in runs),
            "rates": [x["rate"] for x in runs],
            "of_direct": statistics.median(x["rate"] / x["direct"] for x in runs),
            "errors": [x["errors"] for x in runs if x["errors"]],
        }
        for key, runs in results.items()
    }
    return {"runs": results, "median": median}


def environment(argv: Sequence[str]) -> dict[str, str]:
    def first_line(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(list(cmd), capture_output=True, text=True, timeout=10).stdout.splitlines()[
                0
            ]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "nft": first_line(["nft", "--version"]),
        "iptables": first_line(["iptables-nft", "--version"]),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "command": "python -m bench.dataplane_bench " + " ".join(argv),
    }


def markdown(data: dict[str, Any], sizes: Sequence[int]) -> str:
    env, med = data["env"], data["median"]
    small, large = sizes[0], sizes[-1]
    lines = [
        "# Data plane: new connections per second through one service",
        "",
        f"Run {env['when']} on {env['machine']}; {env['nft']}; {env['iptables']}; {env['nginx']}; "
        f"command: `{env['command']}`.",
        "",
        "wrk -t1 -c50 `Connection: close` from a client namespace, through the node's rules, to nginx "
        f"in a pod (10 endpoints, all that pod's addresses); {data['duration']:g} s per measurement, "
        f"median of {data['rounds']} round(s). `direct`: the same client to the pod's address with no "
        "service rules, measured in each cell's fresh lab.",
        "",
        "| mode | services | conn/s | each round | direct conn/s | rules loaded in (s) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for services in sizes:
        for mode in MODES:
            m = med[f"{mode}@{services}"]
            rounds = ", ".join(f"{r:,.0f}" for r in m["rates"])
            lines.append(
                f"| {mode} | {services:,} | {m['rate']:,.0f} | {rounds} | {m['direct']:,.0f} | {m['load_s']:.1f} |"
            )
    lines += [
        "",
        "Ratios. Raw: the median rates above. Paced by direct: each measurement divided by the direct",
        "rate measured seconds before it in the same lab, which takes out most of the drift of a shared",
        "machine.",
        "",
        f"| mode | {large:,} / {small:,} services, raw | {large:,} / {small:,}, paced by direct "
        f"| {small:,} services / direct | {large:,} services / direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        a, b = med[f"{mode}@{small}"], med[f"{mode}@{large}"]
        lines.append(
            f"| {mode} | {b['rate'] / a['rate']:.2f} | {b['of_direct'] / a['of_direct']:.2f} "
            f"| {a['of_direct']:.2f} | {b['of_direct']:.2f} |"
        )
    errors = [f"{k}: {e}" for k, m in med.items() for e in m["errors"]]
    if errors:
        lines += ["", "Socket errors reported by wrk: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], sizes: Sequence[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: chart skipped (pip install -e '.[bench]')", file=sys.stderr)
        return False
    med = data["median"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(sizes)
    for k, services in enumerate(sizes):
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(MODES))]
        ys = [med[f"{m}@{services}"]["rate"] for m in MODES]
        bars = ax.bar(xs, ys, width, label=f"{services:,} services")
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=8)
    direct = statistics.median(med[f"{m}@{s}"]["direct"] for m in MODES for s in sizes)
    ax.axhline(direct, color="grey", linestyle="--", linewidth=1, label=f"direct to the pod ({direct:,.0f})")
    ax.set_xticks(range(len(MODES)), MODES)
    ax.set_ylabel("new connections / s (wrk, Connection: close)")
    ax.set_title("New-connection rate through one service")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--services", type=int, default=0, help="one size only (with 10)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load per measurement")
    ap.add_argument("--quick", action="store_true", help="10 and 1,000 services, one round")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(load_rules(args.worker, args.services)))
        return 0
    for tool in ("nginx", "wrk", "nft", "iptables-nft-restore", "iptables-legacy-restore"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install -y nginx wrk nftables iptables", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    large = args.services or (1000 if args.quick else 10_000)
    rounds = 1 if args.quick else args.rounds
    sizes = (10, large)
    data = run(sizes, rounds, args.duration)
    data.update(env=environment(argv), rounds=rounds, duration=args.duration, sizes=list(sizes))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    base = RESULTS / f"dataplane-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=1))
    md = markdown(data, sizes)
    base.with_suffix(".md").write_text(md)
    print(md)
    if chart(data, sizes, base.with_suffix(".png")) and not args.quick:
        shutil.copy(base.with_suffix(".png"), ROOT / "bench" / "RESULTS-dataplane.png")
    if not args.quick:
        (ROOT / "bench" / "RESULTS-dataplane.md").write_text(md + "\n![chart](RESULTS-dataplane.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
