"""The no-cluster source: a directory of YAML manifests, served as if it were the API.

Every change to the directory re-reads it whole and hands each kind over as a full
list; the change tracker then drops whatever did not change, so rereading is cheap
where it matters (rendering and restoring). The directory is polled by stat: that
survives editors that replace files and Kubernetes ConfigMap mounts that swap a
symlink, where inotify watches on the old inode silently go stale.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Protocol

from kproxy import log
from kproxy.sources.files import load_paths, manifest_files
from kproxy.state.model import EndpointSlice, Node, Service

KObject = Service | EndpointSlice | Node
KINDS = ("Service", "EndpointSlice", "Endpoints", "Node")


class Sink(Protocol):
    """Where a source delivers objects; the change tracker is one."""

    def replace(self, kind: str, objects: list[KObject]) -> int: ...


def _kind(obj: KObject) -> str:
    if isinstance(obj, Service):
        return "Service"
    if isinstance(obj, Node):
        return "Node"
    return "Endpoints" if obj.legacy else "EndpointSlice"


def _signature(path: str) -> tuple[tuple[str, int, int], ...]:
    """Exactly the files load_paths reads, with what tells a change: mtime and size."""
    out: list[tuple[str, int, int]] = []
    for full in manifest_files(path) if os.path.isdir(path) else [path]:
        try:
            st = os.stat(full)
        except OSError:
            continue
        out.append((full, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_directory(path: str, sink: Sink) -> int:
    """Read the directory once and hand every kind to the sink as a full list."""
    objects, errors = load_paths([path])
    for err in errors:
        log.warn("object_skipped", source=err.source, object=str(err.ref), field=err.field, reason=err.reason)
    by_kind: dict[str, list[KObject]] = {k: [] for k in KINDS}
    for obj in objects:
        by_kind[_kind(obj)].append(obj)
    changed = sum(sink.replace(kind, objs) for kind, objs in by_kind.items())
    log.info("manifests_loaded", path=path, objects=len(objects), skipped=len(errors), changed=changed)
    return changed


async def watch_directory(
    path: str,
    sink: Sink,
    on_change: Callable[[], None],
    interval: float = 0.25,
) -> None:
    """Load now, then reload whenever a file under `path` is added, removed or modified."""
    if not os.path.isdir(path):
        log.error("manifests_missing", path=path)
    seen = _signature(path)
    if await asyncio.to_thread(load_directory, path, sink):
        on_change()
    while True:
        await asyncio.sleep(interval)
        now = await asyncio.to_thread(_signature, path)
        if now == seen:
            continue
        seen = now
        if await asyncio.to_thread(load_directory, path, sink):
            on_change()
