"""`kproxy run --manifests DIR` against hostile input, in the kernel: bad input never removes a
working service, and every line the agent logs is one a logfmt parser reads (issue 10.2-10.4).

Reuses test_agent_e2e's lab (one node namespace, pods, a client namespace) and its agent
helpers. Waits are bounded (SOON); nothing asserts a duration.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.agent_node import (
    HEALTHZ,
    Agent,
    Node,
    module_topology,
    node,
    node_obj,
    scrape,
    slice_obj,
    svc_obj,
    vip,
    write_objects,
)
from tests.support.logfmt import parse_kproxy
from tests.support.netns import exec_in, netns_guard

pytestmark = pytest.mark.privileged

__all__ = ["module_topology", "netns_guard", "node"]


def every_line_is_logfmt(agent: Agent) -> int:
    lines = agent.log.read_text().splitlines()
    for line in lines:
        parse_kproxy(line)
    return len(lines)


def test_bad_manifests_never_take_a_working_service_down(node: Node, tmp_path: Path) -> None:
    """A half-written file, a FIFO, a symlink loop, an implausible kproxy annotation, a loopback
    external IP and a directory moved away: the working services keep answering throughout,
    each problem is logged once, and SIGTERM still stops the agent."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    name = node.topo.node_name
    pod1, pod2 = node.pod(1), node.pod(2)
    write_objects(manifests / "node.yaml", [node_obj(node.topo)])
    app = write_objects(manifests / "app.yaml", [svc_obj("app", 60), slice_obj("app", [pod1], name)])
    agent = node.agent("--manifests", str(manifests))
    node.wait_answer(vip(60), 80, {pod1.name}, agent)

    # Caught half-written: truncated inside the EndpointSlice.
    text = app.read_text()
    app.write_text(text[: text.index('"endpoints"') + 20])
    write_objects(manifests / "other.yaml", [svc_obj("other", 61), slice_obj("other", [pod2], name)])
    node.wait_answer(vip(61), 80, {pod2.name}, agent)  # the directory was read after the damage
    assert node.hit(vip(60), 80).ok, "the half-written file's service must keep answering"
    (broken,) = agent.events("manifest_file_not_loaded")
    assert broken["file"] == str(app) and broken["level"] == "ERROR" and broken["reason"].startswith("YAML: ")
    assert broken["at"].startswith(f"{app}:")
    assert scrape(node).value("kproxy_manifest_files_in_error") == 1

    # A FIFO, a symlink loop: reported once, never opened, and later edits still apply.
    os.mkfifo(manifests / "pipe.yaml")
    (manifests / "loop.yaml").symlink_to(manifests / "loop.yaml")
    odd = svc_obj("odd", 62)
    odd["metadata"]["annotations"] = {"kproxy.io/lb-algorithm": "léast-connections"}
    odd["spec"]["externalIPs"] = ["127.0.0.1"]
    write_objects(manifests / "odd.yaml", [odd, slice_obj("odd", [pod1], name)])
    node.wait_answer(vip(62), 80, {pod1.name}, agent)
    assert node.hit(vip(60), 80).ok and node.hit(vip(61), 80).ok
    reported = {Path(e["file"]).name: e["reason"] for e in agent.events("manifest_file_not_loaded")}
    assert reported == {
        "app.yaml": broken["reason"],
        "pipe.yaml": "a FIFO, not read",
        "loop.yaml": "symlink loop",
    }
    ignored = {(e["object"], e["field"]) for e in agent.events("field_ignored")}
    assert ignored == {
        ("Service e2e/odd", "metadata.annotations[kproxy.io/lb-algorithm]"),
        ("Service e2e/odd", "spec.externalIPs[0]"),
    }
    nat = exec_in(node.ns, ["iptables-nft-save", "-t", "nat"]).stdout
    assert "127.0.0.1/32" not in nat, "the node's loopback must not be captured"
    assert scrape(node).value("kproxy_manifest_files_in_error") == 3

    # The directory moved away: everything kept, a warning, probes still 200.
    away = tmp_path / "moved-away"
    manifests.rename(away)
    agent.wait_event("manifests_unreadable")
    assert node.hit(vip(60), 80).ok and node.hit(vip(61), 80).ok and node.hit(vip(62), 80).ok
    assert node.get(HEALTHZ, "/healthz")[0] == 200
    away.rename(manifests)
    agent.wait_event("manifests_readable")

    # Fixed: the file is served from its new content and no longer counted.
    write_objects(app, [svc_obj("app", 60), slice_obj("app", [pod2], name)])
    node.wait_answer(vip(60), 80, {pod2.name}, agent)
    assert agent.events("manifest_file_recovered")

    for event in ("manifest_file_not_loaded", "field_ignored", "manifests_unreadable"):
        counts: dict[tuple[str, ...], int] = {}
        for e in agent.events(event):
            key = tuple(e.get(k, "") for k in ("file", "object", "field", "reason"))
            counts[key] = counts.get(key, 0) + 1
        assert all(n == 1 for n in counts.values()), f"{event} repeated: {counts}"
    assert agent.terminate() == 0, "SIGTERM stops the agent with a FIFO in its directory"
    assert every_line_is_logfmt(agent) > 10


def test_implausible_lb_algorithm_renders_in_userspace_mode_too(node: Node, tmp_path: Path) -> None:
    """The annotation only means something in userspace mode: there too it is ignored with a
    warning and the service is balanced round robin instead of dropped."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    name = node.topo.node_name
    pod1, pod2 = node.pod(1), node.pod(2)
    write_objects(manifests / "node.yaml", [node_obj(node.topo)])
    svc = svc_obj("rr", 63)
    svc["metadata"]["annotations"] = {"kproxy.io/lb-algorithm": "x" * 64}
    write_objects(manifests / "rr.yaml", [svc, slice_obj("rr", [pod1, pod2], name)])
    agent = node.agent("--manifests", str(manifests), "--proxy-mode", "userspace")
    node.wait_answer(vip(63), 80, {pod1.name, pod2.name}, agent)
    (warned,) = agent.events("field_ignored")
    assert warned["object"] == "Service e2e/rr" and "round robin" in warned["reason"]
    assert agent.terminate() == 0
    assert every_line_is_logfmt(agent) > 3
