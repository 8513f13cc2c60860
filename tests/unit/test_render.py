"""The iptables renderer: names, rule text and structure, per family and protocol."""

from __future__ import annotations

import base64
import gc
import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from kproxy.backends.iptables.render import (
    TOP_LEVEL,
    assemble,
    builtin_jumps,
    hash16,
    render_port,
    render_view,
)
from kproxy.config import RenderConfig
from kproxy.netfilter.ruleset import PortRules
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName
from tests.support import naming
from tests.support.tracer import BUILTIN_TARGETS

CFG = RenderConfig(family=4, node_name="node1", cluster_cidr=("10.0.0.0/8",))
CFG6 = RenderConfig(family=6, node_name="node1", cluster_cidr=("fd00:10::/64",))

SVC1 = ServicePortName("ns1", "svc1", "p80", "TCP")
SP1 = ServicePort(SVC1, 4, "172.30.0.41", 80)
EP1 = Endpoint("10.180.0.1", 80)
EP2 = Endpoint("10.180.0.2", 80)
EP3 = Endpoint("10.180.0.3", 80, is_local=True)


def h(text: str) -> str:
    """kube-proxy's algorithm, written out independently of the code under test."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def chains_of(
    sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig = CFG
) -> dict[Any, tuple[str, ...]]:
    return assemble([render_port(sp, eps, cfg)], cfg)


def rules(chains: Mapping[Any, tuple[str, ...]], table: str, prefix: str) -> list[str]:
    """All rules of the chains in `table` whose name starts with `prefix`."""
    return [r for (t, n), rs in chains.items() if t == table and n.startswith(prefix) for r in rs]


def assert_jumps_defined(chains: Mapping[Any, tuple[str, ...]]) -> None:
    for (table, name), rs in chains.items():
        for rule in rs:
            assert rule.startswith(f"-A {name} "), rule
            if " -j " in rule:
                target = rule.split(" -j ", 1)[1].split()[0]
                assert target in BUILTIN_TARGETS or (table, target) in chains, (
                    f"{rule} jumps to undefined {target}"
                )


# ------------------------------------------------------------------ names

NAME_CASES = [
    (
        "tcp named port",
        SVC1,
        "172.30.0.41",
        "10.180.0.1",
        80,
        "KUBE-SVC-XPGD46QRK7WJZT7O",
        "KUBE-SEP-SXIVWICOYRO3J4NJ",
    ),
    (
        "udp v6",
        ServicePortName("ns2", "svc6", "dns", "UDP"),
        "fd00:172:30::41",
        "fd00:10:180::1",
        53,
        "KUBE-SVC-ESG44UKA4MXKY7Z2",
        "KUBE-SEP-CJ37Z5ZI3SYZ2HS4",
    ),
    (
        "sctp unnamed port",
        ServicePortName("ns3", "svc3", "", "SCTP"),
        "172.30.0.43",
        "10.180.2.1",
        7777,
        "KUBE-SVC-DOX4DWJ74M2TZXV4",
        "KUBE-SEP-KER645KXQ6M55UEQ",
    ),
]


@pytest.mark.parametrize(
    ("name", "vip", "ep_ip", "port", "svc", "sep"),
    [c[1:] for c in NAME_CASES],
    ids=[c[0] for c in NAME_CASES],
)
def test_chain_names_match_kube_proxy(
    name: ServicePortName, vip: str, ep_ip: str, port: int, svc: str, sep: str
) -> None:
    family: Family = 6 if ":" in vip else 4
    cfg = CFG6 if family == 6 else CFG
    chains = chains_of(ServicePort(name, family, vip, port), (Endpoint(ep_ip, port),), cfg)
    assert ("nat", svc) in chains
    assert ("nat", sep) in chains
    assert svc == naming.svc_chain(name)
    assert sep == naming.sep_chain(name, Endpoint(ep_ip, port).hostport)


@pytest.mark.parametrize("text", ["", "a", "ns1/svc1:p80tcp", "x" * 200, "ns/s:ü[fd00::1]:53"])
def test_fast_hash_equals_reference(text: str) -> None:
    assert hash16(text) == h(text)


# ------------------------------------------------------------------ spreading and affinity


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_spread_probabilities(n: int) -> None:
    eps = tuple(Endpoint(f"10.180.0.{i}", 80) for i in range(1, n + 1))
    svc = rules(chains_of(SP1, eps), "nat", "KUBE-SVC-")
    assert svc[0].endswith("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    spread = svc[1:]
    assert len(spread) == n
    for i, rule in enumerate(spread):
        sep = "KUBE-SEP-" + h(f"ns1/svc1:p80tcp10.180.0.{i + 1}:80")
        assert rule.endswith(f"-j {sep}")
        assert f'--comment "ns1/svc1:p80 -> 10.180.0.{i + 1}:80"' in rule
        if i < n - 1:
            assert f"-m statistic --mode random --probability {1 / (n - i):.10f} " in rule
        else:
            assert "statistic" not in rule
    if n == 3:
        assert "--probability 0.3333333333 " in spread[0] and "--probability 0.5000000000 " in spread[1]


def test_client_ip_affinity() -> None:
    sp = replace(SP1, affinity_timeout=10800)
    chains = chains_of(sp, (EP1, EP2))
    svc = rules(chains, "nat", "KUBE-SVC-")
    sep1 = "KUBE-SEP-" + h("ns1/svc1:p80tcp10.180.0.1:80")
    assert svc[1] == (
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        f"-m recent --name {sep1} --rcheck --seconds 10800 --reap -j {sep1}"
    )
    assert sum("--rcheck" in r for r in svc) == 2
    assert chains["nat", sep1] == (
        f"-A {sep1} -m comment --comment ns1/svc1:p80 -s 10.180.0.1/32 -j KUBE-MARK-MASQ",
        f"-A {sep1} -m comment --comment ns1/svc1:p80 -m recent --name {sep1} --set -m tcp -p tcp "
        "-j DNAT --to-destination 10.180.0.1:80",
    )


# ------------------------------------------------------------------ full rule text of one service

EXPECTED_CLUSTER_IP = {
    ("nat", "KUBE-SERVICES"): (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 '
        "-j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" '
        "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS",
    ),
    ("nat", "KUBE-SVC-XPGD46QRK7WJZT7O"): (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41/32 '
        "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ',
    ),
    ("nat", "KUBE-SEP-SXIVWICOYRO3J4NJ"): (
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1/32 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
    ),
}


def test_cluster_ip_service_full_text() -> None:
    chains = chains_of(SP1, (EP1,))
    for key, want in EXPECTED_CLUSTER_IP.items():
        assert chains[key] == want, key
    assert list(chains)[: len(TOP_LEVEL)] == list(TOP_LEVEL)
    assert chains["nat", "KUBE-MARK-MASQ"] == ("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",)
    assert chains["nat", "KUBE-POSTROUTING"][-1].endswith("-j MASQUERADE --random-fully")
    assert chains["nat", "KUBE-PROXY-CANARY"] == () and chains["filter", "KUBE-PROXY-CANARY"] == ()
    assert_jumps_defined(chains)


# ------------------------------------------------------------------ table of structural cases

NP = replace(SP1, node_port=3001)
LB = replace(SP1, load_balancer_ips=("192.0.2.10",), node_port=3001)
FULL = replace(LB, external_ips=("198.51.100.7",))


def has(chains: Mapping[Any, tuple[str, ...]], table: str, chain: str, *parts: str) -> bool:
    return any(all(p in r for p in parts) for r in chains.get((table, chain), ()))


CASES: list[
    tuple[str, ServicePort, tuple[Endpoint, ...], RenderConfig, list[tuple[bool, str, str, tuple[str, ...]]]]
] = [
    (
        "no endpoints rejects every VIP",
        FULL,
        (),
        CFG,
        [
            (
                True,
                "filter",
                "KUBE-SERVICES",
                (
                    "-d 172.30.0.41/32",
                    '"ns1/svc1:p80 has no endpoints"',
                    "REJECT --reject-with icmp-port-unreachable",
                ),
            ),
            (True, "filter", "KUBE-EXTERNAL-SERVICES", ("-d 198.51.100.7/32", "REJECT")),
            (True, "filter", "KUBE-EXTERNAL-SERVICES", ("-d 192.0.2.10/32", "REJECT")),
            (
                True,
                "filter",
                "KUBE-EXTERNAL-SERVICES",
                ("-m addrtype --dst-type LOCAL", "--dport 3001", "REJECT"),
            ),
            (False, "nat", "KUBE-SERVICES", ("ns1/svc1:p80",)),
            (False, "nat", "KUBE-NODEPORTS", ("--dport 3001",)),
        ],
    ),
    (
        "cluster policy external traffic is masqueraded",
        FULL,
        (EP1,),
        CFG,
        [
            (
                True,
                "nat",
                "KUBE-SERVICES",
                ("external IP", "-d 198.51.100.7/32", "-j KUBE-EXT-XPGD46QRK7WJZT7O"),
            ),
            (
                True,
                "nat",
                "KUBE-SERVICES",
                ("loadbalancer IP", "-d 192.0.2.10/32", "-j KUBE-EXT-XPGD46QRK7WJZT7O"),
            ),
            (
                True,
                "nat",
                "KUBE-NODEPORTS",
                ("--comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O",),
            ),
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("masquerade traffic for ns1/svc1:p80 external destinations", "-j KUBE-MARK-MASQ"),
            ),
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O",),
            ),
            (False, "filter", "KUBE-EXTERNAL-SERVICES", ("ns1/svc1:p80",)),
        ],
    ),
    (
        "external local with a local endpoint",
        replace(NP, external_local=True),
        (EP1, EP3),
        CFG,
        [
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("pod traffic", "-s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O"),
            ),
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("masquerade LOCAL", "--src-type LOCAL -j KUBE-MARK-MASQ"),
            ),
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("route LOCAL", "--src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O"),
            ),
            (
                True,
                "nat",
                "KUBE-EXT-XPGD46QRK7WJZT7O",
                ("-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O",),
            ),
            (True, "nat", "KUBE-SVL-XPGD46QRK7WJZT7O", ("10.180.0.3:80",)),
            (False, "nat", "KUBE-SVL-XPGD46QRK7WJZT7O", ("10.180.0.1:80",)),
            (False, "nat", "KUBE-EXT-XPGD46QRK7WJZT7O", ("masquerade traffic for",)),
        ],
    ),
    (
        "external local without a local endpoint drops outside traffic",
        replace(NP, external_local=True),
        (EP1,),
        CFG,
        [
            (
                True,
                "filter",
                "KUBE-EXTERNAL-SERVICES",
                ('"ns1/svc1:p80 has no local endpoints"', "--dport 3001", "-j DROP"),
            ),
            (True, "nat", "KUBE-EXT-XPGD46QRK7WJZT7O", ("route LOCAL",)),
            (False, "nat", "KUBE-EXT-XPGD46QRK7WJZT7O", ("-j KUBE-SVL-",)),
            (False, "filter", "KUBE-SERVICES", ("ns1/svc1:p80",)),
        ],
    ),
    (
        "internal local without a local endpoint drops cluster IP traffic",
        replace(SP1, internal_local=True),
        (EP1,),
        CFG,
        [
            (True, "filter", "KUBE-SERVICES", ("-d 172.30.0.41/32", "has no local endpoints", "-j DROP")),
            (False, "nat", "KUBE-SERVICES", ("ns1/svc1:p80",)),
        ],
    ),
    (
        "internal local sends cluster IP to SVL, masquerade rule included",
        replace(SP1, internal_local=True),
        (EP1, EP3),
        CFG,
        [
            (True, "nat", "KUBE-SERVICES", ("cluster IP", "-j KUBE-SVL-XPGD46QRK7WJZT7O")),
            (True, "nat", "KUBE-SVL-XPGD46QRK7WJZT7O", ("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",)),
            (False, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("",)),
            (False, "nat", "KUBE-SEP-" + h("ns1/svc1:p80tcp10.180.0.1:80"), ("",)),
        ],
    ),
    (
        "masquerade all",
        SP1,
        (EP1,),
        replace(CFG, masquerade_all=True),
        [
            (True, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("--dport 80 -j KUBE-MARK-MASQ",)),
            (False, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("! -s",)),
        ],
    ),
    (
        "no local-traffic detector: no masquerade rule",
        SP1,
        (EP1,),
        replace(CFG, cluster_cidr=()),
        [(False, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("KUBE-MARK-MASQ",))],
    ),
    (
        "NodeCIDR detector uses the node's pod CIDR",
        SP1,
        (EP1,),
        replace(CFG, detect_local_mode="NodeCIDR", node_pod_cidrs=("10.180.0.0/24",)),
        [(True, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("! -s 10.180.0.0/24 -j KUBE-MARK-MASQ",))],
    ),
    (
        "load balancer source ranges",
        replace(LB, load_balancer_source_ranges=("203.0.113.0/25", "fd00::/8")),
        (EP1,),
        replace(CFG, node_ip="203.0.113.5"),
        [
            (True, "nat", "KUBE-SERVICES", ("loadbalancer IP", "-j KUBE-FW-XPGD46QRK7WJZT7O")),
            (True, "nat", "KUBE-FW-XPGD46QRK7WJZT7O", ("-s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O",)),
            (True, "nat", "KUBE-FW-XPGD46QRK7WJZT7O", ("-s 192.0.2.10/32 -j KUBE-EXT-XPGD46QRK7WJZT7O",)),
            (False, "nat", "KUBE-FW-XPGD46QRK7WJZT7O", ("fd00::/8",)),
            (
                True,
                "filter",
                "KUBE-PROXY-FIREWALL",
                ("traffic not accepted by KUBE-FW-XPGD46QRK7WJZT7O", "-d 192.0.2.10/32", "-j DROP"),
            ),
        ],
    ),
    (
        "health check node port accepted",
        replace(LB, external_local=True, health_check_node_port=31000),
        (EP3,),
        CFG,
        [
            (
                True,
                "filter",
                "KUBE-NODEPORTS",
                ('"ns1/svc1:p80 health check node port"', "-m tcp -p tcp --dport 31000 -j ACCEPT"),
            )
        ],
    ),
    (
        "nodeport addresses replace addrtype LOCAL, loopback skipped",
        NP,
        (EP1,),
        replace(CFG, nodeport_ips=("192.168.0.10", "127.0.0.1")),
        [
            (
                True,
                "nat",
                "KUBE-SERVICES",
                ("this must be the last rule", "-d 192.168.0.10/32 -j KUBE-NODEPORTS"),
            ),
            (False, "nat", "KUBE-SERVICES", ("addrtype",)),
            (False, "nat", "KUBE-SERVICES", ("127.0.0.1",)),
        ],
    ),
    (
        "comments off on SVC and SEP rules only",
        SP1,
        (EP1, EP2),
        replace(CFG, comments=False),
        [
            (True, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("-A KUBE-SVC-XPGD46QRK7WJZT7O -m statistic",)),
            (True, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ('"ns1/svc1:p80 cluster IP"', "KUBE-MARK-MASQ")),
            (False, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O", ("->",)),
            (
                True,
                "nat",
                "KUBE-SEP-SXIVWICOYRO3J4NJ",
                ("-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -j KUBE-MARK-MASQ",),
            ),
            (True, "nat", "KUBE-SERVICES", ('"ns1/svc1:p80 cluster IP"',)),
        ],
    ),
    (
        "ipv6",
        ServicePort(
            ServicePortName("ns2", "svc6", "dns", "UDP"),
            6,
            "fd00:172:30::41",
            53,
            external_ips=("2001:db8::7",),
        ),
        (),
        CFG6,
        [
            (
                True,
                "filter",
                "KUBE-SERVICES",
                (
                    "-m udp -p udp -d fd00:172:30::41/128 --dport 53",
                    "REJECT --reject-with icmp6-port-unreachable",
                ),
            ),
            (True, "filter", "KUBE-EXTERNAL-SERVICES", ("-d 2001:db8::7/128",)),
            (True, "nat", "KUBE-SERVICES", ("--dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS",)),
        ],
    ),
    (
        "ipv6 endpoints",
        ServicePort(ServicePortName("ns2", "svc6", "dns", "UDP"), 6, "fd00:172:30::41", 53),
        (Endpoint("fd00:10:180::1", 53),),
        CFG6,
        [
            (True, "nat", "KUBE-SVC-ESG44UKA4MXKY7Z2", ("! -s fd00:10::/64 -j KUBE-MARK-MASQ",)),
            (True, "nat", "KUBE-SVC-ESG44UKA4MXKY7Z2", ('"ns2/svc6:dns -> [fd00:10:180::1]:53"',)),
            (True, "nat", "KUBE-SEP-CJ37Z5ZI3SYZ2HS4", ("-s fd00:10:180::1/128 -j KUBE-MARK-MASQ",)),
            (
                True,
                "nat",
                "KUBE-SEP-CJ37Z5ZI3SYZ2HS4",
                ("-m udp -p udp -j DNAT --to-destination [fd00:10:180::1]:53",),
            ),
        ],
    ),
    (
        "sctp",
        ServicePort(ServicePortName("ns3", "svc3", "", "SCTP"), 4, "172.30.0.43", 7777),
        (Endpoint("10.180.2.1", 7777),),
        CFG,
        [
            (
                True,
                "nat",
                "KUBE-SERVICES",
                ('"ns3/svc3 cluster IP" -m sctp -p sctp -d 172.30.0.43/32 --dport 7777',),
            ),
            (
                True,
                "nat",
                "KUBE-SEP-KER645KXQ6M55UEQ",
                ("-m sctp -p sctp -j DNAT --to-destination 10.180.2.1:7777",),
            ),
        ],
    ),
]


@pytest.mark.parametrize(("sp", "eps", "cfg", "checks"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_render_cases(
    sp: ServicePort,
    eps: tuple[Endpoint, ...],
    cfg: RenderConfig,
    checks: list[tuple[bool, str, str, tuple[str, ...]]],
) -> None:
    chains = chains_of(sp, eps, cfg)
    assert_jumps_defined(chains)
    for want, table, chain, parts in checks:
        assert has(chains, table, chain, *parts) == want, (
            want,
            table,
            chain,
            parts,
            chains.get((table, chain)),
        )


def test_hostile_name_cannot_break_out_of_comment() -> None:
    name = ServicePortName("ns", 'evil" -j ACCEPT\n-A INPUT', "p", "TCP")
    chains = chains_of(ServicePort(name, 4, "172.30.0.50", 80), (EP1,))
    for rs in chains.values():
        for rule in rs:
            assert "\n" not in rule
            assert '" -j ACCEPT' not in rule
            assert rule.count('"') % 2 == 0


def test_render_port_is_cached_and_pure() -> None:
    a = render_port(SP1, (EP1, EP2), CFG)
    assert render_port(replace(SP1), (EP1, EP2), CFG) is a
    b = render_port(SP1, (EP1,), CFG)
    assert b is not a and b != a


def test_assemble_keeps_port_order_and_puts_nodeports_last() -> None:
    other = ServicePort(ServicePortName("ns0", "a", "", "TCP"), 4, "172.30.0.2", 80, node_port=3002)
    view = {SP1.name: (SP1, (EP1,)), other.name: (other, (EP2,))}
    chains = render_view(view, CFG)
    services = chains["nat", "KUBE-SERVICES"]
    assert "ns0/a cluster IP" in services[0] and "ns1/svc1:p80 cluster IP" in services[1]
    assert "KUBE-NODEPORTS" in services[-1]
    assert_jumps_defined(chains)
    ports: list[PortRules] = [render_port(sp, eps, CFG) for _, (sp, eps) in sorted(view.items())]
    assert assemble(ports, CFG) == chains


def test_render_view_leaves_the_collector_as_it_was() -> None:
    assert gc.isenabled()
    render_view({SP1.name: (SP1, (EP1,))}, CFG)
    assert gc.isenabled()
    gc.disable()
    try:
        render_view({SP1.name: (SP1, (EP2,))}, CFG)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_builtin_jumps() -> None:
    jumps = builtin_jumps(CFG)
    assert jumps["nat", "PREROUTING"] == (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    )
    assert jumps["nat", "POSTROUTING"] == (
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    )
    fwd = jumps["filter", "FORWARD"]
    assert [r.split(" -j ")[1] for r in fwd] == [
        "KUBE-PROXY-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
    ]
    assert "--ctstate NEW" not in fwd[1] and all("--ctstate NEW" in r for r in (fwd[0], fwd[2], fwd[3]))
    assert [r.split(" -j ")[1] for r in jumps["filter", "INPUT"]] == [
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
    ]
    assert [r.split(" -j ")[1] for r in jumps["filter", "OUTPUT"]] == ["KUBE-PROXY-FIREWALL", "KUBE-SERVICES"]
