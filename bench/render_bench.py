"""Full iptables render of N services x M endpoints: cold cache, then warm.

    .venv/bin/python bench/render_bench.py [--services 10000] [--endpoints 10]

Prints, for render_port over all ports, assemble and restore_payload: wall seconds and
process CPU seconds (the latter less disturbed by other load on a shared machine), with
the garbage collector paused as render_view does (`gc_paused`), and the cold total
without pausing it. A calibration line (an empty Python loop) lets figures from
different machines be compared.
"""

from __future__ import annotations

import argparse
import gc
import time
from contextlib import AbstractContextManager, nullcontext

from kproxy.backends.iptables import render
from kproxy.backends.iptables.render import assemble, builtin_jumps, render_port
from kproxy.config import RenderConfig
from kproxy.infra.gcpause import gc_paused
from kproxy.netfilter.ruleset import restore_payload
from kproxy.state.model import Endpoint, ServicePort, ServicePortName


def make_ports(services: int, endpoints: int) -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    out = []
    for i in range(services):
        name = ServicePortName(f"ns{i % 50}", f"svc{i}", "http", "TCP")
        sp = ServicePort(
            name,
            4,
            f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}",
            80,
            node_port=30000 + i % 2000 if i % 4 == 0 else 0,
        )
        eps = []
        for j in range(endpoints):
            n = i * endpoints + j
            eps.append(Endpoint(f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 8080, is_local=j == 0))
        out.append((sp, tuple(sorted(eps, key=lambda e: e.hostport))))
    out.sort(key=lambda p: p[0].name)
    return out


class Clock:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def run(
    ports: list[tuple[ServicePort, tuple[Endpoint, ...]]], cfg: RenderConfig, pause: bool
) -> tuple[list[tuple[float, float]], int]:
    gc.collect()
    ctx: AbstractContextManager[None] = gc_paused() if pause else nullcontext()
    with ctx:
        clock = Clock()
        rendered = [render_port(sp, eps, cfg) for sp, eps in ports]
        t_render = clock.lap()
        chains = assemble(rendered, cfg)
        t_assemble = clock.lap()
        payload = restore_payload(chains, builtin_jumps=builtin_jumps(cfg))
        t_payload = clock.lap()
    return [t_render, t_assemble, t_payload], payload.count("\n")


def calibrate() -> float:
    t = time.perf_counter()
    for _ in range(10_000_000):
        pass
    return time.perf_counter() - t


def fmt(label: str, laps: list[tuple[float, float]], lines: int) -> str:
    (rw, rc), (aw, ac), (pw, pc) = laps
    return (
        f"{label:<22} {lines} lines: render_port {rw:.3f}s ({rc:.3f} cpu)  assemble {aw:.3f}s ({ac:.3f})  "
        f"restore_payload {pw:.3f}s ({pc:.3f})  total {rw + aw + pw:.3f}s ({rc + ac + pc:.3f} cpu)"
    )


def best(ports: list[tuple[ServicePort, tuple[Endpoint, ...]]], pause: bool, cold: bool, repeat: int) -> str:
    cfg = RenderConfig(family=4, node_name="node1", cluster_cidr=("10.0.0.0/8",))
    if not cold:
        run(ports, cfg, pause)
    results = []
    for _ in range(repeat):
        if cold:
            render_port.cache_clear()
            render._sep.clear()
        results.append(run(ports, cfg, pause))
    laps, lines = min(results, key=lambda r: sum(cpu for _, cpu in r[0]))
    return fmt(f"{'cold' if cold else 'warm'}, gc {'paused' if pause else 'on'}", laps, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs (by CPU time)")
    args = ap.parse_args()
    print(f"calibration: 10M empty loop iterations {calibrate():.3f}s")
    ports = make_ports(args.services, args.endpoints)
    print(f"{args.services} services x {args.endpoints} endpoints, best of {args.repeat}")
    print(best(ports, pause=True, cold=True, repeat=args.repeat))
    print(best(ports, pause=True, cold=False, repeat=args.repeat))
    print(best(ports, pause=False, cold=True, repeat=args.repeat))


if __name__ == "__main__":
    main()
