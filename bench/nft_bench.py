"""nftables mode's syncs beside iptables mode on iptables-nft, in the same run, on a real kernel.

    .venv/bin/python -m bench.nft_bench                       # 1,000 and 10,000 services x 10 endpoints
    .venv/bin/python -m bench.nft_bench --services 1000       # one size only

Per (mode, size), a worker process in a private network namespace (created here, always
deleted) runs the mode's own sync engine against the kernel:

- cold full sync: the engine's first sync into the empty namespace (render + write);
- one endpoint: one service goes from 10 to 11 endpoints, and back (median of --repeat);
  the same for a service with ClientIP affinity (one of them in the cluster), which needs
  chains in both modes;
- new service: one service added, then deleted (each median of --repeat);
- restart: a second engine's first sync over the tables the first one left (same view):
  what an agent restart costs, adoption included;
- peak memory: ru_maxrss of the worker, and of the biggest tool it ran (nft -f for
  nftables full syncs, iptables-restore).

Endpoints sit on 100 other nodes (a 100-node cluster seen from one node).

Timings are end to end: from `engine.sync(view, changed)` being called to the kernel write
returning (render, diff and write; for iptables mode, its canary check too). nftables mode
writes through libnftables in-process; iptables mode through iptables-nft-restore. Output:
Markdown on stdout and bench/results/nft-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kproxy.backends.iptables.sync import SyncEngine
from kproxy.backends.nftables.sync import NftSyncEngine
from kproxy.backends.nftables.writer import host_writer
from kproxy.config import RenderConfig
from kproxy.netfilter.restore import CommandRestorer
from kproxy.state.model import Endpoint, ServicePort, ServicePortName

ROOT = Path(__file__).resolve().parent
CFG = RenderConfig(family=4, node_name="bench-node", cluster_cidr=("10.0.0.0/8",))
View = dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]
MODES = ("nftables", "iptables-nft")


def port_name(i: int) -> ServicePortName:
    return ServicePortName(f"ns{i % 100}", f"svc-{i}", "http", "TCP")


def entry(i: int, count: int) -> tuple[ServicePort, tuple[Endpoint, ...]]:
    """Service i with `count` endpoints on unique pod IPs (block of 32 per service)."""
    eps = []
    for j in range(count):
        n = i * 32 + j
        eps.append(
            Endpoint(f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}", 8080, node_name=f"node-{n % 100}")
        )
    sp = ServicePort(port_name(i), 4, f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, node_port=0)
    return sp, tuple(sorted(eps, key=lambda e: e.hostport))


def sticky_entry(i: int, count: int) -> tuple[ServicePort, tuple[Endpoint, ...]]:
    """Service i with ClientIP affinity: a chain per endpoint in both modes."""
    sp, eps = entry(i, count)
    return replace(sp, affinity_timeout=10800), eps


def worker(mode: str, services: int, repeat: int) -> dict[str, Any]:
    view: View = {port_name(i): entry(i, 10) for i in range(services)}
    sticky = services // 3
    view[port_name(sticky)] = sticky_entry(sticky, 10)
    engine: NftSyncEngine | SyncEngine
    if mode == "nftables":
        engine = NftSyncEngine(CFG, host_writer())
    else:
        engine = SyncEngine(CFG, CommandRestorer("nft"))

    def timed(changed: set[ServicePortName] | None) -> float:
        t = time.perf_counter()
        engine.sync(view, changed)
        return time.perf_counter() - t

    cold = timed(None)
    sticky_ep: list[float] = []
    one_ep: list[float] = []
    ep_back: list[float] = []
    new_svc: list[float] = []
    del_svc: list[float] = []
    target = port_name(services // 2)
    extra = port_name(services + 1)
    for _ in range(repeat):
        view[port_name(sticky)] = sticky_entry(sticky, 11)
        sticky_ep.append(timed({port_name(sticky)}))
        view[port_name(sticky)] = sticky_entry(sticky, 10)
        timed({port_name(sticky)})
        view[target] = entry(services // 2, 11)
        one_ep.append(timed({target}))
        view[target] = entry(services // 2, 10)
        ep_back.append(timed({target}))
        view[extra] = entry(services + 1, 10)
        new_svc.append(timed({extra}))
        del view[extra]
        del_svc.append(timed({extra}))
    # A restart: a new engine over the tables the previous one left, same view.
    fresh: NftSyncEngine | SyncEngine
    fresh = (
        NftSyncEngine(CFG, host_writer()) if mode == "nftables" else SyncEngine(CFG, CommandRestorer("nft"))
    )
    t = time.perf_counter()
    fresh.sync(view, None)
    restart = time.perf_counter() - t
    return {
        "mode": mode,
        "restart_s": restart,
        "services": services,
        "cold_full_s": cold,
        "one_endpoint_s": statistics.median(one_ep),
        "endpoint_removed_s": statistics.median(ep_back),
        "new_service_s": statistics.median(new_svc),
        "service_deleted_s": statistics.median(del_svc),
        "affinity_one_endpoint_s": statistics.median(sticky_ep),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_case(mode: str, services: int, repeat: int) -> dict[str, Any]:
    ns = f"kpbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.nft_bench", "--worker", mode]
        argv += ["--services", str(services), "--repeat", str(repeat)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{mode} {services}: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def ms(x: float) -> str:
    v = x * 1000
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(results: list[dict[str, Any]], meta: str) -> str:
    rows = [
        "| services x 10 eps | mode | cold full sync | one endpoint | endpoint removed | new service | service deleted "
        "| one endpoint, affinity service | restart (adoption) | peak MB (agent) | peak MB (child tools) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['services']:,} | {r['mode']} | {ms(r['cold_full_s'])} | {ms(r['one_endpoint_s'])} | "
            f"{ms(r['endpoint_removed_s'])} | {ms(r['new_service_s'])} | {ms(r['service_deleted_s'])} | "
            f"{ms(r['affinity_one_endpoint_s'])} | {ms(r['restart_s'])} | {r['peak_mb']:.0f} | "
            f"{r['child_peak_mb']:.0f} |"
        )
    ratios = [
        "",
        "| services | one endpoint nft/ipt | new service nft/ipt | cold full nft/ipt |",
        "|---|---:|---:|---:|",
    ]
    by = {(r["mode"], r["services"]): r for r in results}
    for n in sorted({r["services"] for r in results}):
        a, b = by.get(("nftables", n)), by.get(("iptables-nft", n))
        if a and b:
            ratios.append(
                f"| {n:,} | {a['one_endpoint_s'] / b['one_endpoint_s']:.3f} | "
                f"{a['new_service_s'] / b['new_service_s']:.3f} | {a['cold_full_s'] / b['cold_full_s']:.3f} |"
            )
    return f"{meta}\n\nTimes in ms, median of the repeats; each row one worker process.\n\n" + "\n".join(
        rows + ratios
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--services", type=int, action="append", help="cluster size (repeatable; default 1000 and 10000)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.services[0], args.repeat)))
        return
    if os.geteuid() != 0:
        sys.exit("nft_bench: needs root (network namespaces)")
    results = []
    for services in args.services or [1000, 10000]:
        for mode in args.modes.split(","):
            results.append(run_case(mode, services, args.repeat))
            print(json.dumps(results[-1]), file=sys.stderr)
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    meta = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}; {nft}; command: `python -m bench.nft_bench {' '.join(sys.argv[1:])}`."
    )
    text = markdown(results, meta)
    print(text)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"nft-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"meta": meta, "results": results})
    )


if __name__ == "__main__":
    main()
