"""What shapes the rules, as one frozen value.

`RenderConfig` is everything besides services and endpoints that changes the rules.
A change to it invalidates every cached render, which is exactly right: it only
changes on restart or when the Node object changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.state.model import Family


@dataclass(frozen=True, slots=True)
class RenderConfig:
    family: Family
    node_name: str
    node_zone: str = ""
    cluster_cidr: tuple[str, ...] = ()
    """CIDRs of this family that pods live in; traffic from outside them is masqueraded."""
    node_pod_cidrs: tuple[str, ...] = ()
    """Used instead of cluster_cidr when detect_local_mode is NodeCIDR."""
    detect_local_mode: str = "ClusterCIDR"
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_ips: tuple[str, ...] | None = None
    """Node IPs of this family that accept node ports; None means every local address."""
    comments: bool = True

    @property
    def masq_mark(self) -> str:
        return hex(1 << self.masquerade_bit)

    @property
    def local_cidrs(self) -> tuple[str, ...]:
        """Source CIDRs that count as pod traffic; empty means the detector is off."""
        if self.detect_local_mode == "NodeCIDR":
            return self.node_pod_cidrs
        return self.cluster_cidr
