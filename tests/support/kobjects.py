"""Builders for Kubernetes objects in their API (JSON) form, for parser and build tests.

Each builder returns a fresh, valid dict; `at(obj, "spec.ports[1].port", value)` then
breaks or changes one field by the same JSON path the parser reports in its errors.
"""

from __future__ import annotations

import copy
import re
from typing import Any

Obj = dict[str, Any]
_DELETE = object()
DELETE: Any = _DELETE
"""Pass as the value to `at` to remove the field instead of setting it."""

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]|\[([^\]]+)\]")


def _steps(path: str) -> list[str | int]:
    out: list[str | int] = []
    for name, index, key in _STEP.findall(path):
        out.append(name if name else int(index) if index else key)
    return out


def at(obj: Obj, path: str, value: Any) -> Obj:
    """A deep copy of obj with the field at path set (creating objects on the way) or deleted."""
    new = copy.deepcopy(obj)
    steps = _steps(path)
    cur: Any = new
    for step in steps[:-1]:
        if isinstance(step, str) and step not in cur:
            cur[step] = {}
        cur = cur[step]
    last = steps[-1]
    if value is _DELETE:
        if isinstance(cur, dict):
            cur.pop(last, None)
        else:
            del cur[last]
    else:
        cur[last] = value
    return new


def service(name: str = "web", namespace: str = "demo", **spec: Any) -> Obj:
    body: Obj = {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443},
        ],
    }
    body.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "101"},
        "spec": body,
    }


def endpoint(ip: str, node: str | None = "node-a", zone: str | None = "zone-a", **conditions: Any) -> Obj:
    ep: Obj = {"addresses": [ip], "conditions": conditions or {"ready": True}}
    if node is not None:
        ep["nodeName"] = node
    if zone is not None:
        ep["zone"] = zone
    return ep


def endpoint_slice(
    name: str = "web-abcde",
    namespace: str = "demo",
    service_name: str = "web",
    address_type: str = "IPv4",
    endpoints: list[Obj] | None = None,
    ports: list[Obj] | None = None,
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
            "resourceVersion": "202",
        },
        "addressType": address_type,
        "ports": ports
        if ports is not None
        else [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "https", "port": 8443, "protocol": "TCP"},
        ],
        "endpoints": endpoints
        if endpoints is not None
        else [endpoint("10.244.0.5"), endpoint("10.244.1.6", node="node-b", zone="zone-b")],
    }


def legacy_endpoints(name: str = "web", namespace: str = "demo", subsets: list[Obj] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": subsets
        if subsets is not None
        else [
            {
                "addresses": [
                    {"ip": "10.244.0.5", "nodeName": "node-a"},
                    {"ip": "10.244.1.6", "nodeName": "node-b"},
                ],
                "notReadyAddresses": [{"ip": "10.244.1.7", "nodeName": "node-b"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        ],
    }


def node(name: str = "node-a", zone: str = "zone-a") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name},
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.168.50.10"},
                {"type": "ExternalIP", "address": "fd00:50::10"},
                {"type": "Hostname", "address": name},
            ]
        },
    }
