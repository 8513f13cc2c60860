"""Kubernetes objects (the API's JSON form) to kproxy's frozen model.

This is the trust boundary. Whatever comes out of here may be written into iptables
rules verbatim, so every name is checked against the DNS-1123 / label-value grammars
(no quotes, spaces, newlines or option syntax can pass), every address is normalised
with `ipaddress`, and every number is range-checked. A bad object raises exactly one
`ObjectError` naming the object and the JSON path of the field; nothing else escapes,
whatever the input's shape.

Kinds: v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Endpoints (converted to legacy
EndpointSlices), v1 Node. Objects kproxy deliberately leaves alone (ExternalName and
headless services, the service-proxy-name / headless labels, FQDN slices, other kinds)
parse to nothing.

`parse_object_all` is the general entry point: a v1 Endpoints can hold several port sets
and both address families, and becomes one legacy slice per (subset, family).
`parse_object` is the single-result convenience for everything else; handed an
Endpoints that needs more than one slice it raises ObjectError rather than drop some.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, TypeVar, cast

import yaml

from kproxy.errors import ObjectError
from kproxy.infra.gcpause import gc_paused
from kproxy.state.api import RawMeta, RawObject
from kproxy.state.model import (
    AddressType,
    EndpointSlice,
    KObject,
    L4Protocol,
    Node,
    ObjectRef,
    Service,
    ServicePortSpec,
    SliceEndpoint,
    SlicePort,
)

MAX_JSON_DEPTH: Final = 10_000
"""How deep JSON may nest, as Go's encoding/json (and so the API server) allows; deeper is an error."""
MAX_NUMBER_DIGITS: Final = 100
"""Integers longer than this are read as out of range, not converted (Python refuses past 4,300 digits)."""

SERVICE_PROXY_NAME_LABEL: Final = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL: Final = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION: Final = "endpoints.kubernetes.io/last-change-trigger-time"
LB_ALGORITHM_ANNOTATION: Final = "kproxy.io/lb-algorithm"
DEFAULT_AFFINITY_TIMEOUT: Final = 10800
MAX_AFFINITY_TIMEOUT: Final = 86400

DNS1123_LABEL: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
LABEL_VALUE: Final = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_LABEL_NAME: Final = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")

_PROTOCOLS: Final[dict[object, L4Protocol]] = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}
_ADDRESS_TYPES: Final[dict[object, AddressType]] = {"IPv4": "IPv4", "IPv6": "IPv6", "FQDN": "FQDN"}
_SERVICE_TYPES: Final = ("ClusterIP", "NodePort", "LoadBalancer")
_EMPTY: Final[Mapping[str, object]] = {}
_CACHE_LIMIT: Final = 200_000
_intern = sys.intern
_K = TypeVar("_K")
_V = TypeVar("_V")


class _Memo(dict[_K, _V]):
    """A parse memo: relists meet the same values again and again, but churn must not grow it
    without end, so it forgets everything once it holds _CACHE_LIMIT entries."""

    def put(self, key: _K, value: _V) -> _V:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        self[key] = value
        return value


class _Invalid(Exception):
    """Internal: one bad field. Turned into ObjectError (with the object's identity) at the top."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def within(self, prefix: str) -> _Invalid:
        """Prefix the path on the way out: paths are built only for the one field that failed."""
        if not self.field:
            self.field = prefix
        elif self.field[0] == "[":
            self.field = prefix + self.field
        else:
            self.field = f"{prefix}.{self.field}"
        return self


def _fail(field: str, reason: str) -> NoReturn:
    raise _Invalid(field, reason)


class _Notes(threading.local):
    """Warnings of the object being parsed (a field ignored, the rest kept), per thread."""

    found: list[tuple[str, str]] | None = None


_notes = _Notes()


def _warn(field: str, reason: str) -> None:
    """One field is ignored and the object kept, as the API would refuse only that field's value."""
    found = _notes.found
    if found is not None:
        found.append((field, reason))


class _HugeNumber(float):
    """An integer with more than MAX_NUMBER_DIGITS digits: kept as infinity so range checks refuse it."""

    digits: int = 0


def _huge(text: str) -> _HugeNumber:
    n = _HugeNumber(-math.inf if text.startswith("-") else math.inf)
    n.digits = len(text.lstrip("+-"))
    return n


def _tname(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, list | tuple):
        return "list"
    return type(v).__name__


def _show(v: object, limit: int = 60) -> str:
    """A value quoted for an error message: printable, one line, bounded (it may be hostile)."""
    text = v if isinstance(v, str) else _tname(v)
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


# ------------------------------------------------------------ primitive readers


def _map(v: object, field: str) -> Mapping[str, object]:
    if v is None:
        return _EMPTY
    if isinstance(v, dict | Mapping):
        return v
    _fail(field, f"must be an object, not {_tname(v)}")


def _list(v: object, field: str) -> Sequence[object]:
    if v is None:
        return ()
    if isinstance(v, list | tuple):
        return v
    _fail(field, f"must be a list, not {_tname(v)}")


