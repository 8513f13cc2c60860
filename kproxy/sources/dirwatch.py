"""The no-cluster source: a directory of YAML manifests, served as if it were the API.

The directory is polled by stat: that survives editors that replace files and Kubernetes
ConfigMap mounts that swap a symlink, where inotify watches on the old inode silently go
stale. Only files whose stamp (device, inode, mtime, size) changed are read again; each kind
is then handed to the sink as a `listed` event and the change tracker drops what did not change.

Bad input never takes a working service down, as the API server would refuse a bad update
and keep serving the stored object:

- a file that cannot be read or parsed (a syntax error, a half-written file) keeps the
  objects it last parsed to; one error is logged per distinct failure, and the file counts
  in `kproxy_manifest_files_in_error` until it parses again;
- an object that fails validation keeps its last good version from the same file;
- a vanished or unlistable directory keeps everything (a warning, once): a directory moved
  away or an unmounted volume is not an instruction to delete every service. Removing the
  files inside it is. Nothing is lost while it lasts, so /healthz is not affected.

Reading and parsing run in a daemon thread, never on the event loop: a read that hangs (a
stuck network filesystem) cannot stop the agent from answering probes or from exiting on
SIGTERM. FIFOs, sockets and devices are never opened (see files.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from kproxy.errors import ObjectError
from kproxy.infra import log
from kproxy.sources.events import RESOURCES, Resource, SourceEvent, resource_of
from kproxy.sources.files import Entry, ReadError, file_format, read_manifest, scan_path
from kproxy.state.model import EndpointSlice, KObject, Node, ObjectRef
from kproxy.state.parse import is_document_error, parse_stream

T = TypeVar("T")

Identity = tuple[str, str, str]
"""(kind, namespace, name) as an ObjectError names the object: a legacy Endpoints by its own name."""


Sink = Callable[[SourceEvent], int]
"""Where a source delivers its events; returns how many changes an event made."""


def _identity(obj: KObject) -> Identity:
    if isinstance(obj, Node):
        return ("Node", "", obj.name)
    if isinstance(obj, EndpointSlice) and obj.legacy:
        return ("Endpoints", obj.namespace, obj.service_name)
    return (type(obj).__name__, obj.namespace, obj.name)


def _problem_key(e: ObjectError) -> tuple[str, str, str]:
    """What makes a report the same report again: the object, field and reason (not the line)."""
    return (str(e.ref), e.field, e.reason)


@dataclass
class _File:
    """What one manifest file contributes, and what has been said about it."""

    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)
    objects: list[KObject] = field(default_factory=list)
    """Served now: the last good parse, object by object."""
    error: str = ""
    """Why the latest content is not served ("" when it is)."""
    reported: frozenset[tuple[str, str, str]] = frozenset()
    """Object errors and warnings already logged, so a reload repeats none."""


@dataclass
class ManifestDirectory:
    """The directory's last good state, file by file."""

    path: str
    files: dict[str, _File] = field(default_factory=dict)
    listed: bool = False
    """The directory has been listed once: before that, nothing is known and nothing handed over."""
    unreadable: str = ""

    @property
    def files_in_error(self) -> int:
        return sum(1 for f in self.files.values() if f.error)

    def poll(self) -> bool:
        """Look at the directory; re-read what changed. True when the objects served may differ.

        Blocking (stat, read, parse): run it off the event loop.
        """
        try:
            entries = scan_path(self.path)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            if reason != self.unreadable:
                self.unreadable = reason
                log.warn(
                    "manifests_unreadable",
                    path=self.path,
                    reason=reason,
                    kept=sum(len(f.objects) for f in self.files.values()),
                    action="serving the last objects read until the directory is back",
                )
            return False
        if self.unreadable:
            log.info("manifests_readable", path=self.path)
            self.unreadable = ""
        changed = not self.listed
        self.listed = True
        present = {e.path for e in entries}
        for gone in [p for p in self.files if p not in present]:
            old = self.files.pop(gone)
            if old.error:
                log.info("manifest_file_removed", file=gone, was_in_error=True)
            changed = changed or bool(old.objects)
        for entry in entries:
            known = self.files.get(entry.path)
            if known is not None and known.stamp == entry.stamp:
                continue
            changed = self._load(entry, known or _File()) or changed
        return changed

    def _load(self, entry: Entry, before: _File) -> bool:
        if entry.problem:
            return self._failed(entry.path, before, entry.stamp, entry.problem, warn=True)
        try:
            text, stamp = read_manifest(entry.path)
        except ReadError as e:
            if e.transient:
                return False  # a writer is at work: read it at the next poll
            return self._failed(entry.path, before, entry.stamp, e.reason, warn=False)
        warnings: list[ObjectError] = []
        objs, errors = parse_stream(text, entry.path, fmt=file_format(entry.path), warnings=warnings)
        broken = [e for e in errors if is_document_error(e)]
        if broken:
            partial = list(objs) if not before.objects and not before.stamp[1] else None
            first = broken[0]
            return self._failed(
                entry.path, before, stamp, first.reason, warn=False, objects=partial, where=first.source
            )
        bad = {(e.ref.kind, e.ref.namespace, e.ref.name) for e in errors}
        kept = [o for o in before.objects if _identity(o) in bad]
        kept_ids = {_identity(o) for o in kept}
        reported: set[tuple[str, str, str]] = set()
        for err in errors:
            key = _problem_key(err)
            reported.add(key)
            if key not in before.reported:
                held = (err.ref.kind, err.ref.namespace, err.ref.name) in kept_ids
                log.warn(
                    "object_skipped",
                    source=err.source,
                    object=str(err.ref),
                    field=err.field,
                    reason=err.reason,
                    serving="last good version" if held else "nothing",
                )
        for w in warnings:
            key = _problem_key(w)
            reported.add(key)
            if key not in before.reported:
                log.warn("field_ignored", source=w.source, object=str(w.ref), field=w.field, reason=w.reason)
        if before.error:
            log.info("manifest_file_recovered", file=entry.path, objects=len(objs))
        self.files[entry.path] = _File(stamp, [*objs, *kept], "", frozenset(reported))
        return True

    def _failed(
        self,
        path: str,
        before: _File,
        stamp: tuple[int, int, int, int],
        reason: str,
        *,
        warn: bool,
        objects: list[KObject] | None = None,
        where: str = "",
    ) -> bool:
        """The file's new content is unusable: keep serving what it held, say so once."""
        error = f"{where}: {reason}" if where else reason
        if error != before.error:
            kept = len(before.objects) if objects is None else len(objects)
            fields: dict[str, object] = {"file": path}
            if where:
                fields["at"] = where
            fields["reason"] = reason
            fields["kept"] = kept
            if objects is not None:
                fields["action"] = "serving the objects that did parse (nothing was served from it before)"
            elif kept:
                fields["action"] = "serving its last good objects until it is fixed"
            else:
                fields["action"] = "skipped"
            (log.warn if warn else log.error)("manifest_file_not_loaded", **fields)
        self.files[path] = _File(
            stamp, before.objects if objects is None else objects, error, before.reported
        )
        return objects is not None and bool(objects)

    def by_resource(self) -> dict[Resource, dict[ObjectRef, tuple[KObject, ...]]]:
        out: dict[Resource, dict[ObjectRef, tuple[KObject, ...]]] = {r: {} for r in RESOURCES}
        for path in sorted(self.files):
            for obj in self.files[path].objects:
                items = out[resource_of(obj)]
                ref = ObjectRef(*_identity(obj))
                items[ref] = (*items.get(ref, ()), obj)
        return out

    def apply(self, sink: Sink) -> int:
        """Hand every resource over as a `listed` event (on the thread that owns the sink)."""
        by_resource = self.by_resource()
        changed = sum(sink(SourceEvent("listed", r, items=items)) for r, items in by_resource.items())
        log.info(
            "manifests_loaded",
            path=self.path,
            objects=sum(len(objs) for items in by_resource.values() for objs in items.values()),
            files_in_error=self.files_in_error,
            changed=changed,
        )
        return changed


async def off_loop(fn: Callable[[], T]) -> T:
    """fn() in a daemon thread: awaiting it can be cancelled, and a hung call never holds up exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            fut.set_exception(value)

    def run() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as e:  # handed to the awaiting task
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=run, name="kproxy-manifests", daemon=True).start()
    return await fut


async def watch_directory(
    path: str,
    sink: Sink,
    on_change: Callable[[], None],
    interval: float = 0.25,
    *,
    report: Callable[[int], None] | None = None,
) -> None:
    """Load now, then reload whenever a file under `path` is added, removed or modified.

    `report` is told the number of files in error after every poll that looked at the files.
    """
    d = ManifestDirectory(os.fspath(path))
    while True:
        if await off_loop(d.poll) and d.apply(sink):
            on_change()
        if report is not None and d.listed:
            report(d.files_in_error)
        await asyncio.sleep(interval)
