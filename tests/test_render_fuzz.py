"""Random (and hostile) Services and EndpointSlices, through the parser, into the kernel.

Whatever an API object says, the rendered payload must be accepted by iptables-restore,
and each chain must hold exactly the rules its inputs imply: a name, annotation or
address crafted to smuggle in `-j ACCEPT` or a newline must be refused by the parser
or neutralised by the renderer, never turned into a rule.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.backends.iptables.render import builtin_jumps, render_port, render_view
from kproxy.config import RenderConfig
from kproxy.errors import ObjectError
from kproxy.netfilter.ruleset import restore_payload
from kproxy.state.build import Snapshot, view
from kproxy.state.model import Endpoint, Family, ServicePort
from kproxy.state.parse import parse_object
from kproxy.state.topology import categorize, external_local, uses_cluster, uses_local
from tests.netns import create_netns, delete_netns, restore_command, run

HOSTILE = [
    'x" -j ACCEPT',
    "a\nb",
    "-j ACCEPT",
    "a b",
    "ü",
    'q"',
    "$(reboot)",
    "\\",
    "tcp",
    "10.0.0.1 -j ACCEPT",
]


def pick(draw: st.DrawFn, *valid: str) -> str:
    """A valid value most of the time, a hostile one about one time in fifteen."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.sampled_from(HOSTILE))
    return draw(st.sampled_from(valid))


def ip(family: Family, net: str, n: int) -> str:
    return f"{net}{n // 256}.{n % 256}" if family == 4 else f"{net}{n:x}"


@st.composite
def service_objects(draw: st.DrawFn, index: int) -> list[dict[str, Any]]:
    family: Family = draw(st.sampled_from([4, 4, 6]))
    vip_net, ep_net, ext_net = (
        ("10.96.", "10.244.", "192.0.") if family == 4 else ("fd00:96::", "fd00:244::", "2001:db8::")
    )
    name = pick(draw, "web", "api", "x-1", "a", "db") + str(index)
    ns = pick(draw, "demo", "kube-system")
    svc_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    n_ports = draw(st.integers(1, 3))
    ports = []
    for i in range(n_ports):
        p: dict[str, Any] = {
            "name": pick(draw, "", "http", "p80", "dns") + (str(i) if n_ports > 1 else ""),
            "protocol": pick(draw, "TCP", "UDP", "SCTP"),
            "port": 80 + i,
        }
        if svc_type != "ClusterIP":
            p["nodePort"] = 30000 + index * 8 + i
        ports.append(p)
    vip = pick(draw, ip(family, vip_net, index + 1))
    spec: dict[str, Any] = {"type": svc_type, "clusterIP": vip, "ports": ports}
    if draw(st.booleans()):
        spec["externalIPs"] = [ip(family, ext_net, 100 + index)]
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": draw(st.integers(1, 86400))}}
    spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    spec["internalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local", "Cluster"]))
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": {"note": pick(draw, "ok")}},
        "spec": spec,
    }
    if svc_type == "LoadBalancer":
        spec["healthCheckNodePort"] = 32000 + index
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = ["203.0.113.0/24" if family == 4 else "2001:db8:1::/48"]
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip(family, ext_net, 200 + index)}]}}
    endpoints = []
    for j in range(draw(st.integers(0, 5))):
        e: dict[str, Any] = {
            "addresses": [pick(draw, ip(family, ep_net, index * 16 + j + 1))],
            "conditions": {
                "ready": draw(st.integers(0, 3)) > 0,
                "serving": draw(st.integers(0, 3)) > 0,
                "terminating": draw(st.integers(0, 3)) == 0,
            },
            "nodeName": pick(draw, "node-a", "node-b", ""),
        }
        if draw(st.booleans()):
            e["hints"] = {"forZones": [{"name": pick(draw, "zone-a", "zone-b")}]}
        endpoints.append(e)
    eps_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-s", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4" if family == 4 else "IPv6",
        "ports": [
            {"name": p["name"], "protocol": p["protocol"], "port": 8080 + i} for i, p in enumerate(ports)
        ],
        "endpoints": endpoints,
    }
    return [svc, eps_slice]


@st.composite
def clusters(draw: st.DrawFn) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"podCIDRs": ["10.244.0.0/24", "fd00:244::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "203.0.113.5"}]},
        }
    ]
    for i in range(draw(st.integers(1, 6))):
        objs.extend(draw(service_objects(i)))
    return objs


