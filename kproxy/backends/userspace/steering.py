"""NAT rules that steer service traffic into the userspace listeners (the portal scheme).

Four nat chains, named as kube-proxy's userspace mode named them:

- KUBE-PORTALS-CONTAINER (jumped to first from PREROUTING): traffic arriving from pods or
  other hosts for a cluster, external or load-balancer IP.
- KUBE-PORTALS-HOST (jumped to first from OUTPUT): the same, for traffic the node itself sends.
- KUBE-NODEPORT-CONTAINER / KUBE-NODEPORT-HOST (jumped to last, only for local destination
  addresses): node ports.

From PREROUTING a listener bound to a wildcard address is reached with REDIRECT (the
packet goes to the address of the interface it came in on, which the listener covers,
and replies match the conntrack entry); a listener bound to one address is reached with
DNAT to it. From OUTPUT, REDIRECT would rewrite to 127.0.0.1 and the reply would leave
from another address, so host traffic is always DNATed to a real node address.
Listeners bound to 127.0.0.1/::1 cannot be reached from PREROUTING without
route_localnet, so bind to a wildcard or the node IP.

External IPs are matched for traffic from anywhere and, from the host, only when the
address is local (an external IP that belongs to another machine must keep reaching it).
The filter chain KUBE-NODEPORT-NON-LOCAL accepts new connections to listeners behind
node ports so that a default-deny INPUT policy does not drop them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from kproxy.backends.iptables.ruleset import Chain, ChainKey, PortRules
from kproxy.state.model import Family, ServicePort

PORTALS_CONTAINER: Final = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST: Final = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER: Final = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST: Final = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL: Final = "KUBE-NODEPORT-NON-LOCAL"

NAT_CHAINS: Final = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
CHAIN_ORDER: Final[tuple[ChainKey, ...]] = (
    *(("nat", c) for c in NAT_CHAINS),
    ("filter", NODEPORT_NON_LOCAL),
)


@dataclass(frozen=True, slots=True)
class SteeringConfig:
    family: Family
    listen_ip: str
    """Address the listeners are bound to: a wildcard ("0.0.0.0"/"::") or one node address."""
    host_ip: str
    """A non-loopback node address, the DNAT target for host traffic when listen_ip is a wildcard."""
    comments: bool = True


def _wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def _cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _match(sp: ServicePort, port: int, dest: str | None, cfg: SteeringConfig, extra: str = "") -> str:
    proto = sp.protocol.lower()
    parts = []
    if cfg.comments:
        parts.append(f'-m comment --comment "{sp.name}"')
    parts.append(f"-p {proto} -m {proto} --dport {port}")
    if dest is not None:
        parts.append(f"-d {_cidr(dest)}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def _container_jump(proxy_port: int, cfg: SteeringConfig) -> str:
    if _wildcard(cfg.listen_ip):
        return f"-j REDIRECT --to-ports {proxy_port}"
    return f"-j DNAT --to-destination {_hostport(cfg.listen_ip, proxy_port)}"


def _host_jump(proxy_port: int, cfg: SteeringConfig) -> str:
    ip = cfg.host_ip if _wildcard(cfg.listen_ip) else cfg.listen_ip
    return f"-j DNAT --to-destination {_hostport(ip, proxy_port)}"


def render_port(sp: ServicePort, proxy_port: int, cfg: SteeringConfig) -> PortRules:
    """The steering lines of one service port whose listener is on `proxy_port`. All of
    them go to the shared portal chains; a port owns no chain of its own."""
    cj = _container_jump(proxy_port, cfg)
    hj = _host_jump(proxy_port, cfg)
    container: list[str] = []
    host: list[str] = []
    pre_c = f"-A {PORTALS_CONTAINER} "
    pre_h = f"-A {PORTALS_HOST} "
    if sp.cluster_ip:
        container.append(pre_c + _match(sp, sp.port, sp.cluster_ip, cfg) + " " + cj)
        host.append(pre_h + _match(sp, sp.port, sp.cluster_ip, cfg) + " " + hj)
    for ip in sp.external_ips:
        container.append(pre_c + _match(sp, sp.port, ip, cfg) + " " + cj)
        host.append(pre_h + _match(sp, sp.port, ip, cfg, "-m addrtype --dst-type LOCAL") + " " + hj)
    for ip in sp.load_balancer_ips:
        container.append(pre_c + _match(sp, sp.port, ip, cfg) + " " + cj)
        host.append(pre_h + _match(sp, sp.port, ip, cfg) + " " + hj)
    shared = [Chain("nat", PORTALS_CONTAINER, tuple(container)), Chain("nat", PORTALS_HOST, tuple(host))]
    if sp.node_port:
        shared.append(
            Chain(
                "nat",
                NODEPORT_CONTAINER,
                (f"-A {NODEPORT_CONTAINER} " + _match(sp, sp.node_port, None, cfg) + " " + cj,),
            )
        )
        shared.append(
            Chain(
                "nat",
                NODEPORT_HOST,
                (f"-A {NODEPORT_HOST} " + _match(sp, sp.node_port, None, cfg) + " " + hj,),
            )
        )
        shared.append(
            Chain(
                "filter",
                NODEPORT_NON_LOCAL,
                (
                    f"-A {NODEPORT_NON_LOCAL} "
                    + _match(sp, proxy_port, None, cfg, "-m state --state NEW")
                    + " -j ACCEPT",
                ),
            )
        )
    return PortRules(own=(), shared=tuple(c for c in shared if c.rules))


def render_all(
    ports: Mapping[object, tuple[ServicePort, int]], cfg: SteeringConfig
) -> dict[ChainKey, tuple[str, ...]]:
    """Convenience: `assemble` over every (service port, listener port) pair, in name order."""
    items = sorted(ports.items(), key=lambda kv: str(kv[1][0].name))
    return assemble((render_port(sp, pp, cfg) for _, (sp, pp) in items))


def assemble(ports: Iterable[PortRules]) -> dict[ChainKey, tuple[str, ...]]:
    """Every steering chain (declared even when empty, so a restore flushes stale rules), in fixed order."""
    lines: dict[ChainKey, list[str]] = {k: [] for k in CHAIN_ORDER}
    for pr in ports:
        for c in pr.shared:
            lines[(c.table, c.name)].extend(c.rules)
    return {k: tuple(v) for k, v in lines.items()}


def builtin_jumps(cfg: SteeringConfig) -> dict[ChainKey, tuple[str, ...]]:
    """Jumps from the built-in chains: portals first (they must win over node ports), node
    ports last and only for local destinations."""
    c = "-m comment --comment " if cfg.comments else ""
    portals = f'{c}"handle ClusterIPs; NOTE: this must be before the NodePort rules" ' if c else ""
    nodeports = f'{c}"handle service NodePorts; NOTE: this must be the last rule in the chain" ' if c else ""
    nonlocal_ = f'{c}"Ensure that non-local NodePort traffic can flow" ' if c else ""
    return {
        ("nat", "PREROUTING"): (
            f"-A PREROUTING {portals}-j {PORTALS_CONTAINER}",
            f"-A PREROUTING -m addrtype --dst-type LOCAL {nodeports}-j {NODEPORT_CONTAINER}",
        ),
        ("nat", "OUTPUT"): (
            f"-A OUTPUT {portals}-j {PORTALS_HOST}",
            f"-A OUTPUT -m addrtype --dst-type LOCAL {nodeports}-j {NODEPORT_HOST}",
        ),
        ("filter", "INPUT"): (f"-A INPUT {nonlocal_}-j {NODEPORT_NON_LOCAL}",),
    }
