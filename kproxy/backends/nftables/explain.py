"""`kproxy dry-run --proxy-mode nftables --explain`: what nftables mode installs for a port.

The reading of a service (addresses, shares, endpoints left out) is the same in every mode;
this supplies nftables mode's part: an address leads to the map elements it is a key of and
their verdicts rather than to a chain, since most services here are map elements only.
"""

from __future__ import annotations

from collections.abc import Callable

from kproxy.backends.nftables.render import render_port
from kproxy.config import RenderConfig
from kproxy.state.model import Endpoint, ServicePort


def nftables_objects(
    sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig
) -> tuple[list[str], Callable[[str, str], str], str]:
    """The port's own chains and sets; for an address (kind: cluster, external, lb or node), the
    map elements it is a key of; the text for a port with endpoints but no chain."""
    po = render_port(sp, eps, cfg)
    own = [name for name, _ in po.chains] + [f"set {name}" for name, _ in po.sets]
    proto = sp.protocol.lower()

    def arrow(kind: str, ip: str) -> str:
        key = f"{proto} . {sp.node_port}" if kind == "node" else f"{ip} . {proto} . {sp.port}"
        found: list[str] = []
        per_endpoint: set[str] = set()
        for m, k, v in po.elements:
            if k == key:
                found.append(f"{m}: {v}" if v else m)
            elif k.startswith(f"{key} . "):
                per_endpoint.add(m)
        found += [f"{m} (one element per endpoint)" for m in sorted(per_endpoint)]
        return f"  -> {'; '.join(found)}" if found else ""

    return own, arrow, "none (map elements only)"
