"""Steering rules for the userspace proxy: their text, and real packets through them.

The pure tests pin the portal scheme line by line. The privileged test builds a node
with two pods in fresh namespaces, runs the proxier on a loop thread that lives in the
node namespace, loads the rendered rules with iptables-nft-restore there, and checks
that cluster IP, node port and node-local traffic reach both pods through the proxier.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
import uvloop

from kproxy.backends.userspace.proxier import UserspaceProxier
from kproxy.backends.userspace.steering import (
    NODEPORT_CONTAINER,
    NODEPORT_HOST,
    NODEPORT_NON_LOCAL,
    PORTALS_CONTAINER,
    PORTALS_HOST,
    PROXY_FIREWALL,
    SteeringConfig,
    assemble,
    builtin_jumps,
    render_all,
    render_port,
)
from kproxy.netfilter.ruleset import restore_payload
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName
from tests.support.netns import Topology, entered, netns_guard, request

__all__ = ["netns_guard"]

T = TypeVar("T")
WEB = ServicePortName("default", "web", "http", "TCP")
DNS = ServicePortName("default", "dns", "", "UDP")


def sp_full() -> ServicePort:
    return ServicePort(
        WEB,
        4,
        "10.96.0.10",
        80,
        node_port=30080,
        external_ips=("203.0.113.7",),
        load_balancer_ips=("198.51.100.9",),
    )


def test_wildcard_listener_redirects_containers_and_dnats_host() -> None:
    cfg = SteeringConfig(family=4, listen_ip="0.0.0.0", host_ip="192.168.77.1")
    rules = {(c.table, c.name): c.rules for c in render_port(sp_full(), 41000, cfg).shared}
    m = '-m comment --comment "default/web:http" -p tcp -m tcp'
    assert rules[("nat", PORTALS_CONTAINER)] == (
        f"-A {PORTALS_CONTAINER} {m} --dport 80 -d 10.96.0.10/32 -j REDIRECT --to-ports 41000",
        f"-A {PORTALS_CONTAINER} {m} --dport 80 -d 203.0.113.7/32 -j REDIRECT --to-ports 41000",
        f"-A {PORTALS_CONTAINER} {m} --dport 80 -d 198.51.100.9/32 -j REDIRECT --to-ports 41000",
    )
    assert rules[("nat", PORTALS_HOST)] == (
        f"-A {PORTALS_HOST} {m} --dport 80 -d 10.96.0.10/32 -j DNAT --to-destination 192.168.77.1:41000",
        f"-A {PORTALS_HOST} {m} --dport 80 -d 203.0.113.7/32 -m addrtype --dst-type LOCAL"
        " -j DNAT --to-destination 192.168.77.1:41000",
        f"-A {PORTALS_HOST} {m} --dport 80 -d 198.51.100.9/32 -j DNAT --to-destination 192.168.77.1:41000",
    )
    assert rules[("nat", NODEPORT_CONTAINER)] == (
        f"-A {NODEPORT_CONTAINER} {m} --dport 30080 -j REDIRECT --to-ports 41000",
    )
    assert rules[("nat", NODEPORT_HOST)] == (
        f"-A {NODEPORT_HOST} {m} --dport 30080 -j DNAT --to-destination 192.168.77.1:41000",
    )
    assert rules[("filter", NODEPORT_NON_LOCAL)] == (
        f"-A {NODEPORT_NON_LOCAL} {m} --dport 41000 -m state --state NEW -j ACCEPT",
    )


def test_bound_listener_is_reached_by_dnat_everywhere_ipv6() -> None:
    sp = ServicePort(DNS, 6, "fd00:96::a", 53)
    cfg = SteeringConfig(family=6, listen_ip="fd00:77::1", host_ip="fd00:77::1", comments=False)
    rules = {(c.table, c.name): c.rules for c in render_port(sp, 40053, cfg).shared}
    assert rules == {
        ("nat", PORTALS_CONTAINER): (
            f"-A {PORTALS_CONTAINER} -p udp -m udp --dport 53 -d fd00:96::a/128 -j DNAT --to-destination [fd00:77::1]:40053",
        ),
        ("nat", PORTALS_HOST): (
            f"-A {PORTALS_HOST} -p udp -m udp --dport 53 -d fd00:96::a/128 -j DNAT --to-destination [fd00:77::1]:40053",
        ),
    }


def test_assemble_declares_every_chain_and_jumps_keep_portals_first() -> None:
    chains = assemble([])
    assert set(chains) == {
        ("nat", PORTALS_CONTAINER),
        ("nat", PORTALS_HOST),
        ("nat", NODEPORT_CONTAINER),
        ("nat", NODEPORT_HOST),
        ("filter", NODEPORT_NON_LOCAL),
        ("filter", PROXY_FIREWALL),
    }
    assert all(not rules for rules in chains.values())
    jumps = builtin_jumps(SteeringConfig(family=4, listen_ip="0.0.0.0", host_ip="192.168.77.1"))
    pre = jumps[("nat", "PREROUTING")]
    assert pre[0].endswith(f"-j {PORTALS_CONTAINER}")
    assert "--dst-type LOCAL" in pre[1] and pre[1].endswith(f"-j {NODEPORT_CONTAINER}")
    out = jumps[("nat", "OUTPUT")]
    assert out[0].endswith(f"-j {PORTALS_HOST}") and out[1].endswith(f"-j {NODEPORT_HOST}")


# ------------------------------------------------------------------ namespaces


class LoopThread:
    """A uvloop running on a thread that sits in network namespace `ns` for its whole life,
    so every socket the proxier makes (listeners and dials) belongs to that namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with entered(self.ns):
            uvloop.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()

    def __enter__(self) -> LoopThread:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self.loop is not None
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def node2(netns_guard: None) -> Iterator[Topology]:
    with Topology(pods=2, clients=1) as topo:
        topo.start_servers([8080])
        yield topo


