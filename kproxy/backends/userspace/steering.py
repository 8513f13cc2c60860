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

Traffic policies follow the kernel modes (the endpoint sets come from `state.topology`):

- externalTrafficPolicy Local: the port gets a second listener that forwards only to
  node-local endpoints. Node-port, external-IP and load-balancer traffic from outside is
  steered to it; pod traffic (sources in the local CIDRs) and the node's own traffic
  short-circuit to the first listener, as kube-proxy's KUBE-EXT chains do.
- A listener with nothing to forward to is closed by filter KUBE-PROXY-FIREWALL (jumped to
  from INPUT and OUTPUT for new connections, after the portal NAT, so it matches the
  listener's port): REJECT when the service has no usable endpoint anywhere, DROP when
  only a Local policy leaves none here.
- loadBalancerSourceRanges: in the same chain, new connections whose original destination
  (conntrack's, from before the portal NAT) is a load-balancer IP return early when their
  source is in a range, and are dropped otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from kproxy.netfilter.ruleset import Chain, ChainKey, PortRules
from kproxy.state.model import Family, ServicePort

PORTALS_CONTAINER: Final = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST: Final = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER: Final = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST: Final = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL: Final = "KUBE-NODEPORT-NON-LOCAL"
PROXY_FIREWALL: Final = "KUBE-PROXY-FIREWALL"

NAT_CHAINS: Final = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
CHAIN_ORDER: Final[tuple[ChainKey, ...]] = (
    *(("nat", c) for c in NAT_CHAINS),
    ("filter", NODEPORT_NON_LOCAL),
    ("filter", PROXY_FIREWALL),
)

Verdict = Literal["forward", "drop", "reject"]
"""What a listener's new connections get: forwarded, or (no endpoint for it) dropped or rejected."""


@dataclass(frozen=True, slots=True)
class SteeringConfig:
    family: Family
    listen_ip: str
    """Address the listeners are bound to: a wildcard ("0.0.0.0"/"::") or one node address."""
    host_ip: str
    """A non-loopback node address, the DNAT target for host traffic when listen_ip is a wildcard."""
    comments: bool = True
    local_cidrs: tuple[str, ...] = ()
    """Pod CIDRs of this family: their traffic to external addresses short-circuits to all endpoints."""


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


def render_port(
    sp: ServicePort,
    proxy_port: int,
    cfg: SteeringConfig,
    *,
    verdict: Verdict = "forward",
    external: tuple[int, Verdict] | None = None,
) -> PortRules:
    """The steering lines of one service port whose listener is on `proxy_port`; `external`
    is the (port, verdict) of its node-local listener under externalTrafficPolicy Local. All
    lines go to the shared chains; a port owns no chain of its own."""
    cj = _container_jump(proxy_port, cfg)
    hj = _host_jump(proxy_port, cfg)
    ej = _container_jump(external[0], cfg) if external is not None else cj
    container: list[str] = []
    host: list[str] = []
    pre_c = f"-A {PORTALS_CONTAINER} "
    pre_h = f"-A {PORTALS_HOST} "
    pre_n = f"-A {NODEPORT_CONTAINER} "

    def from_outside(pre: str, match: str) -> list[str]:
        if external is None:
            return [pre + match + " " + cj]
        short = [f"{pre}{match} -s {cidr} {cj}" for cidr in cfg.local_cidrs]
        return [*short, pre + match + " " + ej]

    if sp.cluster_ip:
        container.append(pre_c + _match(sp, sp.port, sp.cluster_ip, cfg) + " " + cj)
        host.append(pre_h + _match(sp, sp.port, sp.cluster_ip, cfg) + " " + hj)
    for ip in sp.external_ips:
        container += from_outside(pre_c, _match(sp, sp.port, ip, cfg))
        host.append(pre_h + _match(sp, sp.port, ip, cfg, "-m addrtype --dst-type LOCAL") + " " + hj)
    for ip in sp.load_balancer_ips:
        container += from_outside(pre_c, _match(sp, sp.port, ip, cfg))
        host.append(pre_h + _match(sp, sp.port, ip, cfg) + " " + hj)
    shared = [Chain("nat", PORTALS_CONTAINER, tuple(container)), Chain("nat", PORTALS_HOST, tuple(host))]
    if sp.node_port:
        shared.append(
            Chain("nat", NODEPORT_CONTAINER, tuple(from_outside(pre_n, _match(sp, sp.node_port, None, cfg))))
        )
        shared.append(
            Chain(
                "nat",
                NODEPORT_HOST,
                (f"-A {NODEPORT_HOST} " + _match(sp, sp.node_port, None, cfg) + " " + hj,),
            )
        )
        accept = [proxy_port] if external is None else [proxy_port, external[0]]
        shared.append(
            Chain(
                "filter",
                NODEPORT_NON_LOCAL,
                tuple(
                    f"-A {NODEPORT_NON_LOCAL} "
                    + _match(sp, port, None, cfg, "-m state --state NEW")
                    + " -j ACCEPT"
                    for port in accept
                ),
            )
        )
    shared.append(Chain("filter", PROXY_FIREWALL, _firewall(sp, proxy_port, verdict, external, cfg)))
    return PortRules(own=(), shared=tuple(c for c in shared if c.rules))


def _firewall(
    sp: ServicePort,
    proxy_port: int,
    verdict: Verdict,
    external: tuple[int, Verdict] | None,
    cfg: SteeringConfig,
) -> tuple[str, ...]:
    pre = f"-A {PROXY_FIREWALL} "
    rules: list[str] = []
    for port, v in ((proxy_port, verdict), external or (0, "forward")):
        if v == "drop":
            rules.append(pre + _match(sp, port, None, cfg) + " -j DROP")
        elif v == "reject":
            rules.append(pre + _match(sp, port, None, cfg) + " -j REJECT")
    if sp.load_balancer_source_ranges:
        proto = sp.protocol.lower()
        for ip in sp.load_balancer_ips:
            origin = f"-m conntrack --ctorigdst {_cidr(ip)} --ctorigdstport {sp.port}"
            head = pre + (f'-m comment --comment "{sp.name} loadbalancer IP" ' if cfg.comments else "")
            head += f"-p {proto} {origin}"
            rules.extend(f"{head} -s {cidr} -j RETURN" for cidr in sp.load_balancer_source_ranges)
            rules.append(f"{head} -j DROP")
    return tuple(rules)


def render_all(
    ports: Mapping[object, tuple[ServicePort, int]],
    cfg: SteeringConfig,
    policies: Mapping[object, tuple[Verdict, tuple[int, Verdict] | None]] | None = None,
) -> dict[ChainKey, tuple[str, ...]]:
    """`assemble` over every (service port, listener port) pair, in name order; `policies`
    gives a port's verdict and external listener (see `render_port`), default forward/none."""
    items = sorted(ports.items(), key=lambda kv: str(kv[1][0].name))
    pol = policies or {}
    return assemble(
        render_port(
            sp, pp, cfg, verdict=pol.get(k, ("forward", None))[0], external=pol.get(k, ("forward", None))[1]
        )
        for k, (sp, pp) in items
    )


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
    firewall = '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
    if not c:
        firewall = "-m conntrack --ctstate NEW "
    return {
        ("nat", "PREROUTING"): (
            f"-A PREROUTING {portals}-j {PORTALS_CONTAINER}",
            f"-A PREROUTING -m addrtype --dst-type LOCAL {nodeports}-j {NODEPORT_CONTAINER}",
        ),
        ("nat", "OUTPUT"): (
            f"-A OUTPUT {portals}-j {PORTALS_HOST}",
            f"-A OUTPUT -m addrtype --dst-type LOCAL {nodeports}-j {NODEPORT_HOST}",
        ),
        ("filter", "INPUT"): (
            f"-A INPUT {firewall}-j {PROXY_FIREWALL}",
            f"-A INPUT {nonlocal_}-j {NODEPORT_NON_LOCAL}",
        ),
        ("filter", "OUTPUT"): (f"-A OUTPUT {firewall}-j {PROXY_FIREWALL}",),
    }
