"""The API-server stand-in itself: selectors and wire details other tests rely on."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.apiserver_standin import ApiServerStandIn, _label_match, node, service


@pytest.mark.parametrize(
    ("selector", "labels", "want"),
    [
        ("", {}, True),
        ("!a", {}, True),
        ("!a", {"a": ""}, False),
        ("a", {"a": "x"}, True),
        ("a", {}, False),
        ("a=x", {"a": "x"}, True),
        ("a==x", {"a": "y"}, False),
        ("a!=x", {}, True),
        ("a!=x", {"a": "x"}, False),
        ("!a,b=1", {"b": "1"}, True),
        ("!a,b=1", {"a": "1", "b": "1"}, False),
    ],
    ids=lambda v: repr(v),
)
def test_label_selector_terms(selector: str, labels: dict[str, str], want: bool) -> None:
    assert _label_match(selector, labels) is want


@pytest.fixture
def api() -> Iterator[ApiServerStandIn]:
    server = ApiServerStandIn(bookmark_interval=0.1).start()
    try:
        yield server
    finally:
        server.stop()


def _get(api: ApiServerStandIn, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(api.url + path, timeout=5) as r:
            return r.status, [json.loads(line) for line in r.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_list_items_carry_no_type_meta_and_the_list_a_resource_version(api: ApiServerStandIn) -> None:
    api.create(service("a"))
    status, [doc] = _get(api, "/api/v1/namespaces/default/services")
    assert status == 200 and doc["kind"] == "ServiceList"
    assert doc["metadata"]["resourceVersion"] == str(api.resource_version)
    assert "kind" not in doc["items"][0] and doc["items"][0]["metadata"]["uid"]


def test_single_node_get_and_errors(api: ApiServerStandIn) -> None:
    api.create(node("n1"))
    assert _get(api, "/api/v1/nodes/n1")[1][0]["metadata"]["name"] == "n1"
    status, body = _get(api, "/api/v1/nodes/n2")
    assert status == 404 and body["kind"] == "Status"
    assert _get(api, "/api/v1/services?fieldSelector=spec.clusterIP%3D1")[0] == 400


def test_watch_streams_changes_bookmarks_and_ends_at_the_timeout(api: ApiServerStandIn) -> None:
    start = api.resource_version
    api.create(service("a"))
    t0 = time.monotonic()
    status, events = _get(
        api, f"/api/v1/services?watch=1&resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=1"
    )
    assert status == 200 and time.monotonic() - t0 < 5
    assert events[0]["type"] == "ADDED" and events[0]["object"]["kind"] == "Service"
    assert {e["type"] for e in events[1:]} == {"BOOKMARK"}


def test_watch_from_a_compacted_version_gets_410(api: ApiServerStandIn) -> None:
    start = api.resource_version
    api.create(service("a"))
    api.compact()
    _, events = _get(api, f"/api/v1/services?watch=1&resourceVersion={start}")
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


def test_restart_keeps_the_port_and_the_objects(api: ApiServerStandIn) -> None:
    api.create(service("a"))
    port = api.port
    t0 = time.monotonic()
    api.stop()
    api.start()
    assert api.port == port
    assert time.monotonic() - t0 < 5
    assert len(_get(api, "/api/v1/services")[1][0]["items"]) == 1
