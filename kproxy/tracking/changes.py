"""Change tracking: the latest objects, and which services changed since the last sync.

Sources (API watch, manifest directory) push objects in; the node agent takes the
pending changes out. Updates that change nothing a rule could depend on (a new
resourceVersion, a new trigger time) are dropped here, so they never cost a render.
`FamilyView` then keeps each family's service-port view current by recomputing only
the services that changed: at 10,000 services a sync touching one of them does work
for one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.state.build import merge_endpoints, service_ports
from kproxy.state.model import (
    EndpointSlice,
    Family,
    KObject,
    Node,
    PortEntry,
    Service,
    ServiceKey,
    ServicePortName,
)

RESOURCES = ("Service", "EndpointSlice", "Endpoints", "Node")


@dataclass(frozen=True, slots=True)
class PendingChanges:
    services: frozenset[ServiceKey]
    node_changed: bool
    service_changes: int
    endpoint_changes: int
    trigger_times: tuple[tuple[Family, float], ...]
    """(family, trigger time) of the EndpointSlices changed, for network-programming latency."""
    first_queued: float | None
    """time.monotonic() of the oldest change in the batch."""

    @property
    def empty(self) -> bool:
        return not self.services and not self.node_changed


@dataclass
class ChangeTracker:
    """Owns the current objects; everything else reads them through here."""

    node_name: str
    wait_for: frozenset[str] = frozenset({"Service", "EndpointSlice"})
    services: dict[ServiceKey, Service] = field(default_factory=dict)
    slices: dict[ServiceKey, dict[tuple[str, str], EndpointSlice]] = field(default_factory=dict)
    """Per service, slices keyed by (kind, name): legacy Endpoints live beside real slices."""
    node: Node | None = None
    _slice_owner: dict[tuple[str, str, str], ServiceKey] = field(default_factory=dict)
    _listed: set[str] = field(default_factory=set)
    _dirty: set[ServiceKey] = field(default_factory=set)
    _node_dirty: bool = False
    _service_changes: int = 0
    _endpoint_changes: int = 0
    _trigger_times: list[tuple[Family, float]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    """Trigger times before this are not ours to measure (kube-proxy's trackerStartTime)."""
    _first_queued: float | None = None
    service_changes_total: int = 0
    endpoint_changes_total: int = 0

    # -------------------------------------------------------------- inputs

    def upsert(self, obj: KObject) -> bool:
        """Record an added or modified object; True when it changes anything."""
        if isinstance(obj, Service):
            if self.services.get(obj.key) == obj:
                return False
            self.services[obj.key] = obj
            self._mark(obj.key, service=True)
            return True
        if isinstance(obj, Node):
            if obj.name != self.node_name or self.node == obj:
                return False
            self.node = obj
            self._node_dirty = True
            self._touch()
            return True
        kind = "Endpoints" if obj.legacy else "EndpointSlice"
        owner_key = (kind, obj.namespace, obj.name)
        key = obj.service
        previous_owner = self._slice_owner.get(owner_key)
        if previous_owner is not None and previous_owner != key:
            self._drop_slice(previous_owner, (kind, obj.name))
            self._mark(previous_owner, service=False)
        bucket = self.slices.setdefault(key, {})
        slot = (kind, obj.name)
        if bucket.get(slot) == obj:
            return False
        bucket[slot] = obj
        self._slice_owner[owner_key] = key
        if obj.trigger_time is not None and obj.trigger_time > self.started:
            self._trigger_times.append((6 if obj.address_type == "IPv6" else 4, obj.trigger_time))
        self._mark(key, service=False)
        return True

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        if kind == "Service":
            key = ServiceKey(namespace, name)
            if self.services.pop(key, None) is None:
                return False
            self._mark(key, service=True)
            return True
        if kind == "Node":
            if name != self.node_name or self.node is None:
                return False
            self.node = None
            self._node_dirty = True
            self._touch()
            return True
        if kind == "Endpoints":
            # One legacy Endpoints may have become several slices (one per family).
            key = ServiceKey(namespace, name)
            bucket = self.slices.get(key, {})
            slots = [slot for slot in bucket if slot[0] == "Endpoints"]
            for slot in slots:
                self._drop_slice(key, slot)
                self._slice_owner.pop(("Endpoints", namespace, slot[1]), None)
            if slots:
                self._mark(key, service=False)
            return bool(slots)
        owner = self._slice_owner.pop((kind, namespace, name), None)
        if owner is None:
            return False
        self._drop_slice(owner, (kind, name))
        self._mark(owner, service=False)
        return True

    def replace(self, kind: str, objects: Iterable[KObject]) -> int:
        """Apply a full (re)list of one kind: what is absent from it was deleted meanwhile."""
        fresh = list(objects)
        if kind == "Endpoints":
            groups: dict[ServiceKey, list[EndpointSlice]] = {}
            for obj in fresh:
                if isinstance(obj, EndpointSlice):
                    groups.setdefault(obj.service, []).append(obj)
            changed = sum(1 for key, group in groups.items() if self.set_legacy(key, group))
            present = {(key.namespace, key.name) for key in groups}
        else:
            changed = sum(1 for obj in fresh if self.upsert(obj))
            present = {(obj.namespace if not isinstance(obj, Node) else "", obj.name) for obj in fresh}
        for namespace, name in self._names_of(kind):
            if (namespace, name) not in present and self.delete(kind, namespace, name):
                changed += 1
        self._listed.add(kind)
        return changed

    def set_legacy(self, key: ServiceKey, slices: Iterable[EndpointSlice]) -> bool:
        """Replace the slices one legacy Endpoints became (a family may have vanished from it)."""
        wanted = {s.name: s for s in slices}
        bucket = self.slices.get(key, {})
        changed = False
        for slot in [slot for slot in bucket if slot[0] == "Endpoints" and slot[1] not in wanted]:
            self._drop_slice(key, slot)
            self._slice_owner.pop(("Endpoints", key.namespace, slot[1]), None)
            self._mark(key, service=False)
            changed = True
        for obj in wanted.values():
            changed = self.upsert(obj) or changed
        return changed

    # ------------------------------------------------------------- outputs

    @property
    def ready(self) -> bool:
        """Nothing may be written before every awaited kind has had its first list."""
        return self.wait_for <= self._listed

    @property
    def has_pending(self) -> bool:
        return bool(self._dirty) or self._node_dirty

    @property
    def pending_counts(self) -> tuple[int, int]:
        """(service changes, endpoint changes) waiting for a sync."""
        return self._service_changes, self._endpoint_changes

    def take(self) -> PendingChanges:
        pending = PendingChanges(
            services=frozenset(self._dirty),
            node_changed=self._node_dirty,
            service_changes=self._service_changes,
            endpoint_changes=self._endpoint_changes,
            trigger_times=tuple(self._trigger_times),
            first_queued=self._first_queued,
        )
        self._dirty = set()
        self._node_dirty = False
        self._service_changes = self._endpoint_changes = 0
        self._trigger_times = []
        self._first_queued = None
        return pending

    def requeue(self, pending: PendingChanges) -> None:
        """Give back a batch whose sync failed, so no change is ever lost."""
        self._dirty |= pending.services
        self._node_dirty = self._node_dirty or pending.node_changed
        self._service_changes += pending.service_changes
        self._endpoint_changes += pending.endpoint_changes
        self._trigger_times.extend(pending.trigger_times)
        if pending.first_queued is not None and (
            self._first_queued is None or pending.first_queued < self._first_queued
        ):
            self._first_queued = pending.first_queued

    def all_services(self) -> frozenset[ServiceKey]:
        return frozenset(self.services) | frozenset(self.slices)

    def slices_of(self, key: ServiceKey) -> tuple[EndpointSlice, ...]:
        bucket = self.slices.get(key)
        return tuple(bucket.values()) if bucket else ()

    # ------------------------------------------------------------ internals

    def _names_of(self, kind: str) -> list[tuple[str, str]]:
        if kind == "Service":
            return [(k.namespace, k.name) for k in self.services]
        if kind == "Node":
            return [("", self.node.name)] if self.node is not None else []
        if kind == "Endpoints":
            return sorted(
                {(key.namespace, key.name) for (k, _, _), key in self._slice_owner.items() if k == kind}
            )
        return [(ns, name) for (k, ns, name) in self._slice_owner if k == kind]

    def _drop_slice(self, key: ServiceKey, slot: tuple[str, str]) -> None:
        bucket = self.slices.get(key)
        if bucket is None:
            return
        bucket.pop(slot, None)
        if not bucket:
            del self.slices[key]

    def _mark(self, key: ServiceKey, *, service: bool) -> None:
        self._dirty.add(key)
        if service:
            self._service_changes += 1
            self.service_changes_total += 1
        else:
            self._endpoint_changes += 1
            self.endpoint_changes_total += 1
        self._touch()

    def _touch(self) -> None:
        if self._first_queued is None:
            self._first_queued = time.monotonic()


class FamilyView:
    """One family's {ServicePortName: (ServicePort, endpoints)}, maintained incrementally."""

    def __init__(self, family: Family, node_name: str) -> None:
        self.family = family
        self.node_name = node_name
        self.ports: dict[ServicePortName, PortEntry] = {}
        self._by_service: dict[ServiceKey, tuple[ServicePortName, ...]] = {}
        self.endpoint_total = 0
        """Endpoints over every port, kept as ports change: what kube-proxy counts to
        decide its large-cluster mode, without a walk over the view per sync."""

    def update(self, tracker: ChangeTracker, keys: Iterable[ServiceKey]) -> set[ServicePortName]:
        """Recompute the given services; return the port names whose entry changed."""
        changed: set[ServicePortName] = set()
        ports = self.ports
        for key in keys:
            old_names = self._by_service.pop(key, ())
            svc = tracker.services.get(key)
            new_names: list[ServicePortName] = []
            if svc is not None:
                sps = service_ports(svc, self.family)
                if sps:
                    merged = merge_endpoints(tracker.slices_of(key), self.node_name, self.family)
                    for sp in sps:
                        entry = (sp, merged.get(sp.name, ()))
                        old = ports.get(sp.name)
                        if old != entry:
                            self.endpoint_total += len(entry[1]) - (len(old[1]) if old else 0)
                            ports[sp.name] = entry
                            changed.add(sp.name)
                        new_names.append(sp.name)
            for name in old_names:
                if name not in new_names:
                    gone = ports.pop(name, None)
                    if gone is not None:
                        self.endpoint_total -= len(gone[1])
                    changed.add(name)
            if new_names:
                self._by_service[key] = tuple(new_names)
        return changed

    def rebuild(self, tracker: ChangeTracker) -> set[ServicePortName]:
        return self.update(tracker, tracker.all_services() | frozenset(self._by_service))
