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
    PLAIN_CLUSTER_IPS,
    PLAIN_EXTERNAL_IPS,
    PLAIN_NODEPORTS,
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
REMOTE = Endpoint("10.244.2.12", 8080, node_name="node-b")
TERMINATING = Endpoint("10.244.1.13", 8080, ready=False, serving=True, terminating=True, is_local=True)


def kinds(po: PortObjects) -> list[str]:
    """Chain kinds, e.g. ["service"], in creation order."""
    return [name.split("-", 1)[0] for name, _ in po.chains]


def elements(po: PortObjects) -> set[tuple[str, str, str]]:
    """(map, key, value) with chain names cut to their kind ("goto service")."""
    return {
        (m, k, v.split("-", 1)[0] if v.startswith("goto") else v) for m, k, v in po.elements if m != HAIRPIN
    }


@dataclass(frozen=True)
class Case:
    id: str
    sp: ServicePort
    eps: tuple[Endpoint, ...]
    chains: list[str]
    elements: set[tuple[str, str, str]]


CASES = [
    Case(
        "cluster-ip-is-elements-only",
        SP,
        (LOCAL, REMOTE),
        [],
        {
            (PLAIN_CLUSTER_IPS, "10.96.0.10 . tcp . 80", ""),
            ("endpoints-2", "10.96.0.10 . tcp . 80 . 0", "10.244.1.11 . 8080"),
            ("endpoints-2", "10.96.0.10 . tcp . 80 . 1", "10.244.2.12 . 8080"),
        },
    ),
    Case(
        "many-endpoints-get-a-chain",
        SP,
        tuple(Endpoint(f"10.244.3.{i}", 8080) for i in range(1, 18)),
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
        "node-port-and-external-ip-are-elements-only",
        replace(SP, node_port=30080, external_ips=("192.0.2.1",)),
        (LOCAL,),
        [],
        {
            (PLAIN_CLUSTER_IPS, "10.96.0.10 . tcp . 80", ""),
            ("endpoints-1", "10.96.0.10 . tcp . 80 . 0", "10.244.1.11 . 8080"),
            (PLAIN_EXTERNAL_IPS, "192.0.2.1 . tcp . 80", ""),
            ("endpoints-1", "192.0.2.1 . tcp . 80 . 0", "10.244.1.11 . 8080"),
            (PLAIN_NODEPORTS, "tcp . 30080", ""),
            ("nodeport-endpoints-1", "tcp . 30080 . 0", "10.244.1.11 . 8080"),
        },
    ),
    Case(
        "node-port-with-affinity",
        replace(SP, node_port=30080, affinity_timeout=60),
        (LOCAL,),
        ["endpoint", "service"],
        {
            (SERVICE_IPS, "10.96.0.10 . tcp . 80", "goto service"),
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
        ["firewall"],
        {
            (PLAIN_CLUSTER_IPS, "10.96.0.10 . tcp . 80", ""),
            ("endpoints-1", "10.96.0.10 . tcp . 80 . 0", "10.244.1.11 . 8080"),
            (PLAIN_EXTERNAL_IPS, "198.51.100.7 . tcp . 80", ""),
            ("endpoints-1", "198.51.100.7 . tcp . 80 . 0", "10.244.1.11 . 8080"),
            (PLAIN_NODEPORTS, "tcp . 30080", ""),
            ("nodeport-endpoints-1", "tcp . 30080 . 0", "10.244.1.11 . 8080"),
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
    """Internal traffic policy Local: the chain path (a chain of rules, no anonymous sets)."""
    sp = replace(SP, internal_local=True)
    eps = (LOCAL, replace(REMOTE, ip="10.244.1.14", is_local=True))
    ((_, rules),) = render_port(sp, eps, CFG).chains
    assert rules == (
        "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
        "numgen random mod 2 0 meta l4proto tcp dnat to 10.244.1.11:8080",
        "meta l4proto tcp dnat to 10.244.1.14:8080",
    )


def test_terminating_endpoints_serve_only_when_none_is_ready() -> None:
    def targets(eps: tuple[Endpoint, ...]) -> set[str]:
        return {v for m, _, v in render_port(SP, eps, CFG).elements if m.startswith("endpoints-")}

    assert targets((LOCAL, TERMINATING)) == {"10.244.1.11 . 8080"}
    assert targets((TERMINATING,)) == {"10.244.1.13 . 8080"}


def test_endpoints_that_can_loop_back_through_this_node_are_hairpin_pairs() -> None:
    """This node's endpoints, and those of unknown node; a pod elsewhere is its own node's job."""
    unknown = Endpoint("10.244.3.3", 8080)
    po = render_port(SP, (LOCAL, REMOTE, unknown), CFG)
    assert {k for m, k, _ in po.elements if m == HAIRPIN} == {
        "10.244.1.11 . 10.244.1.11",
        "10.244.3.3 . 10.244.3.3",
    }


def test_two_services_claiming_one_external_ip_do_not_conflict() -> None:
    """The first in name order wins the map element; the other's rules still exist."""
    other = replace(SP, name=ServicePortName("demo", "zzz", "http", "TCP"), cluster_ip="10.96.0.11")
    a = render_port(replace(SP, external_ips=("192.0.2.1",), affinity_timeout=5), (LOCAL,), CFG)
    b = render_port(replace(other, external_ips=("192.0.2.1",), affinity_timeout=5), (REMOTE,), CFG)
    winner = effective_elements([a, b])[(SERVICE_IPS, "192.0.2.1 . tcp . 80")]
    assert winner == dict(((m, k), v) for m, k, v in a.elements)[(SERVICE_IPS, "192.0.2.1 . tcp . 80")]


def test_ipv6_table() -> None:
    cfg6 = render_config(6, "node-a", cluster_cidr=("fd00:10:244::/48",))
    sp = ServicePort(NAME, 6, "fd00:10:96::a", 80)
    script = render_snapshot({NAME: (sp, (Endpoint("fd00:10:244:1::b", 8080),))}, cfg6)
    assert "table ip6 kube-proxy {" in script
    assert "type ipv6_addr . inet_proto . inet_service : verdict" in script
    assert "fd00:10:96::a . tcp . 80 . 0 : fd00:10:244:1::b . 8080" in script
    assert "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints-1" in script


def test_plain_services_are_no_chains_at_all() -> None:
    """The layout's point: 1,000 node-port services of 10 endpoints add no chain (only the
    fixed ones exist); 1,000 with ClientIP affinity are one chain each plus one per endpoint."""
    view = {}
    for i in range(1000):
        name = ServicePortName("bench", f"svc-{i}", "http", "TCP")
        eps = tuple(Endpoint(f"10.100.{i // 250}.{i % 250}", 8080 + j) for j in range(10))
        view[name] = (ServicePort(name, 4, f"10.96.{i // 250}.{i % 250 + 1}", 80, node_port=30000 + i), eps)
    chains = re.findall(r"^\tchain (\S+) \{", render_snapshot(view, CFG), re.M)
    assert len(chains) == 15
    sticky = {n: (replace(sp, affinity_timeout=60), eps) for n, (sp, eps) in view.items()}
    chains = re.findall(r"^\tchain (\S+) \{", render_snapshot(sticky, CFG), re.M)
    assert len(chains) == 15 + 1000 * 11