def expected_own(sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig) -> Counter[str]:
    """Rules per own chain kind the inputs imply, counted without looking at the rules."""
    sel = categorize(sp, eps, cfg.node_zone)
    want: Counter[str] = Counter()
    if not sel.has_any:
        return want
    aff = 2 if sp.affinity_timeout else 1
    ext_local = external_local(sp)
    has_internal = not sp.internal_local or bool(sel.local)
    has_external = not ext_local or bool(sel.local)
    masq = int(has_internal and (cfg.masquerade_all or bool(cfg.local_cidrs)))
    if sel.cluster and uses_cluster(sp):
        want["KUBE-SVC"] = len(sel.cluster) * aff + (0 if sp.internal_local else masq)
    if sel.local and uses_local(sp):
        want["KUBE-SVL"] = len(sel.local) * aff + (masq if sp.internal_local else 0)
    if sp.has_external:
        want["KUBE-EXT"] = (2 + bool(cfg.local_cidrs) if ext_local else 1) + has_external
    if sp.load_balancer_ips and sp.load_balancer_source_ranges:
        want["KUBE-FW"] = (
            len(sp.load_balancer_source_ranges) + 1
        )  # node 203.0.113.5 is not in 2001:db8:1::/48
        if cfg.family == 4:
            want["KUBE-FW"] += len(sp.load_balancer_ips)  # ... but is in 203.0.113.0/24
    want["KUBE-SEP"] = 2 * len(sel.reachable)
    return +want


def parse_all(raw: list[dict[str, Any]]) -> list[Any]:
    out = []
    for o in raw:
        try:
            got = parse_object(o)
        except ObjectError:
            continue
        if got is not None:
            out.append(got)
    return out


def configs(snapshot: Snapshot) -> list[RenderConfig]:
    node = snapshot.node
    assert node is not None
    return [
        RenderConfig(4, "node-a", node.zone, ("10.244.0.0/16",), node_ip="203.0.113.5"),
        RenderConfig(
            6, "node-a", node.zone, (), node_pod_cidrs=("fd00:244::/64",), detect_local_mode="NodeCIDR"
        ),
    ]


@given(clusters())
@settings(max_examples=150, deadline=None)
def test_rule_counts_match_inputs(raw: list[dict[str, Any]]) -> None:
    snapshot = Snapshot.from_objects(parse_all(raw), "node-a")
    for cfg in configs(snapshot):
        v = view(snapshot, "node-a", cfg.family)
        for sp, eps in v.values():
            got: Counter[str] = Counter()
            for chain in render_port(sp, eps, cfg).own:
                got[chain.name.rsplit("-", 1)[0]] += len(chain.rules)
            assert got == expected_own(sp, eps, cfg), sp
        chains = render_view(v, cfg)
        payload = restore_payload(chains, builtin_jumps=builtin_jumps(cfg))
        declared = {line[1:].split()[0] for line in payload.splitlines() if line.startswith(":")}
        appended = [line for line in payload.splitlines() if line.startswith("-A ")]
        assert len(appended) == sum(map(len, chains.values())) + sum(map(len, builtin_jumps(cfg).values()))
        for line in payload.splitlines():
            assert line[:1] in ("*", ":", "-") or line == "COMMIT", line
            if line.startswith("-A "):
                assert line.split()[1] in declared
                assert line.count('"') % 2 == 0, line


@pytest.fixture(scope="module")
def shared_netns() -> Iterator[str]:
    name = f"krenderfz{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


def saved_rule_counts(text: str) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            counts[table, line.split()[1]] += 1
    return counts


@pytest.mark.privileged
@given(raw=clusters())
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_accepts_random_rulesets(shared_netns: str, raw: list[dict[str, Any]]) -> None:
    snapshot = Snapshot.from_objects(parse_all(raw), "node-a")
    for cfg in configs(snapshot):
        chains = render_view(view(snapshot, "node-a", cfg.family), cfg)
        jumps = builtin_jumps(cfg)
        payload = restore_payload(chains, builtin_jumps=jumps)
        ns_exec = ["ip", "netns", "exec", shared_netns]
        run([*ns_exec, restore_command("nft", cfg.family), "--test"], input=payload)
        # A real restore, read back: the kernel holds exactly our rules, chain by chain.
        run([*ns_exec, restore_command("legacy", cfg.family)], input=payload)
        saved = run([*ns_exec, restore_command("legacy", cfg.family).replace("-restore", "-save")]).stdout
        want = Counter({key: len(rules) for key, rules in (chains | jumps).items() if rules})
        assert saved_rule_counts(saved) == want
