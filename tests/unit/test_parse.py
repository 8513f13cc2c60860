"""Parsing Kubernetes objects: what kproxy keeps, what it ignores, and how it refuses bad input.

Every refusal must name the source, the object and the JSON path of the field, so a user
can find the line to fix; nothing but ObjectError may escape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kproxy.errors import ObjectError
from kproxy.sources.files import load_paths
from kproxy.state.model import EndpointSlice, Node, ObjectRef, Service, SliceEndpoint, SlicePort
from kproxy.state.parse import parse_many, parse_object, parse_object_all, parse_stream
from tests.support.kobjects import DELETE, at, endpoint, endpoint_slice, legacy_endpoints, node, service

SRC = "cluster.yaml:7"


def parse_ok(obj: dict[str, Any]) -> Any:
    return parse_object(obj, SRC)


# ------------------------------------------------------------------ Services


def test_plain_service_keeps_every_field_a_rule_needs() -> None:
    svc = parse_ok(service())
    assert isinstance(svc, Service)
    assert (svc.namespace, svc.name, svc.type, svc.cluster_ips) == (
        "demo",
        "web",
        "ClusterIP",
        ("10.96.0.10",),
    )
    assert [(p.name, p.protocol, p.port, p.target_port) for p in svc.ports] == [
        ("http", "TCP", 80, 8080),
        ("https", "TCP", 443, 8443),
    ]
    assert svc.resource_version == "101"
    assert svc.affinity_timeout == 0


SERVICE_CASES: list[tuple[str, dict[str, Any], str, Any]] = [
    # (id, object, attribute, expected)
    ("type-defaults-to-clusterip", at(service(), "spec.type", DELETE), "type", "ClusterIP"),
    ("namespace-defaults", at(service(), "metadata.namespace", DELETE), "namespace", "default"),
    ("protocol-defaults-to-tcp", at(service(), "spec.ports[0].protocol", DELETE), "ports[0].protocol", "TCP"),
    (
        "target-port-defaults-to-port",
        at(service(), "spec.ports[0].targetPort", DELETE),
        "ports[0].target_port",
        80,
    ),
    ("named-target-port", at(service(), "spec.ports[0].targetPort", "web"), "ports[0].target_port", "web"),
    ("udp", at(service(), "spec.ports[0].protocol", "UDP"), "ports[0].protocol", "UDP"),
    ("sctp", at(service(), "spec.ports[0].protocol", "SCTP"), "ports[0].protocol", "SCTP"),
    ("unnamed-single-port", at(service(), "spec.ports", [{"port": 80}]), "ports[0].name", ""),
    (
        "nodeport-kept-for-nodeport",
        at(at(service(), "spec.type", "NodePort"), "spec.ports[0].nodePort", 30080),
        "ports[0].node_port",
        30080,
    ),
    (
        "nodeport-dropped-for-clusterip",
        at(service(), "spec.ports[0].nodePort", 30080),
        "ports[0].node_port",
        0,
    ),
    (
        "affinity-default-timeout",
        at(service(), "spec.sessionAffinity", "ClientIP"),
        "affinity_timeout",
        10800,
    ),
    (
        "affinity-timeout",
        at(
            at(service(), "spec.sessionAffinity", "ClientIP"),
            "spec.sessionAffinityConfig",
            {"clientIP": {"timeoutSeconds": 600}},
        ),
        "affinity_timeout",
        600,
    ),
    ("affinity-none", at(service(), "spec.sessionAffinity", "None"), "affinity_timeout", 0),
    (
        "dual-stack",
        at(
            at(service(), "spec.clusterIPs", ["10.96.0.10", "fd00:10:96::a"]),
            "spec.ipFamilies",
            ["IPv4", "IPv6"],
        ),
        "cluster_ips",
        ("10.96.0.10", "fd00:10:96::a"),
    ),
    (
        "ipv6-primary",
        at(
            at(service(), "spec.clusterIP", "fd00:10:96::a"),
            "spec.clusterIPs",
            ["FD00:10:96:0::A", "10.96.0.10"],
        ),
        "cluster_ips",
        ("fd00:10:96::a", "10.96.0.10"),
    ),
    ("cluster-ip-only", at(service(), "spec.clusterIPs", DELETE), "cluster_ips", ("10.96.0.10",)),
    (
        "v4-mapped-v6-becomes-v4",
        at(service(), "spec.clusterIP", "::ffff:10.96.0.10"),
        "cluster_ips",
        ("10.96.0.10",),
    ),
    (
        "leading-zeros-read-as-decimal",
        at(service(), "spec.clusterIP", "010.096.000.010"),
        "cluster_ips",
        ("10.96.0.10",),
    ),
    (
        "external-ips",
        at(service(), "spec.externalIPs", ["192.168.50.100", "fd00::1"]),
        "external_ips",
        ("192.168.50.100", "fd00::1"),
    ),
    (
        "lb-ingress-ips",
        at(
            at(service(), "spec.type", "LoadBalancer"),
            "status",
            {
                "loadBalancer": {
                    "ingress": [
                        {"ip": "192.0.2.10"},
                        {"hostname": "lb.example.com"},
                        {"ip": "192.0.2.11", "ipMode": "Proxy"},
                    ]
                }
            },
        ),
        "load_balancer_ips",
        ("192.0.2.10",),
    ),
    (
        "lb-ips-ignored-unless-loadbalancer",
        at(service(), "status", {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}),
        "load_balancer_ips",
        (),
    ),
    (
        "source-ranges-trimmed-and-masked",
        at(
            at(service(), "spec.type", "LoadBalancer"),
            "spec.loadBalancerSourceRanges",
            [" 203.0.113.7/24 ", "2001:db8::1/64"],
        ),
        "load_balancer_source_ranges",
        ("203.0.113.0/24", "2001:db8::/64"),
    ),
    (
        "etp-local-on-nodeport",
        at(at(service(), "spec.type", "NodePort"), "spec.externalTrafficPolicy", "Local"),
        "external_local",
        True,
    ),
    (
        "etp-local-meaningless-on-plain-clusterip",
        at(service(), "spec.externalTrafficPolicy", "Local"),
        "external_local",
        False,
    ),
    (
        "etp-local-with-external-ips",
        at(at(service(), "spec.externalTrafficPolicy", "Local"), "spec.externalIPs", ["192.168.50.100"]),
        "external_local",
        True,
    ),
    ("itp-local", at(service(), "spec.internalTrafficPolicy", "Local"), "internal_local", True),
    (
        "health-check-port-for-lb-local",
        at(
            at(at(service(), "spec.type", "LoadBalancer"), "spec.externalTrafficPolicy", "Local"),
            "spec.healthCheckNodePort",
            32000,
        ),
        "health_check_node_port",
        32000,
    ),
    (
        "health-check-port-dropped-without-local",
        at(at(service(), "spec.type", "LoadBalancer"), "spec.healthCheckNodePort", 32000),
        "health_check_node_port",
        0,
    ),
    (
        "lb-algorithm-annotation",
        at(service(), "metadata.annotations", {"kproxy.io/lb-algorithm": " least-connections "}),
        "lb_algorithm",
        "least-connections",
    ),
]


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if part.endswith("]"):
            name, idx = part[:-1].split("[")
            obj = getattr(obj, name)[int(idx)]
        else:
            obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    ("obj", "attr", "want"), [c[1:] for c in SERVICE_CASES], ids=[c[0] for c in SERVICE_CASES]
)
def test_service_field(obj: dict[str, Any], attr: str, want: Any) -> None:
    assert _attr(parse_ok(obj), attr) == want


IGNORED: list[tuple[str, dict[str, Any]]] = [
    ("externalname", at(at(service(), "spec.type", "ExternalName"), "spec.externalName", "db.example.com")),
    ("headless-none", at(service(), "spec.clusterIP", "None")),
    ("headless-clusterips-none", at(at(service(), "spec.clusterIP", "None"), "spec.clusterIPs", ["None"])),
    ("no-cluster-ip", at(service(), "spec.clusterIP", "")),
    ("no-cluster-ip-at-all", at(service(), "spec.clusterIP", DELETE)),
    (
        "service-proxy-name",
        at(service(), "metadata.labels", {"service.kubernetes.io/service-proxy-name": "other"}),
    ),
    ("headless-label", at(service(), "metadata.labels", {"service.kubernetes.io/headless": ""})),
    ("fqdn-slice", endpoint_slice(address_type="FQDN", endpoints=[{"addresses": ["db.example.com"]}])),
    (
        "slice-of-other-proxy",
        at(endpoint_slice(), "metadata.labels[service.kubernetes.io/service-proxy-name]", "x"),
    ),
    ("headless-slice", at(endpoint_slice(), "metadata.labels[service.kubernetes.io/headless]", "")),
    ("deployment", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}),
    ("no-kind", {"metadata": {"name": "web"}}),
    (
        "legacy-of-other-proxy",
        at(legacy_endpoints(), "metadata.labels", {"service.kubernetes.io/service-proxy-name": "x"}),
    ),
    ("legacy-without-subsets", at(legacy_endpoints(), "subsets", [])),
]


@pytest.mark.parametrize("obj", [c[1] for c in IGNORED], ids=[c[0] for c in IGNORED])
def test_ignored_objects_parse_to_nothing(obj: dict[str, Any]) -> None:
    assert parse_object(obj, SRC) is None
    assert parse_object_all(obj, SRC) == ()


# ------------------------------------------------------------------ EndpointSlices


def test_slice_keeps_ports_endpoints_and_conditions() -> None:
    obj = endpoint_slice(
        endpoints=[
            endpoint("10.244.0.5"),
            endpoint("10.244.1.6", node="node-b", zone="zone-b", ready=False, serving=True, terminating=True),
            {"addresses": ["10.244.2.7", "10.244.2.8"]},
        ]
    )
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"
    }
    s = parse_ok(obj)
    assert isinstance(s, EndpointSlice)
    assert (s.namespace, s.name, s.service_name, s.address_type, s.legacy) == (
        "demo",
        "web-abcde",
        "web",
        "IPv4",
        False,
    )
    assert s.ports == (SlicePort("http", "TCP", 8080), SlicePort("https", "TCP", 8443))
    assert s.endpoints == (
        SliceEndpoint("10.244.0.5", True, True, False, "node-a", "zone-a"),
        SliceEndpoint("10.244.1.6", False, True, True, "node-b", "zone-b"),
        SliceEndpoint(
            "10.244.2.7"
        ),  # conditions absent: ready and serving, not terminating; first address only
    )
    assert s.trigger_time == 1714557600.0
    assert s.resource_version == "202"


SLICE_CASES: list[tuple[str, dict[str, Any], str, Any]] = [
    (
        "port-without-number-skipped",
        at(endpoint_slice(), "ports[0].port", None),
        "ports",
        (SlicePort("https", "TCP", 8443),),
    ),
    (
        "port-zero-skipped",
        at(endpoint_slice(), "ports[1].port", 0),
        "ports",
        (SlicePort("http", "TCP", 8080),),
    ),
    (
        "null-port-name-is-empty",
        at(endpoint_slice(), "ports", [{"name": None, "port": 80}]),
        "ports",
        (SlicePort("", "TCP", 80),),
    ),
    ("no-ports", at(endpoint_slice(), "ports", None), "ports", ()),
    (
        "endpoint-without-address-skipped",
        at(endpoint_slice(), "endpoints[0].addresses", []),
        "endpoints[0].address",
        "10.244.1.6",
    ),
    (
        "zone-hints",
        at(endpoint_slice(), "endpoints[0].hints", {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}]}),
        "endpoints[0].zone_hints",
        frozenset({"zone-a", "zone-b"}),
    ),
    (
        "ipv6-normalised",
        endpoint_slice(address_type="IPv6", endpoints=[endpoint("FD00:10:244:0:0:0:0:5")]),
        "endpoints[0].address",
        "fd00:10:244::5",
    ),
    (
        "bad-trigger-time-is-absent",
        at(
            endpoint_slice(),
            "metadata.annotations",
            {"endpoints.kubernetes.io/last-change-trigger-time": "soon"},
        ),
        "trigger_time",
        None,
    ),
    (
        "trigger-time-with-offset",
        at(
            endpoint_slice(),
            "metadata.annotations",
            {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T12:00:00.5+02:00"},
        ),
        "trigger_time",
        1714557600.5,
    ),
]


@pytest.mark.parametrize(
    ("obj", "attr", "want"), [c[1:] for c in SLICE_CASES], ids=[c[0] for c in SLICE_CASES]
)
def test_slice_field(obj: dict[str, Any], attr: str, want: Any) -> None:
    assert _attr(parse_ok(obj), attr) == want


# ------------------------------------------------------------------ legacy Endpoints


def test_legacy_endpoints_become_a_legacy_slice_without_not_ready_addresses() -> None:
    (s,) = parse_object_all(legacy_endpoints(), SRC)
    assert isinstance(s, EndpointSlice)
    assert (s.name, s.service_name, s.address_type, s.legacy) == ("web", "web", "IPv4", True)
    assert s.ports == (SlicePort("http", "TCP", 8080),)
    assert [e.address for e in s.endpoints] == ["10.244.0.5", "10.244.1.6"]
    assert s.endpoints[1].node_name == "node-b"
    assert parse_object(legacy_endpoints(), SRC) == s


def test_legacy_endpoints_split_per_subset_and_family() -> None:
    obj = legacy_endpoints(
        subsets=[
            {
                "addresses": [{"ip": "10.244.0.5"}, {"ip": "fd00:10:244::5"}],
                "ports": [{"name": "http", "port": 8080}],
            },
            {"addresses": [{"ip": "10.244.0.9"}], "ports": [{"name": "admin", "port": 9000}]},
        ]
    )
    got = parse_object_all(obj, SRC)
    assert [(s.name, s.address_type, [e.address for e in s.endpoints], s.ports[0].name) for s in got] == [  # type: ignore[union-attr]
        ("web-0", "IPv4", ["10.244.0.5"], "http"),
        ("web-1", "IPv6", ["fd00:10:244::5"], "http"),
        ("web-2", "IPv4", ["10.244.0.9"], "admin"),
    ]
    with pytest.raises(ObjectError, match="parse_object_all"):
        parse_object(obj, SRC)


# ------------------------------------------------------------------ Node


def test_node_keeps_zone_pod_cidrs_and_addresses() -> None:
    n = parse_ok(node())
    assert isinstance(n, Node)
    assert n.name == "node-a" and n.zone == "zone-a"
    assert n.pod_cidrs == ("10.244.0.0/24", "fd00:10:244::/64")
    assert n.addresses == ("192.168.50.10", "fd00:50::10")
    assert not n.deleting


@pytest.mark.parametrize(
    ("obj", "attr", "want"),
    [
        (at(node(), "spec.podCIDRs", DELETE), "pod_cidrs", ("10.244.0.0/24",)),
        (at(at(node(), "spec.podCIDRs", DELETE), "spec.podCIDR", DELETE), "pod_cidrs", ()),
        (at(node(), "metadata.deletionTimestamp", "2024-05-01T10:00:00Z"), "deleting", True),
        (at(node(), "metadata.labels", {}), "zone", ""),
    ],
    ids=["podcidr-fallback", "no-podcidr", "deleting", "no-zone"],
)
def test_node_field(obj: dict[str, Any], attr: str, want: Any) -> None:
    assert _attr(parse_ok(obj), attr) == want


# ------------------------------------------------------------------ refusals

INJECTION = "10.0.0.1 -j ACCEPT"
ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, object, field named, words in the reason)
    ("port-zero", at(service(), "spec.ports[1].port", 0), "spec.ports[1].port", "out of range"),
    ("port-too-big", at(service(), "spec.ports[1].port", 65536), "spec.ports[1].port", "out of range"),
    ("port-string", at(service(), "spec.ports[0].port", "80"), "spec.ports[0].port", "integer"),
    ("port-bool", at(service(), "spec.ports[0].port", True), "spec.ports[0].port", "integer"),
    ("port-float", at(service(), "spec.ports[0].port", 80.5), "spec.ports[0].port", "integer"),
    ("port-missing", at(service(), "spec.ports[0].port", DELETE), "spec.ports[0].port", "integer"),
    (
        "nodeport-too-big",
        at(at(service(), "spec.type", "NodePort"), "spec.ports[0].nodePort", 70000),
        "spec.ports[0].nodePort",
        "out of range",
    ),
    (
        "target-port-too-big",
        at(service(), "spec.ports[0].targetPort", 70000),
        "spec.ports[0].targetPort",
        "out of range",
    ),
    ("protocol", at(service(), "spec.ports[0].protocol", "HTTP"), "spec.ports[0].protocol", "TCP, UDP, SCTP"),
    (
        "protocol-lowercase",
        at(service(), "spec.ports[0].protocol", "tcp"),
        "spec.ports[0].protocol",
        "TCP, UDP, SCTP",
    ),
    ("port-name-upper", at(service(), "spec.ports[0].name", "HTTP"), "spec.ports[0].name", "DNS-1123 label"),
    ("port-name-quote", at(service(), "spec.ports[0].name", 'a"b'), "spec.ports[0].name", "DNS-1123 label"),
    ("port-name-space", at(service(), "spec.ports[0].name", "a b"), "spec.ports[0].name", "DNS-1123 label"),
    (
        "port-name-newline",
        at(service(), "spec.ports[0].name", "a\n-A KUBE"),
        "spec.ports[0].name",
        "DNS-1123 label",
    ),
    ("port-name-option", at(service(), "spec.ports[0].name", "-j"), "spec.ports[0].name", "DNS-1123 label"),
    (
        "port-name-too-long",
        at(service(), "spec.ports[0].name", "a" * 64),
        "spec.ports[0].name",
        "DNS-1123 label",
    ),
    ("duplicate-port", at(service(), "spec.ports[1].name", "http"), "spec.ports[1].name", "duplicate"),
    ("name-upper", at(service(), "metadata.name", "Web"), "metadata.name", "DNS-1123 label"),
    ("name-injection", at(service(), "metadata.name", "web -j ACCEPT"), "metadata.name", "DNS-1123 label"),
    ("name-missing", at(service(), "metadata.name", DELETE), "metadata.name", "required"),
    ("name-not-string", at(service(), "metadata.name", 42), "metadata.name", "string"),
    ("namespace-dotted", at(service(), "metadata.namespace", "a.b"), "metadata.namespace", "DNS-1123 label"),
    ("cluster-ip-bad", at(service(), "spec.clusterIP", "10.96.0.256"), "spec.clusterIP", "not a valid IP"),
    ("cluster-ip-cidr", at(service(), "spec.clusterIP", "10.96.0.1/32"), "spec.clusterIP", "not a valid IP"),
    ("cluster-ip-zone", at(service(), "spec.clusterIP", "fe80::1%eth0"), "spec.clusterIP", "not a valid IP"),
    (
        "cluster-ip-unspecified",
        at(service(), "spec.clusterIP", "0.0.0.0"),
        "spec.clusterIP",
        "not a valid IP",
    ),
    ("cluster-ip-injection", at(service(), "spec.clusterIP", INJECTION), "spec.clusterIP", "not a valid IP"),
    (
        "cluster-ips-bad",
        at(service(), "spec.clusterIPs", ["10.96.0.10", "x"]),
        "spec.clusterIPs[1]",
        "not a valid IP",
    ),
    (
        "cluster-ips-three",
        at(service(), "spec.clusterIPs", ["10.96.0.10", "fd00::1", "10.96.0.11"]),
        "spec.clusterIPs",
        "at most",
    ),
    (
        "cluster-ips-same-family",
        at(service(), "spec.clusterIPs", ["10.96.0.10", "10.96.0.11"]),
        "spec.clusterIPs[1]",
        "other address family",
    ),
    ("cluster-ips-disagree", at(service(), "spec.clusterIPs", ["10.96.0.11"]), "spec.clusterIP", "differs"),
    (
        "ip-families-disagree",
        at(at(service(), "spec.clusterIPs", ["10.96.0.10"]), "spec.ipFamilies", ["IPv6"]),
        "spec.ipFamilies[0]",
        "does not match",
    ),
    (
        "external-ip-bad",
        at(service(), "spec.externalIPs", ["192.168.50.100", INJECTION]),
        "spec.externalIPs[1]",
        "not a valid IP",
    ),
    (
        "external-ips-not-list",
        at(service(), "spec.externalIPs", "192.168.50.100"),
        "spec.externalIPs",
        "list",
    ),
    (
        "source-range-no-prefix",
        at(at(service(), "spec.type", "LoadBalancer"), "spec.loadBalancerSourceRanges", ["10.0.0.0"]),
        "spec.loadBalancerSourceRanges[0]",
        "CIDR",
    ),
    (
        "source-range-prefix-too-long",
        at(
            at(service(), "spec.type", "LoadBalancer"),
            "spec.loadBalancerSourceRanges",
            ["10.0.0.0/8", "10.0.0.0/33"],
        ),
        "spec.loadBalancerSourceRanges[1]",
        "CIDR",
    ),
    (
        "ingress-ip-bad",
        at(
            at(service(), "spec.type", "LoadBalancer"), "status.loadBalancer.ingress", [{"ip": "192.0.2.300"}]
        ),
        "status.loadBalancer.ingress[0].ip",
        "not a valid IP",
    ),
    (
        "ingress-ip-mode-bad",
        at(
            at(service(), "spec.type", "LoadBalancer"),
            "status.loadBalancer.ingress",
            [{"ip": "192.0.2.3", "ipMode": "Magic"}],
        ),
        "status.loadBalancer.ingress[0].ipMode",
        "VIP or Proxy",
    ),
    (
        "affinity-bad",
        at(service(), "spec.sessionAffinity", "Sticky"),
        "spec.sessionAffinity",
        "None or ClientIP",
    ),
    (
        "affinity-timeout-zero",
        at(
            at(service(), "spec.sessionAffinity", "ClientIP"),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            0,
        ),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "out of range",
    ),
    (
        "affinity-timeout-too-long",
        at(
            at(service(), "spec.sessionAffinity", "ClientIP"),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            86401,
        ),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "out of range",
    ),
    (
        "etp-bad",
        at(service(), "spec.externalTrafficPolicy", "Global"),
        "spec.externalTrafficPolicy",
        "Cluster or Local",
    ),
    (
        "itp-bad",
        at(service(), "spec.internalTrafficPolicy", "Node"),
        "spec.internalTrafficPolicy",
        "Cluster or Local",
    ),
    (
        "hc-port-bad",
        at(service(), "spec.healthCheckNodePort", -1),
        "spec.healthCheckNodePort",
        "out of range",
    ),
    ("type-bad", at(service(), "spec.type", "Ingress"), "spec.type", "not one of"),
    ("spec-is-list", at(service(), "spec", []), "spec", "object"),
    ("ports-is-dict", at(service(), "spec.ports", {"port": 80}), "spec.ports", "list"),
    ("port-is-string", at(service(), "spec.ports", ["80"]), "spec.ports[0]", "object"),
    ("api-version", at(service(), "apiVersion", "v2"), "apiVersion", "not supported"),
    ("metadata-missing", at(service(), "metadata", DELETE), "metadata", "required"),
    (
        "slice-address-type-missing",
        at(endpoint_slice(), "addressType", DELETE),
        "addressType",
        "IPv4, IPv6, FQDN",
    ),
    (
        "slice-address-type-bad",
        at(endpoint_slice(), "addressType", "IPv5"),
        "addressType",
        "IPv4, IPv6, FQDN",
    ),
    (
        "slice-service-label-missing",
        at(endpoint_slice(), "metadata.labels", {}),
        "metadata.labels[kubernetes.io/service-name]",
        "required",
    ),
    (
        "slice-service-label-bad",
        at(endpoint_slice(), "metadata.labels[kubernetes.io/service-name]", "Web"),
        "metadata.labels[kubernetes.io/service-name]",
        "DNS-1123 label",
    ),
    (
        "slice-address-bad",
        at(endpoint_slice(), "endpoints[1].addresses[0]", INJECTION),
        "endpoints[1].addresses[0]",
        "not a valid IP",
    ),
    (
        "slice-address-family",
        at(endpoint_slice(), "endpoints[0].addresses[0]", "fd00::5"),
        "endpoints[0].addresses[0]",
        "addressType",
    ),
    (
        "slice-addresses-not-list",
        at(endpoint_slice(), "endpoints[0].addresses", "10.244.0.5"),
        "endpoints[0].addresses",
        "list",
    ),
    (
        "slice-ready-string",
        at(endpoint_slice(), "endpoints[0].conditions.ready", "yes"),
        "endpoints[0].conditions.ready",
        "true or false",
    ),
    (
        "slice-terminating-int",
        at(endpoint_slice(), "endpoints[1].conditions.terminating", 1),
        "endpoints[1].conditions.terminating",
        "true or false",
    ),
    (
        "slice-node-name-bad",
        at(endpoint_slice(), "endpoints[0].nodeName", "Node A"),
        "endpoints[0].nodeName",
        "DNS-1123 subdomain",
    ),
    (
        "slice-zone-bad",
        at(endpoint_slice(), "endpoints[0].zone", "zone a"),
        "endpoints[0].zone",
        "label value",
    ),
    (
        "slice-hint-bad",
        at(endpoint_slice(), "endpoints[0].hints", {"forZones": [{"name": "a"}, {"name": "$(x)"}]}),
        "endpoints[0].hints.forZones[1].name",
        "label value",
    ),
    (
        "slice-hints-not-list",
        at(endpoint_slice(), "endpoints[0].hints", {"forZones": "zone-a"}),
        "endpoints[0].hints.forZones",
        "list",
    ),
    ("slice-port-too-big", at(endpoint_slice(), "ports[1].port", 65536), "ports[1].port", "out of range"),
    (
        "slice-port-protocol",
        at(endpoint_slice(), "ports[0].protocol", "ICMP"),
        "ports[0].protocol",
        "TCP, UDP, SCTP",
    ),
    ("slice-port-name", at(endpoint_slice(), "ports[0].name", "http'"), "ports[0].name", "DNS-1123 label"),
    (
        "slice-endpoint-not-object",
        at(endpoint_slice(), "endpoints[1]", "10.244.0.9"),
        "endpoints[1]",
        "object",
    ),
    ("slice-name-bad", at(endpoint_slice(), "metadata.name", "web_1"), "metadata.name", "DNS-1123 subdomain"),
    (
        "slice-api-version",
        at(endpoint_slice(), "apiVersion", "discovery.k8s.io/v1beta1"),
        "apiVersion",
        "not supported",
    ),
    (
        "legacy-ip-bad",
        at(legacy_endpoints(), "subsets[0].addresses[1].ip", INJECTION),
        "subsets[0].addresses[1].ip",
        "not a valid IP",
    ),
    (
        "legacy-port-bad",
        at(legacy_endpoints(), "subsets[0].ports[0].port", 99999),
        "subsets[0].ports[0].port",
        "out of range",
    ),
    (
        "legacy-node-bad",
        at(legacy_endpoints(), "subsets[0].addresses[0].nodeName", "a b"),
        "subsets[0].addresses[0].nodeName",
        "DNS-1123 subdomain",
    ),
    (
        "node-pod-cidr-bad",
        at(node(), "spec.podCIDRs", ["10.244.0.0/24", "10.244.0.0/40"]),
        "spec.podCIDRs[1]",
        "CIDR",
    ),
    (
        "node-label-value-bad",
        at(node(), "metadata.labels[topology.kubernetes.io/zone]", "zone a"),
        "metadata.labels[topology.kubernetes.io/zone]",
        "label value",
    ),
    ("node-label-key-bad", at(node(), "metadata.labels", {"bad key": "x"}), "metadata.labels", "label key"),
    (
        "node-address-bad",
        at(node(), "status.addresses[0].address", "192.168.50"),
        "status.addresses[0].address",
        "not a valid IP",
    ),
    ("node-name-bad", at(node(), "metadata.name", "Node-A"), "metadata.name", "DNS-1123 subdomain"),
]


@pytest.mark.parametrize(("obj", "field", "words"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_object_names_source_object_and_field(obj: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ObjectError) as info:
        parse_object_all(obj, SRC)
    err = info.value
    assert err.field == field
    assert words in err.reason
    assert err.source == SRC
    md = obj.get("metadata") or {}
    assert err.ref.kind == obj["kind"]
    if (
        isinstance(md.get("name"), str)
        and md["name"].islower()
        and " " not in md["name"]
        and "_" not in md["name"]
    ):
        assert err.ref.name == md["name"]
    text = str(err)
    assert text.startswith(f"{SRC}: {err.ref}: {field}: ")
    assert "\n" not in text


def test_error_names_a_hostile_object_safely() -> None:
    obj = at(service(), "metadata.name", 'x"\n-A KUBE-SERVICES -j ACCEPT')
    with pytest.raises(ObjectError) as info:
        parse_object(obj, SRC)
    assert "\n" not in str(info.value)
    assert info.value.ref == ObjectRef("Service", "demo", "'x\"\\n-A KUBE-SERVICES -j ACCEPT'")


@pytest.mark.parametrize("junk", [None, [], "Service", 42, ["kind", "Service"]], ids=repr)
def test_not_an_object_at_all(junk: Any) -> None:
    with pytest.raises(ObjectError, match="must be an object"):
        parse_object(junk, SRC)


# ------------------------------------------------------------------ streams

MULTI_DOC = """\
# leading comment
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.5]}]
--- # the broken one
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: demo}
spec: {clusterIP: 10.96.0.11, ports: [{port: 0}]}
---
kind: Deployment
metadata: {name: ignored}
"""


def test_multi_document_yaml_reports_line_and_keeps_the_good_ones() -> None:
    objs, errs = parse_stream(MULTI_DOC, "m.yaml")
    assert [type(o).__name__ for o in objs] == ["Service", "EndpointSlice"]
    assert [str(e) for e in errs] == [
        "m.yaml:18: Service demo/bad: spec.ports[0].port: 0 is out of range 1..65535"
    ]


def test_yaml_syntax_error_spoils_only_its_document() -> None:
    text = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}\n---\nspec: [\n  oops\n---\nkind: Node\nmetadata: {name: n}\n"
    objs, errs = parse_stream(text, "s.yaml")
    assert [type(o).__name__ for o in objs] == ["Service", "Node"]
    (err,) = errs
    assert err.ref == ObjectRef("Document", "", "1")
    assert err.source.startswith("s.yaml:")
    assert "YAML" in err.reason


@pytest.mark.parametrize(
    ("doc", "kinds"),
    [
        (
            {"apiVersion": "v1", "kind": "List", "items": [service(), endpoint_slice(), node()]},
            ["Service", "EndpointSlice", "Node"],
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "ServiceList",
                "items": [{k: v for k, v in service().items() if k not in ("kind", "apiVersion")}],
            },
            ["Service"],
        ),
        (
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "items": [endpoint_slice(), endpoint_slice(name="web-2")],
            },
            ["EndpointSlice", "EndpointSlice"],
        ),
        ([service(), node()], ["Service", "Node"]),
    ],
    ids=["list", "typed-list-items-without-kind", "slice-list", "bare-json-array"],
)
def test_lists_as_json_and_yaml(doc: Any, kinds: list[str]) -> None:
    for text in (json.dumps(doc), json.dumps(doc, indent=2)):
        objs, errs = parse_stream(text, "l.json")
        assert errs == []
        assert [type(o).__name__ for o in objs] == kinds


def test_list_item_error_names_the_item() -> None:
    doc = {"kind": "List", "items": [service(), at(service(name="b"), "spec.ports[0].port", -1)]}
    objs, errs = parse_stream(json.dumps(doc), "l.json")
    assert len(objs) == 1
    assert [e.field for e in errs] == ["items[1].spec.ports[0].port"]


def test_concatenated_json_values() -> None:
    text = json.dumps(service()) + "\n" + json.dumps(node())
    objs, errs = parse_stream(text, "w.json")
    assert errs == [] and [type(o).__name__ for o in objs] == ["Service", "Node"]


@pytest.mark.parametrize(
    ("text", "n_errors"),
    [
        ("", 0),
        ("# nothing\n", 0),
        ("---\n---\n", 0),
        ("just a string\n", 1),
        ("- 1\n- 2\n", 2),
        ("{bad json", 1),
    ],
    ids=["empty", "comment", "empty-docs", "scalar", "list-of-scalars", "broken-flow"],
)
def test_odd_streams_never_raise(text: str, n_errors: int) -> None:
    objs, errs = parse_stream(text, "o.yaml")
    assert objs == []
    assert len(errs) == n_errors


@pytest.mark.parametrize("gc_was_enabled", [True, False], ids=["gc-on", "gc-off"])
def test_parse_many_collects_errors_and_restores_the_collector(gc_was_enabled: bool) -> None:
    import gc

    items = [
        service(),
        at(service(name="b"), "spec.clusterIP", "x"),
        legacy_endpoints(
            subsets=[{"addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "ports": [{"port": 80}]}]
        ),
        {k: v for k, v in node().items() if k != "kind"},
        "junk",
    ]
    (gc.enable if gc_was_enabled else gc.disable)()
    try:
        objs, errs = parse_many(items, "api", kind="Node")
        assert gc.isenabled() == gc_was_enabled
    finally:
        gc.enable()
    assert [type(o).__name__ for o in objs] == ["Service", "EndpointSlice", "EndpointSlice", "Node"]
    assert [(e.ref.name, e.field) for e in errs] == [("b", "spec.clusterIP"), ("<unnamed>", "")]


# ------------------------------------------------------------------ files


def test_load_paths_reads_directories_in_order_and_reports_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(json.dumps(node()))
    (tmp_path / "a.json").write_text(json.dumps(service()))
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yml").write_text(json.dumps(endpoint_slice()))
    (tmp_path / "latin1.yaml").write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    objs, errs = load_paths([str(tmp_path), str(tmp_path / "missing.yaml")])
    assert [type(o).__name__ for o in objs] == ["Service", "Node"]
    assert [(e.ref.kind, e.reason.split(" (")[0]) for e in errs] == [
        ("File", "not UTF-8 text"),
        ("File", "no such file or directory"),
    ]
    assert errs[1].source == str(tmp_path / "missing.yaml")
    objs, _ = load_paths([str(tmp_path)], recursive=True)
    assert [type(o).__name__ for o in objs] == ["Service", "Node", "EndpointSlice"]


def test_parse_object_accepts_any_mapping() -> None:
    from types import MappingProxyType

    assert isinstance(parse_object(MappingProxyType(service())), Service)


# ------------------------------------------------------------------ bundled examples

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def test_example_cluster_parses_cleanly_with_every_shape() -> None:
    from kproxy.state.build import Snapshot, view
    from kproxy.state.model import ServiceKey, ServicePortName

    objs, errs = load_paths([str(EXAMPLES)])
    assert errs == []
    snap = Snapshot.from_objects(objs, node_name="node-a")
    v4, v6 = view(snap, "node-a", 4), view(snap, "node-a", 6)
    svcs = {str(k): s for k, s in snap.services.items()}

    def port(ns_name: str, port_name: str, proto: str = "TCP", v: Any = v4) -> Any:
        ns, name = ns_name.split("/")
        return v[ServicePortName(ns, name, port_name, proto)]  # type: ignore[arg-type]

    assert snap.node is not None and snap.node.zone == "zone-a"
    assert snap.node.pod_cidrs == ("10.244.0.0/24", "fd00:10:244::/64")
    assert [p.name for p in svcs["demo/web"].ports] == ["http", "https"]
    assert len(port("demo/web", "https")[1]) == 2
    assert port("demo/api", "http")[0].node_port == 30080
    shop = port("demo/shop", "https")[0]
    assert shop.load_balancer_ips == ("192.0.2.10",) and shop.load_balancer_source_ranges == (
        "203.0.113.0/24",
        "198.51.100.7/32",
    )
    assert port("demo/gateway", "")[0].external_ips == ("192.168.50.100",)
    assert port("demo/sticky", "http")[0].affinity_timeout == 600
    ingress = port("demo/ingress", "http")[0]
    assert ingress.external_local and ingress.health_check_node_port == 32000
    assert port("demo/node-cache", "http")[0].internal_local
    assert port("demo/empty", "http")[1] == ()
    assert "demo/db" not in svcs and ServiceKey("demo", "db") not in snap.slices, (
        "headless service and slice ignored"
    )
    assert "demo/billing" not in svcs, "ExternalName ignored"
    assert [e.hostport for e in port("kube-system/kube-dns", "dns", "UDP")[1]] == [
        "10.244.0.2:53",
        "10.244.1.3:53",
    ]
    assert port("telco/diameter", "diameter", "SCTP")[0].port == 3868
    assert [e.hostport for e in port("demo/dual", "http", v=v6)[1]] == [
        "[fd00:10:244:1::102]:8080",
        "[fd00:10:244::101]:8080",
    ]
    assert len(port("demo/dual", "http")[1]) == 2
    assert len(snap.slices[ServiceKey("demo", "search")]) == 2 and len(port("demo/search", "http")[1]) == 4
    assert [e.terminating for e in port("demo/checkout", "http")[1]] == [True, False]
    assert all(e.zone_hints == {e.zone} for e in port("demo/catalog", "http")[1])
    legacy = snap.slices[ServiceKey("demo", "legacy")]
    assert [s.legacy for s in legacy] == [True]
    assert [e.hostport for e in port("demo/legacy", "http")[1]] == ["10.244.0.141:8080", "10.244.1.142:8080"]


def test_broken_example_names_file_line_object_and_field() -> None:
    bad = EXAMPLES / "broken" / "bad.yaml"
    objs, errs = load_paths([str(bad)])
    assert [o.name for o in objs] == ["fine"]
    assert [(e.ref.name, e.field) for e in errs] == [
        ("bad-port", "spec.ports[1].port"),
        ("bad-port-abcde", "endpoints[0].addresses[0]"),
        ("orphan-x1y2z", "metadata.labels[kubernetes.io/service-name]"),
        ("bad-name", "spec.ports[0].name"),
    ]
    lines = bad.read_text().splitlines()
    for e in errs:
        path, _, line = e.source.rpartition(":")
        assert path == str(bad)
        assert lines[int(line) - 1].startswith("apiVersion:"), "the line is the object's first"


def test_recursive_load_survives_symlink_loops_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(json.dumps(service()))
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "node.yaml").write_text(json.dumps(node()))
    (tmp_path / "loop").symlink_to(tmp_path)
    objs, errs = load_paths([str(tmp_path)], recursive=True)
    assert errs == [] and [type(o).__name__ for o in objs] == ["Service"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("%YAML 1.1\n---\nkind: Node\nmetadata: {name: Bad}\n", 3),
        ("# header\n---\n# about the node\nkind: Node\nmetadata: {name: Bad}\n", 4),
        ("kind: Node\nmetadata: {name: ok}\n...\n---\nkind: Node\nmetadata: {name: Bad}\n", 5),
        ("--- !!map\nkind: Node\nmetadata: {name: Bad}\n", 1),
    ],
    ids=["directive", "comment-header", "document-end-marker", "tag-on-marker-line"],
)
def test_yaml_document_forms_and_error_lines(text: str, line: int) -> None:
    _, errs = parse_stream(text, "d.yaml")
    assert [(e.source, e.field) for e in errs] == [(f"d.yaml:{line}", "metadata.name")]


# ------------------------------------------------------------------ ignored fields (issue 10.3)

LB = "kproxy.io/lb-algorithm"
LB_FIELD = f"metadata.annotations[{LB}]"

IGNORED: list[tuple[str, dict[str, Any], str, str, str, Any]] = [
    # (id, object, warned field, words, attribute kept, its value)
    (
        "lb-non-ascii",
        at(service(), "metadata.annotations", {LB: "léast-connections"}),
        LB_FIELD,
        "plausible",
        "lb_algorithm",
        "",
    ),
    (
        "lb-too-long",
        at(service(), "metadata.annotations", {LB: "x" * 64}),
        LB_FIELD,
        "plausible",
        "lb_algorithm",
        "",
    ),
    (
        "lb-not-a-string",
        at(service(), "metadata.annotations", {LB: 7}),
        LB_FIELD,
        "must be a string",
        "lb_algorithm",
        "",
    ),
    (
        "lb-unprintable",
        at(service(), "metadata.annotations", {LB: "rr\n-A X"}),
        LB_FIELD,
        "plausible",
        "lb_algorithm",
        "",
    ),
    (
        "external-ip-loopback",
        at(service(), "spec.externalIPs", ["127.0.0.1", "192.168.50.100"]),
        "spec.externalIPs[0]",
        "loopback",
        "external_ips",
        ("192.168.50.100",),
    ),
    (
        "external-ip-v6-loopback",
        at(service(), "spec.externalIPs", ["::1"]),
        "spec.externalIPs[0]",
        "loopback",
        "external_ips",
        (),
    ),
    (
        "external-ip-link-local",
        at(service(), "spec.externalIPs", ["192.168.50.100", "169.254.169.254"]),
        "spec.externalIPs[1]",
        "link-local",
        "external_ips",
        ("192.168.50.100",),
    ),
    (
        "external-ip-v6-link-local",
        at(service(), "spec.externalIPs", ["febf::1"]),
        "spec.externalIPs[0]",
        "link-local",
        "external_ips",
        (),
    ),
    (
        "external-ip-link-local-multicast",
        at(service(), "spec.externalIPs", ["224.0.0.251"]),
        "spec.externalIPs[0]",
        "multicast",
        "external_ips",
        (),
    ),
    (
        "external-ip-v6-link-local-multicast",
        at(service(), "spec.externalIPs", ["ff02::fb"]),
        "spec.externalIPs[0]",
        "multicast",
        "external_ips",
        (),
    ),
    (
        "endpoint-loopback",
        endpoint_slice(endpoints=[endpoint("127.0.0.1"), endpoint("10.244.0.5")]),
        "endpoints[0].addresses[0]",
        "loopback",
        "endpoints[0].address",
        "10.244.0.5",
    ),
    (
        "endpoint-link-local",
        endpoint_slice(endpoints=[endpoint("10.244.0.5"), endpoint("169.254.1.1")]),
        "endpoints[1].addresses[0]",
        "link-local",
        "endpoints[0].address",
        "10.244.0.5",
    ),
    (
        "endpoint-v6-loopback",
        endpoint_slice(address_type="IPv6", endpoints=[endpoint("::1"), endpoint("fd00::5")]),
        "endpoints[0].addresses[0]",
        "loopback",
        "endpoints[0].address",
        "fd00::5",
    ),
]


def _attr(obj: Any, path: str) -> Any:
    for part in path.replace("]", "").replace("[", ".").split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    ("obj", "field", "words", "attr", "value"), [c[1:] for c in IGNORED], ids=[c[0] for c in IGNORED]
)
def test_bad_field_is_ignored_alone_with_a_warning_and_the_object_kept(
    obj: dict[str, Any], field: str, words: str, attr: str, value: Any
) -> None:
    warnings: list[ObjectError] = []
    (got,) = parse_object_all(obj, SRC, warnings=warnings)
    assert _attr(got, attr) == value
    assert [(w.field, w.source, w.ref.kind) for w in warnings] == [(field, SRC, obj["kind"])]
    assert words in warnings[0].reason
    assert str(warnings[0]).startswith(f"{SRC}: {obj['kind']} demo/")


def test_special_endpoint_of_a_legacy_endpoints_is_left_out_alone() -> None:
    obj = legacy_endpoints(
        subsets=[{"addresses": [{"ip": "127.0.0.1"}, {"ip": "10.244.0.5"}], "ports": [{"port": 8080}]}]
    )
    warnings: list[ObjectError] = []
    (got,) = parse_object_all(obj, SRC, warnings=warnings)
    assert isinstance(got, EndpointSlice) and [e.address for e in got.endpoints] == ["10.244.0.5"]
    assert [w.field for w in warnings] == ["subsets[0].addresses[0].ip"]


def test_addresses_upstream_allows_still_parse() -> None:
    """Only what ValidateNonSpecialIP refuses is left out: other multicast or 255.255.255.255 is upstream's to allow."""
    warnings: list[ObjectError] = []
    svc = parse_object_all(
        at(service(), "spec.externalIPs", ["239.1.1.1", "fec0::1"]), SRC, warnings=warnings
    )
    assert isinstance(svc[0], Service) and svc[0].external_ips == ("239.1.1.1", "fec0::1") and warnings == []


