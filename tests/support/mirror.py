"""A mirror of a source's objects per resource, kept by applying `SourceEvent`s in order.

Tests use it to check what a source reported; production feeds events straight to the
change tracker (`kproxy.tracking.events.apply_event`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from kproxy.sources.events import Resource, SourceEvent
from kproxy.state.model import KObject, ObjectRef


@dataclass(frozen=True, slots=True)
class Change:
    ref: ObjectRef
    old: tuple[KObject, ...]
    new: tuple[KObject, ...]


class SourceMirror:
    """The current objects per resource, kept by applying `SourceEvent`s in order.

    `apply` says what actually changed, so a consumer can mark just those services dirty and
    skip no-op relists and bookmarks-driven resyncs.
    """

    def __init__(self) -> None:
        self._by: dict[Resource, dict[ObjectRef, tuple[KObject, ...]]] = {}
        self._listed: set[Resource] = set()

    def apply(self, ev: SourceEvent) -> list[Change]:
        table = self._by.setdefault(ev.resource, {})
        if ev.kind == "listed":
            changes = [Change(ref, old, ()) for ref, old in table.items() if ref not in ev.items]
            changes.extend(
                Change(ref, table.get(ref, ()), new) for ref, new in ev.items.items() if table.get(ref) != new
            )
            self._by[ev.resource] = dict(ev.items)
            self._listed.add(ev.resource)
            return changes
        if ev.ref is None:
            return []
        old = table.get(ev.ref, ())
        if ev.kind == "upsert":
            if old == ev.objects:
                return []
            table[ev.ref] = ev.objects
            return [Change(ev.ref, old, ev.objects)]
        if ev.ref not in table:
            return []
        del table[ev.ref]
        return [Change(ev.ref, old, ())]

    def listed(self, resources: Sequence[Resource]) -> bool:
        return self._listed.issuperset(resources)

    def objects(self) -> Iterator[KObject]:
        for table in self._by.values():
            for objs in table.values():
                yield from objs

    def get(self, resource: Resource) -> Mapping[ObjectRef, tuple[KObject, ...]]:
        return self._by.get(resource, {})
