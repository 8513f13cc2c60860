"""From-scratch answers that `kproxy.health.ServiceHealthIndex` must always equal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kproxy.state.model import Endpoint, ServiceKey, ServicePort


def health_check_ports(ports: Iterable[tuple[ServicePort, Sequence[Endpoint]]]) -> dict[ServiceKey, int]:
    """Services that want a health-check node port: LoadBalancer with externalTrafficPolicy Local."""
    return {
        sp.name.service: sp.health_check_node_port
        for sp, _ in ports
        if sp.health_check_node_port and sp.external_local
    }


def local_ready_endpoints(ports: Iterable[tuple[ServicePort, Sequence[Endpoint]]]) -> dict[ServiceKey, int]:
    """Distinct local ready endpoint IPs per service, as kube-proxy counts them.

    Ready, not merely serving: a node whose only local endpoints are terminating
    should fail its check so load balancers drain it. One pod exposing two ports
    counts once.
    """
    ips: dict[ServiceKey, set[str]] = {}
    for sp, endpoints in ports:
        for ep in endpoints:
            if ep.is_local and ep.ready:
                ips.setdefault(sp.name.service, set()).add(ep.ip)
    return {k: len(v) for k, v in ips.items()}
