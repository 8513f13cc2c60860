"""Moving between nftables mode and the others, as kube-proxy does, with no connection refused.

- Taking over from kube-proxy's own nftables mode: the node holds the `ip`/`ip6 kube-proxy`
  tables as kube-proxy writes them (tests/data/kube-proxy-nft-ipv{4,6}.nft, hand-written in the
  shape of its proxier_test.go expectations, not by kproxy). `kproxy run --proxy-mode nftables`
  replaces each family's table in one transaction while clients keep opening connections.
- Switching back: iptables mode and userspace mode remove nftables mode's tables once their own
  rules serve, so the old table does not keep catching packets for services it no longer knows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.backends.nftables.render import SYNC_STATE
from tests.support.apiserver_standin import ApiServerStandIn, endpoint_slice, node, service
from tests.support.cluster import API_IP, Agent, Load, Prober, agent_args, http_get, lan_apiserver
from tests.support.netns import NodeHost, Topology, exec_in, netns_guard, sample

__all__ = ["netns_guard"]

DATA = Path(__file__).resolve().parents[1] / "data"
NS = "shop"
VIP = {4: "10.96.0.10", 6: "fd00:10:96::10"}
NODE_PORT = 30080
PODS = {"pod-1", "pod-2"}


def create_objects(api: ApiServerStandIn, n: NodeHost) -> None:
    """What the fixture tables were written for: shop/web, dual-stack NodePort, two endpoints."""
    api.create(node(n.name, pod_cidrs=[n.pod_cidr(4), n.pod_cidr(6)], addresses=[n.ipv4, n.ipv6]))
    web = service(
        "web",
        NS,
        cluster_ip=VIP[4],
        type="NodePort",
        clusterIPs=[VIP[4], VIP[6]],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="RequireDualStack",
    )
    web["spec"]["ports"] = [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NODE_PORT}
    ]
    api.create(web)
    api.create(endpoint_slice("web-4", "web", NS, addresses=[p.ipv4 for p in n.pods], node_name=n.name))
    api.create(
        endpoint_slice(
            "web-6", "web", NS, addresses=[p.ipv6 for p in n.pods], node_name=n.name, address_type="IPv6"
        )
    )


def tables(n: NodeHost) -> set[str]:
    out = exec_in(n.ns, ["nft", "list", "tables"]).stdout
    return {line.strip() for line in out.splitlines() if line.strip().startswith("table ")}


def every_path(topo: Topology) -> dict[str, set[str]]:
    """Pods reached through each cluster IP and the node port, from the client."""
    client, n = topo.client_hosts[0].ns, topo.node
    targets = {"ipv4": (VIP[4], 80), "ipv6": (VIP[6], 80), "node port": (n.ipv4, NODE_PORT)}
    out = {}
    for what, (ip, port) in targets.items():
        got = sample(client, ip, port, limit=40, until=lambda rs: {r.name for r in rs} >= PODS)
        out[what] = {r.name for r in got if r.ok} if all(r.ok for r in got) else {str(got[-1])}
    return out


def probers(topo: Topology) -> list[Prober]:
    client, n = topo.client_hosts[0].ns, topo.node
    return [Prober(client, VIP[4], 80), Prober(client, VIP[6], 80), Prober(client, n.ipv4, NODE_PORT)]


@pytest.fixture
def lab() -> Iterator[tuple[Topology, ApiServerStandIn]]:
    with Topology(nodes=1, pods=2, clients=1) as topo, lan_apiserver(topo) as api:
        create_objects(api, topo.node)
        topo.start_servers([8080])
        yield topo, api


@pytest.mark.privileged
def test_takeover_from_kube_proxys_nftables_mode(
    netns_guard: None, lab: tuple[Topology, ApiServerStandIn], tmp_path: Path
) -> None:
    topo, api = lab
    n = topo.node
    for family in (4, 6):
        exec_in(n.ns, ["nft", "-f", str(DATA / f"kube-proxy-nft-ipv{family}.nft")])
    # The fixture is known to serve as kube-proxy's table does before anything else is checked.
    assert every_path(topo) == {"ipv4": PODS, "ipv6": PODS, "node port": PODS}
    kube_proxy_chains = exec_in(n.ns, ["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert "chain endpoint-" in kube_proxy_chains and SYNC_STATE not in kube_proxy_chains

    args = agent_args(n.name, master=f"http://{API_IP}:{api.port}", extra=["--proxy-mode", "nftables"])
    agent = Agent(topo, n, args, tmp_path)
    try:
        with Load(probers(topo), []) as load:
            load.wait_progress(5, 0)
            agent.start()
            agent.wait_synced()
            load.wait_progress(5, 0)
        assert load.failures() == [], agent.tail()
        log = agent.log_text()
        # One transaction per family replaced kube-proxy's table: one full sync each, nothing failed.
        synced = [ln for ln in log.splitlines() if "event=nftables_synced" in ln]
        assert len(synced) == 2 and all("full=true" in ln and "reason=start" in ln for ln in synced), log
        assert "nftables_sync_failed" not in log
        for fam in ("ip", "ip6"):
            listing = exec_in(n.ns, ["nft", "list", "table", fam, "kube-proxy"]).stdout
            assert SYNC_STATE in listing, f"{fam}: not kproxy's table"
            assert "chain endpoint-" not in listing, f"{fam}: kube-proxy's endpoint chains are left"
        assert every_path(topo) == {"ipv4": PODS, "ipv6": PODS, "node port": PODS}
        # kube-proxy's nftables-mode metric names, none of iptables mode's
        metrics = str(http_get(n.ns, "127.0.0.1", 10249, "/metrics").body.get("text", ""))
        for fam in ("IPv4", "IPv6"):
            assert (
                f'kubeproxy_sync_proxy_rules_nftables_sync_failures_total{{ip_family="{fam}"}} 0.0' in metrics
            )
            assert (
                f'kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{{ip_family="{fam}"}} 0.0'
                in metrics
            )
        assert "kubeproxy_sync_proxy_rules_iptables" not in metrics
    finally:
        assert agent.stop() == 0


@pytest.mark.privileged
@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_switching_back_removes_nftables_modes_tables(
    netns_guard: None, lab: tuple[Topology, ApiServerStandIn], tmp_path: Path, mode: str
) -> None:
    topo, api = lab
    n = topo.node
    master = f"http://{API_IP}:{api.port}"
    (tmp_path / "nft").mkdir()
    nft = Agent(
        topo, n, agent_args(n.name, master=master, extra=["--proxy-mode", "nftables"]), tmp_path / "nft"
    )
    other = Agent(topo, n, agent_args(n.name, master=master, extra=["--proxy-mode", mode]), tmp_path)
    try:
        nft.start()
        nft.wait_synced()
        assert {"table ip kube-proxy", "table ip6 kube-proxy"} <= tables(n)
        assert nft.stop() == 0
        with Load(probers(topo), []) as load:
            load.wait_progress(5, 0)
            other.start()
            other.wait_synced()
            for _ in range(200):  # bounded: the tables go right after each family's first full sync
                if not {"table ip kube-proxy", "table ip6 kube-proxy"} & tables(n):
                    break
                time.sleep(0.05)
            load.wait_progress(5, 0)
        assert load.failures() == [], other.tail()
        assert not {"table ip kube-proxy", "table ip6 kube-proxy"} & tables(n), other.tail()
        assert other.log_text().count("event=nftables_mode_table_removed") == 2
        assert every_path(topo) == {"ipv4": PODS, "ipv6": PODS, "node port": PODS}
    finally:
        nft.stop()
        other.stop()
