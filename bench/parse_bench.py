"""Parse throughput on synthetic API objects (plain dicts, as json.loads gives them).

    .venv/bin/python bench/parse_bench.py [--objects 20000] [--endpoints 5] [--batch | --view]

Half Services (two named ports, ClusterIP), half EndpointSlices (two ports, N endpoints
with conditions, node name and zone). Every address is distinct, so the first pass
parses every IP cold; the second pass is a relist of the same objects (warm caches).
CPU time is printed beside wall time because the machine may be shared.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from kproxy.state.build import Snapshot, view
from kproxy.state.parse import parse_many, parse_object


def synthetic(n: int, endpoints: int) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(n // 2):
        ns, name = f"ns-{i % 50}", f"svc-{i}"
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": str(1000 + i)},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": f"10.96.{i // 256 % 256}.{i % 256}",
                    "clusterIPs": [f"10.96.{i // 256 % 256}.{i % 256}"],
                    "ipFamilies": ["IPv4"],
                    "ports": [
                        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                        {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": "metrics"},
                    ],
                    "sessionAffinity": "None",
                },
            }
        )
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name},
                    "annotations": {
                        "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"
                    },
                    "resourceVersion": str(5000 + i),
                },
                "addressType": "IPv4",
                "ports": [
                    {"name": "http", "port": 8080, "protocol": "TCP"},
                    {"name": "metrics", "port": 9090, "protocol": "TCP"},
                ],
                "endpoints": [
                    {
                        "addresses": [
                            f"10.{(i * endpoints + e) // 65536 % 256 + 1}.{(i * endpoints + e) // 256 % 256}.{(i * endpoints + e) % 256}"
                        ],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "nodeName": f"node-{e % 20}",
                        "zone": f"zone-{e % 3}",
                    }
                    for e in range(endpoints)
                ],
            }
        )
    return objs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=20000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--batch", action="store_true", help="use parse_many (cyclic GC paused for the batch)")
    ap.add_argument("--view", action="store_true", help="time build.view over the parsed objects instead")
    args = ap.parse_args()
    objs = synthetic(args.objects, args.endpoints)
    runs: list[tuple[str, Callable[[], int]]] = [
        ("parse_object cold", lambda: sum(parse_object(o, "bench") is not None for o in objs)),
        ("parse_object warm", lambda: sum(parse_object(o, "bench") is not None for o in objs)),
    ]
    if args.batch:
        runs = [
            ("parse_many cold", lambda: len(parse_many(objs, "bench")[0])),
            ("parse_many warm", lambda: len(parse_many(objs, "bench")[0])),
        ]
    if args.view:
        parsed, _ = parse_many(objs, "bench")
        snap = Snapshot.from_objects(parsed, "node-1")
        t0, c0 = time.perf_counter(), time.process_time()
        ports = view(snap, "node-1", 4)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_eps = sum(len(eps) for _, eps in ports.values())
        print(
            f"view: {len(ports)} service ports, {n_eps} endpoints in {dt * 1000:.0f} ms wall ({cpu * 1000:.0f} ms CPU)"
        )
        return
    for label, run in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        n = run()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert n == len(objs)
        print(
            f"{label}: {len(objs)} objects in {dt * 1000:.0f} ms wall = {len(objs) / dt:,.0f} objects/s"
            f" ({cpu * 1000:.0f} ms CPU = {len(objs) / cpu:,.0f} objects/s of CPU)"
        )


if __name__ == "__main__":
    main()
