"""Service ports to one nftables table per family: pure, cached, few chains.

The layout is chosen for what the kernel and the `nft` tool pay for (issue 12's
measurements): the number of chains, and what a write makes the tool read back.

* Every service address (cluster, external and load-balancer IPs) is one element of
  the verdict map `service-ips`, keyed on address . protocol . port; node ports are
  elements of `service-nodeports`. A new connection costs one map lookup, whatever
  the number of services.
* A service port is one chain, `service-<hash>-<ns>/<name>/<proto>/<port>`: its
  masquerade rules, then one `dnat ... to numgen random mod N map {...}` over its
  endpoints. No chain per endpoint.
* Hairpin (a pod reaching itself through its service) is masqueraded in postrouting
  by one set of endpoint address pairs (`E . E`), looked up after DNAT: no chain per
  endpoint needed to know who is talking to whom. Only this node's endpoints can loop
  back through its rules, so only they get a pair.
* Only features that need more get more chains: traffic policy Local on the internal
  side (`local-...`) or the external side (`external-...`), load-balancer source
  ranges (`firewall-...`), and ClientIP affinity (per endpoint, an `endpoint-...`
  chain and an `affinity-...` set of clients with the affinity timeout).
* Traffic nothing can serve is refused or dropped in filter chains by two more verdict
  maps: `no-endpoint-services` and `no-endpoint-nodeports` (`goto reject-chain` when no
  endpoint exists anywhere, `drop` when none is local under policy Local).

`render_port` is pure and cached on its hashable inputs. Its `PortObjects` lists the
port's own chains and sets and the map elements it contributes; `ruleset` joins them
with the fixed part into one `nft -f` script that replaces the table atomically.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from kproxy.config import RenderConfig
from kproxy.state.model import Endpoint, ServicePort, View, port_order
from kproxy.state.topology import categorize, external_local, uses_cluster, uses_local

TABLE = "kube-proxy"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
HAIRPIN = "hairpin-endpoints"
NODEPORT_IPS = "nodeport-ips"
MARK_MASQ = "mark-for-masquerade"
SYNC_STATE = "sync-state"
"""Holds one element, a digest of everything the table should hold (see the sync engine): a
restarted agent that computes the same digest adopts the table instead of rewriting it."""
REJECT_CHAIN = "reject-chain"

PLAIN_CLUSTER_IPS = "plain-cluster-ips"
PLAIN_EXTERNAL_IPS = "plain-external-ips"
PLAIN_NODEPORTS = "plain-nodeports"
MAX_PLAIN_ENDPOINTS = 16
"""Services with up to this many endpoints (and no feature needing a chain) are map elements only."""


def endpoints_map(n: int) -> str:
    """Address . protocol . port . index -> endpoint, for services of `n` endpoints."""
    return f"endpoints-{n}"


def nodeport_endpoints_map(n: int) -> str:
    return f"nodeport-endpoints-{n}"


Element = tuple[str, str, str]
"""(map or set name, key, value): value is "" for a set element."""


@dataclass(frozen=True, slots=True)
class PortObjects:
    """What one service port puts into the table."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]
    """(chain name, its rules), in the order they must be created (targets first)."""
    sets: tuple[tuple[str, str], ...] = ()
    """(set name, declaration body): the affinity sets of ClientIP services."""
    elements: tuple[Element, ...] = ()
    """Elements of the shared maps and of the hairpin set."""


def family_words(family: int) -> tuple[str, str]:
    """(table family and address match keyword, address type): `ip`/`ipv4_addr` or `ip6`/`ipv6_addr`."""
    return ("ip6", "ipv6_addr") if family == 6 else ("ip", "ipv4_addr")


def _hash8(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:8].decode().lower()


@lru_cache(maxsize=64)
def _local_cidr(cfg: RenderConfig) -> str:
    """The pod CIDR of this family (kube-proxy's local-traffic detector takes one)."""
    v6 = cfg.family == 6
    return next((c for c in cfg.local_cidrs if (":" in c) == v6), "")


def _in_any(ip: str, cidrs: tuple[str, ...]) -> bool:
    if not ip:
        return False
    addr = ipaddress.ip_address(ip)
    return any(
        addr in net
        for net in (ipaddress.ip_network(c, strict=False) for c in cidrs)
        if net.version == addr.version
    )


