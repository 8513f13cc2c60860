"""The renderer's fast paths must name chains exactly as the plain ones do.

A SEP name that drifts by one character strands every endpoint chain a node already
has (and breaks the hand-over from kube-proxy), so the batch encoder and the SEP name
cache are checked against `sep_chain`, one name at a time.
"""

from __future__ import annotations

import random

import pytest

from kproxy.backends.iptables import render
from kproxy.backends.iptables.naming import hash16, sep_chains
from kproxy.backends.iptables.render import render_port
from kproxy.config import RenderConfig
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName
from tests.support.naming import sep_chain


@pytest.mark.parametrize("count", [0, 1, 2, 63, 64, 65, 128, 129, 300], ids=lambda n: f"{n}-names")
def test_batch_sep_names_match_one_at_a_time(count: int) -> None:
    prefix = "default/web:httptcp"
    hostports = [f"10.1.{i // 256}.{i % 256}:8080" for i in range(count)]
    assert sep_chains(prefix, hostports) == ["KUBE-SEP-" + hash16(prefix + hp) for hp in hostports]


@pytest.mark.parametrize(
    ("prefix", "hostport"),
    [
        ("ns/svc:dnsudp", "[fd00::1]:53"),
        ("ns/svc-ü:pörtsctp", "10.0.0.1:9"),
        ("", ""),
        ("a" * 300, "[2001:db8::ffff:ffff]:65535"),
    ],
    ids=["ipv6", "non-ascii", "empty", "long"],
)
def test_batch_sep_names_odd_inputs(prefix: str, hostport: str) -> None:
    assert sep_chains(prefix, [hostport]) == ["KUBE-SEP-" + hash16(prefix + hostport)]


def test_random_inputs_match() -> None:
    rng = random.Random(7)
    for _ in range(300):
        prefix = "".join(rng.choice("ab/:-üx9") for _ in range(rng.randrange(40)))
        hps = ["".join(rng.choice("0123456789.:[]af") for _ in range(rng.randrange(1, 48))) for _ in range(5)]
        assert sep_chains(prefix, hps) == ["KUBE-SEP-" + hash16(prefix + hp) for hp in hps]


def _sep_targets(sp: ServicePort, eps: tuple[Endpoint, ...], cfg: RenderConfig) -> list[str]:
    return [c.name for c in render_port(sp, eps, cfg).own if c.name.startswith("KUBE-SEP-")]


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_sep_names_stay_right_as_endpoints_come_and_go(family: Family) -> None:
    """Re-renders reuse cached names for endpoints that stayed and hash the new ones."""
    name = ServicePortName("shop", "cart", "http", "TCP")
    vip = "10.96.0.10" if family == 4 else "fd00:96::10"
    sp = ServicePort(name, family, vip, 80)
    cfg = RenderConfig(family=family, node_name="n")

    def ep(i: int) -> Endpoint:
        return Endpoint(f"10.244.0.{i}" if family == 4 else f"fd00:244::{i:x}", 8080)

    render._sep.clear()
    for members in ([1, 2, 3], [2, 3, 4], [4], [1, 2, 3, 4, 5], []):
        eps = tuple(sorted((ep(i) for i in members), key=lambda e: e.hostport))
        render_port.cache_clear()
        assert _sep_targets(sp, eps, cfg) == [sep_chain(name, e.hostport) for e in eps]
