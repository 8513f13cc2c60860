"""Which endpoints a service port sends traffic to, on this node.

Pure and shared by every backend (and the explain view), so that the iptables
rules, the userspace forwarder and the human-readable explanation never disagree
about who gets traffic. The rules are kube-proxy's (pkg/proxy/topology.go): usable
means ready, falling back to serving-and-terminating when nothing is ready,
independently for Cluster and Local policy. Hints narrow Cluster endpoints:
node hints (trafficDistribution PreferSameNode) when every ready endpoint has one and
one names this node, else zone hints when every ready endpoint has one and one names
this node's zone. kube-proxy's PreferSameTrafficDistribution gate, which guards node
hints, is GA and locked on (1.35), so there is no switch for it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kproxy.state.model import Endpoint, ServicePort


@dataclass(frozen=True, slots=True)
class Selection:
    cluster: tuple[Endpoint, ...]
    """Endpoints for Cluster-policy traffic; empty when the port never uses Cluster policy."""
    local: tuple[Endpoint, ...]
    """Endpoints for Local-policy traffic; empty when the port never uses Local policy."""
    reachable: tuple[Endpoint, ...]
    """Union of the two, in input order: every endpoint this node may DNAT to."""
    has_any: bool
    """Usable endpoints exist somewhere in the cluster (even if none is local)."""
    zone: str = ""
    """The zone hints were filtered on; empty when zone hints were ignored."""
    terminating_fallback: bool = False
    """Cluster endpoints are serving-terminating ones because none was ready."""
    local_terminating_fallback: bool = False
    node: str = ""
    """The node the node hints were filtered on; empty when node hints were ignored."""


class Reason(StrEnum):
    """Why an endpoint gets no traffic of one kind; the text is what the explain view shows."""

    NOT_READY = "not ready"
    NOT_SERVING = "terminating and not serving"
    TERMINATING = "terminating (ready endpoints exist)"
    NOT_LOCAL = "not on this node (traffic policy Local)"
    OTHER_ZONE = "hinted for another zone"
    OTHER_NODE = "hinted for another node"


def uses_cluster(sp: ServicePort) -> bool:
    """Cluster endpoints are needed for Cluster internal policy, and for any external
    traffic (even under Local external policy, pod and node traffic short-circuits to them)."""
    return not sp.internal_local or sp.has_external


def external_local(sp: ServicePort) -> bool:
    """externalTrafficPolicy only means something when something external reaches the port."""
    return sp.external_local and sp.has_external


def uses_local(sp: ServicePort) -> bool:
    return sp.internal_local or external_local(sp)


def hint_zone(endpoints: tuple[Endpoint, ...], node_zone: str) -> str:
    """The zone to filter on, or "" when hints must be ignored."""
    seen_ready = False
    zone_hinted = False
    for ep in endpoints:
        if not ep.ready:
            continue
        seen_ready = True
        if not ep.zone_hints:
            return ""
        if node_zone in ep.zone_hints:
            zone_hinted = True
    return node_zone if seen_ready and zone_hinted and node_zone else ""


def hint_node(endpoints: tuple[Endpoint, ...], node_name: str) -> str:
    """The node to filter on (PreferSameNode), or "" when node hints must be ignored."""
    hinted = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.node_hints:
            return ""
        if node_name in ep.node_hints:
            hinted = True
    return node_name if hinted and node_name else ""


def _fallback(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def categorize(
    sp: ServicePort, endpoints: tuple[Endpoint, ...], node_zone: str = "", node_name: str = ""
) -> Selection:
    if not endpoints:
        return _EMPTY
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any = False
    zone = node = ""
    cluster_fallback = False
    local_fallback = False
    if uses_cluster(sp):
        node = hint_node(endpoints, node_name)
        if node:
            cluster = tuple(ep for ep in endpoints if ep.ready and node in ep.node_hints)
        elif zone := hint_zone(endpoints, node_zone):
            cluster = tuple(ep for ep in endpoints if ep.ready and zone in ep.zone_hints)
        else:
            cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            cluster = tuple(ep for ep in endpoints if _fallback(ep))
            cluster_fallback = bool(cluster)
        has_any = bool(cluster)
    if not uses_local(sp):
        return Selection(cluster, (), cluster, has_any, zone, cluster_fallback, node=node)

    local_ready = local_term = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or ep.is_local
        elif _fallback(ep):
            has_any = True
            local_term = local_term or ep.is_local
    if local_ready:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    elif local_term:
        local = tuple(ep for ep in endpoints if ep.is_local and _fallback(ep))
        local_fallback = True

    if not uses_cluster(sp):
        reachable = local
    elif not zone and not node and not local_fallback:
        reachable = cluster  # every ready endpoint, so a superset of the local ready ones
    else:
        chosen = set(cluster) | set(local)
        reachable = tuple(ep for ep in endpoints if ep in chosen)
    return Selection(cluster, local, reachable, has_any, zone, cluster_fallback, local_fallback, node)


_EMPTY = Selection((), (), (), False)


def exclusion(ep: Endpoint, sel: Selection, local_policy: bool) -> Reason | None:
    """Why `ep` is not among the endpoints of one traffic kind (None: it is used).

    Kept out of `categorize` because only the explain view needs it."""
    chosen = sel.local if local_policy else sel.cluster
    if ep in chosen:
        return None
    if local_policy and not ep.is_local:
        return Reason.NOT_LOCAL
    if ep.ready:
        # the only ways a ready endpoint misses Cluster traffic
        return Reason.OTHER_NODE if sel.node else Reason.OTHER_ZONE
    if ep.terminating:
        return Reason.TERMINATING if ep.serving else Reason.NOT_SERVING
    return Reason.NOT_READY