def _hostport(ep: Endpoint) -> str:
    return f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"


@lru_cache(maxsize=131072)
def render_port(sp: ServicePort, endpoints: tuple[Endpoint, ...], cfg: RenderConfig) -> PortObjects:
    """Every chain, set and map element one service port contributes. Cached."""
    fam, addr_type = family_words(cfg.family)
    proto = sp.protocol.lower()
    name = sp.name
    suffix = f"{name.namespace}/{name.name}/{proto}/{name.port_name}"
    base = f"{_hash8(str(name) + proto)}-{suffix}"
    svc, local_chain, ext_chain, fw_chain = (
        f"{kind}-{base}" for kind in ("service", "local", "external", "firewall")
    )

    sel = categorize(sp, endpoints, cfg.node_zone)
    ext_local = external_local(sp)
    has_any = sel.has_any
    has_internal = has_any and (not sp.internal_local or bool(sel.local))
    has_external = has_any and (not ext_local or bool(sel.local))
    v6 = cfg.family == 6
    lb_ranges = tuple(c for c in sp.load_balancer_source_ranges if (":" in c) == v6)
    uses_fw = has_any and bool(sp.load_balancer_ips) and bool(lb_ranges)
    if (
        not sp.affinity_timeout
        and not sp.internal_local
        and not ext_local
        and has_any
        and 0 < len(sel.cluster) <= MAX_PLAIN_ENDPOINTS
    ):
        return _plain(sp, sel.cluster, sel.reachable, lb_ranges if uses_fw else (), cfg, base)
    local_cidr = _local_cidr(cfg)
    target = "drop" if has_any else f"goto {REJECT_CHAIN}"

    chains: list[tuple[str, tuple[str, ...]]] = []
    sets: list[tuple[str, str]] = []
    elements: list[Element] = []

    # ClientIP affinity: an endpoint chain and a set of recent clients per endpoint.
    ep_chain: dict[Endpoint, str] = {}
    if sp.affinity_timeout:
        for ep in sel.reachable:
            ep_base = f"{_hash8(str(name) + proto + _hostport(ep))}-{suffix}"
            chain, aff = f"endpoint-{ep_base}", f"affinity-{ep_base}"
            ep_chain[ep] = chain
            sets.append((aff, f"type {addr_type}; flags dynamic,timeout; timeout {sp.affinity_timeout}s;"))
            chains.append(
                (
                    chain,
                    (
                        f"update @{aff} {{ {fam} saddr }}",
                        f"meta l4proto {proto} dnat to {_hostport(ep)}",
                    ),
                )
            )

    def spread(eps: tuple[Endpoint, ...]) -> list[str]:
        """Endpoint i of n for a new connection, chosen at random (affinity: a known client first)."""
        n = len(eps)
        if ep_chain:
            rules = [
                f"{fam} saddr @affinity-{ep_chain[ep][len('endpoint-') :]} goto {ep_chain[ep]}" for ep in eps
            ]
            if n == 1:
                return [*rules, f"goto {ep_chain[eps[0]]}"]
            vmap = ", ".join(f"{i} : goto {ep_chain[ep]}" for i, ep in enumerate(eps))
            return [*rules, f"numgen random mod {n} vmap {{ {vmap} }}"]
        rules = [
            f"numgen random mod {n - i} 0 meta l4proto {proto} dnat to {_hostport(ep)}"
            for i, ep in enumerate(eps[:-1])
        ]
        return [*rules, f"meta l4proto {proto} dnat to {_hostport(eps[-1])}"]

    def masquerade() -> list[str]:
        """Cluster IP traffic from outside the pod network (or all, with masquerade-all) is marked."""
        match = f"{fam} daddr {sp.cluster_ip} {proto} dport {sp.port}"
        if cfg.masquerade_all:
            return [f"{match} jump {MARK_MASQ}"]
        if local_cidr:
            return [f"{match} {fam} saddr != {local_cidr} jump {MARK_MASQ}"]
        return []

    has_cluster_chain = bool(sel.cluster) and uses_cluster(sp)
    if has_cluster_chain:
        rules = masquerade() if not sp.internal_local else []
        if sp.has_external and not ext_local:
            # Reached by an external address or a node port: always masqueraded (policy Cluster).
            rules.append(f"{fam} daddr != {sp.cluster_ip} jump {MARK_MASQ}")
        chains.append((svc, (*rules, *spread(sel.cluster))))
    if sp.internal_local and sel.local and uses_local(sp):
        chains.append((local_chain, (*masquerade(), *spread(sel.local))))
    internal = local_chain if sp.internal_local else svc

    external = svc
    if ext_local and has_any and has_cluster_chain:
        external = ext_chain
        rules = []
        if local_cidr:
            rules.append(f"{fam} saddr {local_cidr} goto {svc}")
        rules += [f"fib saddr type local jump {MARK_MASQ}", f"fib saddr type local goto {svc}"]
        if has_external:
            rules += spread(sel.local)
        chains.append((ext_chain, tuple(rules)))

    def key(ip: str, port: int) -> str:
        return f"{ip} . {proto} . {port}"

    if has_internal:
        elements.append((SERVICE_IPS, key(sp.cluster_ip, sp.port), f"goto {internal}"))
    else:
        elements.append((NO_ENDPOINT_SERVICES, key(sp.cluster_ip, sp.port), target))
    reach_external = has_any and (external != svc or has_cluster_chain)
    for ip in (*sp.external_ips, *sp.load_balancer_ips):
        if reach_external:
            elements.append((SERVICE_IPS, key(ip, sp.port), f"goto {external}"))
        if not has_external:
            elements.append((NO_ENDPOINT_SERVICES, key(ip, sp.port), target))
    if uses_fw:
        allowed = list(lb_ranges)
        if _in_any(cfg.node_ip, lb_ranges):
            allowed += sp.load_balancer_ips  # the node reaches a VIP-style LB with it as source
        chains.append((fw_chain, (f"{fam} saddr != {{ {', '.join(allowed)} }} drop",)))
        elements += [(FIREWALL_IPS, key(ip, sp.port), f"goto {fw_chain}") for ip in sp.load_balancer_ips]
    if sp.node_port:
        if reach_external:
            elements.append((SERVICE_NODEPORTS, f"{proto} . {sp.node_port}", f"goto {external}"))
        if not has_external:
            elements.append((NO_ENDPOINT_NODEPORTS, f"{proto} . {sp.node_port}", target))
    elements += _hairpin(sel.reachable)
    return PortObjects(tuple(chains), tuple(sets), tuple(elements))


