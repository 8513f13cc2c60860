"""The userspace policy lab's services, endpoints and manifest: one node, pods in and out of
its zone, services for every traffic policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.netns import FAMILIES, Family, Proto, Topology

NAMESPACE = "kpu"
TARGET_PORT = 8080
OTHER_NODE = "kpu-other-node"
ZONE = "zone-a"


@dataclass(frozen=True, slots=True)
class Ep:
    pod: str
    cond: str = "ready"
    remote: bool = False
    zone_hint: str = ""


@dataclass(frozen=True, slots=True)
class Svc:
    name: str
    vip: int
    eps: tuple[Ep, ...]
    proto: Proto = "tcp"
    port: int = 80
    node_port: int = 0
    external_local: bool = False
    internal_local: bool = False
    load_balancer: bool = False
    health_check: int = 0


SERVICES = {
    s.name: s
    for s in (
        Svc(
            "local",
            15,
            (Ep("pod-1"), Ep("pod-3", remote=True)),
            node_port=30015,
            external_local=True,
            load_balancer=True,
            health_check=32015,
        ),
        Svc(
            "local-none",
            22,
            (Ep("pod-3", remote=True),),
            node_port=30022,
            external_local=True,
            load_balancer=True,
            health_check=32022,
        ),
        Svc("local-none-udp", 23, (Ep("pod-3", remote=True),), "udp", 53, 30023, external_local=True),
        Svc("internal-local", 24, (Ep("pod-1"), Ep("pod-2", remote=True)), internal_local=True),
        Svc("internal-none", 25, (Ep("pod-2", remote=True),), internal_local=True),
        Svc(
            "hints",
            26,
            (Ep("pod-1", zone_hint=ZONE), Ep("pod-2", zone_hint="zone-b"), Ep("pod-3", zone_hint="zone-b")),
        ),
        Svc("term-mixed", 17, (Ep("pod-1"), Ep("pod-2", "terminating"))),
        Svc("term-only", 18, (Ep("pod-1", "terminating"), Ep("pod-2", "terminating"))),
        Svc("empty-tcp", 13, (), node_port=30013),
        Svc("empty-udp", 14, (), "udp", 53, 30014),
        Svc("lb", 21, (Ep("pod-1"), Ep("pod-2")), node_port=30021, load_balancer=True),
        Svc("lb-udp", 27, (Ep("pod-1"), Ep("pod-2")), "udp", 53, 30027, load_balancer=True),
    )
}


def vip(svc: Svc, family: Family) -> str:
    return f"10.96.0.{svc.vip}" if family == 4 else f"fd00:10:96::{svc.vip}"


def lb_ip(svc: Svc, family: Family) -> str:
    return f"192.168.89.{svc.vip}" if family == 4 else f"fd00:89::{svc.vip}"


def manifest(topo: Topology) -> list[dict[str, Any]]:
    node = topo.node
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": topo.node_name,
                "labels": {"kubernetes.io/hostname": topo.node_name, "topology.kubernetes.io/zone": ZONE},
            },
            "spec": {"podCIDR": node.pod_cidr(4), "podCIDRs": [node.pod_cidr(4), node.pod_cidr(6)]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.ipv4},
                    {"type": "InternalIP", "address": node.ipv6},
                ]
            },
        }
    ]
    for svc in SERVICES.values():
        port: dict[str, Any] = {"name": svc.proto, "protocol": svc.proto.upper(), "port": svc.port}
        port["targetPort"] = TARGET_PORT
        spec: dict[str, Any] = {
            "type": "LoadBalancer" if svc.load_balancer else "NodePort" if svc.node_port else "ClusterIP",
            "clusterIP": vip(svc, 4),
            "clusterIPs": [vip(svc, f) for f in FAMILIES],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [port],
        }
        if svc.node_port:
            port["nodePort"] = svc.node_port
            spec["externalTrafficPolicy"] = "Local" if svc.external_local else "Cluster"
        if svc.internal_local:
            spec["internalTrafficPolicy"] = "Local"
        if svc.health_check:
            spec["healthCheckNodePort"] = svc.health_check
        status: dict[str, Any] = {}
        if svc.load_balancer:
            client = topo.client_hosts[0]
            spec["loadBalancerSourceRanges"] = [f"{client.ipv4}/32", f"{client.ipv6}/128"]
            status = {"loadBalancer": {"ingress": [{"ip": lb_ip(svc, f)} for f in FAMILIES]}}
        meta = {"name": svc.name, "namespace": NAMESPACE}
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec, "status": status})
        for family in FAMILIES:
            eps = []
            for ep in svc.eps:
                e: dict[str, Any] = {
                    "addresses": [topo.pod(ep.pod).ip(family)],
                    "conditions": {
                        "ready": ep.cond == "ready",
                        "serving": True,
                        "terminating": ep.cond == "terminating",
                    },
                    "nodeName": OTHER_NODE if ep.remote else topo.node_name,
                }
                if ep.zone_hint:
                    e["hints"] = {"forZones": [{"name": ep.zone_hint}]}
                eps.append(e)
            objs.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{svc.name}-ipv{family}",
                        "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": svc.name},
                    },
                    "addressType": f"IPv{family}",
                    "ports": [{"name": svc.proto, "protocol": svc.proto.upper(), "port": TARGET_PORT}],
                    "endpoints": eps,
                }
            )
    return objs
