"""Random and hostile Services, EndpointSlices and Nodes (hypothesis strategies), parsed and
rendered the way the fuzz tests of every mode need them."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from kproxy.config import RenderConfig
from kproxy.errors import ObjectError
from kproxy.state.build import Snapshot
from kproxy.state.model import Family
from kproxy.state.parse import parse_object

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