def _plain(
    sp: ServicePort,
    eps: tuple[Endpoint, ...],
    reachable: tuple[Endpoint, ...],
    lb_ranges: tuple[str, ...],
    cfg: RenderConfig,
    base: str,
) -> PortObjects:
    """A service that needs no chain: every address of it is a map element, each endpoint
    an element per address, so any change to it is element updates only (no chain the
    kernel must re-validate the table for)."""
    fam, _ = family_words(cfg.family)
    proto = sp.protocol.lower()
    n = len(eps)
    emap, npmap = endpoints_map(n), nodeport_endpoints_map(n)
    targets = [f"{ep.ip} . {ep.port}" for ep in eps]
    chains: list[tuple[str, tuple[str, ...]]] = []
    elements: list[Element] = []

    def add_address(set_name: str, ip: str) -> None:
        key = f"{ip} . {proto} . {sp.port}"
        elements.append((set_name, key, ""))
        elements.extend((emap, f"{key} . {i}", t) for i, t in enumerate(targets))

    add_address(PLAIN_CLUSTER_IPS, sp.cluster_ip)
    for ip in (*sp.external_ips, *sp.load_balancer_ips):
        add_address(PLAIN_EXTERNAL_IPS, ip)
    if sp.node_port:
        key = f"{proto} . {sp.node_port}"
        elements.append((PLAIN_NODEPORTS, key, ""))
        elements.extend((npmap, f"{key} . {i}", t) for i, t in enumerate(targets))
    if lb_ranges:
        fw_chain = f"firewall-{base}"
        allowed = list(lb_ranges)
        if _in_any(cfg.node_ip, lb_ranges):
            allowed += sp.load_balancer_ips
        chains.append((fw_chain, (f"{fam} saddr != {{ {', '.join(allowed)} }} drop",)))
        elements += [
            (FIREWALL_IPS, f"{ip} . {proto} . {sp.port}", f"goto {fw_chain}") for ip in sp.load_balancer_ips
        ]
    elements += _hairpin(reachable)
    return PortObjects(tuple(chains), (), tuple(elements))


