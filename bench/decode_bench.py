"""What decoding a big cluster costs: the kubernetes client's model classes against raw JSON.

Serves N Services and N EndpointSlices (10 endpoints each) from the API-server stand-in and
lists them through the real `kubernetes` client in several ways, printing objects/s:

  models          list_*() as usual: HTTP + the client's pydantic model classes
  models+dict     the same, then sanitize_for_serialization() back to dicts (what a parser of
                  API-shaped dicts would need)
  raw+json        _preload_content=False + json.loads (what kproxy.sources.apiwatch does)
  raw+orjson      the same with orjson, when installed (it is not a dependency: no gain end to end)
  decode-only     the same decoders on bytes already in memory (no HTTP), to separate costs;
                  "gc paused" runs them with the cyclic GC disabled (it rescans the growing result)
  parse           kproxy.state.parse.parse_object_all on the decoded dicts
  ApiSource       kproxy.sources.apiwatch end to end: start until every first list is delivered,
                  as shipped (GC paused per list page) and with the pause switched off

Run:  PYTHONPATH=. .venv/bin/python bench/decode_bench.py [--count 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.apiserver_standin import ApiServerStandIn, endpoint_slice, service


def _best(fn: Callable[[], int], repeat: int, *, gc_paused: bool = False) -> tuple[float, int]:
    best = float("inf")
    n = 0
    for _ in range(repeat):
        if gc_paused:
            gc.disable()
        try:
            t0 = time.perf_counter()
            n = fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best, n


def _fill(api: ApiServerStandIn, count: int) -> None:
    for i in range(count):
        ns = f"ns{i % 50}"
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        api.create(service(f"svc{i}", ns, cluster_ip=ip, ports=[("http", 80, "TCP"), ("dns", 53, "UDP")]))
        addrs = [
            f"10.{200 + (i * 10 + j) // 65536}.{((i * 10 + j) // 256) % 256}.{(i * 10 + j) % 256}"
            for j in range(10)
        ]
        api.create(
            endpoint_slice(
                f"svc{i}-abcde",
                f"svc{i}",
                ns,
                addresses=addrs,
                ports=[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            )
        )


def _measure(
    res: str,
    call: Callable[..., Any],
    rtype: str,
    c: Any,
    repeat: int,
    orjson_loads: Callable[[bytes], Any] | None,
) -> list[tuple[str, str, float, int]]:
    call(limit=1)  # warm up (pydantic builds validators on first use)
    rows: list[tuple[str, str, float, int]] = []

    def models() -> int:
        return len(call().items)

    def models_dict() -> int:
        return len(c.sanitize_for_serialization(call())["items"])

    def raw(loads: Callable[[bytes], Any]) -> Callable[[], int]:
        def run() -> int:
            r = call(_preload_content=False)
            try:
                return len(loads(r.data)["items"])
            finally:
                r.release_conn()

        return run

    rows.append((res, "models", *_best(models, repeat)))
    rows.append((res, "models+dict", *_best(models_dict, repeat)))
    rows.append((res, "raw+json", *_best(raw(json.loads), repeat)))
    if orjson_loads is not None:
        rows.append((res, "raw+orjson", *_best(raw(orjson_loads), repeat)))

    r = call(_preload_content=False)
    body: bytes = r.data
    r.release_conn()
    text = body.decode()
    rows.append(
        (
            res,
            "decode-only models",
            *_best(lambda: len(c.deserialize(text, rtype, "application/json").items), repeat),
        )
    )
    rows.append((res, "decode-only json", *_best(lambda: len(json.loads(body)["items"]), repeat)))
    rows.append(
        (
            res,
            "decode-only json, gc paused",
            *_best(lambda: len(json.loads(body)["items"]), repeat, gc_paused=True),
        )
    )
    if orjson_loads is not None:
        ol = orjson_loads
        rows.append((res, "decode-only orjson", *_best(lambda: len(ol(body)["items"]), repeat)))
    rows.append((res, f"(body {len(body) / 1e6:.1f} MB)", 0.0, 0))

    kind = "Service" if res == "services" else "EndpointSlice"
    items = json.loads(body)["items"]
    for it in items:
        it.setdefault("kind", kind)
        it.setdefault("apiVersion", "v1" if res == "services" else "discovery.k8s.io/v1")
    from kproxy.state.parse import parse_object_all

    def parse() -> int:
        return sum(len(parse_object_all(it, "bench")) for it in items)

    rows.append((res, "parse_object_all", *_best(parse, repeat)))
    rows.append((res, "parse_object_all, gc paused", *_best(parse, repeat, gc_paused=True)))
    return rows


async def _first_sync(url: str) -> tuple[float, int]:
    """The whole path kproxy takes: paged lists, raw JSON, parse, events on the loop."""
    from kproxy.sources.apiwatch import ApiSource, WatchConfig, make_api_client

    src = ApiSource(make_api_client(master=url), WatchConfig(node_name="bench-node"))
    t0 = time.perf_counter()
    await src.start()
    await src.synced.wait()
    secs = time.perf_counter() - t0
    n = 0
    while not src.events.empty():
        n += len(src.events.get_nowait().items)
    await src.stop()
    return secs, n


def _source_rows(url: str, repeat: int) -> list[tuple[str, str, float, int]]:
    """ApiSource as shipped, and with its GC pause switched off, runs interleaved against noise."""
    import kproxy.sources.apiwatch as aw

    shipped = aw.gc_paused
    best: dict[str, tuple[float, int]] = {}
    try:
        for _ in range(repeat):
            for label, pause in (
                ("ApiSource start -> synced", shipped),
                ("  same, GC not paused", contextlib.nullcontext),
            ):
                aw.gc_paused = pause  # type: ignore[assignment]
                secs, n = asyncio.run(_first_sync(url))
                if secs < best.get(label, (float("inf"), 0))[0]:
                    best[label] = (secs, n)
    finally:
        aw.gc_paused = shipped
    return [("both", label, secs, n) for label, (secs, n) in best.items()]


def _serve(count: int, conn: Any) -> None:
    with ApiServerStandIn() as api:
        t0 = time.perf_counter()
        _fill(api, count)
        conn.send((api.url, time.perf_counter() - t0))
        conn.recv()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000, help="services, and as many endpoint slices")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from kubernetes import client

    try:
        import orjson

        orjson_loads: Callable[[bytes], Any] | None = orjson.loads
    except ImportError:
        orjson_loads = None

    # The stand-in keeps every object as dicts; in this process they would make each GC pass
    # crawl millions of objects and skew the figures, so it serves from a child process.
    parent, child = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve, args=(args.count, child), daemon=True)
    server.start()
    try:
        url, fill_secs = parent.recv()
        print(
            f"# served {2 * args.count} objects (filled in {fill_secs:.1f}s); repeat={args.repeat}, best run shown"
        )
        cfg = client.Configuration()
        cfg.host = url
        c = client.ApiClient(cfg)
        core = client.CoreV1Api(c)
        disc = client.DiscoveryV1Api(c)
        calls: list[tuple[str, Callable[..., Any], str]] = [
            ("services", core.list_service_for_all_namespaces, "V1ServiceList"),
            ("endpointslices", disc.list_endpoint_slice_for_all_namespaces, "V1EndpointSliceList"),
        ]
        rows: list[tuple[str, str, float, int]] = []
        for res, call, rtype in calls:
            rows.extend(_measure(res, call, rtype, c, args.repeat, orjson_loads))
        rows.extend(_source_rows(url, args.repeat))
    finally:
        parent.send("stop")
        server.join(10)

    print(f"{'resource':<16}{'path':<40}{'seconds':>10}{'objects/s':>14}")
    for res, path, secs, n in rows:
        if not n:
            print(f"{res:<16}{path:<40}")
            continue
        print(f"{res:<16}{path:<40}{secs:>10.3f}{n / secs:>14,.0f}")


if __name__ == "__main__":
    main()
