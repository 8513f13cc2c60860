"""What shapes the rules, as one frozen value.

`RenderConfig` is everything besides services and endpoints that changes the rules.
A change to it invalidates every cached render, which is exactly right: it only
changes on restart or when the Node object changes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from kproxy.state.model import Family, in_family


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
    """ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix (kube-proxy's four)."""
    bridge_interface: str = ""
    """With BridgeInterface: traffic arriving on this interface is pod traffic."""
    interface_name_prefix: str = ""
    """With InterfaceNamePrefix: traffic arriving on interfaces named so is pod traffic."""
    localhost_nodeports: bool = False
    """IPv4 node ports also answer on 127.0.0.1 (kube-proxy's localhostNodePorts)."""
    random_fully: bool = True
    """The iptables binary supports MASQUERADE --random-fully."""
    drop_invalid: bool = True
    """Write the ctstate INVALID drop; off when nf_conntrack_tcp_be_liberal is set."""
    nfacct: bool = False
    """The kernel holds kube-proxy's nfacct counters (ct_state_invalid_dropped_pkts,
    localhost_nps_accepted_pkts), so rules count into them as kube-proxy's do. kproxy does
    not create the counters: only a caller that knows they exist sets this."""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_ips: tuple[str, ...] | None = None
    """Node IPs of this family that accept node ports; None means every local address."""
    comments: bool = True
    node_ip: str = ""
    """This node's primary IP of this family: when a load balancer's source ranges admit it,
    the node may also reach the LB IP (kube-proxy's allowFromNode)."""

    @property
    def masq_mark(self) -> str:
        return hex(1 << self.masquerade_bit)

    @property
    def local_cidrs(self) -> tuple[str, ...]:
        """Source CIDRs that count as pod traffic; empty means the detector is off."""
        if self.detect_local_mode == "NodeCIDR":
            return self.node_pod_cidrs
        if self.detect_local_mode in ("ClusterCIDR", ""):
            return self.cluster_cidr
        return ()

    @property
    def local_match(self) -> tuple[str, str]:
        """kube-proxy's local-traffic detector as (IfLocal, IfNotLocal) match arguments;
        ("", "") when it is off. A CIDR detector takes one CIDR per family; the interface
        detectors match the input interface (`+` is iptables' name-prefix wildcard)."""
        mode = self.detect_local_mode
        if mode == "BridgeInterface":
            iface = self.bridge_interface
        elif mode == "InterfaceNamePrefix":
            iface = self.interface_name_prefix + "+" if self.interface_name_prefix else ""
        else:
            cidr = next((c for c in self.local_cidrs if in_family(c, self.family)), "")
            return (f"-s {cidr}", f"! -s {cidr}") if cidr else ("", "")
        return (f"-i {iface}", f"! -i {iface}") if iface else ("", "")


_LOCALHOST = ipaddress.IPv4Address("127.0.0.1")
LARGE_CLUSTER_ENDPOINTS = 1000
"""Above this many endpoints in one family, kube-proxy drops the comments from endpoint
(KUBE-SEP) rules and from service-to-endpoint jumps: its large-cluster mode."""


def localhost_in_effect(localhost_nodeports: bool, nodeport_addresses: tuple[str, ...]) -> bool:
    """Whether IPv4 node ports answer on loopback: kube-proxy turns localhostNodePorts off
    when nodePortAddresses (its IPv4 part) leaves 127.0.0.1 out; none given means all."""
    if not localhost_nodeports:
        return False
    if nodeport_addresses == ("primary",):
        return False  # the node IP's /32 (before the Node is known, kproxy does not guess)
    v4 = [ipaddress.ip_network(c, strict=False) for c in _in_family(nodeport_addresses, 4)]
    return not v4 or any(n.version == 4 and (n.network_address.is_loopback or _LOCALHOST in n) for n in v4)


def sized(cfg: RenderConfig, endpoints: int) -> RenderConfig:
    """`cfg` with comments as kube-proxy's large-cluster mode has them for this many
    endpoints. The same object while the mode holds, so crossing the threshold is the only
    thing that changes the config (and makes the next sync full)."""
    comments = endpoints <= LARGE_CLUSTER_ENDPOINTS
    return cfg if cfg.comments == comments else replace(cfg, comments=comments)


def _in_family(cidrs: tuple[str, ...], family: Family) -> tuple[str, ...]:
    return tuple(c for c in cidrs if in_family(c, family))


def render_config(
    family: Family,
    node_name: str,
    *,
    node_zone: str = "",
    node_pod_cidrs: tuple[str, ...] = (),
    cluster_cidr: tuple[str, ...] = (),
    detect_local_mode: str = "ClusterCIDR",
    masquerade_all: bool = False,
    masquerade_bit: int = 14,
    nodeport_addresses: tuple[str, ...] = (),
    node_ips: tuple[str, ...] = (),
    comments: bool = True,
    bridge_interface: str = "",
    interface_name_prefix: str = "",
    localhost_nodeports: bool = False,
    random_fully: bool = True,
    drop_invalid: bool = True,
    primary_ips: tuple[str, ...] = (),
    nfacct: bool = False,
) -> RenderConfig:
    """One family's RenderConfig from family-mixed settings.

    `node_ips` are the node's addresses (from the Node object offline, from netlink on
    a node); with `nodeport_addresses` set, only those inside the CIDRs take node ports.
    `primary_ips` are the Node object's addresses, InternalIPs first: the first of this
    family is the node IP, and `nodeport_addresses` ("primary",) means that IP alone, as
    kube-proxy turns `primary` into the primary node IPs' /32 and /128 at start.
    Localhost node ports (IPv4 only) stay on only while the node-port CIDRs take in
    127.0.0.1, as kube-proxy turns them off otherwise."""
    v6 = family == 6
    primary = [ip for ip in primary_ips if in_family(ip, family)]
    mine = primary or [ip for ip in node_ips if in_family(ip, family)]
    if nodeport_addresses == ("primary",):
        # no primary IP of this family (kube-proxy then holds loopback): every local address
        nodeport_addresses = tuple(
            f"{ip}/{128 if v6 else 32}" for ip in primary[:1] if not ipaddress.ip_address(ip).is_loopback
        )
    nodeport_ips: tuple[str, ...] | None = None
    wanted = _in_family(nodeport_addresses, family)
    if wanted:
        nets = [ipaddress.ip_network(c, strict=False) for c in wanted]
        nodeport_ips = tuple(
            ip
            for ip in node_ips
            if in_family(ip, family) and any(ipaddress.ip_address(ip) in n for n in nets)
        )
        localhost_nodeports = localhost_in_effect(localhost_nodeports, nodeport_addresses)
        if localhost_nodeports and not v6 and "127.0.0.1" not in nodeport_ips:
            # node_ips leave loopback out; kube-proxy finds 127.0.0.1 on lo
            nodeport_ips = ("127.0.0.1", *nodeport_ips)
    return RenderConfig(
        family=family,
        node_ip=mine[0] if mine else "",
        node_name=node_name,
        node_zone=node_zone,
        cluster_cidr=_in_family(cluster_cidr, family),
        node_pod_cidrs=_in_family(node_pod_cidrs, family),
        detect_local_mode=detect_local_mode,
        masquerade_all=masquerade_all,
        masquerade_bit=masquerade_bit,
        nodeport_ips=nodeport_ips,
        comments=comments,
        bridge_interface=bridge_interface,
        interface_name_prefix=interface_name_prefix,
        localhost_nodeports=localhost_nodeports and family == 4,
        random_fully=random_fully,
        drop_invalid=drop_invalid,
        nfacct=nfacct,
    )