def _hairpin(eps: tuple[Endpoint, ...]) -> list[Element]:
    """Pairs for the endpoints that can reach themselves through this node's rules: those on
    this node (a pod elsewhere is DNATed by its own node), and those whose node is unknown."""
    return [(HAIRPIN, f"{ep.ip} . {ep.ip}", "") for ep in eps if ep.is_local or not ep.node_name]


# ------------------------------------------------------------------ the table


@lru_cache(maxsize=64)
def fixed_part(cfg: RenderConfig) -> str:
    """Declarations and base chains that depend on the config only (the body of the table)."""
    fam, addr_type = family_words(cfg.family)
    mark = cfg.masq_mark
    loopback = "::1" if cfg.family == 6 else "127.0.0.0/8"
    if cfg.nodeport_ips is None:
        nodeports = f"fib daddr type local {fam} daddr != {loopback}"
    else:
        nodeports = f"{fam} daddr @{NODEPORT_IPS}"
    service_key = f"{addr_type} . inet_proto . inet_service"
    lines = [
        '\tcomment "rules for kube-proxy"',
        f"\tmap {SERVICE_IPS} {{ type {service_key} : verdict; }}",
        f"\tmap {SERVICE_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}",
        f"\tmap {NO_ENDPOINT_SERVICES} {{ type {service_key} : verdict; }}",
        f"\tmap {NO_ENDPOINT_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}",
        f"\tmap {FIREWALL_IPS} {{ type {service_key} : verdict; }}",
        f"\tset {HAIRPIN} {{ type {addr_type} . {addr_type}; }}",
    ]
    lines += [
        f"\tset {PLAIN_CLUSTER_IPS} {{ type {service_key}; }}",
        f"\tset {PLAIN_EXTERNAL_IPS} {{ type {service_key}; }}",
        f"\tset {PLAIN_NODEPORTS} {{ type inet_proto . inet_service; }}",
    ]
    dnat_rules: list[str] = []
    nodeport_rules: list[str] = []
    for n in range(1, MAX_PLAIN_ENDPOINTS + 1):
        pick = f"numgen random mod {n}"
        lines.append(
            f"\tmap {endpoints_map(n)} {{ typeof {fam} daddr . meta l4proto . th dport . {pick} : "
            f"{fam} daddr . th dport; }}"
        )
        lines.append(
            f"\tmap {nodeport_endpoints_map(n)} {{ typeof meta l4proto . th dport . {pick} : {fam} daddr . th dport; }}"
        )
        dnat_rules.append(
            f"dnat {fam} to {fam} daddr . meta l4proto . th dport . {pick} map @{endpoints_map(n)}"
        )
        nodeport_rules.append(
            f"{nodeports} dnat {fam} to meta l4proto . th dport . {pick} map @{nodeport_endpoints_map(n)}"
        )
    mark_rule = f"meta mark set meta mark or {mark}"
    local_cidr = _local_cidr(cfg)
    plain_masq = []
    cluster_match = f"{fam} daddr . meta l4proto . th dport @{PLAIN_CLUSTER_IPS}"
    if cfg.masquerade_all:
        plain_masq.append(f"{cluster_match} {mark_rule}")
    elif local_cidr:
        plain_masq.append(f"{cluster_match} {fam} saddr != {local_cidr} {mark_rule}")
    plain_masq.append(f"{fam} daddr . meta l4proto . th dport @{PLAIN_EXTERNAL_IPS} {mark_rule}")
    ips = [ip for ip in cfg.nodeport_ips or () if not ipaddress.ip_address(ip).is_loopback]
    elems = f" elements = {{ {', '.join(ips)} }};" if ips else ""
    lines.append(f"\tset {NODEPORT_IPS} {{ type {addr_type};{elems} }}")
    lines.append(f"\tset {SYNC_STATE} {{ type ipv6_addr; }}")
    chains: list[tuple[str, str, list[str]]] = [
        (
            "filter-prerouting",
            "type filter hook prerouting priority dstnat - 10;",
            ["ct state new jump firewall-check"],
        ),
        (
            "filter-input",
            "type filter hook input priority filter;",
            ["ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"],
        ),
        (
            "filter-forward",
            "type filter hook forward priority filter;",
            ["ct state new jump service-endpoints-check"],
        ),
        (
            "filter-output",
            "type filter hook output priority -110;",
            ["ct state new jump firewall-check"],
        ),
        (
            "filter-output-post-dnat",
            "type filter hook output priority filter;",
            ["ct state new jump service-endpoints-check"],
        ),
        ("nat-prerouting", "type nat hook prerouting priority dstnat;", ["jump services"]),
        ("nat-output", "type nat hook output priority -100;", ["jump services"]),
        ("nat-postrouting", "type nat hook postrouting priority srcnat;", ["jump masquerading"]),
        ("firewall-check", "", [f"{fam} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"]),
        (
            "service-endpoints-check",
            "",
            [f"{fam} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"],
        ),
        (
            "nodeport-endpoints-check",
            "",
            [f"{nodeports} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"],
        ),
        (REJECT_CHAIN, "", ["reject"]),
        (MARK_MASQ, "", [f"meta mark set meta mark or {mark}"]),
        (
            "masquerading",
            "",
            [
                f"ct status dnat {fam} saddr . {fam} daddr @{HAIRPIN} meta mark set meta mark or {mark}",
                f"meta mark & {mark} == 0 return",
                f"meta mark set meta mark xor {mark}",
                "masquerade fully-random",
            ],
        ),
        (
            "services",
            "",
            [
                f"{fam} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                *plain_masq,
                *dnat_rules,
                f"{nodeports} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
                f"{nodeports} meta l4proto . th dport @{PLAIN_NODEPORTS} {mark_rule}",
                *nodeport_rules,
            ],
        ),
    ]
    for chain, hook, rules in chains:
        lines.append(f"\tchain {chain} {{")
        if hook:
            lines.append(f"\t\t{hook}")
        lines += [f"\t\t{rule}" for rule in rules]
        lines.append("\t}")
    return "\n".join(lines) + "\n"


