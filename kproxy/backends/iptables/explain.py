"""`kproxy dry-run --explain`: one service as a person reads it.

For each port and family: the addresses that reach it, the chains it owns, which
endpoints get which share of traffic, and every endpoint left out with the reason.
Built from the same functions as the rules (`categorize`, and the `render_port` of the
mode: iptables mode's here, nftables mode's through kproxy.backends.nftables.explain), so
the text cannot disagree with what is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kproxy.backends.iptables.render import render_port
from kproxy.config import RenderConfig
from kproxy.state.build import Snapshot, excluded_endpoints, merge_endpoints, service_ports
from kproxy.state.model import Endpoint, ServiceKey, ServicePort, in_family
from kproxy.state.topology import Selection, categorize, exclusion, external_local, uses_cluster

Arrows = Callable[[str, str], str]
"""(kind of address: cluster, external, lb or node; the address) -> where it leads, as text."""
Objects = tuple[list[str], Arrows, str]
"""What one mode puts in the kernel for a port: its own chains (and sets), where each address
leads, and what to say when it owns no chain although endpoints exist."""
ObjectsOf = Callable[[ServicePort, tuple[Endpoint, ...], RenderConfig], Objects]


def _hp(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _where(ep: Endpoint) -> str:
    node = ep.node_name or "node unknown"
    return f"{node} (this node)" if ep.is_local else node


def _shares(eps: tuple[Endpoint, ...], indent: str) -> list[str]:
    share = 100.0 / len(eps)
    width = max(len(ep.hostport) for ep in eps)
    lines = []
    for ep in eps:
        note = "  serving, terminating (no ready endpoint left)" if not ep.ready else ""
        lines.append(f"{indent}{ep.hostport:<{width}}  {share:5.1f}%  {_where(ep)}{note}")
    return lines


def _left_out(eps: tuple[Endpoint, ...], sel: Selection, local: bool, indent: str) -> list[str]:
    out = []
    for ep in eps:
        why = exclusion(ep, sel, local)
        if why is not None:
            hint = (
                f" (hints: {', '.join(sorted(ep.zone_hints))}; this node: {sel.zone})"
                if why.name == "OTHER_ZONE"
                else ""
            )
            out.append(f"{indent}{ep.hostport}  {why.value}{hint}  [{_where(ep)}]")
    return out


def iptables_objects(sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig) -> Objects:
    """iptables mode: the port's own chains, and the chain each kind of address jumps to."""
    own = [c.name for c in render_port(sp, eps, cfg).own]
    svc = next((n for n in own if n.startswith("KUBE-SVC-")), "")
    svl = next((n for n in own if n.startswith("KUBE-SVL-")), "")
    ext = next((n for n in own if n.startswith("KUBE-EXT-")), "")
    fw = next((n for n in own if n.startswith("KUBE-FW-")), "")
    by_kind = {"cluster": svl if sp.internal_local else svc, "external": ext, "lb": fw or ext, "node": ext}

    def arrow(kind: str, _ip: str) -> str:
        return f"  -> {by_kind[kind]}" if by_kind[kind] else ""

    return own, arrow, "none (no endpoints)"


