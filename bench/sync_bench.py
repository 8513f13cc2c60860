"""How close kproxy's iptables syncs come to the kernel's own floor, on a real kernel.

    .venv/bin/python -m bench.sync_bench            # everything, both backends (minutes)
    .venv/bin/python -m bench.sync_bench --quick    # 1,000 services, nft only

Each case runs in a private network namespace (created here, always deleted) in its own
worker process, so peak memory (ru_maxrss of the worker) is one case's. Per cluster:

- full sync: kproxy's initial full sync into the empty namespace (once, cold caches),
  then forced full syncs over the populated tables, each beside a raw restore of the
  very payloads kproxy wrote (prepared in advance);
- partial syncs: (a) one endpoint added / removed, (b) one service added / deleted,
  (c) one service scaled 10 -> 20 / 20 -> 10 endpoints; each beside the floor, one
  `iptables-restore --noflush` of exactly the chains that differ between the two
  states (computed independently from two full renders, prepared in advance);
- the full-rewrite strategy (render everything cold, restore everything in one payload),
  capped by --rewrite-timeout;
- render-only: a cold render of the whole cluster (render_port and SEP-name caches
  cleared), wall and process CPU time, and a warm one (caches full).

Every timing is the median of --repeat runs. kproxy's partial figures are end to end:
from `engine.sync(view, changed)` being called (the change has arrived) to restore
returning, canary check included. Output: bench/results/sync-<time>.{json,md,png} and a
copy of the Markdown at bench/RESULTS-sync.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kproxy.backends.iptables import render
from kproxy.backends.iptables.render import render_port, render_view
from kproxy.backends.iptables.sync import SyncEngine, SyncResult
from kproxy.config import RenderConfig
from kproxy.netfilter.restore import CommandRestorer, XtablesBackend, tool
from kproxy.netfilter.ruleset import ChainKey, restore_payload
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CFG = RenderConfig(family=4, node_name="bench-node", cluster_cidr=("10.0.0.0/8",))
View = dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]
Chains = dict[ChainKey, tuple[str, ...]]

TARGETS = {
    "one_endpoint_vs_floor": 1.5,
    "full_vs_raw_restore": 1.15,
    "render_only_s": 0.5,
    "peak_memory_mb": 300.0,
}


# ------------------------------------------------------------- synthetic cluster


def port_name(i: int) -> ServicePortName:
    return ServicePortName(f"ns{i % 100}", f"svc-{i}", "http", "TCP")


def endpoints(i: int, count: int, per_service: int) -> tuple[Endpoint, ...]:
    """Unique pod IPs: service i owns the block [i * per_service, (i + 1) * per_service)."""
    eps = []
    for j in range(count):
        n = i * per_service + j
        eps.append(Endpoint(f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}", 8080))
    return tuple(sorted(eps, key=lambda e: e.hostport))


def service(i: int, count: int, per_service: int) -> tuple[ServicePort, tuple[Endpoint, ...]]:
    sp = ServicePort(port_name(i), 4, f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}", 80)
    return sp, endpoints(i, count, per_service)


def cluster(services: int, eps: int, first: int = 0, per_service: int = 32) -> View:
    return {port_name(i): service(i, eps, per_service) for i in range(first, first + services)}


# ---------------------------------------------------------------------- worker


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Recorder:
    """A CommandRestorer that keeps every payload it applied."""

    def __init__(self, inner: CommandRestorer) -> None:
        self.inner = inner
        self.payloads: list[str] = []

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        self.payloads.append(payload)
        self.inner.apply(family, payload, noflush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def take(self) -> list[str]:
        out, self.payloads = self.payloads, []
        return out


def raw_restore(backend: XtablesBackend, payloads: list[bytes], timeout: float | None = None) -> float:
    """iptables-restore of prepared payloads, nothing else: the kernel's floor."""
    argv = [tool(backend, 4, "-restore"), "--wait=5", "--noflush"]
    t = time.perf_counter()
    for data in payloads:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"raw restore failed: {done.stderr.decode()[:500]}")
    return time.perf_counter() - t


def floor_payload(before: Chains, after: Chains) -> str:
    """Exactly the chains that differ, computed from two full renders."""
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    gone = [k for k in before if k not in after]
    return restore_payload(changed, gone)


