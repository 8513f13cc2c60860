"""The Kubernetes API as a source: per resource, list, then watch from that list, forever.

Each resource (Services, EndpointSlices, legacy Endpoints when asked, this node's Node) runs a
small state machine in its own thread, because the `kubernetes` client blocks:

    list ──► emit "listed" (the complete set) ──► watch from the list's resourceVersion
      ▲                                              │ ADDED/MODIFIED/DELETED ──► emit upsert/delete
      │                                              │ BOOKMARK ──► remember its resourceVersion
      └──── 410 Gone (history compacted) ◄───────────┤ clean end (server timeout) ──► watch again
                                                     └ error ──► back off (exponential, jitter) ──► watch again

The client is used for transport, auth and config only: responses are read raw
(`_preload_content=False`) and decoded with json into dicts for `parse_object_all`, about ten
times cheaper than the client's model classes (bench/decode_bench.py measures it).

A stream can never stall silently: the socket read timeout is the server-side watch timeout plus a
margin, and a watchdog on the event loop cuts any request that has shown no sign of life for
longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy.errors import ConfigError, ObjectError, SourceError
from kproxy.infra import log
from kproxy.infra.gcpause import gc_paused
from kproxy.sources.events import Resource, SourceEvent
from kproxy.state.model import KObject, ObjectRef
from kproxy.state.parse import parse_object_all

_loads: Callable[[bytes], Any] = json.loads
"""orjson measured no faster end to end here (bench/decode_bench.py); pausing the GC was what paid."""

PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
"""kube-proxy's selector: services another proxy owns, and headless ones, never reach us."""


class Decoder(Protocol):
    """parse_object_all's shape: an API object to kproxy objects, ignored fields into `warnings`."""

    def __call__(
        self, obj: Mapping[str, Any], source: str = "", *, warnings: list[ObjectError] | None = None
    ) -> tuple[KObject, ...]: ...


@dataclass(frozen=True, slots=True)
class WatchConfig:
    node_name: str
    endpoint_slices: bool = True
    legacy_endpoints: bool = False
    watch_timeout: tuple[float, float] = (300.0, 600.0)
    """Server-side timeoutSeconds, drawn uniformly per watch (client-go: 5 to 10 minutes)."""
    stall_margin: float = 30.0
    """Silence allowed beyond the server-side timeout before a stream counts as stalled."""
    connect_timeout: float = 10.0
    list_timeout: float = 120.0
    """Read timeout of list calls (a list of 20,000 objects can take a while to arrive)."""
    backoff_base: float = 0.8
    backoff_cap: float = 30.0
    backoff_jitter: float = 0.5
    """Each delay is cut by a random fraction up to this, so nodes that lost the apiserver together
    do not all come back in the same instant, even once the delay has reached its cap."""
    min_watch_duration: float = 1.0
    """A watch ending sooner than this with no event counts as a failure, so no busy loop."""
    relist_after_failures: int = 5
    """Every this many consecutive failures, the resume point is dropped and the resource relisted."""
    page_size: int = 500
    """List page size (limit/continue); 0 lists in one response."""
    watchdog_interval: float = 5.0

    def __post_init__(self) -> None:
        lo, hi = self.watch_timeout
        if not 1 <= lo <= hi:
            raise ConfigError("watch_timeout", f"need 1 <= low <= high seconds, got {self.watch_timeout}")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ConfigError("backoff", "need 0 < base <= cap")
        if not 0 <= self.backoff_jitter < 1:
            raise ConfigError("backoff_jitter", "must be in [0, 1)")
        if self.relist_after_failures < 1 or self.page_size < 0:
            raise ConfigError("relist_after_failures/page_size", "must be positive")


@dataclass(slots=True)
class WatchStats:
    """Counters per resource, for metrics and for tests that bound reconnect attempts."""

    lists: int = 0
    watches: int = 0
    failures: int = 0
    expired: int = 0
    stalls: int = 0
    events: int = 0
    skipped: int = 0
    resource_version: str = ""


class _Gone(Exception):
    """The watch's resourceVersion was compacted away: only a relist helps."""


class _Closable(Protocol):
    def shutdown(self) -> None: ...


# ------------------------------------------------------------------ client setup


