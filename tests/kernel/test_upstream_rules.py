"""Our rules against kube-proxy's own expected rules (tests/data/upstream/).

kube-proxy's iptables tests spell out, for fixed inputs, the restore input its proxier
writes. The inputs are reproduced here (YAML or model objects), rendered by kproxy, and
compared rule for rule in canonical form (kproxy/backends/iptables/adopt.py: what
iptables-save would print, so `-d 1.2.3.4` equals `-d 1.2.3.4/32`, `-j REJECT` equals
`-j REJECT --reject-with icmp-port-unreachable`).

What the comparison normalises, and nothing else:
- kproxy's KUBE-PROXY-CANARY chains (filter, nat) are left out: kube-proxy creates its
  canaries with `iptables -N` outside the restore input, so its tests never see them.
- Chains are compared as a set per table (a restore input's chain order means nothing);
  the rules inside every chain are compared in order. Top-level chains list services in
  ServicePortName order in kproxy, in Go map order in kube-proxy: upstream's assertion
  sorts them before comparing, and its expected text is in that same order.
The fake proxier's settings are inputs, not normalisations: upstream's fake iptables has
no --random-fully, its nfacct counters exist, localhost node ports are on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from kproxy.backends.iptables.adopt import canonical_rule
from kproxy.backends.iptables.proxier import IptablesProxier, supports_random_fully
from kproxy.backends.iptables.render import render_port, render_snapshot, render_view
from kproxy.config import LARGE_CLUSTER_ENDPOINTS, RenderConfig, localhost_in_effect, render_config, sized
from kproxy.errors import ConfigError
from kproxy.netfilter.restore import CommandRestorer
from kproxy.netfilter.ruleset import ChainKey
from kproxy.sources.files import load_paths
from kproxy.state.build import Snapshot, view
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName
from kproxy.tracking.changes import ChangeTracker, FamilyView
from tests.support.netns import BACKENDS, Backend, Topology, exec_in, netns_guard, request

__all__ = ["netns_guard"]

DATA = Path(__file__).resolve().parents[1] / "data" / "upstream"
NODE = "test-node"
NODE_IPS = ("192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2")

# NewFakeProxier's settings, as RenderConfig.
FAKE = RenderConfig(
    family=4,
    node_name=NODE,
    cluster_cidr=("10.0.0.0/8",),
    node_ip="192.168.0.2",
    localhost_nodeports=True,
    random_fully=False,
    nfacct=True,
)

Ruleset = dict[ChainKey, list[str]]


# ------------------------------------------------------------------ comparison


def parse_restore(text: str) -> Ruleset:
    """`iptables-restore` input to {(table, chain): rules}; header comments skipped."""
    out: Ruleset = {}
    table = ""
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.setdefault((table, line[1:].split()[0]), [])  # type: ignore[arg-type]
        elif line.startswith("-A "):
            out.setdefault((table, line.split()[1]), []).append(line)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unexpected restore line {line!r}")
    return out


def ours(chains: Mapping[ChainKey, tuple[str, ...]]) -> Ruleset:
    return {key: list(rules) for key, rules in chains.items() if key[1] != "KUBE-PROXY-CANARY"}


def differences(got: Ruleset, want: Ruleset, family: Family = 4) -> list[str]:
    """Human-readable differences after canonicalisation; empty when equal."""
    diffs = [f"missing chain {t} {c}" for t, c in sorted(want.keys() - got.keys())]
    diffs += [f"extra chain {t} {c}" for t, c in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        a = [canonical_rule(r, family) for r in got[key]]
        b = [canonical_rule(r, family) for r in want[key]]
        if a != b:
            diffs.append(
                f"{key[0]} {key[1]} differs:\n  ours:\n    "
                + "\n    ".join(got[key])
                + "\n  upstream:\n    "
                + "\n    ".join(want[key])
            )
    return diffs


def sections() -> dict[str, list[str]]:
    """chain-expectations.txt: `[name]` then the lines of that expectation."""
    out: dict[str, list[str]] = {}
    name = ""
    for line in (DATA / "chain-expectations.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            name = line.strip("[]")
            out[name] = []
        else:
            out[name].append(line)
    return out


EXPECT = sections()


def render(
    view_: Mapping[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]], cfg: RenderConfig
) -> Ruleset:
    return ours(render_view(view_, cfg))


def manifest_view(
    path: Path, family: Family = 4
) -> dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]:
    objs, errors = load_paths([str(path)])
    assert not errors, errors
    return dict(view(Snapshot.from_objects(objs, NODE), NODE, family))


def port(ns: str, name: str, port_name: str, vip: str, number: int, **kw: object) -> ServicePort:
    return ServicePort(ServicePortName(ns, name, port_name, "TCP"), 4, vip, number, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ whole rulesets


def test_overall_iptables_rules_match_upstream() -> None:
    got = render(manifest_view(DATA / "overall-iptables-rules.yaml"), FAKE)
    want = parse_restore((DATA / "overall-iptables-rules.txt").read_text())
    assert differences(got, want) == []


def repeated_view() -> dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]:
    sp1 = port("ns1", "svc1", "p80", "172.30.0.41", 80)
    sp2 = port("ns2", "svc2", "p8080", "172.30.0.42", 8080)
    return {sp1.name: (sp1, (Endpoint("10.0.1.1", 80),)), sp2.name: (sp2, (Endpoint("10.0.2.1", 8080),))}


def test_sync_proxy_rules_repeated_first_sync_matches_upstream() -> None:
    got = render(repeated_view(), FAKE)
    want = parse_restore((DATA / "sync-proxy-rules-repeated.txt").read_text())
    assert differences(got, want) == []


def test_a_difference_is_reported() -> None:
    """The comparison is not vacuous: one changed rule, one extra chain are both caught."""
    want = parse_restore((DATA / "sync-proxy-rules-repeated.txt").read_text())
    got = render(repeated_view(), replace(FAKE, masquerade_bit=13))
    diffs = differences(got, want)
    assert any("KUBE-MARK-MASQ differs" in d for d in diffs)
    got = render(repeated_view(), replace(FAKE, localhost_nodeports=False))
    assert "missing chain filter KUBE-FIREWALL" in differences(got, want)


# ------------------------------------------------------------------ single chains


def chain(got: Ruleset, table: str, name: str) -> list[str]:
    return got.get((table, name), [])  # type: ignore[arg-type]


def same(got: list[str], want: list[str], family: Family = 4) -> bool:
    return [canonical_rule(r, family) for r in got] == [canonical_rule(r, family) for r in want]


@pytest.mark.parametrize(
    ("liberal", "nfacct"), [(False, False), (False, True), (True, False)], ids=lambda v: str(v)
)
def test_drop_invalid_rule(liberal: bool, nfacct: bool) -> None:
    got = render({}, replace(FAKE, drop_invalid=not liberal, nfacct=nfacct))
    want = EXPECT[
        f"TestDropInvalidRule tcpLiberal={str(liberal).lower()} nfacct={str(nfacct).lower()}: filter KUBE-FORWARD"
    ]
    assert same(chain(got, "filter", "KUBE-FORWARD"), want)


@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(random_fully: bool) -> None:
    got = render({}, replace(FAKE, random_fully=random_fully))
    want = EXPECT[f"TestMasqueradeRule randomFully={str(random_fully).lower()}: nat KUBE-POSTROUTING"]
    assert same(chain(got, "nat", "KUBE-POSTROUTING"), want)


TAIL = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"

# TestNodePorts' cases: (name, family, localhostNodePorts, nodePortAddresses), the node-port
# destinations kube-proxy's proxier writes for them, and whether KUBE-FIREWALL is filled.
NODE_PORT_CASES = [
    ("ipv4, localhost-nodeports enabled", 4, True, (), ["-m addrtype --dst-type LOCAL"]),
    ("ipv4, localhost-nodeports disabled", 4, False, (), ["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8"]),
    (
        "ipv4, localhost-nodeports disabled, localhost in nodeport-addresses",
        4,
        False,
        ("192.168.0.0/24", "127.0.0.1/32"),
        ["-d 192.168.0.2"],
    ),
    (
        "ipv4, localhost-nodeports enabled, multiple nodeport-addresses",
        4,
        False,  # sic: upstream's case of this name runs with localhostNodePorts false
        ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"),
        ["-d 192.168.0.2", "-d 192.168.1.2"],
    ),
    ("ipv6, localhost-nodeports enabled", 6, True, (), ["-m addrtype --dst-type LOCAL ! -d ::1/128"]),
]


@pytest.mark.parametrize(
    ("name", "family", "localhost", "addresses", "destinations"),
    NODE_PORT_CASES,
    ids=[c[0] for c in NODE_PORT_CASES],
)
def test_node_ports(
    name: str, family: Family, localhost: bool, addresses: tuple[str, ...], destinations: list[str]
) -> None:
    cfg = render_config(
        family,
        NODE,
        cluster_cidr=("10.0.0.0/8", "fd00:10::/64"),
        nodeport_addresses=addresses,
        node_ips=NODE_IPS,
        localhost_nodeports=localhost,
        random_fully=False,
    )
    got = render({}, cfg)
    want = EXPECT.get(f"TestNodePorts {name}: filter KUBE-FIREWALL", [])
    assert same(chain(got, "filter", "KUBE-FIREWALL"), want, family)
    tail = [f'-A KUBE-SERVICES -m comment --comment "{TAIL}" {d} -j KUBE-NODEPORTS' for d in destinations]
    assert same(chain(got, "nat", "KUBE-SERVICES"), tail, family)


def test_localhost_node_ports_are_off_without_loopback_in_nodeport_addresses() -> None:
    cfg = render_config(
        4, NODE, nodeport_addresses=("192.168.0.0/24",), node_ips=NODE_IPS, localhost_nodeports=True
    )
    assert not cfg.localhost_nodeports
    cfg = render_config(
        4, NODE, nodeport_addresses=("127.0.0.0/8",), node_ips=NODE_IPS, localhost_nodeports=True
    )
    assert cfg.localhost_nodeports
    assert not render_config(6, NODE, node_ips=NODE_IPS, localhost_nodeports=True).localhost_nodeports


@pytest.mark.parametrize(
    ("mode", "extra", "name"),
    [
        ("ClusterCIDR", {"cluster_cidr": ("10.0.0.0/14",)}, "TestDetectLocalByCIDR 10.0.0.0/14"),
        ("BridgeInterface", {"bridge_interface": "eth0"}, "TestDetectLocalByBridgeInterface eth0"),
        (
            "InterfaceNamePrefix",
            {"interface_name_prefix": "eth0"},
            "TestDetectLocalByInterfaceNamePrefix eth0",
        ),
    ],
)
def test_local_traffic_detectors(mode: str, extra: dict[str, object], name: str) -> None:
    cfg = RenderConfig(family=4, node_name=NODE, detect_local_mode=mode, **extra)  # type: ignore[arg-type]
    if_local, if_not_local = EXPECT[f"{name}: IfLocal / IfNotLocal"]
    assert cfg.local_match == (if_local, if_not_local)
    # and they land where kube-proxy puts them: Local-policy short-circuit, cluster-IP masquerade
    sp = port("ns1", "svc1", "p80", "172.30.0.41", 80, node_port=3001, external_local=True)
    rules = [
        r for c in render_port(sp, (Endpoint("10.180.0.1", 80, is_local=True),), cfg).own for r in c.rules
    ]
    assert any(f"{if_local} -j KUBE-SVC-" in r and "pod traffic" in r for r in rules)
    assert any(f"{if_not_local} -j KUBE-MARK-MASQ" in r and "cluster IP" in r for r in rules)


def test_interface_detector_without_an_interface_is_off() -> None:
    cfg = RenderConfig(
        family=4, node_name=NODE, detect_local_mode="BridgeInterface", cluster_cidr=("10.0.0.0/8",)
    )
    assert cfg.local_match == ("", "")


# ------------------------------------------------------------------ large-cluster mode


def many(ip_format: str, n: int, port_number: int) -> tuple[Endpoint, ...]:
    eps = [Endpoint(ip_format.format(i % 256, i // 256), port_number) for i in range(n)]
    return tuple(sorted(eps, key=lambda e: e.hostport))


def dnat(got: Ruleset, sep: str) -> list[str]:
    return [r for r in chain(got, "nat", sep) if "DNAT" in r]


def test_large_cluster_mode_drops_endpoint_comments_as_upstream() -> None:
    half = LARGE_CLUSTER_ENDPOINTS // 2 - 1
    sp1 = port("ns1", "svc1", "p80", "172.30.0.41", 80)
    sp2 = port("ns2", "svc2", "p8080", "172.30.0.42", 8080)
    sp3 = port("ns3", "svc3", "p8081", "172.30.0.43", 8081)
    sp4 = port("ns4", "svc4", "p8082", "172.30.0.44", 8082)
    cfg = replace(FAKE, masquerade_all=True)
    v = {
        sp1.name: (sp1, many("10.0.{}.{}", half, 80)),
        sp2.name: (sp2, many("10.1.{}.{}", half, 8080)),
    }
    total = sum(len(eps) for _, eps in v.values())
    got = render(v, sized(cfg, total))
    assert (
        dnat(got, "KUBE-SEP-DKGQUZGBKLTPAR56")
        == EXPECT["TestSyncProxyRulesLargeClusterMode 998 endpoints: nat KUBE-SEP-DKGQUZGBKLTPAR56 DNAT"]
    )
    v[sp3.name] = (sp3, tuple(Endpoint(ip, 8081) for ip in ("203.0.113.12", "203.0.113.4", "203.0.113.8")))
    big = sized(cfg, total + 3)
    assert not big.comments
    got = render(v, big)
    assert (
        dnat(got, "KUBE-SEP-RUVVH7YV3PHQBDOS")
        == EXPECT["TestSyncProxyRulesLargeClusterMode 1001 endpoints: nat KUBE-SEP-RUVVH7YV3PHQBDOS DNAT"]
    )
    assert (
        dnat(got, "KUBE-SEP-DKGQUZGBKLTPAR56")
        == EXPECT[
            "TestSyncProxyRulesLargeClusterMode 1001 endpoints, after a full sync: nat KUBE-SEP-DKGQUZGBKLTPAR56 DNAT"
        ]
    )
    v[sp4.name] = (sp4, (Endpoint("10.4.0.1", 8082),))
    got = render(v, sized(cfg, total + 4))
    assert (
        dnat(got, "KUBE-SEP-SU5STNODRYEWJAUF")
        == EXPECT["TestSyncProxyRulesLargeClusterMode 1002 endpoints: nat KUBE-SEP-SU5STNODRYEWJAUF DNAT"]
    )
    # Which rules lose their comment: every rule of the SEP chains and the SVC chain's jumps
    # to them; the cluster-IP rules (KUBE-SERVICES, the masquerade rule) keep theirs.
    svc = chain(got, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O")
    assert "--comment" in svc[0] and not any("--comment" in r for r in svc[1:])
    assert not any("--comment" in r for r in chain(got, "nat", "KUBE-SEP-DKGQUZGBKLTPAR56"))
    assert all("--comment" in r for r in chain(got, "nat", "KUBE-SERVICES"))


def test_sized_keeps_the_config_object_while_the_mode_holds() -> None:
    assert sized(FAKE, LARGE_CLUSTER_ENDPOINTS) is FAKE
    small = sized(replace(FAKE, comments=False), 3)
    assert small.comments and sized(small, 7) is small


def slice_obj(name: str, ips: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
    }


def service_obj(name: str, vip: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"clusterIP": vip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    }


def test_family_view_keeps_the_endpoint_total_as_services_change() -> None:
    from kproxy.state.parse import parse_object

    tracker = ChangeTracker(NODE)
    fv = FamilyView(4, NODE)

    def apply(*objs: dict[str, object]) -> None:
        for o in objs:
            tracker.upsert(parse_object(o))

    apply(service_obj("a", "172.30.0.1"), slice_obj("a", ["10.0.0.1", "10.0.0.2"]))
    apply(service_obj("b", "172.30.0.2"), slice_obj("b", ["10.0.1.1"]))
    fv.rebuild(tracker)
    assert fv.endpoint_total == 3
    apply(slice_obj("a", ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]))
    fv.update(tracker, tracker.take().services)
    assert fv.endpoint_total == 5
    tracker.delete("Service", "ns", "b")
    fv.update(tracker, tracker.take().services)
    assert fv.endpoint_total == 4 == sum(len(eps) for _, eps in fv.ports.values())


# ------------------------------------------------------------------ primary node-port addresses


def test_primary_node_port_addresses_are_the_nodes_first_internal_ip() -> None:
    # The Node lists an ExternalIP first; kube-proxy's primary IP is its first InternalIP.
    from kproxy.state.parse import parse_object

    node = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {
                "addresses": [
                    {"type": "ExternalIP", "address": "203.0.113.9"},
                    {"type": "Hostname", "address": NODE},
                    {"type": "InternalIP", "address": "192.168.0.2"},
                    {"type": "InternalIP", "address": "2001:db8::1"},
                ]
            },
        }
    )
    assert node.addresses == ("192.168.0.2", "2001:db8::1", "203.0.113.9")  # type: ignore[union-attr]
    local = ("192.168.0.2", "192.168.1.2", "203.0.113.9", "2001:db8::1")
    primary = node.addresses  # type: ignore[union-attr]
    v4 = render_config(4, NODE, nodeport_addresses=("primary",), node_ips=local, primary_ips=primary)
    v6 = render_config(6, NODE, nodeport_addresses=("primary",), node_ips=local, primary_ips=primary)
    assert (v4.nodeport_ips, v6.nodeport_ips, v4.node_ip) == (
        ("192.168.0.2",),
        ("2001:db8::1",),
        "192.168.0.2",
    )
    assert not v4.localhost_nodeports  # a /32 of the node IP leaves loopback out, as upstream
    tail = chain(render({}, v4), "nat", "KUBE-SERVICES")
    assert same(tail, [f'-A KUBE-SERVICES -m comment --comment "{TAIL}" -d 192.168.0.2 -j KUBE-NODEPORTS'])
    # no primary IP of a family: that family's node ports stay on every local address
    only_v4 = render_config(
        6, NODE, nodeport_addresses=("primary",), node_ips=local, primary_ips=("192.168.0.2",)
    )
    assert only_v4.nodeport_ips is None


# ------------------------------------------------------------------ the proxier's host probe


class FakeProbe:
    def __init__(self, version: str = "iptables v1.8.9 (nf_tables)", liberal: str | None = "0") -> None:
        self.version = version
        self.liberal = liberal
        self.written: list[tuple[str, str]] = []
        self.canaries: list[int] = []
        self.fail_write = False

    def iptables_version(self) -> str:
        return self.version

    def read_sysctl(self, name: str) -> str | None:
        return self.liberal if name.endswith("tcp_be_liberal") else None

    def write_sysctl(self, name: str, value: str) -> None:
        if self.fail_write:
            raise OSError("read-only file system")
        self.written.append((name, value))

    def ensure_mangle_canary(self, family: Family) -> None:
        self.canaries.append(family)


class NullRestorer:
    """Accepts every write; the kernel side is proven by the privileged tests below."""

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def chunk_limit(self, table_chains: int) -> int | None:
        return None

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        self.payloads.append(payload)

    def save(self, family: Family, table: str) -> str:
        return ""

    def chains(self, family: Family, tables: object) -> dict[str, set[str]]:
        return {t: set() for t in ("filter", "nat")}

    def has_chain(self, family: Family, table: str, chain: str) -> bool:
        return True

    def generation(self, family: Family, table: str) -> object | None:
        return None

    def ensure_jumps(self, family: Family, jumps: object) -> int:
        return 0


@pytest.mark.parametrize(
    ("text", "supported"),
    [
        ("iptables v1.8.9 (nf_tables)", True),
        ("iptables v1.6.2", True),
        ("iptables v1.6.1", False),
        ("iptables v1.4.21", False),
        ("", False),
    ],
)
def test_random_fully_needs_iptables_1_6_2(text: str, supported: bool) -> None:
    assert supports_random_fully(text) is supported


def sync_once(probe: FakeProbe, cfg: RenderConfig, route_localnet: bool = False) -> NullRestorer:
    restorer = NullRestorer()
    proxier = IptablesProxier(restorer, probe=probe, route_localnet=route_localnet)  # type: ignore[arg-type]
    asyncio.run(proxier.sync(4, {}, None, cfg))
    return restorer


def test_proxier_writes_what_the_host_supports() -> None:
    probe = FakeProbe(version="iptables v1.6.1", liberal="1")
    payload = sync_once(
        probe, replace(FAKE, nfacct=False, random_fully=True, drop_invalid=True), True
    ).payloads[0]
    assert "--random-fully" not in payload and "--ctstate INVALID" not in payload
    assert probe.written == [("net/ipv4/conf/all/route_localnet", "1")]
    assert probe.canaries == [4]  # the first sync is full: the mangle canary is ensured
    probe = FakeProbe()
    payload = sync_once(probe, replace(FAKE, nfacct=False, localhost_nodeports=False)).payloads[0]
    assert "MASQUERADE --random-fully" in payload and "--ctstate INVALID -j DROP" in payload
    assert probe.written == []  # route_localnet is left alone without localhost node ports


def test_proxier_refuses_to_start_when_route_localnet_cannot_be_set() -> None:
    probe = FakeProbe()
    probe.fail_write = True
    with pytest.raises(ConfigError, match="route_localnet"):
        IptablesProxier(NullRestorer(), probe=probe, route_localnet=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("localhost", "addresses", "effect"),
    [
        (True, (), True),
        (False, (), False),
        (True, ("192.168.0.0/24",), False),
        (True, ("127.0.0.0/8", "192.168.0.0/24"), True),
        (True, ("2001:db8::/64",), True),  # no IPv4 CIDR: IPv4 node ports stay on every address
        (True, ("primary",), False),
    ],
)
def test_localhost_node_ports_in_effect(localhost: bool, addresses: tuple[str, ...], effect: bool) -> None:
    assert localhost_in_effect(localhost, addresses) is effect
    cfg = render_config(
        4,
        NODE,
        nodeport_addresses=addresses,
        node_ips=NODE_IPS,
        primary_ips=("192.168.0.2",),
        localhost_nodeports=localhost,
    )
    assert cfg.localhost_nodeports is effect


# ------------------------------------------------------------------ the kernel


RULESETS = {
    "overall": lambda: render_snapshot(manifest_view(DATA / "overall-iptables-rules.yaml"), FAKE),
    "repeated": lambda: render_snapshot(repeated_view(), FAKE),
    "large": lambda: render_snapshot(
        {
            port("ns1", "svc1", "p80", "172.30.0.41", 80).name: (
                port("ns1", "svc1", "p80", "172.30.0.41", 80),
                many("10.0.{}.{}", 1001, 80),
            )
        },
        replace(FAKE, comments=False, random_fully=True, nfacct=False),
    ),
    "bridge": lambda: render_snapshot(
        manifest_view(DATA / "overall-iptables-rules.yaml"),
        replace(FAKE, detect_local_mode="BridgeInterface", bridge_interface="cbr0", nfacct=False),
    ),
    "prefix": lambda: render_snapshot(
        manifest_view(DATA / "overall-iptables-rules.yaml"),
        replace(
            FAKE, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth", drop_invalid=False
        ),
    ),
}


@pytest.fixture
def bare_netns(netns_guard: None) -> Iterator[str]:
    with Topology(pods=0, clients=0) as topo:
        yield topo.node_ns


@pytest.mark.privileged
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(RULESETS))
def test_reproduced_rulesets_load_into_the_kernel(name: str, backend: Backend, bare_netns: str) -> None:
    payload = RULESETS[name]()
    exec_in(bare_netns, [f"iptables-{backend}-restore", "--test"], input=payload)


NODE_PORT = 30080


def localhost_lab_rules(topo: Topology, localhost: bool) -> str:
    pods = topo.pod_hosts
    sp = ServicePort(ServicePortName("demo", "web", "http", "TCP"), 4, "10.96.0.50", 80, node_port=NODE_PORT)
    eps = tuple(Endpoint(p.ip(4), 8080, node_name=topo.node_name) for p in pods)
    cfg = render_config(
        4,
        topo.node_name,
        cluster_cidr=(str(ipaddress.ip_network(topo.node.pod_cidr(4), strict=False)),),
        node_ips=(topo.node.ip(4),),
        localhost_nodeports=localhost,
    )
    return render_snapshot({sp.name: (sp, eps)}, cfg)


@pytest.mark.privileged
@pytest.mark.parametrize("backend", BACKENDS)
def test_localhost_node_port_carries_traffic(backend: Backend, netns_guard: None) -> None:
    with Topology(pods=2, clients=0) as topo:
        topo.start_servers([8080])
        ns = topo.node_ns
        topo.load_rules(localhost_lab_rules(topo, localhost=True), backend, 4)
        exec_in(ns, ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        reply = request(ns, "127.0.0.1", NODE_PORT)
        assert reply.ok and reply.name.startswith("pod-"), str(reply)
        # masqueraded: the pod never sees 127.0.0.1, which it could not answer
        assert reply.peer == topo.node.gateway(4), str(reply)
        saved = topo.save_rules(backend, 4)
        assert re.search(r"-A INPUT -j KUBE-FIREWALL|-A KUBE-FIREWALL .*-d 127.0.0.0/8", saved), saved


@pytest.mark.privileged
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_localhost_node_ports_loopback_is_not_a_node_port(
    backend: Backend, netns_guard: None
) -> None:
    with Topology(pods=1, clients=0) as topo:
        topo.start_servers([8080])
        ns = topo.node_ns
        topo.load_rules(localhost_lab_rules(topo, localhost=False), backend, 4)
        exec_in(ns, ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        assert request(ns, "127.0.0.1", NODE_PORT, timeout=1.0).outcome != "ok"
        assert request(ns, topo.node.ip(4), NODE_PORT).ok


@pytest.mark.privileged
def test_command_probe_reads_and_sets_the_namespaces_own_sysctls(netns_guard: None) -> None:
    from kproxy.backends.iptables.proxier import ROUTE_LOCALNET, TCP_BE_LIBERAL, CommandProbe

    with Topology(pods=0, clients=0) as topo:
        ns = topo.node_ns
        exec_in(ns, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=1"], check=False)
        probe = CommandProbe("nft", netns=ns)
        liberal = probe.read_sysctl(TCP_BE_LIBERAL)
        if liberal is None:
            pytest.skip("nf_conntrack is not loaded on this kernel")
        assert liberal == "1"
        assert supports_random_fully(probe.iptables_version())
        probe.write_sysctl(ROUTE_LOCALNET, "1")
        assert exec_in(ns, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"
        probe.ensure_mangle_canary(4)
        probe.ensure_mangle_canary(4)  # idempotent
        assert ":KUBE-PROXY-CANARY" in exec_in(ns, ["iptables-nft-save", "-t", "mangle"]).stdout
        # the proxier over this namespace writes no INVALID drop: the host is liberal
        restorer = CommandRestorer("nft", netns=ns)
        proxier = IptablesProxier(restorer, probe=probe)
        asyncio.run(proxier.sync(4, {}, None, replace(FAKE, nfacct=False)))
        forward = exec_in(ns, ["iptables-nft-save", "-t", "filter"]).stdout
        assert "-A KUBE-FORWARD" in forward and "INVALID" not in forward


class ConfigRecorder:
    """A backend that keeps the RenderConfig of each sync."""

    mode = "iptables"

    def __init__(self) -> None:
        self.cfgs: list[RenderConfig] = []

    async def sync(self, family: Family, ports: object, changed: object, cfg: RenderConfig) -> object:
        from kproxy.agent import SyncReport

        self.cfgs.append(cfg)
        return SyncReport(full=changed is None)

    async def close(self) -> None:
        pass


def test_agent_switches_large_cluster_mode_when_the_endpoint_total_crosses_1000() -> None:
    from kproxy.agent import NodeAgent
    from kproxy.settings import Settings
    from tests.support.objects import eps, svc

    settings = Settings(node_name="node-a", families=(4,), healthz_bind_address="", metrics_bind_address="")
    backend = ConfigRecorder()
    a = NodeAgent(settings, backend)  # type: ignore[arg-type]
    ips = tuple(f"10.244.{i // 250}.{i % 250 + 1}" for i in range(LARGE_CLUSTER_ENDPOINTS))
    a.tracker.replace("Service", [svc("web")])
    a.tracker.replace("EndpointSlice", [eps("web", ips)])
    a.tracker.replace("Node", [])
    asyncio.run(a._sync())
    a.tracker.upsert(eps("web", (*ips, "10.244.9.1")))
    asyncio.run(a._sync())
    a.tracker.upsert(eps("web", ips[:3]))
    asyncio.run(a._sync())
    assert [c.comments for c in backend.cfgs] == [True, False, True]
    # a change of mode is a new config (the engine then syncs in full); no change, the same object
    assert backend.cfgs[0] != backend.cfgs[1]
    a.tracker.upsert(eps("web", ips[:4]))
    asyncio.run(a._sync())
    assert backend.cfgs[3] is backend.cfgs[2]


# ------------------------------------------------------------------ takeover in large-cluster mode


def kube_proxy_large_cluster_nat(
    services: int, per_service: int
) -> tuple[str, dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]]:
    """nat chains as kube-proxy writes them above 1,000 endpoints, written out here from its
    source's rule shapes (not by kproxy's renderer), and the view they serve."""

    def h(text: str) -> str:
        return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()

    chains = [":KUBE-MARK-MASQ - [0:0]"]
    rules: list[str] = []
    v: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
    for s in range(1, services + 1):
        sp = port(f"ns{s}", f"svc{s}", "p80", f"172.30.0.{40 + s}", 80)
        name = f"{sp.name}tcp"
        svc = "KUBE-SVC-" + h(name)
        eps = tuple(
            sorted(
                (Endpoint(f"10.{s}.{i // 250}.{i % 250 + 1}", 80) for i in range(per_service)),
                key=lambda e: e.hostport,
            )
        )
        seps = ["KUBE-SEP-" + h(name + e.hostport) for e in eps]
        chains += [f":{svc} - [0:0]", *(f":{sep} - [0:0]" for sep in seps)]
        rules.append(
            f'-A {svc} -m comment --comment "{sp.name} cluster IP" -m tcp -p tcp -d {sp.cluster_ip} --dport 80 '
            "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"
        )
        n = len(eps)
        for i, sep in enumerate(seps[:-1]):
            rules.append(f"-A {svc} -m statistic --mode random --probability {1.0 / (n - i):0.10f} -j {sep}")
        rules.append(f"-A {svc} -j {seps[-1]}")
        for e, sep in zip(eps, seps, strict=True):
            rules += [
                f"-A {sep} -s {e.ip} -j KUBE-MARK-MASQ",
                f"-A {sep} -m tcp -p tcp -j DNAT --to-destination {e.hostport}",
            ]
        v[sp.name] = (sp, eps)
    return "*nat\n" + "\n".join(chains + rules) + "\nCOMMIT\n", v


class Recording:
    """A restorer that keeps every payload it passes on."""

    def __init__(self, inner: CommandRestorer) -> None:
        self.inner = inner
        self.payloads: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        self.payloads.append(payload)
        self.inner.apply(family, payload, noflush)


PER_SERVICE_DECL = re.compile(r"^:KUBE-(SVC|SVL|EXT|FW|SEP)-", re.M)


@pytest.mark.privileged
@pytest.mark.parametrize("backend", BACKENDS)
def test_takeover_above_1000_endpoints_rewrites_no_per_service_chain(
    backend: Backend, netns_guard: None
) -> None:
    from kproxy.backends.iptables.sync import SyncEngine

    nat, v = kube_proxy_large_cluster_nat(services=2, per_service=600)
    with Topology(pods=0, clients=0) as topo:
        ns = topo.node_ns
        exec_in(ns, [f"iptables-{backend}-restore", "--noflush"], input=nat)
        before = exec_in(ns, ["nft", "-a", "list", "table", "ip", "nat"]).stdout if backend == "nft" else ""
        cfg = render_config(4, NODE, cluster_cidr=("10.0.0.0/8",))
        restorer = Recording(CommandRestorer(backend, netns=ns))
        engine = SyncEngine(sized(cfg, sum(len(eps) for _, eps in v.values())), restorer)  # type: ignore[arg-type]
        result = engine.sync(v, None)
        assert result.full and restorer.payloads
        assert not any(PER_SERVICE_DECL.search(p) for p in restorer.payloads), (
            "a per-service chain was rewritten"
        )
        if backend == "nft":  # same rules, same kernel handles: nothing was replaced
            after = exec_in(ns, ["nft", "-a", "list", "table", "ip", "nat"]).stdout
            handles = re.compile(r"chain (KUBE-(?:SVC|SEP)-\S+) \{(.*?)\}", re.S)
            assert dict(handles.findall(after)) == dict(handles.findall(before))
        # the same node taken over by a renderer that kept comments would rewrite every chain
        restorer.payloads.clear()
        SyncEngine(cfg, restorer).sync(v, None)  # type: ignore[arg-type]
        assert len(PER_SERVICE_DECL.findall("".join(restorer.payloads))) == 2 + 1200


def test_loopback_in_nodeport_addresses_with_localhost_node_ports() -> None:
    cfg = render_config(
        4,
        NODE,
        nodeport_addresses=("127.0.0.0/8", "192.168.0.0/24"),
        node_ips=NODE_IPS,
        localhost_nodeports=True,
    )
    tail = chain(render({}, cfg), "nat", "KUBE-SERVICES")
    want = [
        f'-A KUBE-SERVICES -m comment --comment "{TAIL}" -d {ip} -j KUBE-NODEPORTS'
        for ip in ("127.0.0.1", "192.168.0.2")
    ]
    assert same(tail, want)
    assert chain(render({}, cfg), "filter", "KUBE-FIREWALL")  # the anti-martian rule comes with it


@pytest.mark.parametrize(
    ("flag", "localhost"), [([], True), (["--iptables-localhost-nodeports=false"], False)]
)
def test_dry_run_renders_localhost_node_ports_as_kube_proxys_default(
    flag: list[str], localhost: bool
) -> None:
    import io

    from kproxy.cli import build_parser, cmd_dry_run

    path = str(DATA / "overall-iptables-rules.yaml")
    args = build_parser().parse_args(
        ["dry-run", "-f", path, "--node-name", NODE, "--cluster-cidr", "10.0.0.0/8", *flag]
    )
    out, err = io.StringIO(), io.StringIO()
    assert cmd_dry_run(args, out, err) == 0
    got = parse_restore(out.getvalue())
    assert (("filter", "KUBE-FIREWALL") in got) is localhost
    assert any("! -d 127.0.0.0/8" in r for r in got[("nat", "KUBE-SERVICES")]) is not localhost
