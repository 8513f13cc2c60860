"""`kproxy run --proxy-mode nftables` on a namespace node, watching the API-server stand-in.

The agent programs the node's `ip kube-proxy` / `ip6 kube-proxy` tables (no iptables rule at
all); a client outside the node reaches the service, follows an endpoint change, and is
refused once the service has no endpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.apiserver_standin import endpoint_slice, node, service
from tests.support.cluster import API_IP, Agent, Load, Prober, agent_args, http_get, lan_apiserver
from tests.support.netns import Reply, Topology, exec_in, netns_guard, request, sample

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]

NS = "shop"
VIP = "10.96.0.10"


def poll(ns: str, want: Callable[[Reply], bool], tries: int = 200) -> Reply:
    """Request until a reply satisfies `want` (the agent syncs within its 100 ms minimum
    period); bounded, and returns the last reply either way."""
    reply = request(ns, VIP, 80, timeout=1.0)
    for _ in range(tries):
        if want(reply):
            break
        time.sleep(0.05)
        reply = request(ns, VIP, 80, timeout=1.0)
    return reply


def test_run_nftables_mode_follows_the_api(netns_guard: None, tmp_path: Path) -> None:
    with Topology(nodes=1, pods=2, clients=1) as topo, lan_apiserver(topo) as api:
        n = topo.node
        api.create(node(n.name, pod_cidrs=[n.pod_cidr(4), n.pod_cidr(6)], addresses=[n.ipv4, n.ipv6]))
        api.create(service("web", NS, cluster_ip=VIP, ports=[("http", 80, "TCP")]))
        pod1, pod2 = n.pods
        api.create(endpoint_slice("web-1", "web", NS, addresses=[pod1.ipv4], node_name=n.name))
        topo.start_servers([8080])
        args = agent_args(
            n.name, master=f"http://{API_IP}:{api.port}", families="4", extra=["--proxy-mode", "nftables"]
        )
        agent = Agent(topo, n, args, tmp_path)
        try:
            agent.start()
            agent.wait_synced()
            client = topo.client_hosts[0].ns
            first = sample(client, VIP, 80, limit=3)
            assert [r.name for r in first] == ["pod-1"] * 3, agent.tail()

            tables = exec_in(n.ns, ["nft", "list", "tables"]).stdout
            assert "table ip kube-proxy" in tables, tables
            saved = exec_in(n.ns, ["iptables-nft-save"]).stdout
            assert "KUBE-SERVICES" not in saved, "nftables mode wrote iptables rules"
            assert http_get(n.ns, "127.0.0.1", 10249, "/proxyMode").body == {"text": "nftables"}

            # the endpoint moves to pod-2: new connections follow (bounded wait for the sync)
            api.update(endpoint_slice("web-1", "web", NS, addresses=[pod2.ipv4], node_name=n.name))
            moved = poll(client, lambda r: r.ok and r.name == "pod-2")
            assert moved.name == "pod-2", agent.tail()
            assert [r.name for r in sample(client, VIP, 80, limit=3)] == ["pod-2"] * 3

            # no endpoints: refused at once, not a timeout
            api.update(endpoint_slice("web-1", "web", NS, addresses=[], node_name=n.name))
            refused = poll(client, lambda r: r.outcome == "refused")
            assert refused.outcome == "refused", agent.tail()
            assert request(client, VIP, 80).outcome == "refused"
            log = agent.log_text()
            assert "nftables_sync_failed" not in log
            # the changes were partial syncs: one full sync at start only
            assert log.count("event=nftables_synced") >= 3 and log.count("full=true") == 1, log
        finally:
            assert agent.stop() == 0


def test_switch_from_iptables_mode_refuses_no_connection(netns_guard: None, tmp_path: Path) -> None:
    """A node served by iptables mode switches to nftables mode: the new table serves before
    iptables mode's chains go, and a client opening connections throughout sees no failure."""
    with Topology(nodes=1, pods=2, clients=1) as topo, lan_apiserver(topo) as api:
        n = topo.node
        api.create(node(n.name, pod_cidrs=[n.pod_cidr(4), n.pod_cidr(6)], addresses=[n.ipv4, n.ipv6]))
        api.create(service("web", NS, cluster_ip=VIP, ports=[("http", 80, "TCP")]))
        api.create(endpoint_slice("web-1", "web", NS, addresses=[p.ipv4 for p in n.pods], node_name=n.name))
        topo.start_servers([8080])
        master = f"http://{API_IP}:{api.port}"
        old = Agent(topo, n, agent_args(n.name, master=master, families="4"), tmp_path / "iptables")
        new = Agent(
            topo,
            n,
            agent_args(n.name, master=master, families="4", extra=["--proxy-mode", "nftables"]),
            tmp_path,
        )
        (tmp_path / "iptables").mkdir()
        client = topo.client_hosts[0].ns
        try:
            old.start()
            old.wait_synced()
            assert "KUBE-SERVICES" in exec_in(n.ns, ["iptables-nft-save"]).stdout
            assert old.stop() == 0
            with Load([Prober(client, VIP, 80)], []) as load:
                load.wait_progress(5, 0)
                new.start()
                new.wait_synced()
                for _ in range(200):  # bounded: the old chains go right after the first full sync
                    if "KUBE-SERVICES" not in exec_in(n.ns, ["iptables-nft-save"]).stdout:
                        break
                    time.sleep(0.05)
                load.wait_progress(5, 0)
            assert load.failures() == []
            assert "KUBE-SERVICES" not in exec_in(n.ns, ["iptables-nft-save"]).stdout, new.tail()
            assert "event=iptables_mode_rules_removed" in new.log_text()
            assert {r.name for r in sample(client, VIP, 80, limit=3)} <= {"pod-1", "pod-2"}
        finally:
            old.stop()
            new.stop()