def _str(v: object, field: str) -> str:
    """A string field; null or missing reads as empty, as the API's defaulting does."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    _fail(field, f"must be a string, not {_tname(v)}")


def _bool(v: object, field: str, default: bool) -> bool:
    if v is None:
        return default
    if v is True or v is False:
        return v
    _fail(field, f"must be true or false, not {_tname(v)}")


def _int(v: object, field: str, lo: int, hi: int) -> int:
    if isinstance(v, _HugeNumber):
        _fail(field, f"a {v.digits}-digit number is out of range {lo}..{hi}")
    if type(v) is not int:
        _fail(field, f"must be an integer, not {_tname(v)}")
    if not lo <= v <= hi:
        _fail(field, f"{v} is out of range {lo}..{hi}")
    return v


def _each(items: Sequence[object], field: str, fn: Callable[[Any, str], Any]) -> list[Any]:
    """fn over a list, naming the failing item `field[i]`."""
    out: list[Any] = []
    for i, v in enumerate(items):
        try:
            out.append(fn(v, ""))
        except _Invalid as e:
            raise e.within(f"{field}[{i}]") from None
    return out


def _cached_check(
    pattern: re.Pattern[str], max_len: int, what: str, seen: _Memo[str, str]
) -> Callable[[object, str], str]:
    """A validator for one grammar, remembering good strings in `seen`: names repeat across objects and resyncs."""

    def check(v: object, field: str) -> str:
        if type(v) is str:
            got = seen.get(v)
            if got is not None:
                return got
            if len(v) <= max_len and pattern.fullmatch(v):
                return seen.put(v, _intern(v))
            _fail(field, f"{_show(v)} is not a valid {what}")
        _fail(field, f"must be a string, not {_tname(v)}")

    return check


_subdomains: _Memo[str, str] = _Memo()
_dns_label = _cached_check(DNS1123_LABEL, 63, "DNS-1123 label (lowercase letters, digits, '-')", _Memo())
_dns_subdomain = _cached_check(
    DNS1123_SUBDOMAIN, 253, "DNS-1123 subdomain (lowercase letters, digits, '-', '.')", _subdomains
)
_label_value = _cached_check(LABEL_VALUE, 63, "label value (letters, digits, '-', '_', '.')", _Memo())


def _label_key(v: object, field: str) -> str:
    k = _str(v, field)
    prefix, slash, name = k.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        _fail(field, f"{_show(k)} has an invalid prefix")
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        _fail(field, f"{_show(k)} is not a valid label key")
    return _intern(k)


def _port_name(v: object, field: str) -> str:
    """Port names: empty, or a DNS-1123 label as the API requires for Service and slice ports."""
    if v is None or v == "":
        return ""
    return _dns_label(v, field)


_ip_cache: _Memo[str, str] = _Memo()
# Frozen value objects shared between equal parses: a relist rebuilds nothing, and
# equality checks downstream often short-cut on identity.
_port_specs: _Memo[tuple[str, L4Protocol, int, int, int | str], ServicePortSpec] = _Memo()
_slice_ports: _Memo[tuple[str, L4Protocol, int], SlicePort] = _Memo()
_slice_endpoints: _Memo[
    tuple[str, bool, bool, bool, str, str, frozenset[str], frozenset[str]], SliceEndpoint
] = _Memo()


def _ip(v: object, field: str) -> str:
    """Canonical text of an address, as Go's ParseIPSloppy + String would give it.

    IPv4-mapped IPv6 becomes plain IPv4 (Go treats it as IPv4, so must the family split);
    IPv4 with leading zeros is read as decimal, as kube-proxy reads legacy objects. Zone
    suffixes (`fe80::1%eth0`) and the unspecified address are refused.
    """
    if type(v) is str:
        got = _ip_cache.get(v)
        if got is not None:
            return got
        norm = _normalise_ip(v)
        if norm is None:
            _fail(field, f"{_show(v)} is not a valid IP address")
        return _ip_cache.put(v, norm)
    _fail(field, f"must be an IP address string, not {_tname(v)}")


_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4: Final = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
"""An already-canonical dotted quad: the common case, checked without building an address object."""


def _normalise_ip(s: str) -> str | None:
    if _PLAIN_IPV4.fullmatch(s) and s != "0.0.0.0":
        return _intern(s)
    try:
        a = ipaddress.ip_address(s)
    except ValueError:
        parts = s.split(".")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
            return None
        try:
            a = ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))
        except ValueError:
            return None
    if isinstance(a, ipaddress.IPv6Address):
        if a.scope_id is not None:
            return None
        if a.ipv4_mapped is not None:
            a = a.ipv4_mapped
    if a.is_unspecified:
        return None
    return _intern(str(a))


_NON_SPECIAL_V6_LINK_LOCAL: Final = ("fe8", "fe9", "fea", "feb")


def _special(address: str) -> str:
    """Why the API server's ValidateNonSpecialIP refuses a canonical address ("" when it does not).

    It guards endpoint addresses and external IPs: loopback and unspecified addresses make no
    sense there, link-local ones belong to the node (a metadata service). Plain string tests
    on the canonical text, as this runs for every endpoint of a relist.
    """
    if ":" not in address:
        if address.startswith("127."):
            return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
        if address.startswith("169.254."):
            return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
        if address.startswith("224.0.0."):
            return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
        return ""
    if address == "::1":
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    head = address.split(":", 1)[0]
    if len(head) == 4 and head.startswith(_NON_SPECIAL_V6_LINK_LOCAL):
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if len(head) == 4 and head.startswith("ff") and head[3] == "2":
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
    return ""


def _non_special_ips(items: Sequence[object], field: str) -> tuple[str, ...]:
    """Addresses of a list field; a special one is left out alone, with a warning naming it."""
    out: list[str] = []
    for i, v in enumerate(items):
        ip = _ip(v, f"{field}[{i}]")
        why = _special(ip)
        if why:
            _warn(f"{field}[{i}]", f"{ip} is ignored: {why}")
            continue
        out.append(ip)
    return tuple(out)


def _cidr(v: object, field: str) -> str:
    """A CIDR, whitespace-trimmed and with host bits cleared: kube-proxy tolerates both (Go's ParseCIDR masks)."""
    if type(v) is not str:
        _fail(field, f"must be a CIDR string, not {_tname(v)}")
    s = v.strip()
    addr, slash, bits = s.partition("/")
    if not slash or not bits.isascii() or not bits.isdigit():
        _fail(field, f"{_show(v)} is not a valid CIDR")
    try:
        ip = ipaddress.ip_address(addr)
        net = ipaddress.ip_network(f"{ip}/{int(bits)}", strict=False)
    except ValueError:
        _fail(field, f"{_show(v)} is not a valid CIDR")
    if isinstance(ip, ipaddress.IPv6Address) and (ip.scope_id is not None or ip.ipv4_mapped is not None):
        _fail(field, f"{_show(v)} is not a valid CIDR")
    return _intern(str(net))


def _timestamp(v: object) -> float | None:
    """RFC 3339 to Unix time; an unreadable value only loses a latency sample, so it reads as absent."""
    if isinstance(v, datetime):  # unquoted in YAML
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    if type(v) is not str or not v:
        return None
    try:
        t = datetime.fromisoformat(v)
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


# ------------------------------------------------------------ object identity


def _display_name(v: object) -> str:
    if type(v) is str and len(v) <= 253 and DNS1123_SUBDOMAIN.fullmatch(v):
        return v
    if v is None or v == "":
        return "<unnamed>"
    return _show(v)


def _identity(kind: str, meta_raw: object, namespaced: bool) -> ObjectRef:
    """Best-effort identity for an error message: the object may be invalid anywhere."""
    meta = meta_raw if isinstance(meta_raw, Mapping) else _EMPTY
    ns = ""
    if namespaced:
        raw_ns = meta.get("namespace")
        ns = "default" if raw_ns is None or raw_ns == "" else _display_name(raw_ns)
    return ObjectRef(kind, ns, _display_name(meta.get("name")))


def _names(meta: RawMeta, namespaced: bool, service_name: bool) -> tuple[str, str]:
    """Namespace (defaulting to "default", as kubectl does for manifests) and name."""
    ns = ""
    if namespaced:
        raw_ns = meta.get("namespace")
        ns = "default" if raw_ns is None or raw_ns == "" else _dns_label(raw_ns, "metadata.namespace")
    raw = meta.get("name")
    if raw is None or raw == "":
        _fail("metadata.name", "is required")
    name = _dns_label(raw, "metadata.name") if service_name else _dns_subdomain(raw, "metadata.name")
    return ns, name


def _resource_version(meta: RawMeta) -> str:
    rv = _str(meta.get("resourceVersion"), "metadata.resourceVersion")
    if rv and (len(rv) > 64 or not rv.isprintable() or " " in rv):
        _fail("metadata.resourceVersion", f"{_show(rv)} is not a valid resource version")
    return rv


def _labels(meta: RawMeta) -> Mapping[str, object]:
    return _map(meta.get("labels"), "metadata.labels")


def _ignored_by_label(labels: Mapping[str, object]) -> bool:
    return SERVICE_PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels


# ------------------------------------------------------------ Service


def _service(obj: RawObject, meta: RawMeta) -> Service | None:
    labels = _labels(meta)
    if _ignored_by_label(labels):
        return None
    spec = _map(obj.get("spec"), "spec")
    svc_type = _str(spec.get("type"), "spec.type") or "ClusterIP"
    if svc_type == "ExternalName":
        return None
    if svc_type not in _SERVICE_TYPES:
        _fail("spec.type", f"{_show(svc_type)} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName")
    cluster_ips = _cluster_ips(spec)
    if cluster_ips is None:
        return None
    ns, name = _names(meta, namespaced=True, service_name=True)

    external_ips = _non_special_ips(_list(spec.get("externalIPs"), "spec.externalIPs"), "spec.externalIPs")
    externally_reachable = svc_type != "ClusterIP" or bool(external_ips)
    lb_ips: tuple[str, ...] = ()
    ranges: tuple[str, ...] = ()
    if svc_type == "LoadBalancer":
        lb_ips = _ingress_ips(obj)
        raw_ranges = _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
        ranges = tuple(dict.fromkeys(_each(raw_ranges, "spec.loadBalancerSourceRanges", _cidr)))

    etp = _str(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy")
    if etp not in ("", "Cluster", "Local"):
        _fail("spec.externalTrafficPolicy", f"{_show(etp)} is not Cluster or Local")
    itp = _str(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy")
    if itp not in ("", "Cluster", "Local"):
        _fail("spec.internalTrafficPolicy", f"{_show(itp)} is not Cluster or Local")
    external_local = etp == "Local" and externally_reachable

    hc_raw = spec.get("healthCheckNodePort")
    hc = 0 if hc_raw is None else _int(hc_raw, "spec.healthCheckNodePort", 0, 65535)
    if not (svc_type == "LoadBalancer" and external_local):
        hc = 0

    return Service(
        namespace=ns,
        name=name,
        type=svc_type,  # type: ignore[arg-type]
        cluster_ips=cluster_ips,
        ports=_service_ports(spec, node_ports=svc_type != "ClusterIP"),
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=ranges,
        affinity_timeout=_affinity(spec),
        external_local=external_local,
        internal_local=itp == "Local",
        health_check_node_port=hc,
        lb_algorithm=_lb_algorithm(meta),
        resource_version=_resource_version(meta),
    )


def _lb_algorithm(meta: RawMeta) -> str:
    """kproxy's own annotation: a plausible name passes through (userspace mode logs an unknown one and
    falls back); an implausible one is ignored with a warning, as kube-proxy ignores annotations it
    does not know, so the Service still renders with round robin."""
    annotations = _map(meta.get("annotations"), "metadata.annotations")
    field = f"metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"
    raw = annotations.get(LB_ALGORITHM_ANNOTATION)
    if raw is None:
        return ""
    if type(raw) is not str:
        _warn(field, f"must be a string, not {_tname(raw)}; ignored, using round robin")
        return ""
    v = raw.strip()
    if len(v) > 63 or not (v.isascii() and v.isprintable()):
        _warn(field, f"{_show(v)} is not a plausible algorithm name; ignored, using round robin")
        return ""
    return _intern(v)


def _cluster_ips(spec: Mapping[str, object]) -> tuple[str, ...] | None:
    """spec.clusterIPs (dual stack) or else spec.clusterIP; None means headless (ignored)."""
    primary = spec.get("clusterIP")
    if primary == "None":
        return None
    raw = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    if (
        len(raw) == 1
        and type(primary) is str
        and primary
        and raw[0] == primary
        and not spec.get("ipFamilies")
    ):
        return (_ip(primary, "spec.clusterIP"),)
    if not raw:
        if primary is None or primary == "":
            return None
        return (_ip(primary, "spec.clusterIP"),)
    if raw[0] == "None":
        return None
    if len(raw) > 2:
        _fail("spec.clusterIPs", f"holds {len(raw)} addresses, at most one per family (2) allowed")
    ips = tuple(_each(raw, "spec.clusterIPs", _ip))
    if primary is not None and primary != "" and _ip(primary, "spec.clusterIP") != ips[0]:
        _fail("spec.clusterIP", f"{_show(primary)} differs from spec.clusterIPs[0] {ips[0]!r}")
    if len(ips) == 2 and (":" in ips[0]) == (":" in ips[1]):
        _fail("spec.clusterIPs[1]", "must be of the other address family than spec.clusterIPs[0]")
    families = _list(spec.get("ipFamilies"), "spec.ipFamilies")
    for i, fam in enumerate(families[: len(ips)]):
        want = "IPv6" if ":" in ips[i] else "IPv4"
        if fam != want:
            _fail(f"spec.ipFamilies[{i}]", f"{_show(fam)} does not match spec.clusterIPs[{i}] ({want})")
    return ips


def _ingress_ips(obj: RawObject) -> tuple[str, ...]:
    """status.loadBalancer.ingress IPs in VIP mode; hostname-only and ipMode Proxy entries are not ours."""
    status = _map(obj.get("status"), "status")
    lb = _map(status.get("loadBalancer"), "status.loadBalancer")
    out: list[str] = []
    for i, ing_raw in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress")):
        try:
            ing = _map(ing_raw, "")
            ip = ing.get("ip")
            if ip is None or ip == "":
                continue
            mode = _str(ing.get("ipMode"), "ipMode")
            if mode not in ("", "VIP", "Proxy"):
                _fail("ipMode", f"{_show(mode)} is not VIP or Proxy")
            norm = _ip(ip, "ip")
        except _Invalid as e:
            raise e.within(f"status.loadBalancer.ingress[{i}]") from None
        if mode != "Proxy" and norm not in out:
            out.append(norm)
    return tuple(out)


def _affinity(spec: Mapping[str, object]) -> int:
    aff = _str(spec.get("sessionAffinity"), "spec.sessionAffinity")
    if aff in ("", "None"):
        return 0
    if aff != "ClientIP":
        _fail("spec.sessionAffinity", f"{_show(aff)} is not None or ClientIP")
    cfg = _map(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client = _map(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    t = client.get("timeoutSeconds")
    if t is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return _int(t, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT)


def _service_ports(spec: Mapping[str, object], node_ports: bool) -> tuple[ServicePortSpec, ...]:
    raw = _list(spec.get("ports"), "spec.ports")
    out: list[ServicePortSpec] = []
    seen: set[tuple[str, str]] = set()
    for i, p_raw in enumerate(raw):
        try:
            sp = _service_port(p_raw, node_ports)
            if (sp.name, sp.protocol) in seen:
                _fail("name", f"duplicate port name {sp.name!r} for protocol {sp.protocol}")
        except _Invalid as e:
            raise e.within(f"spec.ports[{i}]") from None
        seen.add((sp.name, sp.protocol))
        out.append(sp)
    return tuple(out)


def _service_port(p_raw: object, node_ports: bool) -> ServicePortSpec:
    p = _map(p_raw, "")
    name = _port_name(p.get("name"), "name")
    proto = _protocol(p.get("protocol"), "protocol")
    port = _int(p.get("port"), "port", 1, 65535)
    np_raw = p.get("nodePort")
    node_port = 0 if np_raw is None else _int(np_raw, "nodePort", 0, 65535)
    target = _target_port(p.get("targetPort"), "targetPort", port)
    key = (name, proto, port, node_port if node_ports else 0, target)
    got = _port_specs.get(key)
    if got is None:
        got = _port_specs.put(key, ServicePortSpec(*key))
    return got


def _protocol(v: object, field: str) -> L4Protocol:
    if v is None or v == "":
        return "TCP"
    try:
        return _PROTOCOLS[v]
    except (KeyError, TypeError):
        _fail(field, f"{_show(v)} is not one of TCP, UDP, SCTP")


def _target_port(v: object, field: str, port: int) -> int | str:
    if v is None or v == 0 or v == "":
        return port
    if type(v) is int:
        return _int(v, field, 1, 65535)
    if type(v) is str and v.isascii() and v.isdigit():
        return _int(int(v), field, 1, 65535)
    return _dns_label(v, field)


# ------------------------------------------------------------ EndpointSlice


def _endpoint_slice(obj: RawObject, meta: RawMeta) -> EndpointSlice | None:
    labels = _labels(meta)
    if _ignored_by_label(labels):
        return None
    at_raw = obj.get("addressType")
    address_type = _ADDRESS_TYPES.get(at_raw) if type(at_raw) is str else None
    if address_type is None:
        _fail("addressType", f"{_show(at_raw)} is not one of IPv4, IPv6, FQDN")
    if address_type == "FQDN":
        return None
    ns, name = _names(meta, namespaced=True, service_name=False)
    svc_raw = labels.get(SERVICE_NAME_LABEL)
    if svc_raw is None or svc_raw == "":
        _fail(
            f"metadata.labels[{SERVICE_NAME_LABEL}]",
            "is required: it names the Service this slice belongs to",
        )
    service_name = _dns_label(svc_raw, f"metadata.labels[{SERVICE_NAME_LABEL}]")

    ports: list[SlicePort] = []
    for i, p_raw in enumerate(_list(obj.get("ports"), "ports")):
        try:
            sp = _slice_port(p_raw)
        except _Invalid as e:
            raise e.within(f"ports[{i}]") from None
        if sp is not None:
            ports.append(sp)

    want_v6 = address_type == "IPv6"
    endpoints: list[SliceEndpoint] = []
    for i, e_raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        try:
            ep = _slice_endpoint(e_raw, want_v6)
        except _Invalid as e:
            raise e.within(f"endpoints[{i}]") from None
        if ep is not None:
            why = _special(ep.address)
            if why:
                _warn(f"endpoints[{i}].addresses[0]", f"{ep.address} is ignored: {why}")
                continue
            endpoints.append(ep)

    annotations = _map(meta.get("annotations"), "metadata.annotations")
    return EndpointSlice(
        namespace=ns,
        name=name,
        service_name=service_name,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_timestamp(annotations.get(TRIGGER_TIME_ANNOTATION)),
        resource_version=_resource_version(meta),
    )


def _slice_port(p_raw: object) -> SlicePort | None:
    """A port without a number is skipped (kube-proxy logs and ignores it), as is port 0."""
    p = _map(p_raw, "")
    name = _port_name(p.get("name"), "name")
    proto = _protocol(p.get("protocol"), "protocol")
    port_raw = p.get("port")
    if port_raw is None or (port_raw == 0 and type(port_raw) is int):
        return None
    key = (name, proto, _int(port_raw, "port", 1, 65535))
    got = _slice_ports.get(key)
    if got is None:
        got = _slice_ports.put(key, SlicePort(*key))
    return got


def _slice_endpoint(e_raw: object, want_v6: bool) -> SliceEndpoint | None:
    # The hottest loop of a relist: well-formed input takes the inline fast paths (exact
    # types, cache hits); anything else goes through the general readers and their errors.
    e = e_raw if type(e_raw) is dict else _map(e_raw, "")
    addrs = e.get("addresses")
    if type(addrs) is not list:
        addrs = _list(addrs, "addresses")
    if not addrs:
        return None
    a0 = addrs[0]
    address = (_ip_cache.get(a0) if type(a0) is str else None) or _ip(a0, "addresses[0]")
    if (":" in address) != want_v6:
        _fail("addresses[0]", f"{address} does not match the slice's addressType")
    cond_raw = e.get("conditions")
    if cond_raw is None:
        ready, serving, terminating = True, True, False
    else:
        cond = cond_raw if type(cond_raw) is dict else _map(cond_raw, "conditions")
        ready = _bool(cond.get("ready"), "conditions.ready", True)
        serving = _bool(cond.get("serving"), "conditions.serving", True)
        terminating = _bool(cond.get("terminating"), "conditions.terminating", False)
    node_raw = e.get("nodeName")
    if node_raw is None or node_raw == "":
        node_name = ""
    else:
        node_name = (_subdomains.get(node_raw) if type(node_raw) is str else None) or _dns_subdomain(
            node_raw, "nodeName"
        )
    zone_raw = e.get("zone")
    zone = "" if zone_raw is None else _label_value(zone_raw, "zone")
    hints: frozenset[str] = _NO_HINTS
    node_hints: frozenset[str] = _NO_HINTS
    hints_raw = e.get("hints")
    if hints_raw is not None:
        h = _map(hints_raw, "hints")
        zones = _list(h.get("forZones"), "hints.forZones")
        if zones:
            hints = frozenset(_each(zones, "hints.forZones", _zone_hint))
        nodes = _list(h.get("forNodes"), "hints.forNodes")
        if nodes:
            node_hints = frozenset(_each(nodes, "hints.forNodes", _node_hint))
    key = (address, ready, serving, terminating, node_name, zone, hints, node_hints)
    got = _slice_endpoints.get(key)
    if got is None:
        got = _slice_endpoints.put(key, SliceEndpoint(*key))
    return got


_NO_HINTS: Final[frozenset[str]] = frozenset()


def _zone_hint(z_raw: object, field: str) -> str:
    z = _map(z_raw, field)
    return _label_value(z.get("name"), f"{field}.name" if field else "name")


def _node_hint(n_raw: object, field: str) -> str:
    n = _map(n_raw, field)
    return _dns_subdomain(n.get("name"), f"{field}.name" if field else "name")


# ------------------------------------------------------------ legacy Endpoints


def _endpoints(obj: RawObject, meta: RawMeta) -> tuple[EndpointSlice, ...]:
    """v1 Endpoints: subsets x ports x addresses; notReadyAddresses are ignored, as kube-proxy once did.

    Every address in an Endpoints shares its subset's ports, so each (subset, family)
    becomes one slice. Slices are named after the Endpoints, with `-N` appended only when
    there is more than one, so the common case keeps the object's own name.
    """
    if _ignored_by_label(_labels(meta)):
        return ()
    ns, name = _names(meta, namespaced=True, service_name=True)
    annotations = _map(meta.get("annotations"), "metadata.annotations")
    trigger = _timestamp(annotations.get(TRIGGER_TIME_ANNOTATION))
    rv = _resource_version(meta)
    parts: list[tuple[AddressType, tuple[SlicePort, ...], tuple[SliceEndpoint, ...]]] = []
    for s, sub_raw in enumerate(_list(obj.get("subsets"), "subsets")):
        try:
            sub = _map(sub_raw, "")
            ports = [
                p for p in _each(_list(sub.get("ports"), "ports"), "ports", _legacy_port) if p is not None
            ]
            by_family: dict[AddressType, list[SliceEndpoint]] = {}
            addresses = _each(_list(sub.get("addresses"), "addresses"), "addresses", _legacy_address)
            for a, ep in enumerate(addresses):
                why = _special(ep.address)
                if why:
                    _warn(f"subsets[{s}].addresses[{a}].ip", f"{ep.address} is ignored: {why}")
                    continue
                by_family.setdefault("IPv6" if ":" in ep.address else "IPv4", []).append(ep)
        except _Invalid as e:
            raise e.within(f"subsets[{s}]") from None
        for fam in ("IPv4", "IPv6"):
            eps = by_family.get(fam)
            if eps and ports:
                parts.append((fam, tuple(ports), tuple(eps)))
    many = len(parts) > 1
    return tuple(
        EndpointSlice(
            namespace=ns,
            name=f"{name}-{n}" if many else name,
            service_name=name,
            address_type=fam,
            ports=ports_t,
            endpoints=eps_t,
            trigger_time=trigger,
            resource_version=rv,
            legacy=True,
        )
        for n, (fam, ports_t, eps_t) in enumerate(parts)
    )


def _legacy_port(p_raw: object, field: str) -> SlicePort | None:
    return _slice_port(p_raw)


def _legacy_address(a_raw: object, field: str) -> SliceEndpoint:
    a = _map(a_raw, "")
    ip = _ip(a.get("ip"), "ip")
    node_raw = a.get("nodeName")
    node = "" if node_raw is None or node_raw == "" else _dns_subdomain(node_raw, "nodeName")
    return SliceEndpoint(ip, node_name=node)


# ------------------------------------------------------------ Node


def _node(obj: RawObject, meta: RawMeta) -> Node:
    _, name = _names(meta, namespaced=False, service_name=False)
    labels: list[tuple[str, str]] = []
    for k, v in _labels(meta).items():
        key = _label_key(k, "metadata.labels")
        labels.append((key, _label_value(v, f"metadata.labels[{key}]")))
    spec = _map(obj.get("spec"), "spec")
    cidrs_raw = _list(spec.get("podCIDRs"), "spec.podCIDRs")
    if cidrs_raw:
        cidrs = tuple(_each(cidrs_raw, "spec.podCIDRs", _cidr))
    elif spec.get("podCIDR"):
        cidrs = (_cidr(spec.get("podCIDR"), "spec.podCIDR"),)
    else:
        cidrs = ()
    status = _map(obj.get("status"), "status")
    addresses: list[str] = []
    external: list[str] = []
    for i, a_raw in enumerate(_list(status.get("addresses"), "status.addresses")):
        a = _map(a_raw, f"status.addresses[{i}]")
        kind = a.get("type")
        if kind in ("InternalIP", "ExternalIP"):
            ip = _ip(a.get("address"), f"status.addresses[{i}].address")
            (addresses if kind == "InternalIP" else external).append(ip)
    # InternalIPs first, as kube-proxy picks the node's primary IPs (GetNodeHostIPs).
    addresses = list(dict.fromkeys(addresses + external))
    return Node(
        name=name,
        labels=tuple(sorted(labels)),
        pod_cidrs=cidrs,
        addresses=tuple(addresses),
        deleting=meta.get("deletionTimestamp") is not None or _to_be_deleted(spec),
    )


def _to_be_deleted(spec: Mapping[str, object]) -> bool:
    """The cluster autoscaler's taint on a node it is about to remove (kube-proxy's ToBeDeletedTaint)."""
    taints = spec.get("taints")
    return isinstance(taints, list) and any(
        isinstance(t, Mapping) and t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints
    )


# ------------------------------------------------------------ dispatch

_Reader = Callable[[RawObject, RawMeta], tuple[KObject, ...]]


def _one(fn: Callable[[RawObject, RawMeta], KObject | None]) -> _Reader:
    def read(obj: RawObject, meta: RawMeta) -> tuple[KObject, ...]:
        got = fn(obj, meta)
        return () if got is None else (got,)

    return read


# kind -> (accepted apiVersions, namespaced, reader)
_KINDS: Final[dict[str, tuple[tuple[str, ...], bool, _Reader]]] = {
    "Service": (("v1",), True, _one(_service)),
    "EndpointSlice": (("discovery.k8s.io/v1",), True, _one(_endpoint_slice)),
    "Endpoints": (("v1",), True, _endpoints),
    "Node": (("v1",), False, _one(_node)),
}


def parse_object_all(
    obj: Mapping[str, object],
    source: str = "",
    *,
    kind: str = "",
    warnings: list[ObjectError] | None = None,
) -> tuple[KObject, ...]:
    """Every kproxy object one API object yields (0 when ignored, several for a legacy Endpoints).

    `kind` supplies the kind for items of a typed list (ServiceList items carry none).
    Raises ObjectError, and only ObjectError, for an unusable object. A field ignored while the
    object is kept (an implausible kproxy annotation, a special address) is appended to
    `warnings`, naming the object and the field.
    """
    if not isinstance(obj, Mapping):
        raise ObjectError(
            ObjectRef("Object", "", "<unnamed>"), "", f"must be an object, not {_tname(obj)}", source
        )
    raw_kind = obj.get("kind")
    k = raw_kind if type(raw_kind) is str and raw_kind else kind
    entry = _KINDS.get(k)
    if entry is None:
        return ()
    versions, namespaced, reader = entry
    meta = obj.get("metadata")
    try:
        api_version = obj.get("apiVersion")
        if api_version is not None and api_version not in versions:
            _fail(
                "apiVersion", f"{_show(api_version)} is not supported for {k} (want {' or '.join(versions)})"
            )
        if not isinstance(meta, Mapping):
            _fail("metadata", "is required and must be an object")
        # Checked to be mappings; RawObject/RawMeta name the fields read, each checked as it is.
        raw, raw_meta = cast(RawObject, obj), cast(RawMeta, meta)
        if warnings is None:
            return reader(raw, raw_meta)
        notes: list[tuple[str, str]] = []
        _notes.found = notes
        try:
            got = reader(raw, raw_meta)
        finally:
            _notes.found = None
        if notes:
            ref = _identity(k, meta, namespaced)
            warnings.extend(ObjectError(ref, field, reason, source) for field, reason in notes)
        return got
    except _Invalid as e:
        raise ObjectError(_identity(k, meta, namespaced), e.field, e.reason, source) from None
    except RecursionError:
        raise ObjectError(_identity(k, meta, namespaced), "", "nested too deeply", source) from None
    except Exception as e:  # the boundary promise: a bug here must not take the caller down
        reason = f"internal error while parsing: {type(e).__name__}"
        raise ObjectError(_identity(k, meta, namespaced), "", reason, source) from e


def parse_object(obj: Mapping[str, object], source: str = "") -> KObject | None:
    """The single kproxy object an API object yields, or None when kproxy ignores it.

    A v1 Endpoints that needs several slices (more than one port set or address family)
    raises ObjectError here; read those with `parse_object_all`.
    """
    got = parse_object_all(obj, source)
    if not got:
        return None
    if len(got) > 1:
        ref = _identity("Endpoints", obj.get("metadata"), True)
        raise ObjectError(ref, "subsets", f"yields {len(got)} slices; read it with parse_object_all", source)
    return got[0]


# ------------------------------------------------------------ batches and streams


def parse_many(
    objs: Iterable[object],
    source: str = "",
    *,
    kind: str = "",
    warnings: list[ObjectError] | None = None,
) -> tuple[list[KObject], list[ObjectError]]:
    """Every object of a batch (a relist, a typed list's items): errors collected, never raised.

    `kind` is the item kind for a typed list whose items carry none (ServiceList items).
    """
    out: list[KObject] = []
    errors: list[ObjectError] = []
    with gc_paused():
        for item in objs:
            _collect_one(item, source, kind, "", out, errors, warnings)
    return out, errors


_DOC_MARK: Final = re.compile(r"^---(?=[ \t\r]|$)", re.M)
_LEADING: Final = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\r?\n)*")
_DIRECTIVES_ONLY: Final = re.compile(r"(?:[ \t]*(?:[#%][^\n]*)?\r?\n?)*")
_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _documents(text: str) -> Iterator[tuple[int, int, str]]:
    """(marker line, first content line, text) per YAML document.

    Split before parsing, so one bad document spoils only itself. The content line skips
    leading comments, so an error points at the object rather than at the `---` above it.
    """
    starts = [0]
    starts.extend(m.start() + 3 for m in _DOC_MARK.finditer(text))
    starts.append(len(text) + 3)
    line, counted = 1, 0
    directives, directives_line = "", 0
    for a, b in itertools.pairwise(starts):
        line += text.count("\n", counted, a)
        counted = a
        chunk = text[a : b - 3]
        if not chunk.strip():
            continue
        if _DIRECTIVES_ONLY.fullmatch(chunk):
            directives, directives_line = chunk + "---", line  # `%YAML 1.2` belongs to the next document
            continue
        lead = _LEADING.match(chunk)
        first = line + (chunk.count("\n", 0, lead.end()) if lead else 0)
        if directives:
            yield directives_line, first, directives + chunk
            directives = ""
        else:
            yield line, first, chunk


_deep_lock = threading.Lock()
_deep_users = 0
_saved_limit = 0


class _DeepRecursion:
    """Room for JSON nested MAX_JSON_DEPTH deep: Python's json decoder recurses once per level.

    The limit is process-wide, so it is raised by the first parse that needs it and put back
    by the last one; parsing runs in worker threads, whose C stacks hold that depth easily.
    """

    def __enter__(self) -> None:
        global _deep_users, _saved_limit
        with _deep_lock:
            if _deep_users == 0:
                _saved_limit = sys.getrecursionlimit()
                sys.setrecursionlimit(_saved_limit + MAX_JSON_DEPTH + 100)
            _deep_users += 1

    def __exit__(self, *_: object) -> None:
        global _deep_users
        with _deep_lock:
            _deep_users -= 1
            if _deep_users == 0:
                sys.setrecursionlimit(_saved_limit)


def _json_int(text: str) -> int | float:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else _huge(text)


_JSON: Final = json.JSONDecoder(parse_int=_json_int)


def _json_depth(text: str, limit: int) -> bool:
    """True when brackets nest deeper than `limit` outside strings (checked only after a failure)."""
    depth = 0
    in_str = esc = False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


class _JsonFailure(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(line, reason)
        self.line = line
        self.reason = reason


def _json_values_strict(text: str) -> list[Any]:
    """Concatenated JSON values (`kubectl get -o json`, `-w` output); _JsonFailure says where and why not."""
    out: list[Any] = []
    i, n = 0, len(text)
    with _DeepRecursion():
        while True:
            while i < n and text[i] in " \t\r\n\ufeff":
                i += 1
            if i >= n:
                return out
            try:
                val, i = _JSON.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise _JsonFailure(e.lineno, f"{e.msg} (line {e.lineno}, column {e.colno})") from None
            except RecursionError:
                line = text.count("\n", 0, i) + 1
                raise _JsonFailure(line, f"nested more than {MAX_JSON_DEPTH} levels deep") from None
            except ValueError as e:
                line = text.count("\n", 0, i) + 1
                raise _JsonFailure(line, str(e).split(";")[0]) from None
            out.append(val)


def _json_values(text: str) -> list[Any] | None:
    """JSON values, or None if this is not JSON (then the text is read as YAML, JSON's superset)."""
    try:
        return _json_values_strict(text)
    except _JsonFailure:
        return None


class _Loader(_LOADER):  # type: ignore[misc]
    """The YAML loader, with integers too long to be a port or a count read as out of range."""


def _yaml_int(loader: Any, node: Any) -> int | float:
    value = loader.construct_scalar(node)
    digits = value.replace("_", "").lstrip("+-")
    if len(digits) > MAX_NUMBER_DIGITS:
        return _huge(value)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _yaml_int)


def _yaml_error(source: str, line: int, index: int, e: Exception) -> ObjectError:
    mark = getattr(e, "problem_mark", None)
    at = line
    if mark is not None and isinstance(getattr(mark, "line", None), int):
        at = line + mark.line
    problem = getattr(e, "problem", None) or (
        "nested too deeply" if isinstance(e, RecursionError) else type(e).__name__
    )
    where = f"{source}:{at}" if source else f"line {at}"
    return ObjectError(ObjectRef("Document", "", str(index)), "", f"YAML: {problem}", where)


def is_document_error(e: ObjectError) -> bool:
    """An error of the text itself (syntax, a document that is no object), not of one object in it."""
    return e.ref.kind == "Document"


def parse_stream(
    text: str, source: str, *, fmt: str = "", warnings: list[ObjectError] | None = None
) -> tuple[list[KObject], list[ObjectError]]:
    """Every object in a YAML or JSON text (multi-document, `kind: List`, typed lists).

    `fmt` is "json" for a `.json` file: when it opens as JSON does it is read by the JSON
    parser alone and its errors say JSON (a YAML text in a .json file is read as the YAML it
    is, as kubectl would). "yaml" is YAML only, "" tells by the first character.
    Errors are collected, never raised: one bad object or document does not hide the rest.
    Each object's source is `source:LINE` (the line its document starts on); items of a
    list get `items[N].` before the field. Ignored fields of kept objects go to `warnings`.
    """
    with gc_paused():
        return _parse_stream(text, source, fmt, warnings)


def _parse_stream(
    text: str, source: str, fmt: str, warnings: list[ObjectError] | None
) -> tuple[list[KObject], list[ObjectError]]:
    objs: list[KObject] = []
    errors: list[ObjectError] = []
    values: list[Any] | None
    head = text.lstrip(" \t\r\n\ufeff")[:1]
    if fmt == "json" and head in ("{", "["):
        try:
            values = _json_values_strict(text)
        except _JsonFailure as e:
            where = f"{source}:{e.line}" if source else f"line {e.line}"
            errors.append(ObjectError(ObjectRef("Document", "", "0"), "", f"JSON: {e.reason}", where))
            return objs, errors
    else:
        values = _json_values(text) if fmt != "yaml" and head in ("{", "[") else None
    if values is not None:
        where = f"{source}:1" if source else "line 1"
        for index, v in enumerate(values):
            _collect(v, where, index, objs, errors, warnings)
        return objs, errors
    for index, (line, first, chunk) in enumerate(_documents(text)):
        where = f"{source}:{first}" if source else f"line {first}"
        try:
            docs = list(yaml.load_all(chunk, Loader=_Loader))
        except (yaml.YAMLError, RecursionError, ValueError, TypeError) as e:
            errors.append(_yaml_error(source, line, index, e))
            continue
        for doc in docs:
            _collect(doc, where, index, objs, errors, warnings)
    return objs, errors


def _collect(
    doc: object,
    where: str,
    index: int,
    objs: list[KObject],
    errors: list[ObjectError],
    warnings: list[ObjectError] | None = None,
) -> None:
    if doc is None:
        return
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            _collect_one(item, where, "", f"[{i}].", objs, errors, warnings)
        return
    if not isinstance(doc, Mapping):
        errors.append(
            ObjectError(
                ObjectRef("Document", "", str(index)), "", f"is a {_tname(doc)}, not an object", where
            )
        )
        return
    kind = doc.get("kind")
    if type(kind) is str and kind.endswith("List") and "items" in doc:
        item_kind = kind[: -len("List")]
        items = doc.get("items")
        if not isinstance(items, list):
            errors.append(
                ObjectError(
                    ObjectRef(kind, "", str(index)), "items", f"must be a list, not {_tname(items)}", where
                )
            )
            return
        for i, item in enumerate(items):
            _collect_one(item, where, item_kind, f"items[{i}].", objs, errors, warnings)
        return
    _collect_one(doc, where, "", "", objs, errors, warnings)


def _prefixed(e: ObjectError, prefix: str) -> ObjectError:
    if not prefix:
        return e
    return ObjectError(e.ref, f"{prefix}{e.field}" if e.field else prefix.rstrip("."), e.reason, e.source)


def _collect_one(
    item: object,
    where: str,
    kind: str,
    prefix: str,
    objs: list[KObject],
    errors: list[ObjectError],
    warnings: list[ObjectError] | None = None,
) -> None:
    notes: list[ObjectError] | None = None if warnings is None else []
    try:
        objs.extend(parse_object_all(item, where, kind=kind, warnings=notes))  # type: ignore[arg-type]
    except ObjectError as e:
        errors.append(_prefixed(e, prefix))
    if notes and warnings is not None:
        warnings.extend(_prefixed(w, prefix) for w in notes)
