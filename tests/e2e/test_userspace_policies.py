"""Userspace mode's traffic policies, in the namespace lab, beside tests/kernel/test_kernel_rules.py.

`kproxy run --proxy-mode userspace` runs on the node of one Topology with a manifest
directory; clients, pods and the node itself send real connections and datagrams, and each
test checks who answered, or that the connection was refused or dropped where the kernel
modes refuse or drop it. The pod sees the proxier as its client (a userspace proxy
cannot keep the client address), so unlike the kernel tests these do not check the peer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kproxy.backends.userspace import handover
from tests.support import httpclient
from tests.support.cluster import Agent, agent_args
from tests.support.httpclient import Got
from tests.support.netns import (
    FAMILIES,
    Family,
    Proto,
    Reply,
    Topology,
    entered,
    netns_guard,
    request,
    sample,
)
from tests.support.privileges import REQUIRED, privileged_missing
from tests.support.userspace_lab import SERVICES, TARGET_PORT, lb_ip, manifest, vip

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]


@dataclass
class Lab:
    topo: Topology
    family: Family
    agent: Agent

    def vip(self, name: str) -> str:
        return vip(SERVICES[name], self.family)

    def node_ip(self) -> str:
        return self.topo.node.ip(self.family)

    def ns(self, who: str) -> str:
        if who == "client":
            return self.topo.client_hosts[0].ns
        if who == "other-client":
            return self.topo.client_hosts[1].ns
        if who == "node":
            return self.topo.node_ns
        return self.topo.pod(who).ns

    def why(self, replies: list[Reply] | dict[str, Reply]) -> str:
        shown = replies.values() if isinstance(replies, dict) else replies
        return f"userspace/IPv{self.family}: {[str(r) for r in shown]}\n{self.agent.tail(15)}"


@pytest.fixture(scope="module")
def node(netns_guard: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Agent]]:
    """The agent's socket keeper (kproxy/backends/userspace/handover.py) is claimed at the end."""
    reason = privileged_missing()
    if reason is not None:
        (pytest.fail if REQUIRED else pytest.skip)(f"kernel tests: {reason}")
    with Topology(pods=3, clients=2) as topo:
        topo.start_servers([TARGET_PORT])
        tmp = tmp_path_factory.mktemp("userspace-policies")
        (tmp / "manifests").mkdir()
        (tmp / "manifests" / "cluster.yaml").write_text(
            "".join(f"---\n{json.dumps(o)}\n" for o in manifest(topo))
        )
        args = agent_args(
            topo.node_name, manifests=str(tmp / "manifests"), extra=["--proxy-mode", "userspace"]
        )
        agent = Agent(topo, topo.node, args, tmp)
        agent.start()
        try:
            agent.wait_synced(1)
            yield topo, agent
        finally:
            agent.stop()
            with entered(topo.node_ns):
                handover.release()


@pytest.fixture(params=FAMILIES, ids=lambda f: f"ipv{f}")
def lab(node: tuple[Topology, Agent], request: pytest.FixtureRequest) -> Lab:
    return Lab(node[0], request.param, node[1])


def _names(replies: list[Reply]) -> set[str]:
    return {r.name for r in replies if r.ok}


def _seen_all(want: set[str]) -> Callable[[list[Reply]], bool]:
    return lambda replies: want <= _names(replies)


def test_external_policy_local_node_port_reaches_only_local_endpoints(lab: Lab) -> None:
    replies = sample(lab.ns("client"), lab.node_ip(), 30015, limit=20)
    assert all(r.ok for r in replies) and _names(replies) == {"pod-1"}, lab.why(replies)


