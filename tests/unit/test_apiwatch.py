"""The API source against the API-server stand-in, over real HTTP on loopback.

Organised by behaviour: first list, selectors, continuous watching, bookmarks and resuming,
410 Gone, apiserver restarts, server-side timeouts, errors and backoff, stalls, bad objects.
Timeouts are shrunk through WatchConfig so the module runs in seconds; nothing asserts timings.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.errors import ConfigError, ObjectError
from kproxy.sources.apiwatch import (
    PROXY_LABEL_SELECTOR,
    ApiSource,
    WatchConfig,
    make_api_client,
)
from kproxy.sources.events import Resource, SourceEvent
from kproxy.state.model import EndpointSlice, KObject, ObjectRef, Service
from kproxy.state.parse import parse_object_all
from tests.support.apiserver_standin import (
    ApiServerStandIn,
    _label_match,
    endpoint_slice,
    endpoints,
    node,
    service,
)
from tests.support.mirror import SourceMirror

NODE = "node-a"
FAST = WatchConfig(
    node_name=NODE,
    watch_timeout=(30, 30),
    stall_margin=1.0,
    connect_timeout=1.0,
    list_timeout=5.0,
    backoff_base=0.05,
    backoff_cap=0.4,
    min_watch_duration=0.3,
    page_size=2,
    watchdog_interval=0.2,
)


def cfg(**kw: Any) -> WatchConfig:
    base = {f: getattr(FAST, f) for f in FAST.__dataclass_fields__}
    base.update(kw)
    return WatchConfig(**base)


@pytest.fixture
def api() -> Iterator[ApiServerStandIn]:
    server = ApiServerStandIn(bookmark_interval=0.2).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """kproxy's log records, whatever another test did to propagation."""
    got: list[logging.LogRecord] = []

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    logger = logging.getLogger("kproxy")
    h = _H(logging.DEBUG)
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


