"""Source events into the change tracker: the one place their meaning is decided."""

from __future__ import annotations

from typing import Final

from kproxy.sources.events import Resource, SourceEvent
from kproxy.state.model import EndpointSlice, ServiceKey
from kproxy.tracking.changes import ChangeTracker

KIND_OF_RESOURCE: Final[dict[Resource, str]] = {
    "services": "Service",
    "endpointslices": "EndpointSlice",
    "endpoints": "Endpoints",
    "nodes": "Node",
}


def apply_event(tracker: ChangeTracker, ev: SourceEvent) -> int:
    """Feed one event to the tracker and say how many changes it made (a relist is a replace:
    what is missing from it was deleted)."""
    kind = KIND_OF_RESOURCE[ev.resource]
    if ev.kind == "listed":
        return tracker.replace(kind, [obj for objs in ev.items.values() for obj in objs])
    ref = ev.ref
    if ref is None:
        return 0
    if ev.kind == "upsert" and kind == "Endpoints":
        return int(
            tracker.set_legacy(
                ServiceKey(ref.namespace, ref.name), [o for o in ev.objects if isinstance(o, EndpointSlice)]
            )
        )
    if ev.kind == "upsert" and ev.objects:
        return sum(tracker.upsert(obj) for obj in ev.objects)
    return int(tracker.delete(kind, ref.namespace, ref.name))
