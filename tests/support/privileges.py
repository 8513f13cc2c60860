"""Whether this host can run the privileged (namespace and iptables) tests, and whether it must."""

from __future__ import annotations

import os
import shutil

REQUIRED = os.environ.get("KPROXY_REQUIRE_PRIVILEGED") == "1"


def privileged_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in (
        "ip",
        "iptables-legacy",
        "iptables-nft",
        "ip6tables-legacy",
        "ip6tables-nft",
        "conntrack",
        "nft",
    ):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (apt-get install iptables nftables iproute2 conntrack)"
    return None
