"""Property tests: whatever shape an object arrives in, the parser raises ObjectError or
returns values that are safe to write into an iptables rule."""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.errors import ObjectError
from kproxy.state.model import EndpointSlice, Node, Service
from kproxy.state.parse import parse_object_all, parse_stream
from tests.support.kobjects import endpoint, endpoint_slice, legacy_endpoints, node, service

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: list[dict[str, Any]] = [
    service(),
    service(
        type="LoadBalancer",
        clusterIPs=["10.96.0.10", "fd00:10:96::a"],
        ipFamilies=["IPv4", "IPv6"],
        externalIPs=["192.168.50.100"],
        loadBalancerSourceRanges=["203.0.113.0/24"],
        externalTrafficPolicy="Local",
        healthCheckNodePort=32000,
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
    )
    | {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}},
    endpoint_slice(),
    endpoint_slice(
        address_type="IPv6",
        endpoints=[
            endpoint("fd00::5", ready=False, serving=True, terminating=True)
            | {"hints": {"forZones": [{"name": "zone-a"}]}}
        ],
    ),
    legacy_endpoints(),
    node(),
]

NASTY_STRINGS = [
    "",
    "None",
    "web",
    "TCP",
    "IPv4",
    "Local",
    "ClientIP",
    "10.0.0.1",
    "fd00::1",
    "10.0.0.0/8",
    '"',
    "'",
    "a b",
    "x\ny",
    "-j ACCEPT",
    "10.0.0.1 -j ACCEPT",
    "web\n-A KUBE-SERVICES -j ACCEPT",
    'web" --comment "x',
    "fe80::1%eth0",
    "::ffff:10.0.0.1",
    "0.0.0.0",
    "999.1.1.1",
    "$(reboot)",
    "é",
    "a" * 300,
    "\x00",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=70000),
    st.floats(allow_nan=True),
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(NASTY_STRINGS) | st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        parent: Any = obj
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and path[-1] not in ("kind",) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(values)
    return obj


def _ip_ok(ip: str) -> None:
    assert str(ipaddress.ip_address(ip)) == ip


def _cidr_ok(c: str) -> None:
    assert str(ipaddress.ip_network(c)) == c


def assert_safe(o: Service | EndpointSlice | Node) -> None:
    """Everything that can reach a rule matches a grammar with no quotes, spaces or newlines."""
    if isinstance(o, Service):
        assert DNS_LABEL.fullmatch(o.namespace) and DNS_LABEL.fullmatch(o.name)
        for p in o.ports:
            assert p.name == "" or DNS_LABEL.fullmatch(p.name)
            assert p.protocol in ("TCP", "UDP", "SCTP")
            assert 1 <= p.port <= 65535 and 0 <= p.node_port <= 65535
        for ip in (*o.cluster_ips, *o.external_ips, *o.load_balancer_ips):
            _ip_ok(ip)
        for c in o.load_balancer_source_ranges:
            _cidr_ok(c)
        assert 0 <= o.affinity_timeout <= 86400 and 0 <= o.health_check_node_port <= 65535
        assert o.lb_algorithm.isprintable()
    elif isinstance(o, EndpointSlice):
        assert DNS_LABEL.fullmatch(o.namespace) and DNS_SUBDOMAIN.fullmatch(o.name)
        assert DNS_LABEL.fullmatch(o.service_name)
        assert o.address_type in ("IPv4", "IPv6")
        for sp in o.ports:
            assert sp.name == "" or DNS_LABEL.fullmatch(sp.name)
            assert 1 <= sp.port <= 65535
        for e in o.endpoints:
            _ip_ok(e.address)
            assert (":" in e.address) == (o.address_type == "IPv6")
            assert e.node_name == "" or DNS_SUBDOMAIN.fullmatch(e.node_name)
            assert LABEL_VALUE.fullmatch(e.zone)
            assert all(LABEL_VALUE.fullmatch(z) for z in e.zone_hints)
    else:
        assert DNS_SUBDOMAIN.fullmatch(o.name)
        for c in o.pod_cidrs:
            _cidr_ok(c)
        for ip in o.addresses:
            _ip_ok(ip)
        assert all(LABEL_VALUE.fullmatch(v) for _, v in o.labels)


def check(obj: Any) -> None:
    try:
        got = parse_object_all(obj, "fuzz.yaml")
    except ObjectError as e:
        text = str(e)
        assert "\n" not in text and "\r" not in text
        assert "internal error" not in e.reason, text
        return
    for o in got:
        assert_safe(o)


@FUZZ
@given(mutated())
def test_mutated_objects_parse_safely_or_fail_with_object_error(obj: dict[str, Any]) -> None:
    check(obj)


@FUZZ
@given(st.sampled_from(["Service", "EndpointSlice", "Endpoints", "Node"]), values, values, values)
def test_random_shapes_parse_safely_or_fail_with_object_error(
    kind: str, meta: Any, spec: Any, rest: Any
) -> None:
    check(
        {
            "kind": kind,
            "metadata": meta,
            "spec": spec,
            "endpoints": rest,
            "subsets": rest,
            "addressType": "IPv4",
        }
    )


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="kind: Service\n-[]{},'\"#&*!|>%@`.0123456789", max_size=200))
def test_random_text_streams_never_raise(text: str) -> None:
    objs, errs = parse_stream(text, "fuzz.yaml")
    for o in objs:
        assert_safe(o)
    assert all(isinstance(e, ObjectError) and "internal error" not in e.reason for e in errs)