def test_pod_and_node_traffic_to_local_policy_node_port_use_every_endpoint(lab: Lab) -> None:
    want = {"pod-1", "pod-3"}
    for src in ("pod-2", "node"):
        replies = sample(lab.ns(src), lab.node_ip(), 30015, limit=40, until=_seen_all(want))
        assert all(r.ok for r in replies) and _names(replies) == want, lab.why(replies)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_external_policy_local_without_local_endpoints_drops_outside_traffic(lab: Lab, proto: Proto) -> None:
    svc = SERVICES["local-none" if proto == "tcp" else "local-none-udp"]
    dropped = request(lab.ns("client"), lab.node_ip(), svc.node_port, proto, timeout=0.5)
    assert dropped.outcome == "timeout", lab.why([dropped])
    # the cluster IP still reaches the remote endpoint, from outside too
    inside = sample(lab.ns("client"), lab.vip(svc.name), svc.port, proto, limit=3)
    assert [r.name for r in inside] == ["pod-3"] * 3, lab.why(inside)


def test_health_check_node_port_reflects_local_endpoints(lab: Lab) -> None:
    """What a cloud load balancer asks before it sends a node external traffic."""

    async def get(port: int) -> Got:
        return await httpclient.get(port, "/healthz", host=lab.node_ip())

    got = {}
    for name in ("local", "local-none"):
        with entered(lab.ns("client")):
            got[name] = asyncio.run(get(SERVICES[name].health_check))
    assert got["local"].status == 200 and got["local"].json()["localEndpoints"] > 0, got
    assert got["local-none"].status == 503 and got["local-none"].json()["localEndpoints"] == 0, got


def test_internal_policy_local_reaches_only_local_endpoints(lab: Lab) -> None:
    replies = sample(lab.ns("pod-2"), lab.vip("internal-local"), 80, limit=20)
    assert [r.name for r in replies] == ["pod-1"] * 20, lab.why(replies)


def test_internal_policy_local_without_local_endpoints_drops(lab: Lab) -> None:
    dropped = request(lab.ns("pod-1"), lab.vip("internal-none"), 80, timeout=0.5)
    assert dropped.outcome == "timeout", lab.why([dropped])


def test_topology_hints_keep_traffic_in_the_node_zone(lab: Lab) -> None:
    replies = sample(lab.ns("client"), lab.vip("hints"), 80, limit=20)
    assert [r.name for r in replies] == ["pod-1"] * 20, lab.why(replies)


def test_terminating_endpoint_unused_while_a_ready_one_exists(lab: Lab) -> None:
    replies = sample(lab.ns("client"), lab.vip("term-mixed"), 80, limit=20)
    assert [r.name for r in replies] == ["pod-1"] * 20, lab.why(replies)


def test_serving_terminating_endpoints_used_when_none_is_ready(lab: Lab) -> None:
    want = {"pod-1", "pod-2"}
    replies = sample(lab.ns("client"), lab.vip("term-only"), 80, limit=40, until=_seen_all(want))
    assert all(r.ok for r in replies) and _names(replies) == want, lab.why(replies)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_service_without_endpoints_is_refused(lab: Lab, proto: Proto) -> None:
    svc = SERVICES[f"empty-{proto}"]
    got = {
        "client to cluster IP": request(lab.ns("client"), lab.vip(svc.name), svc.port, proto),
        "pod to cluster IP": request(lab.ns("pod-1"), lab.vip(svc.name), svc.port, proto),
        "client to node port": request(lab.ns("client"), lab.node_ip(), svc.node_port, proto),
    }
    assert {k: r.outcome for k, r in got.items()} == dict.fromkeys(got, "refused"), lab.why(got)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_load_balancer_source_ranges_admit_only_listed_clients(lab: Lab, proto: Proto) -> None:
    svc = SERVICES["lb" if proto == "tcp" else "lb-udp"]
    ip = lb_ip(svc, lab.family)
    admitted = sample(lab.ns("client"), ip, svc.port, proto, limit=5)
    assert all(r.ok for r in admitted) and _names(admitted) <= {"pod-1", "pod-2"}, lab.why(admitted)
    other = request(lab.ns("other-client"), ip, svc.port, proto, timeout=0.5)
    assert other.outcome == "timeout", lab.why([other])
    # the node port of the same service is not subject to the ranges
    via_node_port = request(lab.ns("other-client"), lab.node_ip(), svc.node_port, proto)
    assert via_node_port.ok, lab.why([via_node_port])


def test_agent_did_not_log_errors(lab: Lab) -> None:
    assert "level=error" not in lab.agent.log_text(), lab.agent.tail(40)
