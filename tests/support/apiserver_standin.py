"""An in-process stand-in for the Kubernetes API server, good enough for list/watch clients.

It speaks the real protocol over HTTP/1.1 so the unmodified `kubernetes` client can talk to it:
a global resourceVersion, lists with label and field selectors (and limit/continue pages), and
watches as chunked JSON lines with BOOKMARKs, server-side timeouts and a 410 ERROR event when the
requested resourceVersion was compacted away. Selector semantics on update follow the apiserver's
watch cache: an object that stops matching arrives as DELETED, one that starts matching as ADDED.

Test controls: create/update/apply/delete objects, compact the history, stop and start again on the
same port (objects and history survive, as they would in etcd), drop every open watch, make new
watches hang or trickle bytes, inject latency or error responses, and read back a log of requests.
It binds 127.0.0.1 by default; pass `host=` an address inside a test's network namespace plumbing
when the client runs in another namespace. Pass `tls=` a server-side SSLContext to serve HTTPS, as
in-cluster clients (service account token and CA) require. No reverse DNS lookups anywhere.

Usage:
    with ApiServerStandIn() as api:
        api.create(service_dict)
        cfg = api.configuration()      # kubernetes.client.Configuration for the real client
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


RESOURCES: dict[str, ResourceType] = {
    r.plural: r
    for r in (
        ResourceType("services", "Service", "", "v1", True),
        ResourceType("endpoints", "Endpoints", "", "v1", True),
        ResourceType("nodes", "Node", "", "v1", False),
        ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", True),
    )
}
BY_KIND = {r.kind: r for r in RESOURCES.values()}


@dataclass(frozen=True)
class Change:
    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    old: Obj | None


@dataclass(frozen=True)
class RequestRecord:
    path: str
    query: Mapping[str, str]
    status: int
    at: float

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "") in ("1", "true", "True")


@dataclass
class Fault:
    status: int
    remaining: int | None
    path_contains: str = ""
    watch_only: bool = False


# ------------------------------------------------------------------ selectors


def _label_match(selector: str, labels: Mapping[str, str]) -> bool:
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            continue
        if term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(selector: str, obj: Obj) -> bool:
    meta = obj.get("metadata", {})
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            continue
        neg = "!=" in term
        k, v = (s.strip() for s in term.replace("!=", "=").replace("==", "=").split("=", 1))
        if k == "metadata.name":
            have = meta.get("name", "")
        elif k == "metadata.namespace":
            have = meta.get("namespace", "")
        else:
            raise ValueError(f'field label not supported: "{k}"')
        if (have == v) == neg:
            return False
    return True


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ------------------------------------------------------------------ server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], owner: ApiServerStandIn) -> None:
        self.owner = owner
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse lookup that stalls without DNS.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conns_lock:
                self.conns.discard(request)

    def kill_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients going away mid-stream is normal here


class _Dropped(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def address_string(self) -> str:
        return str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing

    def _send_json(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_status(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, _enc(_status(code, reason, message)))

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # -- routing

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path.rstrip("/")
        status = owner._pre_request(path, query)
        if status:
            owner._record(path, query, status)
            self._send_status(status, "InternalError" if status >= 500 else "Injected", "injected fault")
            return
        route = _route(path)
        if route is None:
            owner._record(path, query, 404)
            self._send_status(404, "NotFound", f"the server could not find the requested resource ({path})")
            return
        if isinstance(route, bytes):
            owner._record(path, query, 200)
            self._send_json(200, route)
            return
        rtype, ns, name = route
        watch = query.get("watch", "") in ("1", "true", "True")
        owner._record(path, query, 200)
        try:
            if name is not None:
                self._get_one(rtype, ns or "", name)
            elif watch:
                self._watch(rtype, ns, query)
            else:
                self._list(rtype, ns, query)
        except ValueError as e:
            self._send_status(400, "BadRequest", str(e))

    def _get_one(self, rtype: ResourceType, ns: str, name: str) -> None:
        enc = self.server.owner._get_encoded(rtype.plural, ns, name)
        if enc is None:
            self._send_status(404, "NotFound", f'{rtype.plural} "{name}" not found')
        else:
            self._send_json(200, enc)

    def _list(self, rtype: ResourceType, ns: str | None, query: Mapping[str, str]) -> None:
        owner = self.server.owner
        limit = int(query.get("limit", "0") or 0)
        token = query.get("continue", "")
        _field_match(query.get("fieldSelector", ""), {})  # unknown field labels are a 400, objects or not
        if token:
            page = owner._continue_page(token)
            if page is None:
                self._send_status(410, "Expired", "continue token expired or unknown")
                return
            rv, encs = page
        else:
            rv, encs = owner._list_encoded(
                rtype.plural, ns, query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
        cont = ""
        if limit > 0 and len(encs) > limit:
            cont = owner._store_continue(rv, encs[limit:])
            encs = encs[:limit]
        meta: Obj = {"resourceVersion": str(rv)}
        if cont:
            meta["continue"] = cont
        head = b'{"kind":"%s","apiVersion":"%s","metadata":%s,"items":[' % (
            (rtype.kind + "List").encode(),
            rtype.api_version.encode(),
            _enc(meta),
        )
        self._send_json(200, head + b",".join(encs) + b"]}")

    def _watch(self, rtype: ResourceType, ns: str | None, query: Mapping[str, str]) -> None:
        owner = self.server.owner
        labels = query.get("labelSelector", "")
        fields = query.get("fieldSelector", "")
        _field_match(fields, {})  # reject unknown field labels up front, as the apiserver does
        bookmarks = query.get("allowWatchBookmarks", "") in ("1", "true", "True")
        timeout = float(query.get("timeoutSeconds", "0") or 0) or owner.default_watch_timeout
        rv_text = query.get("resourceVersion", "")
        if rv_text not in ("", "0") and not rv_text.isdigit():
            self._send_status(400, "BadRequest", f"invalid resourceVersion {rv_text!r}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        conn = self.connection
        owner._watch_opened(conn)
        try:
            for line in owner._watch_lines(rtype, ns, labels, fields, rv_text, bookmarks, timeout):
                self._chunk(line + b"\n")
            self.wfile.write(b"0\r\n\r\n")
        except _Dropped:
            self.close_connection = True
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True
        finally:
            owner._watch_closed(conn)


def _route(path: str) -> tuple[ResourceType, str | None, str | None] | bytes | None:
    if path in ("/api", "/apis", "/version"):
        return _DISCOVERY[path]
    segs = [unquote(s) for s in path.split("/")[1:]]
    if len(segs) >= 2 and segs[0] == "api" and segs[1] == "v1":
        rest = segs[2:]
        group = ""
    elif len(segs) >= 3 and segs[0] == "apis":
        rest = segs[3:]
        group = segs[1]
        if segs[2] != "v1":
            return None
    else:
        return None
    ns: str | None = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        return None
    rtype = RESOURCES.get(rest[0])
    if rtype is None or rtype.group != group or (ns is not None and not rtype.namespaced):
        return None
    name = rest[1] if len(rest) == 2 else None
    if name is not None and rtype.namespaced and ns is None:
        return None
    return rtype, ns, name


_DISCOVERY: dict[str, bytes] = {
    "/api": _enc({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
    "/apis": _enc(
        {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": "discovery.k8s.io",
                    "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
                }
            ],
        }
    ),
    "/version": _enc(
        {"major": "1", "minor": "31", "gitVersion": "v1.31.0-standin", "platform": "linux/amd64"}
    ),
}


# ------------------------------------------------------------------ the stand-in


@dataclass
class _Stored:
    obj: Obj
    enc: bytes
    """As a watch event carries it."""
    list_enc: bytes
    """As a list item: the apiserver leaves kind and apiVersion off list items."""
    labels: Mapping[str, str] = field(default_factory=dict)


class ApiServerStandIn:
    """See the module docstring. Every control method is thread-safe and works while stopped."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = 1800.0,
        first_rv: int = 1000,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.latency = 0.0
        self.hang_watches: bool | str = False
        """While set, new watch streams send headers and then nothing, ignoring their timeout;
        "trickle" sends a bare newline every 0.1 s instead (alive on the wire, dead in content)."""
        self.requests: list[RequestRecord] = []
        self._cond = threading.Condition()
        self._rv = first_rv
        self._compacted = first_rv
        self._objects: dict[str, dict[tuple[str, str], _Stored]] = {p: {} for p in RESOURCES}
        self._history: list[Change] = []
        self._history_rvs: list[int] = []
        self._continues: dict[str, tuple[int, list[bytes]]] = {}
        self._faults: list[Fault] = []
        self._drop_gen = 0
        self._running = False
        self._watch_conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> ApiServerStandIn:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), self)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_port
        with self._cond:
            self._running = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="apiserver-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, as a crashed apiserver would."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._running = False
            self._drop_gen += 1
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        server.kill_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ApiServerStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def configuration(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig pointing at this stand-in (JSON is valid YAML)."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "current-context": "standin",
        }
        p = Path(path)
        p.write_text(json.dumps(doc, indent=2))
        return p

    # -- object controls

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def create(self, obj: Mapping[str, Any]) -> Obj:
        return self._write(obj, must_exist=False)

    def update(self, obj: Mapping[str, Any]) -> Obj:
        return self._write(obj, must_exist=True)

    def apply(self, obj: Mapping[str, Any]) -> Obj:
        return self._write(obj, must_exist=None)

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        rtype = BY_KIND.get(kind) or RESOURCES[kind]
        key = (namespace if rtype.namespaced else "", name)
        with self._cond:
            stored = self._objects[rtype.plural].pop(key)
            self._rv += 1
            gone = copy.deepcopy(stored.obj)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._append(Change(self._rv, rtype.plural, "DELETED", gone, stored.obj))
            return gone

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        rtype = BY_KIND.get(kind) or RESOURCES[kind]
        with self._cond:
            s = self._objects[rtype.plural].get((namespace if rtype.namespaced else "", name))
            return copy.deepcopy(s.obj) if s else None

    def objects(self, kind: str) -> list[Obj]:
        rtype = BY_KIND.get(kind) or RESOURCES[kind]
        with self._cond:
            return [copy.deepcopy(s.obj) for _, s in sorted(self._objects[rtype.plural].items())]

    def compact(self, keep: int = 0) -> int:
        """Forget all but the last `keep` changes; a watch from before them gets 410 Gone."""
        with self._cond:
            cut = max(0, len(self._history) - keep)
            if cut:
                self._compacted = self._history[cut - 1].rv
            if keep == 0:
                self._compacted = self._rv
            del self._history[:cut]
            del self._history_rvs[:cut]
            self._continues.clear()
            return self._compacted

    def drop_watches(self) -> None:
        """Cut every open watch connection without a clean end, like a network blip."""
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()
            conns = list(self._watch_conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def inject_fault(
        self,
        status: int = 500,
        count: int | None = None,
        *,
        path_contains: str = "",
        watch_only: bool = False,
    ) -> None:
        """Answer matching requests with `status` (`count` times, or until clear_faults())."""
        with self._cond:
            self._faults.append(Fault(status, count, path_contains, watch_only))

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watch_conns)

    def wait_for_watches(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._watch_conns) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- internals (called from handler threads)

    def _write(self, obj: Mapping[str, Any], must_exist: bool | None) -> Obj:
        new = copy.deepcopy(dict(obj))
        rtype = BY_KIND[new["kind"]]
        new.setdefault("apiVersion", rtype.api_version)
        meta = new.setdefault("metadata", {})
        if rtype.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            table = self._objects[rtype.plural]
            old = table.get(key)
            if must_exist is True and old is None:
                raise KeyError(f"{rtype.kind} {key} does not exist")
            if must_exist is False and old is not None:
                raise KeyError(f"{rtype.kind} {key} already exists")
            self._rv += 1
            if old is None:
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                meta["generation"] = 1
            else:
                meta["uid"] = old.obj["metadata"]["uid"]
                meta["creationTimestamp"] = old.obj["metadata"]["creationTimestamp"]
                meta["generation"] = old.obj["metadata"].get("generation", 1) + 1
            meta["resourceVersion"] = str(self._rv)
            bare = {k: v for k, v in new.items() if k not in ("kind", "apiVersion")}
            table[key] = _Stored(new, _enc(new), _enc(bare), dict(meta.get("labels") or {}))
            self._append(
                Change(self._rv, rtype.plural, "MODIFIED" if old else "ADDED", new, old.obj if old else None)
            )
            return copy.deepcopy(new)

    def _append(self, change: Change) -> None:
        self._history.append(change)
        self._history_rvs.append(change.rv)
        self._cond.notify_all()

    def _record(self, path: str, query: Mapping[str, str], status: int) -> None:
        with self._cond:
            self.requests.append(RequestRecord(path, dict(query), status, time.monotonic()))

    def _pre_request(self, path: str, query: Mapping[str, str]) -> int:
        if self.latency:
            time.sleep(self.latency)
        watch = query.get("watch", "") in ("1", "true", "True")
        with self._cond:
            for f in self._faults:
                if f.path_contains not in path or (f.watch_only and not watch):
                    continue
                if f.remaining is not None:
                    if f.remaining <= 0:
                        continue
                    f.remaining -= 1
                return f.status
        return 0

    def _get_encoded(self, plural: str, ns: str, name: str) -> bytes | None:
        with self._cond:
            s = self._objects[plural].get((ns, name))
            return s.enc if s else None

    def _list_encoded(self, plural: str, ns: str | None, labels: str, fields: str) -> tuple[int, list[bytes]]:
        with self._cond:
            items = sorted(self._objects[plural].items())
            rv = self._rv
        out = []
        for (ons, _), s in items:
            if ns is not None and ons != ns:
                continue
            if labels and not _label_match(labels, s.labels):
                continue
            if fields and not _field_match(fields, s.obj):
                continue
            out.append(s.list_enc)
        return rv, out

    def _store_continue(self, rv: int, rest: list[bytes]) -> str:
        token = uuid.uuid4().hex
        with self._cond:
            self._continues[token] = (rv, rest)
        return token

    def _continue_page(self, token: str) -> tuple[int, list[bytes]] | None:
        with self._cond:
            return self._continues.pop(token, None)

    def _watch_opened(self, conn: socket.socket) -> None:
        with self._cond:
            self._watch_conns.add(conn)
            self._cond.notify_all()

    def _watch_closed(self, conn: socket.socket) -> None:
        with self._cond:
            self._watch_conns.discard(conn)
            self._cond.notify_all()

    def _matches(self, ns: str | None, labels: str, fields: str, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if ns is not None and meta.get("namespace", "") != ns:
            return False
        if labels and not _label_match(labels, meta.get("labels") or {}):
            return False
        return not (fields and not _field_match(fields, obj))

    def _watch_lines(
        self,
        rtype: ResourceType,
        ns: str | None,
        labels: str,
        fields: str,
        rv_text: str,
        bookmarks: bool,
        timeout: float,
    ) -> Iterator[bytes]:
        """The watch stream as encoded lines; raises _Dropped when the connection must be cut."""
        now = time.monotonic()
        deadline = now + timeout
        next_bookmark = now + self.bookmark_interval
        with self._cond:
            gen = self._drop_gen
            if rv_text in ("", "0"):
                last = self._rv
                initial = [
                    s.obj
                    for s in self._objects[rtype.plural].values()
                    if self._matches(ns, labels, fields, s.obj)
                ]
            else:
                last = int(rv_text)
                initial = []
        if self.hang_watches:
            while True:
                with self._cond:
                    if not self.hang_watches or gen != self._drop_gen or not self._running:
                        raise _Dropped
                    self._cond.wait(0.1)
                if self.hang_watches == "trickle":
                    yield b""  # a bare newline: bytes on the wire, never an event
        for obj in initial:
            yield _enc({"type": "ADDED", "object": obj})
        while True:
            expired = ""
            with self._cond:
                while True:
                    if gen != self._drop_gen or not self._running:
                        raise _Dropped
                    if last < self._compacted:
                        expired = f"too old resource version: {last} ({self._compacted})"
                        break
                    start = bisect.bisect_right(self._history_rvs, last)
                    now = time.monotonic()
                    if start < len(self._history) or now >= deadline or (bookmarks and now >= next_bookmark):
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    self._cond.wait(max(0.0, wake - now))
                changes = [] if expired else self._history[start:]
                seen = self._rv
            if expired:
                yield _enc({"type": "ERROR", "object": _status(410, "Expired", expired)})
                return
            yield from self._render_changes(rtype, ns, labels, fields, changes)
            last = seen
            now = time.monotonic()
            if bookmarks and now >= next_bookmark:
                mark = {
                    "kind": rtype.kind,
                    "apiVersion": rtype.api_version,
                    "metadata": {"resourceVersion": str(seen)},
                }
                yield _enc({"type": "BOOKMARK", "object": mark})
                next_bookmark = now + self.bookmark_interval
            if now >= deadline:
                return

    def _render_changes(
        self, rtype: ResourceType, ns: str | None, labels: str, fields: str, changes: Iterable[Change]
    ) -> Iterator[bytes]:
        for c in changes:
            if c.resource != rtype.plural:
                continue
            if c.type == "DELETED":
                if self._matches(ns, labels, fields, c.old):
                    yield _enc({"type": "DELETED", "object": c.obj})
                continue
            was = self._matches(ns, labels, fields, c.old)
            now = self._matches(ns, labels, fields, c.obj)
            if now:
                yield _enc({"type": "MODIFIED" if was else "ADDED", "object": c.obj})
            elif was:
                yield _enc({"type": "DELETED", "object": c.obj})


# ------------------------------------------------------------------ object builders


def service(
    name: str,
    namespace: str = "default",
    *,
    cluster_ip: str = "10.96.0.10",
    ports: Iterable[tuple[str, int, str]] = (("http", 80, "TCP"),),
    labels: Mapping[str, str] | None = None,
    type: str = "ClusterIP",
    **spec: Any,
) -> Obj:
    """A v1 Service; `spec` keys (camelCase) are merged into `.spec`."""
    body: Obj = {
        "type": type,
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip] if cluster_ip and cluster_ip != "None" else [],
        "ports": [{"name": n, "port": p, "protocol": proto, "targetPort": p} for n, p, proto in ports],
        **spec,
    }
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def endpoint_slice(
    name: str,
    service_name: str,
    namespace: str = "default",
    *,
    addresses: Iterable[str] = ("10.244.0.5",),
    ports: Iterable[tuple[str, int, str]] = (("http", 8080, "TCP"),),
    node_name: str = "",
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
) -> Obj:
    eps: list[Obj] = []
    for a in addresses:
        ep: Obj = {"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
        if node_name:
            ep["nodeName"] = node_name
        eps.append(ep)
    lab = {"kubernetes.io/service-name": service_name, **(labels or {})}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": lab},
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def node(name: str, *, zone: str = "", pod_cidrs: Iterable[str] = (), addresses: Iterable[str] = ()) -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    cidrs = list(pod_cidrs)
    spec: Obj = {"podCIDRs": cidrs}
    if cidrs:
        spec["podCIDR"] = cidrs[0]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


def endpoints(
    name: str,
    namespace: str = "default",
    *,
    addresses: Iterable[str] = ("10.244.0.5",),
    ports: Iterable[tuple[str, int, str]] = (("http", 8080, "TCP"),),
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [
            {
                "addresses": [{"ip": a} for a in addresses],
                "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
            }
        ],
    }
