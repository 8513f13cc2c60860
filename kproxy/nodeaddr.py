"""The node's own addresses, read over netlink with pyroute2.

Needed where kube-proxy needs them: `--nodeport-addresses` CIDRs are matched against the
addresses the node actually holds, and the node's primary IP lets it reach its own
load-balancer IPs past source ranges. Loopback and link-local addresses never count.
"""

from __future__ import annotations

import ipaddress

from kproxy import log


def node_addresses() -> tuple[str, ...]:
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a declared dependency
        return ()
    out: list[str] = []
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                value = msg.get_attr("IFA_ADDRESS")
                if not value:
                    continue
                ip = ipaddress.ip_address(value)
                if ip.is_loopback or ip.is_link_local:
                    continue
                out.append(str(ip))
    except OSError as e:
        log.warn("node_addresses_unavailable", error=str(e))
        return ()
    return tuple(dict.fromkeys(out))
