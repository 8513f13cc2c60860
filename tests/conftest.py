"""Shared test plumbing.

Privileged tests need root, `ip netns` and iptables. Without them they skip with the
reason; when KPROXY_REQUIRE_PRIVILEGED=1 (set by .ci/run) a missing prerequisite is a
failure instead, so CI can never go green by skipping the kernel tests.
"""

from __future__ import annotations

import os
import shutil

import pytest

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


@pytest.fixture(autouse=True)
def _privileged_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is None:
        return
    reason = privileged_missing()
    if reason is None:
        return
    if REQUIRED:
        pytest.fail(f"KPROXY_REQUIRE_PRIVILEGED=1 but this test {reason}")
    pytest.skip(reason)