class Harness:
    """An ApiSource plus a mirror of what it delivered, and a way to wait for conditions."""

    def __init__(self, api: ApiServerStandIn, config: WatchConfig = FAST, client: Any = None) -> None:
        self.api = api
        self.source = ApiSource(client or make_api_client(master=api.url), config)
        self.mirror = SourceMirror()
        self.log: list[SourceEvent] = []

    async def __aenter__(self) -> Harness:
        await self.source.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.source.stop()

    async def until(self, pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.drain()
            if pred():
                return
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; stats={self.source.stats()}")
            try:
                ev = await asyncio.wait_for(self.source.events.get(), min(left, 0.05))
            except TimeoutError:
                continue
            self._take(ev)

    def drain(self) -> None:
        while not self.source.events.empty():
            self._take(self.source.events.get_nowait())

    def _take(self, ev: SourceEvent) -> None:
        self.log.append(ev)
        self.mirror.apply(ev)

    async def synced(self) -> None:
        await self.until(lambda: self.mirror.listed(self.source.resources), "first lists")

    def state(self, resource: Resource) -> dict[ObjectRef, tuple[KObject, ...]]:
        return dict(self.mirror.get(resource))

    def expected(self, kind: str) -> dict[ObjectRef, tuple[KObject, ...]]:
        """What the API holds for `kind`, as kube-proxy's selector and kproxy's parser see it."""
        out = {}
        for obj in self.api.objects(kind):
            meta = obj["metadata"]
            if not _label_match(PROXY_LABEL_SELECTOR, meta.get("labels") or {}):
                continue
            try:
                parsed = parse_object_all(obj)
            except ObjectError:
                continue
            if parsed:
                out[ObjectRef(kind, meta.get("namespace", ""), meta["name"])] = parsed
        return out

    def converged(self) -> bool:
        return self.state("services") == self.expected("Service") and self.state(
            "endpointslices"
        ) == self.expected("EndpointSlice")

    def events_for(self, ref: ObjectRef) -> list[SourceEvent]:
        return [e for e in self.log if e.ref == ref]


def run(coro: Coroutine[Any, Any, None], timeout: float = 25.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def svc_ref(name: str, ns: str = "default") -> ObjectRef:
    return ObjectRef("Service", ns, name)


# ------------------------------------------------------------------ first list and selectors


def test_first_list_delivers_every_object_then_listed_marker(api: ApiServerStandIn, tmp_path: Path) -> None:
    for i in range(5):  # more than one page (page_size=2)
        api.create(service(f"web{i}", cluster_ip=f"10.96.0.{10 + i}"))
        api.create(endpoint_slice(f"web{i}-x", f"web{i}", addresses=[f"10.244.0.{i + 1}"]))
    api.create(node(NODE, zone="z1"))
    client = make_api_client(kubeconfig=str(api.write_kubeconfig(tmp_path / "kubeconfig")))

    async def main() -> None:
        async with Harness(api, client=client) as h:
            await asyncio.wait_for(h.source.synced.wait(), 10)
            await h.synced()
            firsts = {e.resource: e for e in reversed(h.log)}
            assert {r: (e.kind, e.initial) for r, e in firsts.items()} == {
                "services": ("listed", True),
                "endpointslices": ("listed", True),
                "nodes": ("listed", True),
            }
            assert h.state("services") == h.expected("Service")
            assert h.state("endpointslices") == h.expected("EndpointSlice")
            assert len(h.state("endpointslices")) == 5
            assert [o.name for o in h.mirror.get("nodes").get(ObjectRef("Node", "", NODE), ())] == [NODE]

    run(main())
    lists = [r for r in api.requests if r.path == "/api/v1/services" and not r.watch]
    assert len(lists) == 3, "five services in pages of two"


def test_selectors_keep_other_proxies_objects_and_other_nodes_out(api: ApiServerStandIn) -> None:
    api.create(service("mine"))
    api.create(service("theirs", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    api.create(endpoint_slice("mine-x", "mine"))
    api.create(endpoint_slice("headless-x", "headless", labels={"service.kubernetes.io/headless": ""}))
    api.create(node(NODE))
    api.create(node("node-b"))

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            api.update(
                service(
                    "theirs", cluster_ip="10.96.9.9", labels={"service.kubernetes.io/service-proxy-name": "o"}
                )
            )
            api.update(node("node-b", zone="z9"))
            api.update(node(NODE, zone="z2"))
            await h.until(
                lambda: any(e.kind == "upsert" and e.resource == "nodes" for e in h.log), "this node's update"
            )
            api.create(service("later"))
            await h.until(lambda: svc_ref("later") in h.mirror.get("services"), "a later service")
            names = {ref.name for e in h.log for ref in [*e.items, e.ref] if ref is not None}
            assert "theirs" not in names and "headless-x" not in names and "node-b" not in names
            assert set(h.mirror.get("services")) == {svc_ref("mine"), svc_ref("later")}
            assert set(h.mirror.get("nodes")) == {ObjectRef("Node", "", NODE)}

    run(main())


def test_legacy_endpoints_are_watched_when_asked(api: ApiServerStandIn) -> None:
    api.create(service("old"))
    api.create(endpoints("old", addresses=["10.244.1.1", "fd00::1"]))

    async def main() -> None:
        async with Harness(api, cfg(legacy_endpoints=True)) as h:
            await h.synced()
            objs = h.mirror.get("endpoints")[ObjectRef("Endpoints", "default", "old")]
            assert all(isinstance(o, EndpointSlice) and o.legacy for o in objs)
            assert sorted(o.address_type for o in objs if isinstance(o, EndpointSlice)) == ["IPv4", "IPv6"]

    run(main())


# ------------------------------------------------------------------ continuous watching


def test_watch_delivers_add_modify_delete_in_order(api: ApiServerStandIn) -> None:
    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            a = api.create(service("x", cluster_ip="10.96.1.1"))
            b = api.update(service("x", cluster_ip="10.96.1.2"))
            api.update(
                service("x", cluster_ip="10.96.1.2", labels={"service.kubernetes.io/service-proxy-name": "o"})
            )
            c = api.update(service("x", cluster_ip="10.96.1.3"))
            d = api.delete("Service", "default", "x")
            await h.until(lambda: len(h.events_for(svc_ref("x"))) == 5, "five events for x")
            got = [(e.kind, e.resource_version) for e in h.events_for(svc_ref("x"))]
            rv = [o["metadata"]["resourceVersion"] for o in (a, b, c, d)]
            labelled = str(int(rv[1]) + 1)
            assert got == [
                ("upsert", rv[0]),
                ("upsert", rv[1]),
                ("delete", labelled),  # stopped matching the selector: gone for us
                ("upsert", rv[2]),
                ("delete", rv[3]),
            ]
            ips = [
                o.cluster_ips for e in h.events_for(svc_ref("x")) for o in e.objects if isinstance(o, Service)
            ]
            assert ips == [("10.96.1.1",), ("10.96.1.2",), ("10.96.1.3",)]

    run(main())


def test_bookmark_moves_resume_point_and_a_dropped_watch_resumes_exactly(api: ApiServerStandIn) -> None:
    api.create(service("a"))
    api.create(node(NODE))

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            for i in range(3):  # changes no service watch sees: only bookmarks can move its RV
                api.apply(node("node-b", zone=f"z{i}"))
            head = str(api.resource_version)
            stats = h.source.stats()["services"]
            await h.until(lambda: stats.resource_version == head, "a bookmark carrying the newest RV")
            watches_before = len([r for r in api.requests if r.path == "/api/v1/services" and r.watch])
            api.drop_watches()
            api.create(service("b"))
            api.update(service("a", cluster_ip="10.96.0.99"))
            await h.until(h.converged, "convergence after the drop")
            resumed = [r for r in api.requests if r.path == "/api/v1/services" and r.watch][watches_before]
            assert resumed.query["resourceVersion"] == head
            keyed = [(e.kind, e.ref, e.resource_version) for e in h.log if e.resource == "services" and e.ref]
            assert len(keyed) == len(set(keyed)) == 2, "each change exactly once, none replayed"
            assert stats.lists == 1

    run(main())


# ------------------------------------------------------------------ 410 Gone and restarts


def test_gone_after_compaction_relists_and_the_relist_replaces_state(api: ApiServerStandIn) -> None:
    for n in ("a", "b", "c"):
        api.create(service(n))

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            api.stop()
            api.delete("Service", "default", "a")
            api.update(service("b", cluster_ip="10.96.7.7"))
            api.create(service("d"))
            api.compact()
            api.start()
            await h.until(h.converged, "convergence after 410")
            relist = [e for e in h.log if e.resource == "services" and e.kind == "listed"][-1]
            assert not relist.initial
            assert relist.gone == frozenset({svc_ref("a")})
            assert set(h.mirror.get("services")) == {svc_ref("b"), svc_ref("c"), svc_ref("d")}
            stats = h.source.stats()["services"]
            assert stats.expired >= 1 and stats.lists == 2

    run(main())


def test_apiserver_restart_mid_churn_converges_to_final_state(api: ApiServerStandIn) -> None:
    rng = random.Random(7)
    stop = threading.Event()

    def churn() -> None:
        live: set[str] = set()
        while not stop.is_set():
            name = f"s{rng.randrange(30)}"
            if name in live and rng.random() < 0.3:
                api.delete("Service", "default", name)
                api.delete("EndpointSlice", "default", f"{name}-x")
                live.discard(name)
            else:
                api.apply(service(name, cluster_ip=f"10.96.3.{rng.randrange(1, 250)}"))
                api.apply(endpoint_slice(f"{name}-x", name, addresses=[f"10.244.3.{rng.randrange(1, 250)}"]))
                live.add(name)
            stop.wait(0.002)

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            t = threading.Thread(target=churn, daemon=True)
            t.start()
            try:
                await asyncio.sleep(0.5)
                api.stop()
                await asyncio.sleep(0.5)
                api.compact(keep=5)
                api.start()
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.to_thread(t.join, 5)
            await h.until(h.converged, "convergence after the restart", timeout=15)
            assert h.expected("Service"), "the churn left something to converge to"
            for r in ("services", "endpointslices"):
                assert h.source.stats()[r].lists >= 2, f"{r} relisted after compaction"

    run(main())


def test_server_timeout_ends_the_stream_and_the_watch_resumes_without_relist(api: ApiServerStandIn) -> None:
    api.create(service("a"))

    async def main() -> None:
        async with Harness(api, cfg(watch_timeout=(1, 1), min_watch_duration=0.5)) as h:
            await h.synced()
            stats = h.source.stats()["services"]
            await h.until(lambda: stats.watches >= 3, "three watches", timeout=10)
            api.create(service("b"))
            await h.until(h.converged, "b after timeouts")
            assert stats.lists == 1 and stats.failures == 0

    run(main())
    timeouts = {r.query.get("timeoutSeconds") for r in api.requests if r.watch}
    assert timeouts == {"1"}


# ------------------------------------------------------------------ errors, backoff, stalls


def test_errors_back_off_instead_of_hammering(api: ApiServerStandIn) -> None:
    api.create(service("a"))
    api.inject_fault(500)

    async def main() -> None:
        async with Harness(api) as h:
            await asyncio.sleep(2.0)
            h.drain()
            assert not h.log and not h.source.synced.is_set()
            tries = [r for r in api.requests if r.path == "/api/v1/services"]
            # backoff 0.05 s doubling to a 0.4 s cap, jitter down to half: at most ~12 tries in 2 s;
            # a busy loop makes thousands
            assert 2 <= len(tries) <= 20, len(tries)
            api.clear_faults()
            await h.synced()
            assert h.converged()

    run(main())


def test_failing_watches_back_off_too(api: ApiServerStandIn) -> None:
    api.create(service("a"))

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            api.inject_fault(500, watch_only=True)
            api.drop_watches()
            n0 = len(api.requests)
            await asyncio.sleep(2.0)
            watches = [r for r in api.requests[n0:] if r.path == "/api/v1/services"]
            assert 2 <= len(watches) <= 20, len(watches)
            api.clear_faults()
            api.create(service("b"))
            await h.until(h.converged, "b after the faults clear")

    run(main())


def test_a_silent_stream_is_cut_and_restarted(api: ApiServerStandIn) -> None:
    api.create(service("a"))

    async def main() -> None:
        async with Harness(api, cfg(watch_timeout=(1, 1), stall_margin=0.5)) as h:
            await h.synced()
            stats = h.source.stats()["services"]
            api.hang_watches = True
            api.drop_watches()
            await h.until(lambda: stats.failures >= 1, "the silent stream to be noticed", timeout=10)
            api.hang_watches = False
            api.create(service("b"))
            await h.until(h.converged, "b after the stall")

    run(main())


def test_watchdog_cuts_a_stream_that_trickles_bytes_but_no_events(api: ApiServerStandIn) -> None:
    api.create(service("a"))

    async def main() -> None:
        async with Harness(api, cfg(watch_timeout=(1, 1), stall_margin=0.5)) as h:
            await h.synced()
            stats = h.source.stats()["services"]
            api.hang_watches = "trickle"
            api.drop_watches()
            await h.until(lambda: stats.stalls >= 1, "the watchdog to cut the stream", timeout=10)
            api.hang_watches = False
            api.create(service("b"))
            await h.until(h.converged, "b after the stall")

    run(main())


# ------------------------------------------------------------------ bad objects


def test_malformed_object_is_skipped_with_its_name_and_field(
    api: ApiServerStandIn, records: list[logging.LogRecord]
) -> None:
    bad = service("broken", cluster_ip="10.96.0.300")
    with pytest.raises(ObjectError) as err:
        parse_object_all(bad)
    api.create(service("good"))
    api.create(bad)

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            assert set(h.mirror.get("services")) == {svc_ref("good")}
            api.update(service("good", cluster_ip="not-an-ip"))  # a good object turning bad is removed
            api.create(service("fine"))
            await h.until(
                lambda: set(h.mirror.get("services")) == {svc_ref("fine")}, "the bad update handled"
            )

    run(main())
    skipped = [r.getMessage() for r in records if "event=object_skipped" in r.getMessage()]
    assert any("default/broken" in m and f"field={err.value.field}" in m for m in skipped), skipped
    assert any("default/good" in m for m in skipped), skipped


def test_stop_is_prompt_and_leaves_no_threads(api: ApiServerStandIn) -> None:
    async def main() -> None:
        h = Harness(api)
        await h.source.start()
        await h.synced()
        await h.source.stop()

    run(main(), timeout=10)
    assert not [t for t in threading.enumerate() if t.name.startswith("kproxy-watch-")]


def test_no_cluster_config_is_refused_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster"):
        make_api_client()
    with pytest.raises(ConfigError, match="--kubeconfig"):
        make_api_client(kubeconfig=str(tmp_path / "missing"))
    assert make_api_client(master="http://127.0.0.1:1/").configuration.host == "http://127.0.0.1:1"


# ------------------------------------------------------------------ the mirror (no network)


def _svc(name: str, ip: str, rv: str = "1") -> Service:
    return Service("default", name, "ClusterIP", (ip,), (), resource_version=rv)


def test_mirror_reports_only_real_changes() -> None:
    m = SourceMirror()
    a, b = svc_ref("a"), svc_ref("b")
    first = m.apply(SourceEvent("listed", "services", items={a: (_svc("a", "10.0.0.1"),)}, initial=True))
    assert [(c.ref, c.old) for c in first] == [(a, ())]
    assert m.listed(["services"]) and not m.listed(["services", "nodes"])
    assert m.apply(SourceEvent("upsert", "services", a, (_svc("a", "10.0.0.1", rv="2"),))) == []
    assert m.apply(SourceEvent("delete", "services", b)) == []
    relist = m.apply(SourceEvent("listed", "services", items={b: (_svc("b", "10.0.0.2"),)}))
    assert sorted((c.ref.name, bool(c.old), bool(c.new)) for c in relist) == [
        ("a", True, False),
        ("b", False, True),
    ]
    assert [o.name for o in m.objects()] == ["b"]


def test_an_ignored_field_is_warned_once_per_version_and_the_service_kept(
    api: ApiServerStandIn, records: list[logging.LogRecord]
) -> None:
    """Issue 10.3/10.4: an implausible kproxy annotation leaves the Service in place (round robin)
    with one warning; a relist (410 Gone after compaction) of the same version repeats none."""
    odd = service("odd")
    odd["metadata"]["annotations"] = {"kproxy.io/lb-algorithm": "léast-connections"}
    api.create(odd)

    async def main() -> None:
        async with Harness(api) as h:
            await h.synced()
            assert set(h.mirror.get("services")) == {svc_ref("odd")}
            api.stop()
            api.create(service("other"))
            api.compact()
            api.start()
            await h.until(h.converged, "convergence after 410")
            assert h.source.stats()["services"].lists == 2

    run(main())
    warned = [r.getMessage() for r in records if "event=field_ignored" in r.getMessage()]
    assert len(warned) == 1 and "default/odd" in warned[0] and "kproxy.io/lb-algorithm" in warned[0], warned
