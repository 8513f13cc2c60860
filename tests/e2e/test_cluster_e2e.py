"""A three-node cluster made of network namespaces, one `kproxy run` per node, one API server.

Nodes route each other's pod CIDRs over a LAN (like flannel host-gw); the API-server stand-in
listens on the LAN bridge, so every agent watches the same objects, exactly as a DaemonSet
would. One module-scoped cluster serves every test: the tests only read it, except the last,
which restarts agents (and leaves them running).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.apiserver_standin import ApiServerStandIn, endpoint_slice, node, service
from tests.support.cluster import (
    API_IP,
    Agent,
    EchoPods,
    Load,
    Prober,
    Stream,
    agent_args,
    http_get,
    lan_apiserver,
)
from tests.support.netns import NodeHost, Topology, netns_guard, sample

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]

NS = "shop"
SPREAD_IP, STREAM_IP, LOCAL_IP = "10.96.0.10", "10.96.0.20", "10.96.0.11"
NODE_PORT, HEALTH_PORT = 30080, 32080
ECHO_PORT = 7070


@dataclass
class Cluster:
    topo: Topology
    api: ApiServerStandIn
    agents: list[Agent]

    @property
    def a(self) -> NodeHost:
        return self.topo.node_hosts[0]

    @property
    def b(self) -> NodeHost:
        return self.topo.node_hosts[1]

    @property
    def c(self) -> NodeHost:
        return self.topo.node_hosts[2]


def _objects(topo: Topology) -> list[dict[str, object]]:
    _, b, c = topo.node_hosts
    objs: list[dict[str, object]] = [
        node(n.name, pod_cidrs=[n.pod_cidr(4), n.pod_cidr(6)], addresses=[n.ipv4, n.ipv6])
        for n in topo.node_hosts
    ]

    def slice_on(
        name: str, svc: str, hosts: list[tuple[NodeHost, int]], port: int
    ) -> list[dict[str, object]]:
        # one slice per node, as the EndpointSlice controller may well produce
        return [
            endpoint_slice(
                f"{name}-{n.index}",
                svc,
                NS,
                addresses=[n.pods[i].ipv4 for nn, i in hosts if nn is n],
                ports=[("http", port, "TCP")],
                node_name=n.name,
            )
            for n in {nn.index: nn for nn, _ in hosts}.values()
        ]

    objs.append(service("spread", NS, cluster_ip=SPREAD_IP, ports=[("http", 80, "TCP")]))
    objs += slice_on("spread", "spread", [(b, 0), (c, 0)], 8080)
    objs.append(service("stream", NS, cluster_ip=STREAM_IP, ports=[("http", 7000, "TCP")]))
    objs += slice_on("stream", "stream", [(b, 0), (c, 0)], ECHO_PORT)
    local = service(
        "local",
        NS,
        cluster_ip=LOCAL_IP,
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=HEALTH_PORT,
    )
    local["spec"]["ports"][0]["nodePort"] = NODE_PORT
    objs.append(local)
    objs += slice_on("local", "local", [(b, 0), (c, 0), (c, 1)], 8080)
    return objs


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def cluster(
    netns_guard: None, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """The cluster with every agent in one proxy mode (iptables, then nftables)."""
    logdir = tmp_path_factory.mktemp(f"cluster-logs-{request.param}")
    mode = ["--proxy-mode", request.param]
    with Topology(nodes=3, pods=2, clients=1) as topo, lan_apiserver(topo) as api:
        for obj in _objects(topo):
            api.create(obj)
        topo.start_servers([8080])
        agents = [
            Agent(topo, n, agent_args(n.name, master=f"http://{API_IP}:{api.port}", extra=mode), Path(logdir))
            for n in topo.node_hosts
        ]
        try:
            for agent in agents:
                agent.start()
            for agent in agents:
                agent.wait_synced()
            yield Cluster(topo, api, agents)
        finally:
            for agent in agents:
                agent.stop()


def test_pod_reaches_a_service_whose_endpoints_live_on_other_nodes(cluster: Cluster) -> None:
    pod = cluster.a.pods[0]
    want = {cluster.b.pods[0].name, cluster.c.pods[0].name}
    replies = sample(pod.ns, SPREAD_IP, 80, limit=60, until=lambda rs: {r.name for r in rs} >= want)
    assert all(r.ok for r in replies), [str(r) for r in replies if not r.ok]
    assert {r.name for r in replies} == want
    assert {r.peer for r in replies} == {pod.ipv4}, "pod-to-service traffic is not masqueraded"


def test_local_node_port_answers_only_on_nodes_with_endpoints(cluster: Cluster) -> None:
    client = cluster.topo.client_hosts[0]
    c_pods = {p.name for p in cluster.c.pods}
    on_c = sample(
        client.ns, cluster.c.ipv4, NODE_PORT, limit=40, until=lambda rs: {r.name for r in rs} >= c_pods
    )
    assert all(r.ok for r in on_c), [str(r) for r in on_c if not r.ok]
    assert {r.name for r in on_c} == c_pods, "externalTrafficPolicy Local: only C's own pods"
    assert {r.peer for r in on_c} == {client.ipv4}, "externalTrafficPolicy Local keeps the client address"
    on_a = sample(client.ns, cluster.a.ipv4, NODE_PORT, limit=1, timeout=0.5)
    assert [r.outcome for r in on_a] == ["timeout"], "no local endpoint on A: dropped"


def test_health_check_node_port_reports_local_endpoints(cluster: Cluster) -> None:
    client = cluster.topo.client_hosts[0]
    on_c = http_get(client.ns, cluster.c.ipv4, HEALTH_PORT)
    on_b = http_get(client.ns, cluster.b.ipv4, HEALTH_PORT)
    on_a = http_get(client.ns, cluster.a.ipv4, HEALTH_PORT)
    assert (on_c.status, on_b.status, on_a.status) == (200, 200, 503)
    assert on_c.body.get("localEndpoints") == 2, on_c.body
    assert on_a.body.get("localEndpoints") == 0, on_a.body
    assert on_c.body.get("service") == {"namespace": NS, "name": "local"}, on_c.body


def test_restarting_each_agent_under_load_loses_nothing(cluster: Cluster) -> None:
    topo, a, b, c = cluster.topo, cluster.a, cluster.b, cluster.c
    client = topo.client_hosts[0]
    echo = [(n.pods[0].ns, n.pods[0].name) for n in (b, c)]
    with EchoPods(echo, ECHO_PORT):
        probers = [
            Prober(a.pods[0].ns, SPREAD_IP, 80),
            Prober(b.pods[1].ns, SPREAD_IP, 80),
            Prober(client.ns, c.ipv4, NODE_PORT),
        ]
        streams = [Stream(p.ns, STREAM_IP, 7000) for p in (a.pods[0], a.pods[1], c.pods[1])]
        with Load(probers, streams) as load:
            load.wait_progress(connections=10, exchanges=10)
            for agent in cluster.agents:
                agent.stop()
                load.wait_progress(connections=5, exchanges=5)
                agent.start()
                agent.wait_synced()
                load.wait_progress(connections=5, exchanges=5)
            load.stop()
            failures = load.failures()
        assert not failures, "\n".join(failures[:20])
        done, exchanged = load.progress()
        assert done >= 40 and exchanged >= 40
        assert {s.pod for s in streams} <= {b.pods[0].name, c.pods[0].name}
        assert all(s.exchanges > 0 for s in streams)
    assert [ag.runs for ag in cluster.agents] == [2, 2, 2]