def explain_port(
    sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig, objects_of: ObjectsOf = iptables_objects
) -> list[str]:
    sel = categorize(sp, eps, cfg.node_zone, cfg.node_name)
    own, arrow, no_chain = objects_of(sp, eps, cfg)
    fam = f"IPv{sp.family}"
    lines = [f"{sp.name} {sp.protocol} {fam}"]
    ext_local = external_local(sp)

    lines.append("  reached at:")
    lines.append(f"    cluster IP   {_hp(sp.cluster_ip, sp.port)}" + arrow("cluster", sp.cluster_ip))
    for ip in sp.external_ips:
        lines.append(f"    external IP  {_hp(ip, sp.port)}" + arrow("external", ip))
    for ip in sp.load_balancer_ips:
        ranges = (
            f"  (only from {', '.join(sp.load_balancer_source_ranges)})"
            if sp.load_balancer_source_ranges
            else ""
        )
        lines.append(f"    LB IP        {_hp(ip, sp.port)}" + arrow("lb", ip) + ranges)
    if sp.node_port:
        if cfg.nodeport_ips is None:
            where = "every local address but loopback"
        else:
            where = ", ".join(cfg.nodeport_ips) or "no address (none matches --nodeport-addresses)"
        lines.append(f"    node port    {sp.node_port} on {where}" + arrow("node", ""))
    if sp.health_check_node_port:
        lines.append(f"    health check node port {sp.health_check_node_port} (tcp, accepted)")
    if sp.affinity_timeout:
        lines.append(
            f"  session affinity: ClientIP for {sp.affinity_timeout} s; a client keeps the endpoint it first reached,"
            " so the shares below are for new clients"
        )
    if own:
        lines.append(f"  chains: {', '.join(own)}")
    elif sel.has_any:
        lines.append(f"  chains: {no_chain}")
    else:
        lines.append("  chains: none (no endpoints)")

    if not sel.has_any:
        lines.append("  no usable endpoint anywhere: every address above answers with REJECT")
    else:
        int_policy = "Local" if sp.internal_local else "Cluster"
        chosen = sel.local if sp.internal_local else sel.cluster
        lines.append(f"  cluster IP traffic (internalTrafficPolicy {int_policy}):")
        if chosen:
            lines.extend(_shares(chosen, "    "))
        else:
            lines.append("    none on this node: dropped (DROP)")
        lines.extend(_left_out(eps, sel, sp.internal_local, "    left out: "))
        if sp.has_external:
            policy = "Local" if ext_local else "Cluster"
            lines.append(f"  external traffic (externalTrafficPolicy {policy}):")
            if not ext_local:
                lines.append("    as cluster IP traffic, source masqueraded")
            elif sel.local:
                lines.extend(_shares(sel.local, "    "))
                lines.append("    source address kept; from pods and from this node: as cluster IP traffic")
                lines.extend(_left_out(eps, sel, True, "    left out: "))
            else:
                lines.append(
                    "    no endpoint on this node: dropped (DROP); from pods and this node: as cluster IP traffic"
                )
        if uses_cluster(sp) and sp.internal_local and sel.cluster:
            lines.append("  (pod and node traffic to external addresses uses the cluster-wide endpoints)")
    return lines


def explain(
    snapshot: Snapshot,
    key: ServiceKey,
    cfgs: Sequence[RenderConfig],
    objects_of: ObjectsOf = iptables_objects,
) -> str:
    """`cfgs`: one RenderConfig per family to show, in order; `objects_of`: the mode's objects
    (iptables mode's by default; nftables mode passes its own)."""
    svc = snapshot.services.get(key)
    if svc is None:
        return f"service {key} not found (or ignored: headless, ExternalName, no cluster IP, other proxy)\n"
    lines = [f"service {key} ({svc.type})"]
    for cfg in cfgs:
        ports = service_ports(svc, cfg.family)
        if not ports:
            lines.extend(("", f"IPv{cfg.family}: no cluster IP of this family"))
        eps = merge_endpoints(snapshot.slices.get(key, ()), cfg.node_name, cfg.family)
        for sp in ports:
            lines.append("")
            lines.extend(explain_port(sp, eps.get(sp.name, ()), cfg, objects_of))
        extra = excluded_endpoints(snapshot, key, cfg.node_name, cfg.family)
        if len(cfgs) > 1:  # the other family's endpoints are shown under that family
            extra = tuple(x for x in extra if in_family(x.endpoint.ip, cfg.family))
        if extra:
            lines.append("")
            lines.append(f"not used for IPv{cfg.family}:")
            lines.extend(f"  {x.port_name} {x.endpoint.hostport}  {x.reason}" for x in extra)
    return "\n".join(lines) + "\n"