FIXED_CHAINS = frozenset(
    {
        "filter-prerouting",
        "filter-input",
        "filter-forward",
        "filter-output",
        "filter-output-post-dnat",
        "nat-prerouting",
        "nat-output",
        "nat-postrouting",
        "firewall-check",
        "service-endpoints-check",
        "nodeport-endpoints-check",
        REJECT_CHAIN,
        MARK_MASQ,
        "masquerading",
        "services",
    }
)


def effective_elements(ports: Iterable[PortObjects]) -> dict[tuple[str, str], str]:
    """Map elements the kernel gets: per key, the first port's value (ports come in name order,
    so two services claiming one address and port cannot fail the whole write)."""
    out: dict[tuple[str, str], str] = {}
    for po in ports:
        for m, k, v in po.elements:
            out.setdefault((m, k), v)
    return out


def table_script(ports: Iterable[PortObjects], cfg: RenderConfig) -> str:
    """One `nft -f` script replacing the family's table with this one, atomically
    (`add table` first, so the `delete` also works on a node without the table)."""
    fam, _ = family_words(cfg.family)
    ports = list(ports)
    body = [fixed_part(cfg)]
    for po in ports:
        for set_name, decl in po.sets:
            body.append(f"\tset {set_name} {{ {decl} }}\n")
    for po in ports:
        for chain, rules in po.chains:
            body.append(f"\tchain {chain} {{\n" + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n")
    out = [f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\ntable {fam} {TABLE} {{\n", *body, "}\n"]
    out += element_commands(fam, "add", effective_elements(ports).items())
    return "".join(out)


def element_commands(fam: str, verb: str, items: Iterable[tuple[tuple[str, str], str]]) -> list[str]:
    """`add element` / `delete element` commands, one per map or set, keys only for delete."""
    by_map: dict[str, list[str]] = {}
    for (m, k), v in items:
        by_map.setdefault(m, []).append(f"{k} : {v}" if v and verb == "add" else k)
    return [f"{verb} element {fam} {TABLE} {m} {{ {', '.join(items_)} }}\n" for m, items_ in by_map.items()]


def render_view(view: View, cfg: RenderConfig) -> list[PortObjects]:
    return [render_port(*view[name], cfg) for name in sorted(view, key=port_order)]


def render_snapshot(view: View, cfg: RenderConfig) -> str:
    """The whole script for one family, as `kproxy dry-run --proxy-mode nftables` prints it."""
    return table_script(render_view(view, cfg), cfg)
