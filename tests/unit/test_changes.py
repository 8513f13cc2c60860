"""Change tracking: what counts as a change, and what a sync is told to rewrite."""

from __future__ import annotations

import pytest

from kproxy.state.model import (
    EndpointSlice,
    Node,
    Service,
    ServiceKey,
)
from kproxy.tracking.changes import ChangeTracker, FamilyView
from tests.support.objects import eps, svc

WEB = ServiceKey("default", "web")


def listed() -> ChangeTracker:
    t = ChangeTracker(node_name="node-a")
    t.replace("Service", [])
    t.replace("EndpointSlice", [])
    t.take()
    return t


def test_nothing_is_ready_before_both_initial_lists() -> None:
    t = ChangeTracker(node_name="node-a")
    assert not t.ready
    t.replace("Service", [svc()])
    assert not t.ready
    t.replace("EndpointSlice", [eps()])
    assert t.ready


@pytest.mark.parametrize(
    ("first", "second", "changed"),
    [
        (svc(rv="1"), svc(rv="2"), False),
        (svc(), svc(port=81), True),
        (eps(rv="1"), eps(rv="9"), False),
        (eps(), eps(ips=("10.244.0.6",)), True),
    ],
    ids=["service-new-rv-only", "service-port-changed", "slice-new-rv-only", "slice-endpoint-changed"],
)
def test_updates_that_change_nothing_are_dropped(
    first: Service | EndpointSlice, second: Service | EndpointSlice, changed: bool
) -> None:
    t = listed()
    t.upsert(first)
    t.take()
    assert t.upsert(second) is changed
    assert t.has_pending is changed


def test_relist_deletes_what_vanished_while_disconnected() -> None:
    t = listed()
    t.upsert(svc("a", "10.96.0.1"))
    t.upsert(svc("b", "10.96.0.2"))
    t.take()
    t.replace("Service", [svc("a", "10.96.0.1")])
    pending = t.take()
    assert pending.services == {ServiceKey("default", "b")}
    assert set(t.services) == {ServiceKey("default", "a")}


def test_failed_sync_gives_changes_back() -> None:
    t = listed()
    t.upsert(svc())
    t.upsert(eps())
    batch = t.take()
    assert not t.has_pending
    t.upsert(svc("other", "10.96.0.3"))
    t.requeue(batch)
    again = t.take()
    assert again.services == {WEB, ServiceKey("default", "other")}
    assert again.service_changes == 2 and again.endpoint_changes == 1


def test_slice_moving_to_another_service_marks_both() -> None:
    t = listed()
    t.upsert(eps("web", name="s1"))
    t.take()
    t.upsert(eps("api", name="s1"))
    assert t.take().services == {WEB, ServiceKey("default", "api")}
    assert t.slices_of(WEB) == ()


def test_only_this_nodes_node_counts() -> None:
    t = listed()
    assert not t.upsert(Node(name="node-b"))
    assert t.upsert(Node(name="node-a", labels=(("topology.kubernetes.io/zone", "z1"),)))
    assert t.take().node_changed


def test_family_view_recomputes_only_what_changed() -> None:
    t = listed()
    for i in range(50):
        t.upsert(svc(f"s{i}", f"10.96.1.{i}"))
        t.upsert(eps(f"s{i}", (f"10.244.1.{i}",)))
    view = FamilyView(4, "node-a")
    assert len(view.rebuild(t)) == 50
    t.take()
    t.upsert(eps("s7", ("10.244.1.7", "10.244.2.7")))
    changed = view.update(t, t.take().services)
    assert [str(n) for n in changed] == ["default/s7:http"]
    _sp, endpoints = view.ports[next(iter(changed))]
    assert [e.ip for e in endpoints] == ["10.244.1.7", "10.244.2.7"]
    assert all(e.is_local for e in endpoints)


def test_family_view_drops_deleted_services_and_ignores_other_family() -> None:
    t = listed()
    t.upsert(svc())
    t.upsert(eps())
    v4, v6 = FamilyView(4, "node-a"), FamilyView(6, "node-a")
    v4.rebuild(t)
    v6.rebuild(t)
    assert len(v4.ports) == 1 and v6.ports == {}
    t.take()
    t.delete("Service", "default", "web")
    assert len(v4.update(t, t.take().services)) == 1
    assert v4.ports == {}
