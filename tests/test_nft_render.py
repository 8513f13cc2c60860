"""nftables mode's renderer: what each kind of service port puts into the table.

Table-driven over the shapes a user meets (plain cluster IP, node port, traffic policy
Local, affinity, load balancer with source ranges, no endpoints), checked for what
decides traffic: which map gets which element, which chains exist, and the chain count
the layout promises (one per service port unless a feature needs more).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest

from kproxy.backends.nftables.render import (
    FIREWALL_IPS,
    HAIRPIN,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    PortObjects,
    effective_elements,
    render_port,
    render_snapshot,
)
from kproxy.config import render_config
from kproxy.state.model import Endpoint, ServicePort, ServicePortName

CFG = render_config(4, "node-a", cluster_cidr=("10.244.0.0/16",), node_ips=("192.168.1.5",))
NAME = ServicePortName("demo", "web", "http", "TCP")
SP = ServicePort(NAME, 4, "10.96.0.10", 80)
LOCAL = Endpoint("10.244.1.11", 8080, is_local=True)
REMOTE = Endpoint("10.244.2.12", 8080)
TERMINATING = Endpoint("10.244.1.13", 8080, ready=False, serving=True, terminating=True, is_local=True)


def kinds(po: PortObjects) -> list[str]:
    """Chain kinds, e.g. ["service"], in creation order."""
    return [name.split("-", 1)[0] for name, _ in po.chains]


def elements(po: PortObjects) -> set[tuple[str, str, str]]:
    """(map, key, verdict kind) with the chain hash left out."""
    return {(m, k, v.split("-", 1)[0]) for m, k, v in po.elements if m != HAIRPIN}


@dataclass(frozen=True)
class Case:
    id: str
    sp: ServicePort
    eps: tuple[Endpoint, ...]
    chains: list[str]
    elements: set[tuple[str, str, str]]


CASES = [
    Case(
        "cluster-ip",
        SP,
        (LOCAL, REMOTE),
        ["service"],
        {(SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service")},
    ),
    Case(
        "no-endpoints-rejects",
        replace(SP, node_port=30080),
        (),
        [],
        {
            (NO_ENDPOINT_SERVICES, "10.96.0.10 . tcp . 80", "goto reject"),
            (NO_ENDPOINT_NODEPORTS, "tcp . 30080", "goto reject"),
        },
    ),
    Case(
        "node-port-cluster-policy-is-one-chain",
        replace(SP, node_port=30080, external_ips=("192.0.2.1",)),
        (LOCAL, REMOTE),
        ["service"],
        {
            (SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service"),
            (SERVICE_IPS, "192.0.2.1 . tcp . 80", "goto service"),
            (SERVICE_NODEPORTS, "tcp . 30080", "goto service"),
        },
    ),
    Case(
        "external-local",
        replace(SP, node_port=30080, external_local=True),
        (LOCAL, REMOTE),
        ["service", "external"],
        {
            (SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service"),
            (SERVICE_NODEPORTS, "tcp . 30080", "goto external"),
        },
    ),
    Case(
        "external-local-without-local-endpoints-drops",
        replace(SP, node_port=30080, external_local=True),
        (REMOTE,),
        ["service", "external"],
        {
            (SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service"),
            (SERVICE_NODEPORTS, "tcp . 30080", "goto external"),
            (NO_ENDPOINT_NODEPORTS, "tcp . 30080", "drop"),
        },
    ),
    Case(
        "internal-local-without-local-endpoints-drops",
        replace(SP, internal_local=True),
        (REMOTE,),
        [],
        {(NO_ENDPOINT_SERVICES, "10.96.0.10 . tcp . 80", "drop")},
    ),
    Case(
        "internal-local",
        replace(SP, internal_local=True),
        (LOCAL, REMOTE),
        ["local"],
        {(SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto local")},
    ),
    Case(
        "affinity-has-endpoint-chains",
        replace(SP, affinity_timeout=600),
        (LOCAL, REMOTE),
        ["endpoint", "endpoint", "service"],
        {(SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service")},
    ),
    Case(
        "load-balancer-source-ranges",
        replace(
            SP,
            node_port=30080,
            load_balancer_ips=("198.51.100.7",),
            load_balancer_source_ranges=("203.0.113.0/24",),
        ),
        (LOCAL,),
        ["service", "firewall"],
        {
            (SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service"),
            (SERVICE_IPS, "198.51.100.7 . tcp . 80", "goto service"),
            (SERVICE_NODEPORTS, "tcp . 30080", "goto service"),
            (FIREWALL_IPS, "198.51.100.7 . tcp . 80", "goto firewall"),
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_port_objects(case: Case) -> None:
    po = render_port(case.sp, case.eps, CFG)
    assert kinds(po) == case.chains
    assert elements(po) == case.elements


def test_service_chain_masquerades_outside_traffic_and_spreads_over_endpoints() -> None:
    ((_, rules),) = render_port(SP, (LOCAL, REMOTE), CFG).chains
    assert rules == (
        "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
        "meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.244.1.11 . 8080, 1 : 10.244.2.12 . 8080 }",
    )


def test_terminating_endpoints_serve_only_when_none_is_ready() -> None:
    ((_, rules),) = render_port(SP, (LOCAL, TERMINATING), CFG).chains
    assert rules[-1] == "meta l4proto tcp dnat to 10.244.1.11:8080"
    ((_, rules),) = render_port(SP, (TERMINATING,), CFG).chains
    assert rules[-1] == "meta l4proto tcp dnat to 10.244.1.13:8080"


def test_every_endpoint_is_a_hairpin_pair() -> None:
    po = render_port(SP, (LOCAL, REMOTE), CFG)
    assert {k for m, k, _ in po.elements if m == HAIRPIN} == {
        "10.244.1.11 . 10.244.1.11",
        "10.244.2.12 . 10.244.2.12",
    }


def test_two_services_claiming_one_external_ip_do_not_conflict() -> None:
    """The first in name order wins the map element; the other's rules still exist."""
    other = replace(SP, name=ServicePortName("demo", "zzz", "http", "TCP"), cluster_ip="10.96.0.11")
    a = render_port(replace(SP, external_ips=("192.0.2.1",)), (LOCAL,), CFG)
    b = render_port(replace(other, external_ips=("192.0.2.1",)), (REMOTE,), CFG)
    winner = effective_elements([a, b])[(SERVICE_IPS, "192.0.2.1 . tcp . 80")]
    assert winner == dict(((m, k), v) for m, k, v in a.elements)[(SERVICE_IPS, "192.0.2.1 . tcp . 80")]


