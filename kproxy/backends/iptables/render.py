"""Service ports to iptables rules, line for line what kube-proxy's iptables mode writes.

`render_port` is pure and cached on its (hashable) arguments, so a sync re-renders
only ports whose service, endpoints or config changed. `assemble` stitches the
per-port pieces into the whole ruleset. Rules are plain strings built with
f-strings: at 10,000 ports this is the hot path of every full sync.

Where kproxy departs from kube-proxy's restore input, it is on purpose and
harmless to a node switching between the two: host addresses carry an explicit
/32 or /128, REJECT names its ICMP type, and comments are reduced to a safe
character set (iptables-save prints all three the same either way). Top-level
chains list the ports in ServicePortName order where kube-proxy walks a Go map.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from kproxy.backends.iptables.naming import hash16, sep_chains
from kproxy.config import RenderConfig
from kproxy.infra.gcpause import gc_paused
from kproxy.netfilter.ruleset import Chain, ChainKey, PortRules, Table, restore_payload
from kproxy.state.model import Endpoint, ServicePort, View, in_family, port_order
from kproxy.state.topology import categorize, external_local, uses_cluster, uses_local

SERVICES = "KUBE-SERVICES"
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
NODEPORTS = "KUBE-NODEPORTS"
POSTROUTING = "KUBE-POSTROUTING"
MARK_MASQ = "KUBE-MARK-MASQ"
FORWARD = "KUBE-FORWARD"
PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
CANARY = "KUBE-PROXY-CANARY"
FIREWALL = "KUBE-FIREWALL"
"""kubelet's chain; kube-proxy fills it (with kubelet's very rule) when localhost node ports are on."""
NFACCT_INVALID = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST = "localhost_nps_accepted_pkts"

NAT_SERVICES: ChainKey = ("nat", SERVICES)
NAT_NODEPORTS: ChainKey = ("nat", NODEPORTS)
FILTER_SERVICES: ChainKey = ("filter", SERVICES)
FILTER_EXTERNAL: ChainKey = ("filter", EXTERNAL_SERVICES)
FILTER_NODEPORTS: ChainKey = ("filter", NODEPORTS)
FILTER_FIREWALL: ChainKey = ("filter", PROXY_FIREWALL)
FILTER_FIREWALL_KUBELET: ChainKey = ("filter", FIREWALL)

TOP_LEVEL: tuple[ChainKey, ...] = (
    FILTER_SERVICES,
    FILTER_EXTERNAL,
    ("filter", FORWARD),
    FILTER_NODEPORTS,
    FILTER_FIREWALL,
    ("filter", CANARY),
    NAT_SERVICES,
    NAT_NODEPORTS,
    ("nat", POSTROUTING),
    ("nat", MARK_MASQ),
    ("nat", CANARY),
)
"""Chains kproxy (like kube-proxy) owns that are not per service port."""

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:/[]")


def _clean(text: str) -> str:
    """Comments are data from the API; keep only characters that cannot end a quoted
    iptables-restore argument or a line, whatever a validator upstream let through."""
    if len(text) <= 200 and _SAFE.issuperset(text):
        return text
    return "".join(c if c in _SAFE else "_" for c in text)[:200]


class _SepNames(dict[tuple[int, str], dict[str, str]]):
    """SEP names outlive their port's render: when one endpoint of a service changes, the
    others keep their names, and hashing is the dearest step per endpoint. Keyed by (family,
    hash prefix) and replaced by each render of the port, so endpoints that went away drop out."""

    limit = 65536


_sep = _SepNames()
_tuple_new = tuple.__new__


def _sep_names(family: int, prefix: str, hps: list[str]) -> list[str]:
    if not hps:
        return []
    key = (family, prefix)
    known = _sep.get(key)
    if known is None:
        seps = sep_chains(prefix, hps)
    else:
        missing = [hp for hp in hps if hp not in known]
        if missing:
            known = {**known, **dict(zip(missing, sep_chains(prefix, missing), strict=True))}
        seps = [known[hp] for hp in hps]
    if known is None and len(_sep) >= _sep.limit:
        _sep.clear()
    _sep[key] = dict(zip(hps, seps, strict=True))
    return seps


@lru_cache(maxsize=4096)
def probability(n: int) -> str:
    """1/n with ten decimals, as kube-proxy writes it (formatting floats is slow, hence the cache)."""
    return f"{1.0 / n:.10f}"


@lru_cache(maxsize=1024)
def _probabilities(n: int) -> tuple[str, ...]:
    """The `--probability` of rules 0..n-2 of an n-endpoint spread (the last rule has none)."""
    return tuple(probability(n - i) for i in range(n - 1))


def _reject(family: int) -> str:
    return (
        "REJECT --reject-with icmp6-port-unreachable"
        if family == 6
        else "REJECT --reject-with icmp-port-unreachable"
    )


def _in_any(ip: str, cidrs: tuple[str, ...]) -> bool:
    if not ip:
        return False
    addr = ipaddress.ip_address(ip)
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == addr.version and addr in net:
            return True
    return False


@lru_cache(maxsize=64)
def _local_match(cfg: RenderConfig) -> tuple[str, str]:
    return cfg.local_match


class _PortRender:
    """What one render of one service port decides before writing a rule: kube-proxy's
    per-service variables (hasEndpoints, internalTrafficChain, ...) under the same names."""

    __slots__ = (
        "cfg",
        "dport",
        "ext",
        "ext_local",
        "fw",
        "has_any",
        "has_external",
        "has_internal",
        "host",
        "if_local",
        "if_not_local",
        "internal_chain",
        "lb_ranges",
        "name",
        "pm",
        "prefix",
        "sel",
        "sp",
        "svc",
        "svl",
        "uses_fw",
        "vip",
    )

    def __init__(self, sp: ServicePort, endpoints: tuple[Endpoint, ...], cfg: RenderConfig) -> None:
        self.sp = sp
        self.cfg = cfg
        self.sel = sel = categorize(sp, endpoints, cfg.node_zone, cfg.node_name)
        v6 = cfg.family == 6
        self.host = "/128" if v6 else "/32"
        port_name = str(sp.name)
        self.name = _clean(port_name)
        proto = sp.protocol.lower()
        self.pm = f"-m {proto} -p {proto}"
        self.vip = f"{sp.cluster_ip}{self.host}"
        self.dport = f"--dport {sp.port}"
        self.prefix = port_name + proto  # what chain-name hashes start with
        port_hash = hash16(self.prefix)
        self.svc = "KUBE-SVC-" + port_hash
        self.svl = "KUBE-SVL-" + port_hash
        self.ext = "KUBE-EXT-" + port_hash
        self.fw = "KUBE-FW-" + port_hash
        self.if_local, self.if_not_local = _local_match(cfg)
        self.ext_local = external_local(sp)
        self.has_any = sel.has_any
        self.has_internal = sel.has_any and (not sp.internal_local or bool(sel.local))
        self.has_external = sel.has_any and (not self.ext_local or bool(sel.local))
        self.internal_chain = self.svl if sp.internal_local else self.svc
        ranges = sp.load_balancer_source_ranges
        self.lb_ranges = tuple(c for c in ranges if in_family(c, cfg.family)) if ranges else ()
        self.uses_fw = sel.has_any and bool(sp.load_balancer_ips) and bool(self.lb_ranges)


@lru_cache(maxsize=131072)
def render_port(sp: ServicePort, endpoints: tuple[Endpoint, ...], cfg: RenderConfig) -> PortRules:
    """Every rule one service port contributes. Cached: identical inputs return the same object."""
    p = _PortRender(sp, endpoints, cfg)
    own: list[Chain] = []
    if p.has_any and sp.has_external:
        own.append(Chain("nat", p.ext, _ext_rules(p)))
    if p.uses_fw:
        own.append(Chain("nat", p.fw, _fw_rules(p)))
    sel = p.sel
    reach = sel.reachable
    # Endpoint.hostport, inlined: a property call per endpoint shows in a cold render.
    hps = [f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}" for ep in reach]
    seps = _sep_names(cfg.family, p.prefix, hps)
    if sel.cluster and uses_cluster(sp):
        own.append(Chain("nat", p.svc, _spread(p, p.svc, *_pick(sel.cluster, reach, hps, seps))))
    if sel.local and uses_local(sp):
        own.append(Chain("nat", p.svl, _spread(p, p.svl, *_pick(sel.local, reach, hps, seps))))
    if reach:
        own.extend(_endpoint_chains(p, reach, hps, seps))
    return PortRules(tuple(own), _capture(p))


def _capture(p: _PortRender) -> tuple[Chain, ...]:
    """Rules in the top-level chains: nat sends each VIP to the port's chains; filter rejects
    (no endpoints anywhere) or drops (none local under Local policy) what nat cannot serve."""
    sp, name, pm, host, dport = p.sp, p.name, p.pm, p.host, p.dport
    if not p.has_any:
        target = _reject(p.cfg.family)
        comment = f'"{name} has no endpoints"'
    else:
        target = "DROP"
        comment = f'"{name} has no local endpoints"'
    nat: list[str] = []
    nodeports: list[str] = []
    f_services: list[str] = []
    f_external: list[str] = []
    f_firewall: list[str] = []
    f_nodeports: list[str] = []

    if p.has_internal:
        nat.append(
            f'-A {SERVICES} -m comment --comment "{name} cluster IP" {pm} -d {p.vip} {dport} -j {p.internal_chain}'
        )
    else:
        f_services.append(f"-A {SERVICES} -m comment --comment {comment} {pm} -d {p.vip} {dport} -j {target}")
    for ip in sp.external_ips:
        if p.has_any:
            nat.append(
                f'-A {SERVICES} -m comment --comment "{name} external IP" {pm} -d {ip}{host} {dport} -j {p.ext}'
            )
        if not p.has_external:
            f_external.append(
                f"-A {EXTERNAL_SERVICES} -m comment --comment {comment} {pm} -d {ip}{host} {dport} -j {target}"
            )
    lb_chain = p.fw if p.uses_fw else p.ext
    for ip in sp.load_balancer_ips:
        if p.has_any:
            nat.append(
                f'-A {SERVICES} -m comment --comment "{name} loadbalancer IP" {pm} -d {ip}{host} {dport} -j {lb_chain}'
            )
        if p.uses_fw:
            f_firewall.append(
                f'-A {PROXY_FIREWALL} -m comment --comment "{name} traffic not accepted by {p.fw}" '
                f"{pm} -d {ip}{host} {dport} -j DROP"
            )
    if not p.has_external:
        for ip in sp.load_balancer_ips:
            f_external.append(
                f"-A {EXTERNAL_SERVICES} -m comment --comment {comment} {pm} -d {ip}{host} {dport} -j {target}"
            )
    if sp.node_port:
        if p.has_any:
            if p.cfg.localhost_nodeports and p.cfg.nfacct:
                nodeports.append(
                    f"-A {NODEPORTS} -m comment --comment {name} {pm} -d 127.0.0.0/8 --dport {sp.node_port} "
                    f"-m nfacct --nfacct-name {NFACCT_LOCALHOST} -j {p.ext}"
                )
            nodeports.append(
                f"-A {NODEPORTS} -m comment --comment {name} {pm} --dport {sp.node_port} -j {p.ext}"
            )
        if not p.has_external:
            f_external.append(
                f"-A {EXTERNAL_SERVICES} -m comment --comment {comment} -m addrtype --dst-type LOCAL "
                f"{pm} --dport {sp.node_port} -j {target}"
            )
    if sp.health_check_node_port:
        f_nodeports.append(
            f'-A {NODEPORTS} -m comment --comment "{name} health check node port" '
            f"-m tcp -p tcp --dport {sp.health_check_node_port} -j ACCEPT"
        )
    out: list[Chain] = []
    if nat:
        out.append(Chain("nat", SERVICES, tuple(nat)))
    if nodeports:
        out.append(Chain("nat", NODEPORTS, tuple(nodeports)))
    if f_services:
        out.append(Chain("filter", SERVICES, tuple(f_services)))
    if f_external:
        out.append(Chain("filter", EXTERNAL_SERVICES, tuple(f_external)))
    if f_firewall:
        out.append(Chain("filter", PROXY_FIREWALL, tuple(f_firewall)))
    if f_nodeports:
        out.append(Chain("filter", NODEPORTS, tuple(f_nodeports)))
    return tuple(out)


def _masquerade(p: _PortRender, chain: str) -> list[str]:
    """First rule of the chain cluster IP traffic enters: mark what does not come from a pod
    (or everything, with masquerade-all), so replies from another node come back through this one."""
    if chain != p.internal_chain or not p.has_internal:
        return []
    args = f'-m comment --comment "{p.name} cluster IP" {p.pm} -d {p.vip} {p.dport}'
    if p.cfg.masquerade_all:
        return [f"-A {chain} {args} -j {MARK_MASQ}"]
    if p.if_not_local:
        return [f"-A {chain} {args} {p.if_not_local} -j {MARK_MASQ}"]
    return []


def _ext_rules(p: _PortRender) -> tuple[str, ...]:
    """KUBE-EXT: the entry for node ports, external IPs and LB IPs. Under Local policy, pod
    and node traffic short-circuits to the Cluster chain (as if it had gone out to the
    load balancer and come back); the rest keeps its source and goes to local endpoints."""
    ext, svc, name = p.ext, p.svc, p.name
    rules: list[str] = []
    if not p.ext_local:
        rules.append(
            f'-A {ext} -m comment --comment "masquerade traffic for {name} external destinations" -j {MARK_MASQ}'
        )
    else:
        if p.if_local:
            rules.append(
                f'-A {ext} -m comment --comment "pod traffic for {name} external destinations" {p.if_local} -j {svc}'
            )
        rules.append(
            f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
            f"-m addrtype --src-type LOCAL -j {MARK_MASQ}"
        )
        rules.append(
            f'-A {ext} -m comment --comment "route LOCAL traffic for {name} external destinations" '
            f"-m addrtype --src-type LOCAL -j {svc}"
        )
    if p.has_external:
        rules.append(f"-A {ext} -j {p.svl if p.ext_local else svc}")
    return tuple(rules)


def _fw_rules(p: _PortRender) -> tuple[str, ...]:
    """KUBE-FW: admitted sources go on to KUBE-EXT; whatever falls off the end is dropped by
    filter KUBE-PROXY-FIREWALL (DROP is not allowed in the nat table). When the ranges admit
    the node itself, so does the LB IP: a node reaching a VIP-style LB loops back with it as source."""
    head = f'-A {p.fw} -m comment --comment "{p.name} loadbalancer IP"'
    rules = [f"{head} -s {cidr} -j {p.ext}" for cidr in p.lb_ranges]
    if _in_any(p.cfg.node_ip, p.lb_ranges):
        rules.extend(f"{head} -s {ip}{p.host} -j {p.ext}" for ip in p.sp.load_balancer_ips)
    rules.append(
        f'-A {p.fw} -m comment --comment "other traffic to {p.name} will be dropped by {PROXY_FIREWALL}"'
    )
    return tuple(rules)


def _endpoint_chains(
    p: _PortRender, reach: tuple[Endpoint, ...], hps: list[str], seps: list[str]
) -> list[Chain]:
    """KUBE-SEP: mark hairpin traffic (an endpoint reaching itself through the service), then DNAT;
    under affinity, remember the client for the KUBE-SVC `--rcheck` rules."""
    comment = f" -m comment --comment {p.name}" if p.cfg.comments else ""
    dnat = f" {p.pm} -j DNAT --to-destination "
    masq = f"{p.host} -j {MARK_MASQ}"
    new = _tuple_new  # Chain(...) and Chain._make run Python code per call; this is one C call
    if p.sp.affinity_timeout:
        return [
            new(
                Chain,
                (
                    "nat",
                    sep,
                    (
                        f"-A {sep}{comment} -s {ep.ip}{masq}",
                        f"-A {sep}{comment} -m recent --name {sep} --set{dnat}{hp}",
                    ),
                ),
            )
            for ep, hp, sep in zip(reach, hps, seps, strict=True)
        ]
    dnat = comment + dnat
    return [
        new(Chain, ("nat", sep, (f"-A {sep}{comment} -s {ep.ip}{masq}", f"-A {sep}{dnat}{hp}")))
        for ep, hp, sep in zip(reach, hps, seps, strict=True)
    ]


def _pick(
    eps: tuple[Endpoint, ...], reach: tuple[Endpoint, ...], hps: list[str], seps: list[str]
) -> tuple[list[str], list[str]]:
    """Host:ports and SEP names of a subset of the reachable endpoints."""
    if eps is reach:
        return hps, seps
    # By identity: hashing an Endpoint hashes every field, and this runs per endpoint.
    where = {id(ep): i for i, ep in enumerate(reach)}
    idx = [where[id(ep)] for ep in eps]
    return [hps[i] for i in idx], [seps[i] for i in idx]


def _spread(p: _PortRender, chain: str, hps: list[str], seps: list[str]) -> tuple[str, ...]:
    """The port's masquerade rule, affinity checks (a known client goes back to its endpoint),
    then endpoint i of n taken with probability 1/(n-i), which spreads new connections evenly.
    `seps` is never empty."""
    rules = _masquerade(p, chain)
    probs = _probabilities(len(seps))
    if p.cfg.comments:
        pre = f'-A {chain} -m comment --comment "{p.name} -> '
        if aff := p.sp.affinity_timeout:
            rules.extend(
                [
                    f'{pre}{hp}" -m recent --name {sep} --rcheck --seconds {aff} --reap -j {sep}'
                    for hp, sep in zip(hps, seps, strict=True)
                ]
            )
        # zip stops at the shorter probabilities: every endpoint but the last.
        rules.extend(
            [
                f'{pre}{hp}" -m statistic --mode random --probability {prob} -j {sep}'
                for hp, prob, sep in zip(hps, probs, seps, strict=False)
            ]
        )
        rules.append(f'{pre}{hps[-1]}" -j {seps[-1]}')
        return tuple(rules)
    head = f"-A {chain}"
    if aff := p.sp.affinity_timeout:
        rules.extend(
            [f"{head} -m recent --name {sep} --rcheck --seconds {aff} --reap -j {sep}" for sep in seps]
        )
    rules.extend(
        [
            f"{head} -m statistic --mode random --probability {prob} -j {sep}"
            for prob, sep in zip(probs, seps, strict=False)
        ]
    )
    rules.append(f"{head} -j {seps[-1]}")
    return tuple(rules)


@lru_cache(maxsize=64)
def _fixed(cfg: RenderConfig) -> dict[ChainKey, tuple[str, ...]]:
    """Top-level rules that depend on the config only."""
    mark = cfg.masq_mark
    v6 = cfg.family == 6
    localhost = cfg.localhost_nodeports and not v6
    tail_comment = (
        '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
    )
    tail: tuple[str, ...]
    if cfg.nodeport_ips is None:
        # Loopback destinations are node ports too only with localhost node ports (IPv4),
        # which need route_localnet; kube-proxy never offers them on IPv6.
        loopback = " ! -d ::1/128" if v6 else "" if localhost else " ! -d 127.0.0.0/8"
        tail = (f"-A {SERVICES} {tail_comment} -m addrtype --dst-type LOCAL{loopback} -j {NODEPORTS}",)
    else:
        host = "/128" if v6 else "/32"
        tail = tuple(
            f"-A {SERVICES} {tail_comment} -d {ip}{host} -j {NODEPORTS}"
            for ip in cfg.nodeport_ips
            if localhost or not ipaddress.ip_address(ip).is_loopback
        )
    forward: tuple[str, ...] = ()
    if cfg.drop_invalid:
        counter = f" -m nfacct --nfacct-name {NFACCT_INVALID}" if cfg.nfacct else ""
        forward = (f"-A {FORWARD} -m conntrack --ctstate INVALID{counter} -j DROP",)
    random_fully = " --random-fully" if cfg.random_fully else ""
    out: dict[ChainKey, tuple[str, ...]] = {
        ("nat", SERVICES): tail,
        ("filter", FORWARD): (
            *forward,
            f'-A {FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
            f'-A {FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        ("nat", POSTROUTING): (
            f"-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {POSTROUTING} -j MARK --xor-mark {mark}",
            f'-A {POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE{random_fully}',
        ),
        ("nat", MARK_MASQ): (f"-A {MARK_MASQ} -j MARK --or-mark {mark}",),
    }
    if localhost:
        # route_localnet lets the outside send to 127.0.0.0/8 too; kubelet's anti-martian
        # rule (kube-proxy writes the same) drops what was not DNATed to a node port.
        out[FILTER_FIREWALL_KUBELET] = (
            f'-A {FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
    return out


def assemble(ports: Iterable[PortRules], cfg: RenderConfig) -> dict[ChainKey, tuple[str, ...]]:
    """The whole ruleset of one family: top-level chains first, then every port's own chains,
    in the order the ports are given (callers sort them by ServicePortName)."""
    shared: dict[ChainKey, list[str]] = {key: [] for key in TOP_LEVEL}
    # Own chains go straight into the result (after placeholders that fix the top-level
    # chains' place): copying 100,000 entries from a second dict costs more than the rest.
    out: dict[ChainKey, tuple[str, ...]] = dict.fromkeys(TOP_LEVEL, ())
    for pr in ports:
        for ch in pr.shared:
            shared[ch.table, ch.name].extend(ch.rules)
        for ch in pr.own:
            out[ch.table, ch.name] = ch.rules
    for key, rules in _fixed(cfg).items():
        shared.setdefault(key, []).extend(rules)
    for key, lines in shared.items():
        out[key] = tuple(lines)
    return out


_JUMPS: tuple[tuple[Table, str, str, str, bool], ...] = (
    # (table, builtin chain, our chain, comment, only new connections); in the order the rules
    # end up in the kernel (kube-proxy prepends them one by one, in reverse of this).
    ("nat", "PREROUTING", SERVICES, "kubernetes service portals", False),
    ("nat", "OUTPUT", SERVICES, "kubernetes service portals", False),
    ("nat", "POSTROUTING", POSTROUTING, "kubernetes postrouting rules", False),
    ("filter", "INPUT", PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    ("filter", "INPUT", NODEPORTS, "kubernetes health check service ports", False),
    ("filter", "INPUT", EXTERNAL_SERVICES, "kubernetes externally-visible service portals", True),
    ("filter", "FORWARD", PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    ("filter", "FORWARD", FORWARD, "kubernetes forwarding rules", False),
    ("filter", "FORWARD", SERVICES, "kubernetes service portals", True),
    ("filter", "FORWARD", EXTERNAL_SERVICES, "kubernetes externally-visible service portals", True),
    ("filter", "OUTPUT", PROXY_FIREWALL, "kubernetes load balancer firewall", True),
    ("filter", "OUTPUT", SERVICES, "kubernetes service portals", True),
)


_KUBELET_JUMPS: tuple[tuple[Table, str, str, str, bool], ...] = (
    # kube-proxy ensures kubelet's jumps after its own, so they end up first.
    ("filter", "INPUT", FIREWALL, "", False),
    ("filter", "OUTPUT", FIREWALL, "", False),
)


def jump_rule_args(new_only: bool, comment: str, target: str) -> str:
    """The arguments of one jump rule, without `-A CHAIN` (for `iptables -C/-I` callers)."""
    ct = "-m conntrack --ctstate NEW " if new_only else ""
    if not comment:
        return f"{ct}-j {target}"
    return f'{ct}-m comment --comment "{comment}" -j {target}'


def builtin_jumps(cfg: RenderConfig) -> dict[ChainKey, tuple[str, ...]]:
    """Jumps from the built-in chains into ours (the same in both families), and into
    kubelet's KUBE-FIREWALL when kproxy fills it (localhost node ports)."""
    out: dict[ChainKey, list[str]] = {}
    jumps = _JUMPS
    if cfg.localhost_nodeports and cfg.family == 4:
        jumps = _KUBELET_JUMPS + _JUMPS
    for table, builtin, target, comment, new_only in jumps:
        out.setdefault((table, builtin), []).append(
            f"-A {builtin} {jump_rule_args(new_only, comment, target)}"
        )
    return {key: tuple(rules) for key, rules in out.items()}


def render_view(view: View, cfg: RenderConfig) -> dict[ChainKey, tuple[str, ...]]:
    with gc_paused():
        return assemble((render_port(*view[name], cfg) for name in sorted(view, key=port_order)), cfg)


def render_snapshot(view: View, cfg: RenderConfig) -> str:
    """A complete iptables-restore payload (built-in chains included) for an empty table set."""
    return restore_payload(render_view(view, cfg), builtin_jumps=builtin_jumps(cfg))
