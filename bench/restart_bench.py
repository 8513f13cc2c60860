"""What a restart costs: a new SyncEngine's first sync over a node that already holds its rules.

The node is what kube-proxy or an earlier kproxy left: every chain already right. With
adoption the first sync reads the tables and writes only the top-level chains; without it,
it rewrites everything. Same cluster, same namespace, same run.

    python -m bench.restart_bench [--services 10000] [--backend nft]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid

from bench.sync_bench import cluster
from kproxy.backends.iptables.sync import SyncEngine
from kproxy.config import RenderConfig
from kproxy.netfilter.restore import CommandRestorer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    args = p.parse_args()
    ns = f"kpbench{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cfg = RenderConfig(family=4, node_name="node-a", cluster_cidr=("10.244.0.0/16",))
        view = cluster(args.services, args.endpoints)
        restorer = CommandRestorer(args.backend, netns=ns)  # type: ignore[arg-type]
        first = SyncEngine(cfg, restorer).sync(view, None)
        out: dict[str, object] = {
            "services": args.services,
            "backend": args.backend,
            "initial_s": first.total_s,
        }
        for adopt in (True, False):
            t = time.perf_counter()
            res = SyncEngine(cfg, restorer, adopt=adopt).sync(view, None)
            out["adopt" if adopt else "rewrite"] = {
                "seconds": round(time.perf_counter() - t, 3),
                "chains_written": res.chains_written,
            }
        print(json.dumps(out, indent=2))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
