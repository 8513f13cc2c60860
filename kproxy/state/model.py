"""The pure data every backend works from.

Two layers live here. The *object* layer (`Service`, `EndpointSlice`, `Node`) mirrors
what the API holds, family-agnostic, already validated. The *per-family* layer
(`ServicePort`, `Endpoint`) is what a renderer or forwarder consumes: one address
family, one port, nothing left to interpret. Everything is frozen and hashable so a
backend can cache on equality and a change tracker can drop no-op updates cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal

L4Protocol = Literal["TCP", "UDP", "SCTP"]
Family = Literal[4, 6]
AddressType = Literal["IPv4", "IPv6", "FQDN"]
FAMILIES: tuple[Family, ...] = (4, 6)


def in_family(address: str, family: Family) -> bool:
    """Whether an address or CIDR (normalised by the parser or settings) is of `family`."""
    return (":" in address) == (family == 6)


@dataclass(frozen=True, slots=True, order=True)
class ObjectRef:
    """`kind namespace/name`, the identity every error and log line carries."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """kube-proxy's ServicePortName; its `str` feeds the chain-name hash, so keep it exact."""

    namespace: str
    name: str
    port_name: str
    protocol: L4Protocol

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    def __str__(self) -> str:
        if self.port_name:
            return f"{self.namespace}/{self.name}:{self.port_name}"
        return f"{self.namespace}/{self.name}"


port_order = attrgetter("namespace", "name", "port_name", "protocol")
"""Sort key giving ServicePortName's own order: the dataclass's `<` is Python code, this key
is C, and sorting 10,000 names by it is several times faster."""


# ---------------------------------------------------------------- object layer


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    name: str
    protocol: L4Protocol
    port: int
    node_port: int = 0
    target_port: int | str = 0


@dataclass(frozen=True, slots=True)
class Service:
    """A v1 Service that kproxy proxies (headless and ExternalName never get this far)."""

    namespace: str
    name: str
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"]
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePortSpec, ...]
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    """Seconds of ClientIP affinity; 0 means affinity None."""
    external_local: bool = False
    internal_local: bool = False
    health_check_node_port: int = 0
    lb_algorithm: str = ""
    """From annotation `kproxy.io/lb-algorithm` (userspace mode): "" or round-robin, least-connections, random."""
    resource_version: str = field(default="", compare=False)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    """Only the first address of an endpoint counts, as in kube-proxy."""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    """`hints.forNodes`: the nodes this endpoint is meant for (trafficDistribution PreferSameNode)."""


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: L4Protocol
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice, or one converted from a legacy v1 Endpoints."""

    namespace: str
    name: str
    service_name: str
    address_type: AddressType
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    trigger_time: float | None = field(default=None, compare=False)
    """`endpoints.kubernetes.io/last-change-trigger-time` as a Unix time, for latency metrics."""
    resource_version: str = field(default="", compare=False)
    legacy: bool = False
    """Converted from a v1 Endpoints; used for a service only when it has no real slices."""

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    """InternalIP and ExternalIP addresses, used to resolve --nodeport-addresses offline."""
    deleting: bool = False

    @property
    def zone(self) -> str:
        for k, v in self.labels:
            if k == "topology.kubernetes.io/zone":
                return v
        return ""


KObject = Service | EndpointSlice | Node
"""Any object a source delivers."""


# ----------------------------------------------------------- per-family layer


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service in one address family: what a rule writer needs, no more."""

    name: ServicePortName
    family: Family
    cluster_ip: str
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    external_local: bool = False
    internal_local: bool = False
    health_check_node_port: int = 0
    lb_algorithm: str = ""
    """Userspace mode's endpoint choice, copied from `Service.lb_algorithm`; "" means round robin."""

    @property
    def protocol(self) -> L4Protocol:
        return self.name.protocol

    @property
    def has_external(self) -> bool:
        """True when anything but the cluster IP reaches this port (node port, external or LB IPs)."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of one service port. Lists of them are sorted by `hostport`, as kube-proxy sorts by "ip:port"."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False
    zone: str = ""
    zone_hints: frozenset[str] = frozenset()
    node_name: str = ""
    node_hints: frozenset[str] = frozenset()

    @property
    def hostport(self) -> str:
        """`ip:port` with IPv6 in brackets, as Go's net.JoinHostPort writes it (it feeds chain names)."""
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


PortEntry = tuple[ServicePort, tuple[Endpoint, ...]]
"""One service port of one family, and every endpoint it has (rules decide which to use)."""
View = Mapping[ServicePortName, PortEntry]
"""One family's service ports: what the tracker keeps current and every backend syncs from."""
