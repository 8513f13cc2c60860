"""Synthetic service-port views for sync tests: built from model objects directly, no parsing."""

from __future__ import annotations

from kproxy.state.model import Endpoint, ServicePort, ServicePortName

PortEntry = tuple[ServicePort, tuple[Endpoint, ...]]
View = dict[ServicePortName, PortEntry]


def port_name(i: int) -> ServicePortName:
    return ServicePortName("bench", f"svc-{i}", "http", "TCP")


def endpoints(i: int, count: int, first: int = 0) -> tuple[Endpoint, ...]:
    """Endpoints of service i: unique pod IPs, sorted by hostport as the view requires."""
    eps = [
        Endpoint(f"10.{100 + i // 16000}.{(i // 64) % 250}.{(i % 64) * 4 + 1}", 8080 + j)
        for j in range(first, first + count)
    ]
    return tuple(sorted(eps, key=lambda e: e.hostport))


def service(i: int, count: int, *, node_port: bool = False) -> PortEntry:
    sp = ServicePort(
        port_name(i),
        4,
        f"10.96.{i // 250}.{i % 250 + 1}",
        80,
        node_port=30000 + i % 2000 if node_port else 0,
    )
    return sp, endpoints(i, count)


def cluster(services: int, eps: int, *, node_ports: bool = False) -> View:
    return {port_name(i): service(i, eps, node_port=node_ports and i % 4 == 0) for i in range(services)}


def with_endpoints(entry: PortEntry, count: int, first: int = 0) -> PortEntry:
    sp, _ = entry
    idx = int(sp.name.name.rsplit("-", 1)[1])
    return sp, endpoints(idx, count, first)


def cluster6(services: int, eps: int) -> View:
    """The same shape in IPv6."""
    out: View = {}
    for i in range(services):
        sp = ServicePort(port_name(i), 6, f"fd00:96::{i + 1:x}", 80, node_port=30000 + i if i % 2 else 0)
        ends = [Endpoint(f"fd00:244::{i:x}:{j + 1:x}", 8080) for j in range(eps)]
        out[sp.name] = (sp, tuple(sorted(ends, key=lambda e: e.hostport)))
    return out
