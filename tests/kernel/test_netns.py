"""The kernel-test harness itself: if these fail, no kernel test result means anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.netns import FAMILIES, Family, Topology, exec_in, netns_guard, request, sample

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"ipv{f}")
def test_single_node_hosts_reach_each_other_without_nat(family: Family, netns_guard: None) -> None:
    with Topology(pods=2, clients=1) as topo:
        topo.start_servers([8080])
        client, (p1, p2) = topo.client_hosts[0], topo.pod_hosts
        got = {
            "client to pod-1": request(client.ns, p1.ip(family), 8080),
            "pod-1 to pod-2 udp": request(p1.ns, p2.ip(family), 8080, "udp"),
            "node to pod-2": request(topo.node_ns, p2.ip(family), 8080),
        }
        assert {k: (r.name, r.peer) for k, r in got.items()} == {
            "client to pod-1": ("pod-1", client.ip(family)),
            "pod-1 to pod-2 udp": ("pod-2", p1.ip(family)),
            "node to pod-2": ("pod-2", topo.node.gateway(family)),
        }


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"ipv{f}")
def test_three_nodes_route_pods_and_clients(family: Family, netns_guard: None) -> None:
    with Topology(nodes=3, pods=1, clients=1) as topo:
        topo.start_servers([8080])
        client = topo.client_hosts[0]
        a, c = topo.pod("n1-pod-1"), topo.pod("n3-pod-1")
        across = request(a.ns, c.ip(family), 8080)
        via_node1 = request(client.ns, topo.pod("n2-pod-1").ip(family), 8080)
        assert (across.name, across.peer) == ("n3-pod-1", a.ip(family)), across
        assert (via_node1.name, via_node1.peer) == ("n2-pod-1", client.ip(family)), via_node1


def test_request_outcomes_are_typed(netns_guard: None) -> None:
    with Topology(pods=1, clients=1) as topo:
        topo.start_servers([8080])
        pod, client = topo.pod_hosts[0], topo.client_hosts[0]
        rules = [
            "-A FORWARD -p tcp --dport 8081 -j DROP",
            "-A FORWARD -p tcp --dport 8082 -j REJECT --reject-with icmp-host-unreachable",
        ]
        topo.load_rules("*filter\n" + "\n".join(rules) + "\nCOMMIT\n", "nft", 4)
        got = {
            "tcp, nothing listening": request(client.ns, pod.ipv4, 9999).outcome,
            "udp, nothing listening": request(client.ns, pod.ipv4, 9999, "udp").outcome,
            "dropped": request(client.ns, pod.ipv4, 8081, timeout=0.3).outcome,
            "host unreachable": request(client.ns, pod.ipv4, 8082).outcome,
        }
        assert got == {
            "tcp, nothing listening": "refused",
            "udp, nothing listening": "refused",
            "dropped": "timeout",
            "host unreachable": "unreachable",
        }
        replies = sample(client.ns, pod.ipv4, 8081, limit=5, timeout=0.2)
        assert [r.outcome for r in replies] == ["timeout"], "sampling stops at the first failure"


def test_topology_removes_namespaces_and_servers_even_on_failure(netns_guard: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology(pods=2, clients=1) as topo:
        topo.start_servers([8080])
        pids = [p.pid for p in topo._procs]
        assert exec_in(topo.pod_hosts[0].ns, ["ip", "-brief", "addr", "show", "eth0"]).stdout
        raise RuntimeError("boom")
    assert not [ns for ns in topo.namespaces if Path("/run/netns", ns).exists()]
    assert not [pid for pid in pids if _alive(pid)]