def make_api_client(
    *, kubeconfig: str | None = None, master: str | None = None, context: str | None = None
) -> Any:
    """An `ApiClient` configured as kube-proxy would be: --kubeconfig, else in-cluster; --master overrides the server."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=cfg
            )
        elif not master:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as e:
        option = "--kubeconfig" if kubeconfig else "in-cluster config (or --kubeconfig / --master)"
        raise ConfigError(option, str(e)) from e
    if master:
        cfg.host = master.rstrip("/")
    cfg.retries = 0  # the watch loop owns retrying, with backoff; no hidden immediate retries
    api = client.ApiClient(cfg)
    api.user_agent = "kproxy/0.1"
    return api


@dataclass(frozen=True, slots=True)
class _Spec:
    resource: Resource
    kind: str
    api_version: str
    method: str
    core: bool
    label_selector: str = ""
    field_selector: str = ""


def _specs(cfg: WatchConfig) -> list[_Spec]:
    specs = [
        _Spec("services", "Service", "v1", "list_service_for_all_namespaces", True, PROXY_LABEL_SELECTOR)
    ]
    if cfg.endpoint_slices:
        specs.append(
            _Spec(
                "endpointslices",
                "EndpointSlice",
                "discovery.k8s.io/v1",
                "list_endpoint_slice_for_all_namespaces",
                False,
                PROXY_LABEL_SELECTOR,
            )
        )
    if cfg.legacy_endpoints:
        specs.append(
            _Spec(
                "endpoints",
                "Endpoints",
                "v1",
                "list_endpoints_for_all_namespaces",
                True,
                PROXY_LABEL_SELECTOR,
            )
        )
    specs.append(
        _Spec("nodes", "Node", "v1", "list_node", True, field_selector=f"metadata.name={cfg.node_name}")
    )
    return specs


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    inner = getattr(e, "reason", None)  # urllib3 wraps the real cause (refused, timed out) in MaxRetryError
    if isinstance(inner, BaseException):
        return _describe(inner)
    return f"{type(e).__name__}: {e}"[:300]


# ------------------------------------------------------------------ one resource


class _Watcher:
    """The list/watch loop of one resource. Runs in its own thread; talks to the loop only via `emit`."""

    def __init__(
        self,
        spec: _Spec,
        api_client: Any,
        cfg: WatchConfig,
        emit: Callable[[SourceEvent], None],
        decode: Decoder,
        stopping: threading.Event,
    ) -> None:
        from kubernetes import client

        self.spec = spec
        self.cfg = cfg
        api = client.CoreV1Api(api_client) if spec.core else client.DiscoveryV1Api(api_client)
        self._call: Callable[..., Any] = getattr(api, spec.method)
        self._emit = emit
        self._decode = decode
        self._stopping = stopping
        self._reported: dict[ObjectRef, str] = {}
        self._rv: str | None = None
        self._known: set[ObjectRef] = set()
        self._listed_once = False
        self._progress = False
        self._lock = threading.Lock()
        self._resp: _Closable | None = None
        self._deadline = float("inf")
        """monotonic time after which the in-flight request counts as stalled."""
        self.stats = WatchStats()
        self.thread = threading.Thread(target=self.run, name=f"kproxy-watch-{spec.resource}", daemon=True)

    # -- loop

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._progress = False
            listed_now = False
            try:
                if self._rv is None:
                    self._relist()
                    listed_now = True
                self._watch()
            except _Gone:
                self.stats.expired += 1
                log.info("watch_expired", resource=self.spec.resource, resource_version=self._rv)
                self._rv = None
                if not listed_now:
                    failures = 0
                    continue
            except Exception as e:  # every failure is retried; the log says which
                if self._stopping.is_set():
                    break
                self.stats.failures += 1
                log.warn(
                    "watch_failed", resource=self.spec.resource, error=_describe(e), attempt=failures + 1
                )
            finally:
                self._set_inflight(None, float("inf"))
            if self._progress:
                failures = 0
                continue
            failures += 1
            if failures % self.cfg.relist_after_failures == 0 and self._rv is not None:
                # e.g. "too large resource version" after an etcd restore: the RV itself may be the problem
                log.warn("watch_relist_forced", resource=self.spec.resource, failures=failures)
                self._rv = None
            self._stopping.wait(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        delay = min(self.cfg.backoff_cap, self.cfg.backoff_base * 2.0 ** min(failures - 1, 30))
        return delay * (1 - random.random() * self.cfg.backoff_jitter)

    def interrupt(self) -> None:
        """Cut the in-flight request from another thread; the loop sees an error and retries."""
        with self._lock:
            resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def stalled(self, now: float) -> bool:
        with self._lock:
            return self._resp is not None and now > self._deadline

    def _set_inflight(self, resp: _Closable | None, deadline: float) -> None:
        with self._lock:
            self._resp = resp
            self._deadline = deadline

    def _alive(self, budget: float) -> None:
        with self._lock:
            self._deadline = time.monotonic() + budget

    # -- list

    def _selectors(self) -> dict[str, str]:
        kw = {}
        if self.spec.label_selector:
            kw["label_selector"] = self.spec.label_selector
        if self.spec.field_selector:
            kw["field_selector"] = self.spec.field_selector
        return kw

    def _relist(self) -> None:
        self.stats.lists += 1
        items: dict[ObjectRef, tuple[KObject, ...]] = {}
        cont: str | None = None
        budget = self.cfg.list_timeout + self.cfg.stall_margin
        while True:
            kw: dict[str, Any] = self._selectors()
            if self.cfg.page_size:
                kw["limit"] = self.cfg.page_size
            if cont:
                kw["_continue"] = cont
            resp = self._call(
                **kw,
                _preload_content=False,
                _request_timeout=(self.cfg.connect_timeout, self.cfg.list_timeout),
            )
            self._set_inflight(resp, time.monotonic() + budget)
            try:
                body = resp.data
            finally:
                self._set_inflight(None, float("inf"))
                resp.release_conn()
            with gc_paused():
                doc = _loads(body)
                for obj in doc.get("items") or ():  # parsed page by page: the raw pages never pile up
                    obj.setdefault("kind", self.spec.kind)
                    obj.setdefault("apiVersion", self.spec.api_version)
                    ref, parsed = self._parse(obj)
                    if ref is not None and parsed:
                        items[ref] = parsed
            meta = doc.get("metadata") or {}
            cont = meta.get("continue") or None
            if not cont:
                break
        rv = str(meta.get("resourceVersion", ""))
        if not rv:
            raise SourceError(f"{self.spec.resource}: list without a resourceVersion")
        gone = frozenset(self._known.difference(items))
        self._known = set(items)
        initial = not self._listed_once
        self._listed_once = True
        self._rv = rv
        self.stats.resource_version = rv
        log.info(
            "listed", resource=self.spec.resource, objects=len(items), resource_version=rv, gone=len(gone)
        )
        self._emit(
            SourceEvent(
                "listed", self.spec.resource, items=items, gone=gone, initial=initial, resource_version=rv
            )
        )

    def _parse(self, obj: dict[str, Any]) -> tuple[ObjectRef | None, tuple[KObject, ...]]:
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            self.stats.skipped += 1
            log.warn("object_skipped", resource=self.spec.resource, field="metadata.name", reason="missing")
            return None, ()
        ref = ObjectRef(self.spec.kind, str(meta.get("namespace") or ""), str(meta["name"]))
        ignored: list[ObjectError] = []
        try:
            got = self._decode(obj, "api", warnings=ignored)
        except ObjectError as e:
            self.stats.skipped += 1
            if self._first_report(ref, meta):
                log.warn("object_skipped", object=str(e.ref), field=e.field, reason=e.reason)
        except Exception as e:  # a parser bug must not take the source down
            self.stats.skipped += 1
            log.error("object_skipped", object=str(ref), field="?", reason=_describe(e))
        else:
            if not ignored:
                self._reported.pop(ref, None)
            elif self._first_report(ref, meta):
                for w in ignored:
                    log.warn("field_ignored", object=str(w.ref), field=w.field, reason=w.reason)
            return ref, got
        return ref, ()

    def _first_report(self, ref: ObjectRef, meta: dict[str, Any]) -> bool:
        """Once per version of an object: a relist or resync of the same bad object says nothing new."""
        rv = str(meta.get("resourceVersion") or "")
        if rv and self._reported.get(ref) == rv:
            return False
        self._reported[ref] = rv
        return True

    # -- watch

    def _watch(self) -> None:
        lo, hi = self.cfg.watch_timeout
        timeout = max(1, int(random.uniform(lo, hi)))
        read_timeout = timeout + self.cfg.stall_margin
        self.stats.watches += 1
        started = time.monotonic()
        resp = self._call(
            **self._selectors(),
            watch=True,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(self.cfg.connect_timeout, read_timeout),
        )
        self._set_inflight(resp, time.monotonic() + read_timeout + self.cfg.stall_margin)
        clean = False
        try:
            buf = bytearray()
            for chunk in self._chunks(resp):
                buf.extend(chunk)
                start = 0
                while (nl := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[start:nl])
                    start = nl + 1
                    if line.strip():
                        self._handle(_loads(line))
                        # only whole events count as life: a trickle of bytes must not hide a stall
                        self._alive(read_timeout + self.cfg.stall_margin)
                del buf[:start]
                if self._stopping.is_set():
                    return
            clean = True
        finally:
            self._set_inflight(None, float("inf"))
            if clean:
                resp.release_conn()
            else:
                with contextlib.suppress(Exception):
                    resp.close()
        if time.monotonic() - started >= self.cfg.min_watch_duration:
            self._progress = True
        log.debug("watch_ended", resource=self.spec.resource, resource_version=self._rv)

    @staticmethod
    def _chunks(resp: Any) -> Iterator[bytes]:
        if resp.chunked and resp.supports_chunked_reads():
            yield from resp.read_chunked(decode_content=False)
            return
        while data := resp.read1(65536):
            yield data

    def _handle(self, ev: Mapping[str, Any]) -> None:
        typ = ev.get("type")
        obj = ev.get("object")
        if not isinstance(obj, dict):
            raise SourceError(f"{self.spec.resource}: watch event without an object: {str(ev)[:200]}")
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise SourceError(
                f"{self.spec.resource}: watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}"
            )
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if typ == "BOOKMARK":
            if rv:
                self._rv = rv
                self.stats.resource_version = rv
            return
        obj.setdefault("kind", self.spec.kind)
        obj.setdefault("apiVersion", self.spec.api_version)
        if typ in ("ADDED", "MODIFIED"):
            ref, parsed = self._parse(obj)
            if ref is not None:
                if parsed:
                    self._known.add(ref)
                    self._emit(SourceEvent("upsert", self.spec.resource, ref, parsed, resource_version=rv))
                elif ref in self._known:
                    self._known.discard(ref)
                    self._emit(SourceEvent("delete", self.spec.resource, ref, resource_version=rv))
        elif typ == "DELETED":
            meta = obj.get("metadata") or {}
            ref = ObjectRef(self.spec.kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if ref in self._known:
                self._known.discard(ref)
                self._emit(SourceEvent("delete", self.spec.resource, ref, resource_version=rv))
        else:
            log.warn("watch_event_unknown", resource=self.spec.resource, type=typ)
            return
        self.stats.events += 1
        self._progress = True
        if rv:
            self._rv = rv
            self.stats.resource_version = rv


# ------------------------------------------------------------------ the source


class ApiSource:
    """Every watched resource of one API server, delivered as `SourceEvent`s on `events`.

    `synced` is set once every resource's first list is in the queue; nothing should be written
    to the kernel before that (kube-proxy waits the same way). The node agent feeds each event to
    the change tracker with `kproxy.tracking.events.apply_event`.
    """

    def __init__(self, api_client: Any, cfg: WatchConfig, *, decode: Decoder = parse_object_all) -> None:
        self.cfg = cfg
        self.events: asyncio.Queue[SourceEvent] = asyncio.Queue()
        self.synced = asyncio.Event()
        self._api_client = api_client
        self._decode = decode
        self._stopping = threading.Event()
        self._watchers: list[_Watcher] = []
        self._unlisted: set[Resource] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def resources(self) -> tuple[Resource, ...]:
        return tuple(s.resource for s in _specs(self.cfg))

    def stats(self) -> dict[Resource, WatchStats]:
        return {w.spec.resource: w.stats for w in self._watchers}

    async def start(self) -> None:
        if self._watchers:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        for spec in _specs(self.cfg):
            self._watchers.append(
                _Watcher(spec, self._api_client, self.cfg, self._emit, self._decode, self._stopping)
            )
        self._unlisted = {w.spec.resource for w in self._watchers}
        for w in self._watchers:
            w.thread.start()
        self._watchdog = asyncio.create_task(self._watch_dog(), name="kproxy-watchdog")

    async def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for w in self._watchers:
            w.interrupt()
        for w in self._watchers:
            await asyncio.to_thread(w.thread.join, self.cfg.connect_timeout + 1)
            if w.thread.is_alive():
                log.warn("watch_thread_lingers", resource=w.spec.resource)
        self._watchers = []

    async def __aenter__(self) -> ApiSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _emit(self, ev: SourceEvent) -> None:
        """Called from watcher threads."""
        loop = self._loop
        if loop is None or self._stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody left to tell
            loop.call_soon_threadsafe(self._deliver, ev)

    def _deliver(self, ev: SourceEvent) -> None:
        self.events.put_nowait(ev)
        if ev.kind == "listed" and ev.resource in self._unlisted:
            self._unlisted.discard(ev.resource)
            if not self._unlisted:
                log.info("sources_synced", resources=",".join(self.resources))
                self.synced.set()

    async def _watch_dog(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.watchdog_interval)
            now = time.monotonic()
            for w in self._watchers:
                if w.stalled(now):
                    w.stats.stalls += 1
                    log.warn(
                        "watch_stalled", resource=w.spec.resource, resource_version=w.stats.resource_version
                    )
                    w.interrupt()