def worker(
    backend: XtablesBackend, case: dict[str, Any], repeat: int, rewrite_timeout: float
) -> dict[str, Any]:
    services, eps = case["services"], case["endpoints"]
    out: dict[str, Any] = {"backend": backend, "case": case["name"], "services": services, "endpoints": eps}
    engine = SyncEngine(CFG, CommandRestorer(backend))
    base = cluster(services, eps) if case["kind"] == "cluster" else {}

    t = time.perf_counter()
    first = engine.sync(base, None)
    out["initial_full_s"] = time.perf_counter() - t
    # kproxy's own peak: view, render cache, engine state, payloads of a cold full sync.
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out["initial_full"] = _result(first)
    out["chains"] = len(engine.applied)
    out["rule_lines"] = sum(len(r) for r in engine.applied.values())
    rec = Recorder(CommandRestorer(backend))
    engine.restorer = rec

    if case["kind"] == "churn":
        out["scenarios"] = churn(backend, engine, rec, services, eps, repeat)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out

    # Forced full syncs over populated tables, beside a raw restore of the same payloads.
    full_k, full_raw, check = [], [], []
    for _ in range(repeat):
        engine.force_full()
        t = time.perf_counter()
        res = engine.sync(base, set())
        full_k.append(time.perf_counter() - t)
        check.append(res.check_s)
        payloads = [p.encode() for p in rec.take()]
        full_raw.append(raw_restore(backend, payloads))
    out["full"] = {
        "kproxy_s": median(full_k),
        "raw_restore_s": median(full_raw),
        "check_s": median(check),
        "restores": res.restores,
        "payload_bytes": res.payload_bytes,
    }

    scenarios: dict[str, Any] = {}
    k = services // 2
    name = port_name(k)
    grown = {**base, name: (base[name][0], endpoints(k, eps + 1, 32))}
    new = port_name(services + 7)
    added = {**base, new: service(services + 7, eps, 32)}
    scaled = {**base, name: (base[name][0], endpoints(k, 2 * eps, 32))}
    full_before = render_view(base, CFG)
    for label, changed_view, key in (
        ("one endpoint", grown, name),
        ("one service", added, new),
        ("scale 10->20", scaled, name),
    ):
        full_after = render_view(changed_view, CFG)
        fwd = floor_payload(full_before, full_after).encode()
        back = floor_payload(full_after, full_before).encode()
        k_fwd, k_back, f_fwd, f_back = [], [], [], []
        r_fwd = r_back = None
        for _ in range(repeat):
            t = time.perf_counter()
            r_fwd = engine.sync(changed_view, {key})
            k_fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            r_back = engine.sync(base, {key})
            k_back.append(time.perf_counter() - t)
            rec.take()
            f_fwd.append(raw_restore(backend, [fwd]))
            f_back.append(raw_restore(backend, [back]))
        assert r_fwd is not None and r_back is not None
        undo = {
            "one endpoint": "endpoint removed",
            "one service": "service deleted",
            "scale 10->20": "scale 20->10",
        }
        scenarios[label] = _scenario(k_fwd, f_fwd, r_fwd, len(fwd))
        scenarios[undo[label]] = _scenario(k_back, f_back, r_back, len(back))
    out["scenarios"] = scenarios

    # Render-only: a cold pass over the whole cluster (every render cache emptied, as at
    # start), then a warm one (a forced full sync in a running proxy). Wall and process CPU:
    # on nft the kernel is still freeing the tables just written, on the other core.
    cold, cold_cpu, warm = [], [], []
    for _ in range(repeat):
        render_port.cache_clear()
        render._sep.clear()
        t, c = time.perf_counter(), time.process_time()
        render_view(base, CFG)
        cold.append(time.perf_counter() - t)
        cold_cpu.append(time.process_time() - c)
        t = time.perf_counter()
        render_view(base, CFG)
        warm.append(time.perf_counter() - t)
    out["render_only_s"] = median(cold)
    out["render_only_cpu_s"] = median(cold_cpu)
    out["render_warm_s"] = median(warm)

    # The full-rewrite strategy: render everything (cold), restore everything at once.
    rewrite: list[float] = []
    for _ in range(repeat):
        render_port.cache_clear()
        t = time.perf_counter()
        payload = restore_payload(render_view(base, CFG)).encode()
        try:
            raw_restore(backend, [payload], timeout=rewrite_timeout)
        except subprocess.TimeoutExpired:
            out["full_rewrite_timeout"] = rewrite_timeout
            rewrite = []
            break
        rewrite.append(time.perf_counter() - t)
        if rewrite[-1] > 30:
            break
    out["full_rewrite_s"] = median(rewrite) if rewrite else None
    return out


def churn(
    backend: XtablesBackend, engine: SyncEngine, rec: Recorder, services: int, eps: int, repeat: int
) -> dict[str, Any]:
    """kube-proxy's churn test: many services with many endpoints appear at once, then go."""
    view = cluster(services, eps, per_service=eps)
    names = set(view)
    out: dict[str, Any] = {}
    k_add, k_del, f_add, f_del = [], [], [], []
    r_add = r_del = None
    for _ in range(repeat):
        t = time.perf_counter()
        r_add = engine.sync(view, names)
        k_add.append(time.perf_counter() - t)
        add_payloads = [p.encode() for p in rec.take()]
        t = time.perf_counter()
        r_del = engine.sync({}, names)
        k_del.append(time.perf_counter() - t)
        del_payloads = [p.encode() for p in rec.take()]
        f_add.append(raw_restore(backend, add_payloads))
        f_del.append(raw_restore(backend, del_payloads))
    assert r_add is not None and r_del is not None
    out["services added"] = _scenario(k_add, f_add, r_add, sum(map(len, add_payloads)))
    out["services deleted"] = _scenario(k_del, f_del, r_del, sum(map(len, del_payloads)))
    out["services added"]["floor_note"] = "raw restore of kproxy's own payloads"
    out["services deleted"]["floor_note"] = "raw restore of kproxy's own payloads"
    return out