CLUSTER_IP: dict[Family, str] = {4: "10.96.0.10", 6: "fd00:10:96::a"}


@pytest.mark.privileged
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_steering_sends_service_traffic_through_the_proxier(node2: Topology, family: Family) -> None:
    topo = node2
    pods = topo.pod_hosts
    vip = CLUSTER_IP[family]
    eps = tuple(Endpoint(p.ip(family), 8080) for p in pods)
    web = ServicePort(WEB, family, vip, 80, node_port=30080)
    dns = ServicePort(DNS, family, vip, 53)
    view = {WEB: (web, eps), DNS: (dns, eps)}
    wildcard = "0.0.0.0" if family == 4 else "::"
    with LoopThread(topo.node_ns) as lt:
        proxier = UserspaceProxier(family=family, bind_ip=wildcard)
        try:
            lt.call(proxier.sync(view))
            ports = proxier.listener_ports()
            assert set(ports) == {WEB, DNS}
            cfg = SteeringConfig(family=family, listen_ip=wildcard, host_ip=topo.node.ip(family))
            chains = render_all({n: (view[n][0], p) for n, p in ports.items()}, cfg)
            topo.load_rules(restore_payload(chains, builtin_jumps=builtin_jumps(cfg)), "nft", family)

            from_pod = {request(pods[0].ns, vip, 80).name for _ in range(6)}
            assert from_pod == {"pod-1", "pod-2"}  # round robin through the proxier, from a pod
            client = topo.client_hosts[0]
            assert {request(client.ns, topo.node.ip(family), 30080).name for _ in range(4)} == {
                "pod-1",
                "pod-2",
            }
            assert request(topo.node_ns, vip, 80).ok  # the node itself, through OUTPUT
            udp = request(pods[1].ns, vip, 53, "udp")
            assert udp.ok, udp  # the reply came back from the cluster IP, or the client would drop it
            reply = request(client.ns, vip, 80)
            assert reply.ok and reply.peer != client.ip(family)  # pods see the proxier, not the client
        finally:
            lt.call(proxier.close(deadline=1))


def test_external_local_steers_outside_traffic_to_the_local_listener_and_ranges_filter_lb_traffic() -> None:
    sp = ServicePort(
        WEB,
        4,
        "10.96.0.10",
        80,
        node_port=30080,
        load_balancer_ips=("198.51.100.9",),
        load_balancer_source_ranges=("203.0.113.0/24",),
        external_local=True,
    )
    cfg = SteeringConfig(
        family=4, listen_ip="0.0.0.0", host_ip="192.168.77.1", comments=False, local_cidrs=("10.244.0.0/16",)
    )
    rules = {(c.table, c.name): c.rules for c in render_port(sp, 41000, cfg, external=(41001, "drop")).shared}
    assert rules[("nat", NODEPORT_CONTAINER)] == (
        f"-A {NODEPORT_CONTAINER} -p tcp -m tcp --dport 30080 -s 10.244.0.0/16 -j REDIRECT --to-ports 41000",
        f"-A {NODEPORT_CONTAINER} -p tcp -m tcp --dport 30080 -j REDIRECT --to-ports 41001",
    )
    assert rules[("nat", NODEPORT_HOST)] == (
        f"-A {NODEPORT_HOST} -p tcp -m tcp --dport 30080 -j DNAT --to-destination 192.168.77.1:41000",
    )
    origin = "-p tcp -m conntrack --ctorigdst 198.51.100.9/32 --ctorigdstport 80"
    assert rules[("filter", PROXY_FIREWALL)] == (
        f"-A {PROXY_FIREWALL} -p tcp -m tcp --dport 41001 -j DROP",
        f"-A {PROXY_FIREWALL} {origin} -s 203.0.113.0/24 -j RETURN",
        f"-A {PROXY_FIREWALL} {origin} -j DROP",
    )
