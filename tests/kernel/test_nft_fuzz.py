"""Random (and hostile) Services and EndpointSlices, through the parser, into nftables.

The generator is the iptables fuzz test's: whatever an API object says, the script
nftables mode renders must be accepted by `nft -c -f`, and applied for real it must give
the kernel exactly the chains and map elements the renderer produced.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from kproxy.backends.nftables.render import effective_elements, render_view, table_script
from kproxy.state.build import Snapshot, view
from tests.support.fuzz import clusters, configs, parse_all
from tests.support.netns import create_netns, delete_netns, run


@pytest.fixture(scope="module")
def nft_netns() -> Iterator[str]:
    name = f"knftfz{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


@pytest.mark.privileged
@given(raw=clusters())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_nft_accepts_every_rendered_table(nft_netns: str, raw: list[dict[str, Any]]) -> None:
    snapshot = Snapshot.from_objects(parse_all(raw), "node-a")
    ns_exec = ["ip", "netns", "exec", nft_netns, "nft"]
    for cfg in configs(snapshot):
        ports = render_view(view(snapshot, "node-a", cfg.family), cfg)
        script = table_script(ports, cfg)
        run([*ns_exec, "-c", "-f", "-"], input=script)
        run([*ns_exec, "-f", "-"], input=script)
        fam = "ip6" if cfg.family == 6 else "ip"
        listed = json.loads(run([*ns_exec, "-j", "list", "table", fam, "kube-proxy"]).stdout)["nftables"]
        chains = {o["chain"]["name"] for o in listed if "chain" in o}
        assert {name for po in ports for name, _ in po.chains} <= chains
        elements = 0
        for o in listed:
            s = o.get("set") or o.get("map")
            if (
                s
                and not s["name"].startswith("affinity-")
                and s["name"] not in ("nodeport-ips", "sync-state")
            ):
                elements += len(s.get("elem", []))
        assert elements == len(effective_elements(ports))