def test_ipv6_table() -> None:
    cfg6 = render_config(6, "node-a", cluster_cidr=("fd00:10:244::/48",))
    sp = ServicePort(NAME, 6, "fd00:10:96::a", 80)
    script = render_snapshot({NAME: (sp, (Endpoint("fd00:10:244:1::b", 8080),))}, cfg6)
    assert "table ip6 kube-proxy {" in script
    assert "type ipv6_addr . inet_proto . inet_service : verdict" in script
    assert "meta l4proto tcp dnat to [fd00:10:244:1::b]:8080" in script


def test_chain_count_is_one_per_service_port() -> None:
    """The layout's point: 1,000 plain services are 1,000 chains (plus the fixed ones)."""
    view = {}
    for i in range(1000):
        name = ServicePortName("bench", f"svc-{i}", "http", "TCP")
        eps = tuple(Endpoint(f"10.100.{i // 250}.{i % 250}", 8080 + j) for j in range(10))
        view[name] = (ServicePort(name, 4, f"10.96.{i // 250}.{i % 250 + 1}", 80, node_port=30000 + i), eps)
    script = render_snapshot(view, CFG)
    chains = re.findall(r"^\tchain (\S+) \{", script, re.M)
    assert len([c for c in chains if c.startswith("service-") and "-bench/svc-" in c]) == 1000
    assert len(chains) == 1000 + 15
