"""Model objects in one line each, for tests of the tracker and the agent."""

from __future__ import annotations

from kproxy.state.model import EndpointSlice, Service, ServicePortSpec, SliceEndpoint, SlicePort


def svc(name: str = "web", ip: str = "10.96.0.10", port: int = 80, rv: str = "1") -> Service:
    return Service(
        namespace="default",
        name=name,
        type="ClusterIP",
        cluster_ips=(ip,),
        ports=(ServicePortSpec(name="http", protocol="TCP", port=port, target_port=8080),),
        resource_version=rv,
    )


def eps(
    service: str = "web", ips: tuple[str, ...] = ("10.244.0.5",), name: str = "", rv: str = "1"
) -> EndpointSlice:
    return EndpointSlice(
        namespace="default",
        name=name or f"{service}-abc",
        service_name=service,
        address_type="IPv4",
        ports=(SlicePort(name="http", protocol="TCP", port=8080),),
        endpoints=tuple(SliceEndpoint(address=ip, node_name="node-a") for ip in ips),
        resource_version=rv,
    )