def _scenario(kproxy: list[float], floor: list[float], res: SyncResult, floor_bytes: int) -> dict[str, Any]:
    return {
        "kproxy_s": median(kproxy),
        "floor_s": median(floor),
        "ratio": median(kproxy) / median(floor) if median(floor) else None,
        "kproxy_bytes": res.payload_bytes,
        "floor_bytes": floor_bytes,
        "chains_written": res.chains_written,
        "chains_deleted": res.chains_deleted,
        "restores": res.restores,
        "render_s": res.render_s,
        "diff_s": res.diff_s,
        "check_s": res.check_s,
        "restore_s": res.restore_s,
    }


def _result(res: SyncResult) -> dict[str, Any]:
    return {
        "restores": res.restores,
        "payload_bytes": res.payload_bytes,
        "render_s": res.render_s,
        "diff_s": res.diff_s,
        "restore_s": res.restore_s,
        "check_s": res.check_s,
    }


# ---------------------------------------------------------------------- parent


def run_case(
    backend: XtablesBackend, case: dict[str, Any], repeat: int, rewrite_timeout: float
) -> dict[str, Any]:
    ns = f"syncbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = [
            "nsenter",
            f"--net=/run/netns/{ns}",
            sys.executable,
            "-m",
            "bench.sync_bench",
            "--worker",
            json.dumps(
                {"backend": backend, "case": case, "repeat": repeat, "rewrite_timeout": rewrite_timeout}
            ),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT.parent, check=False)
        if done.returncode != 0:
            return {"backend": backend, "case": case["name"], "error": done.stderr[-2000:]}
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def ms(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x * 1000:,.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# kproxy iptables sync: measured against the kernel's floor",
        "",
        f"Run {meta['when']} on {meta['machine']}; iptables {meta['iptables']}; median of {meta['repeat']} runs; "
        f"command: `{meta['command']}`.",
        "",
        "Floor: one `iptables-restore --noflush` of exactly the chains that differ (prepared in advance). "
        "Full rewrite: render everything cold and restore it in one payload (kube-proxy before partial syncs). "
        "kproxy: `SyncEngine.sync()` end to end (render, diff, canary check, restore).",
        "",
        "## Partial syncs (ms)",
        "",
        "| backend | cluster | change | kproxy | floor | kproxy/floor | full rewrite | bytes kproxy/floor | restores |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['case']} | ERROR | | | | | | |")
            continue
        rewrite = ms(r.get("full_rewrite_s"))
        if r.get("full_rewrite_timeout"):
            rewrite = f"> {r['full_rewrite_timeout'] * 1000:,.0f} (timed out)"
        for label, s in r["scenarios"].items():
            ratio = f"{s['ratio']:.2f}" if s.get("ratio") else "-"
            lines.append(
                f"| {r['backend']} | {r['case']} | {label} | {ms(s['kproxy_s'])} | {ms(s['floor_s'])} | {ratio} | "
                f"{rewrite if r['case'] != 'churn' else '-'} | {s['kproxy_bytes']:,}/{s['floor_bytes']:,} | {s['restores']} |"
            )
    lines += [
        "",
        "## Full syncs, render, memory",
        "",
        "| backend | cluster | rule lines | initial full (s) | forced full (s) | raw restore of same payload (s) | full/raw | restores | render cold, wall / CPU (s) | render warm (s) | peak RSS after initial full (MB) | largest child (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            continue
        f = r.get("full")
        full = (
            f"{f['kproxy_s']:.2f} | {f['raw_restore_s']:.2f} | {f['kproxy_s'] / f['raw_restore_s']:.3f} | {f['restores']}"
            if f
            else "- | - | - | -"
        )
        render = (
            f"{r['render_only_s']:.3f} / {r['render_only_cpu_s']:.3f} | {r['render_warm_s']:.3f}"
            if "render_only_cpu_s" in r
            else "- | -"
        )
        lines.append(
            f"| {r['backend']} | {r['case']} | {r['rule_lines']:,} | {r['initial_full_s']:.2f} | {full} | {render} | {r['peak_rss_mb']:.0f} | {r.get('children_peak_rss_mb', 0):.0f} |"
        )
    lines += ["", "## Targets (10,000 services x 10 endpoints, nft)", ""]
    lines += [f"- {line}" for line in check_targets(results)]
    return "\n".join(lines) + "\n"


def check_targets(results: list[dict[str, Any]]) -> list[str]:
    big = [
        r for r in results if r.get("backend") == "nft" and r.get("case") == "10k x 10" and "error" not in r
    ]
    if not big:
        big = [
            r for r in results if r.get("backend") == "nft" and "error" not in r and r.get("case") != "churn"
        ]
        if not big:
            return ["no nft cluster case ran"]
    r = big[-1]
    out = [f"(checked on {r['case']})"]
    one = r["scenarios"]["one endpoint"]["ratio"]
    out.append(_verdict("one-endpoint change vs floor", one, TARGETS["one_endpoint_vs_floor"], "x"))
    full = r["full"]["kproxy_s"] / r["full"]["raw_restore_s"]
    out.append(
        _verdict("full sync vs raw restore of the same payload", full, TARGETS["full_vs_raw_restore"], "x")
    )
    out.append(
        _verdict(
            "render-only full pass, cold, CPU time", r["render_only_cpu_s"], TARGETS["render_only_s"], " s"
        )
        + f"; wall {r['render_only_s']:.3f} s"
    )
    out.append(_verdict("peak memory", r["peak_rss_mb"], TARGETS["peak_memory_mb"], " MB"))
    return out


def _verdict(what: str, value: float, limit: float, unit: str) -> str:
    return f"{'MET ' if value <= limit else 'MISSED'} {what}: {value:.3f}{unit} (target <= {limit}{unit})"


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    backends = sorted({r["backend"] for r in results if "error" not in r})
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = sorted(
            (r for r in results if r["backend"] == backend and "error" not in r and r["case"] != "churn"),
            key=lambda r: r["services"],
        )
        xs = [r["services"] for r in rows]
        series: dict[str, Callable[[dict[str, Any]], float | None]] = {
            "kproxy, one endpoint": lambda r: r["scenarios"]["one endpoint"]["kproxy_s"],
            "floor, one endpoint": lambda r: r["scenarios"]["one endpoint"]["floor_s"],
            "kproxy, one service added": lambda r: r["scenarios"]["one service"]["kproxy_s"],
            "floor, one service added": lambda r: r["scenarios"]["one service"]["floor_s"],
            "full rewrite": lambda r: r.get("full_rewrite_s") or (r.get("full_rewrite_timeout") or None),
        }
        for label, get in series.items():
            ys = [get(r) for r in rows]
            style = "--" if label.startswith("floor") else ":" if label == "full rewrite" else "-"
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, marker="o", label=label)
        for r in rows:
            if r.get("full_rewrite_timeout"):
                ax.annotate(
                    "timed out: a lower bound", (r["services"], r["full_rewrite_timeout"]), fontsize=8
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("services (x 10 endpoints)")
        ax.set_ylabel("sync time (s)")
        ax.set_title(f"iptables-{backend}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 services, nft only")
    ap.add_argument("--backends", default="", help="comma-separated: legacy,nft (default both)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--rewrite-timeout", type=float, default=150.0, help="cap on one full-rewrite restore (s)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["backend"], spec["case"], spec["repeat"], spec["rewrite_timeout"])))
        return
    if os.geteuid() != 0 or shutil.which("nsenter") is None:
        sys.exit("sync_bench needs root, ip netns and nsenter")
    backends: list[XtablesBackend] = ["nft"] if args.quick else ["legacy", "nft"]
    if args.backends:
        backends = [b for b in ("legacy", "nft") if b in args.backends.split(",")]
    cases: list[dict[str, Any]] = [{"name": "1k x 10", "kind": "cluster", "services": 1000, "endpoints": 10}]
    if not args.quick:
        cases += [
            {"name": "10k x 10", "kind": "cluster", "services": 10000, "endpoints": 10},
            {"name": "churn", "kind": "churn", "services": 1000, "endpoints": 100},
        ]
    results = []
    for backend in backends:
        for case in cases:
            t = time.perf_counter()
            print(f"{backend} {case['name']} ...", end=" ", flush=True, file=sys.stderr)
            results.append(
                run_case(backend, case, 1 if case["kind"] == "churn" else args.repeat, args.rewrite_timeout)
            )
            print(f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    version = subprocess.run(
        ["iptables", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "iptables": version,
        "repeat": args.repeat,
        "command": "python -m bench.sync_bench" + (" --quick" if args.quick else ""),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    base = RESULTS / f"sync-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    base.with_suffix(".md").write_text(md)
    if not args.quick:
        (ROOT / "RESULTS-sync.md").write_text(md)
    plotted = plot(results, base.with_suffix(".png"))
    print(md)
    print(f"wrote {base}.json, .md{', .png' if plotted else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
