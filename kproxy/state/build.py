"""From parsed objects to what a backend consumes: one family, one service port, its endpoints.

Pure functions, no I/O. The merge rules follow kube-proxy's EndpointSliceCache: group by
(port name, protocol), only the first address of an endpoint, other-family slices
skipped, duplicates of one ip:port resolved so that a terminating copy never replaces
a live one, endpoints sorted by their "ip:port" text (which is what makes chain order
and the statistic probabilities deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from kproxy.infra.gcpause import gc_paused
from kproxy.state.model import (
    Endpoint,
    EndpointSlice,
    Family,
    Node,
    PortEntry,
    Service,
    ServiceKey,
    ServicePort,
    ServicePortName,
    View,
    in_family,
)

_ADDRESS_TYPE: dict[int, str] = {4: "IPv4", 6: "IPv6"}


def service_ports(svc: Service, family: Family) -> tuple[ServicePort, ...]:
    """The service's ports in one family; none when it has no cluster IP of that family."""
    cluster_ip = next((ip for ip in svc.cluster_ips if in_family(ip, family)), None)
    if cluster_ip is None:
        return ()
    external = tuple(ip for ip in svc.external_ips if in_family(ip, family))
    lb = tuple(ip for ip in svc.load_balancer_ips if in_family(ip, family))
    ranges = tuple(c for c in svc.load_balancer_source_ranges if in_family(c, family))
    return tuple(
        ServicePort(
            name=ServicePortName(svc.namespace, svc.name, p.name, p.protocol),
            family=family,
            cluster_ip=cluster_ip,
            port=p.port,
            node_port=p.node_port,
            external_ips=external,
            load_balancer_ips=lb,
            load_balancer_source_ranges=ranges,
            affinity_timeout=svc.affinity_timeout,
            external_local=svc.external_local,
            internal_local=svc.internal_local,
            health_check_node_port=svc.health_check_node_port,
            lb_algorithm=svc.lb_algorithm,
        )
        for p in svc.ports
    )


def effective_slices(slices: Iterable[EndpointSlice]) -> list[EndpointSlice]:
    """The slices that count, in a fixed order: legacy ones only when no real slice exists.

    Sorting by name makes the duplicate rule deterministic where kube-proxy's map order is not.
    """
    all_slices = list(slices)
    if any(not s.legacy for s in all_slices):
        all_slices = [s for s in all_slices if not s.legacy]
    all_slices.sort(key=lambda s: s.name)
    return all_slices


def merge_endpoints(
    slices: Iterable[EndpointSlice], node_name: str, family: Family
) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """Endpoints per service port name for the slices of ONE service, in one family.

    Only ports with at least one endpoint appear, as in kube-proxy's endpoints map.
    """
    address_type = _ADDRESS_TYPE[family]
    v6 = family == 6
    by_port: dict[ServicePortName, dict[str, Endpoint]] = {}
    for s in effective_slices(slices):
        if s.address_type != address_type or not s.endpoints:
            continue
        eps = s.endpoints
        for p in s.ports:
            spn = ServicePortName(s.namespace, s.service_name, p.name, p.protocol)
            bucket = by_port.get(spn)
            if bucket is None:
                bucket = by_port[spn] = {}
            port = p.port
            for e in eps:
                ip = e.address
                hp = (
                    f"[{ip}]:{port}" if v6 else f"{ip}:{port}"
                )  # Endpoint.hostport, without building it first
                # Same ip:port twice (a pod IP reused before the old pod is gone, or an
                # endpoint moving between slices): a live copy wins over a terminating one.
                if e.terminating and hp in bucket:
                    continue
                local = e.node_name == node_name and bool(node_name)
                bucket[hp] = Endpoint(
                    ip,
                    port,
                    e.ready,
                    e.serving,
                    e.terminating,
                    local,
                    e.zone,
                    e.zone_hints,
                    e.node_name,
                    e.node_hints,
                )
    return {spn: tuple(bucket[hp] for hp in sorted(bucket)) for spn, bucket in by_port.items() if bucket}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every object kproxy knows at one moment. The mappings are read-only views; do not mutate them."""

    services: Mapping[ServiceKey, Service]
    slices: Mapping[ServiceKey, tuple[EndpointSlice, ...]]
    """Per service, sorted by (legacy, name); legacy slices included (merge decides)."""
    node: Node | None = None

    @classmethod
    def from_objects(cls, objs: Iterable[Service | EndpointSlice | Node], node_name: str = "") -> Snapshot:
        """Later objects replace earlier ones with the same identity; only the Node named node_name is kept."""
        services: dict[ServiceKey, Service] = {}
        slices: dict[tuple[str, bool, str], EndpointSlice] = {}
        node: Node | None = None
        for o in objs:
            if isinstance(o, Service):
                services[o.key] = o
            elif isinstance(o, EndpointSlice):
                slices[(o.namespace, o.legacy, o.name)] = o
            elif isinstance(o, Node) and node_name and o.name == node_name:
                node = o
        grouped: dict[ServiceKey, list[EndpointSlice]] = {}
        for s in slices.values():
            grouped.setdefault(s.service, []).append(s)
        return cls(
            services=MappingProxyType(services),
            slices=MappingProxyType(
                {k: tuple(sorted(v, key=lambda s: (s.legacy, s.name))) for k, v in sorted(grouped.items())}
            ),
            node=node,
        )


def view(snapshot: Snapshot, node_name: str, family: Family) -> View:
    """Every service port of one family with its endpoints (empty when none), sorted by ServicePortName."""
    out: dict[ServicePortName, PortEntry] = {}
    with gc_paused():  # a full view is one batch of many small acyclic objects
        for key in sorted(snapshot.services):
            ports = service_ports(snapshot.services[key], family)
            if not ports:
                continue
            eps = merge_endpoints(snapshot.slices.get(key, ()), node_name, family)
            for sp in ports:
                out[sp.name] = (sp, eps.get(sp.name, ()))
    return dict(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class Exclusion:
    """One endpoint a service port does not use in a family, and why (for `dry-run --explain`)."""

    port_name: ServicePortName
    endpoint: Endpoint
    reason: str


def excluded_endpoints(
    snapshot: Snapshot, key: ServiceKey, node_name: str, family: Family
) -> tuple[Exclusion, ...]:
    """Endpoints of the service left out of `view` for this family.

    Reasons: the endpoint is of the other family (or the service has no cluster IP in
    this family), its port matches no service port, or it sits in a legacy Endpoints
    that real EndpointSlices override.
    """
    slices = snapshot.slices.get(key, ())
    svc = snapshot.services.get(key)
    wanted = {sp.name for sp in service_ports(svc, family)} if svc is not None else set()
    other: Family = 6 if family == 4 else 4
    out: list[Exclusion] = []
    for spn, eps in sorted(merge_endpoints(slices, node_name, other).items()):
        out.extend(Exclusion(spn, e, f"IPv{other} endpoint, not used for IPv{family}") for e in eps)
    for spn, eps in sorted(merge_endpoints(slices, node_name, family).items()):
        if spn not in wanted:
            why = (
                "no service port of that name and protocol"
                if wanted
                else f"service has no IPv{family} cluster IP"
            )
            out.extend(Exclusion(spn, e, why) for e in eps)
    if any(not s.legacy for s in slices):
        legacy = [s for s in slices if s.legacy]
        for spn, eps in sorted(merge_endpoints(legacy, node_name, family).items()):
            out.extend(Exclusion(spn, e, "from legacy Endpoints, overridden by EndpointSlices") for e in eps)
    return tuple(out)