def test_warnings_of_a_stream_name_list_items() -> None:
    doc = {"kind": "List", "items": [at(service(), "spec.externalIPs", ["127.0.0.2"])]}
    warnings: list[ObjectError] = []
    objs, errs = parse_stream(json.dumps(doc), "list.json", fmt="json", warnings=warnings)
    assert len(objs) == 1 and errs == []
    assert [w.field for w in warnings] == ["items[0].spec.externalIPs[0]"]


# ------------------------------------------------------------------ formats (issue 10.3)


def test_json_file_error_says_json_with_line_and_column() -> None:
    _, errs = parse_stream('{\n  "kind": "Service",\n  "metadata": {,}\n}\n', "svc.json", fmt="json")
    assert len(errs) == 1
    assert errs[0].reason.startswith("JSON: Expecting property name") and "line 3" in errs[0].reason
    assert errs[0].source == "svc.json:3"


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_5000_digit_port_is_an_out_of_range_field_not_a_parser_crash(fmt: str) -> None:
    text = json.dumps(service()).replace('"port": 80,', '"port": ' + "9" * 5000 + ",")
    objs, errs = parse_stream(text, f"svc.{fmt}", fmt=fmt)
    assert objs == []
    assert [(e.ref.name, e.field) for e in errs] == [("web", "spec.ports[0].port")]
    assert "5000-digit number is out of range 1..65535" in errs[0].reason


def test_json_nested_1000_deep_in_an_annotation_keeps_the_service() -> None:
    text = json.dumps(at(service(), "metadata.annotations", {"example.com/deep": "DEEP"}))
    text = text.replace('"DEEP"', "[" * 1000 + "]" * 1000)
    objs, errs = parse_stream(text, "svc.json", fmt="json")
    assert errs == [] and [type(o).__name__ for o in objs] == ["Service"]


def test_json_nested_past_the_api_servers_limit_is_one_clear_error() -> None:
    text = '{"kind": "Service", "x": ' + "[" * 20_000 + "]" * 20_000 + "}"
    objs, errs = parse_stream(text, "deep.json", fmt="json")
    assert objs == [] and len(errs) == 1
    assert errs[0].reason == "JSON: nested more than 10000 levels deep"
