"""Chains already in the kernel are recognised however iptables-save spells them."""

from __future__ import annotations

import pytest

from kproxy.backends.iptables.adopt import canonical_rule, chains_in_save
from tests.support.adopt import adoptable

SAME = [
    (
        "-A KUBE-SEP-X -m comment --comment demo/api:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.22:8080",
        '-A KUBE-SEP-X -p tcp -m comment --comment "demo/api:http" -m tcp -j DNAT --to-destination 10.244.1.22:8080',
    ),
    (
        "-A KUBE-SEP-X -m comment --comment demo/api:http -s 10.244.1.22/32 -j KUBE-MARK-MASQ",
        '-A KUBE-SEP-X -s 10.244.1.22/32 -m comment --comment "demo/api:http" -j KUBE-MARK-MASQ',
    ),
    (
        "-A KUBE-SEP-X -s 10.244.1.22 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-X -s 10.244.1.22/32 -j KUBE-MARK-MASQ",
    ),
    ("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000", "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"),
    ("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000", "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0"),
    (
        "-A KUBE-SVC-X -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-A",
        "-A KUBE-SVC-X -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A",
    ),
    (
        "-A KUBE-SEP-X -m recent --name KUBE-SEP-X --set -m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80",
        "-A KUBE-SEP-X -p tcp -m recent --set --name KUBE-SEP-X --mask 255.255.255.255 --rsource -m tcp "
        "-j DNAT --to-destination 10.0.0.1:80",
    ),
    (
        "-A KUBE-SERVICES -d 10.96.0.9/32 -p tcp -m tcp --dport 80 -j REJECT",
        "-A KUBE-SERVICES -d 10.96.0.9/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable",
    ),
]

DIFFERENT = [
    (
        "-A KUBE-SEP-X -p tcp -m tcp -j DNAT --to-destination 10.244.1.22:8080",
        "-A KUBE-SEP-X -p tcp -m tcp -j DNAT --to-destination 10.244.1.23:8080",
    ),
    (
        "-A KUBE-SVC-X -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A",
        "-A KUBE-SVC-X -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A",
    ),
    (
        "-A KUBE-SVC-X ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        "-A KUBE-SVC-X -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
    ),
    ("-A KUBE-SVC-X -p tcp -j KUBE-SEP-A", "-A KUBE-SVC-X -p udp -j KUBE-SEP-A"),
    (
        "-A KUBE-SEP-X -m recent --name KUBE-SEP-X --set -j DNAT --to-destination 10.0.0.1:80",
        "-A KUBE-SEP-X -j DNAT --to-destination 10.0.0.1:80",
    ),
]


@pytest.mark.parametrize(("ours", "saved"), SAME, ids=[f"same-{i}" for i in range(len(SAME))])
def test_spellings_of_one_rule_are_equal(ours: str, saved: str) -> None:
    assert canonical_rule(ours, 4) == canonical_rule(saved, 4)


@pytest.mark.parametrize(("ours", "saved"), DIFFERENT, ids=[f"diff-{i}" for i in range(len(DIFFERENT))])
def test_rules_that_differ_in_effect_differ(ours: str, saved: str) -> None:
    assert canonical_rule(ours, 4) != canonical_rule(saved, 4)


def test_ipv6_host_masks() -> None:
    a = "-A KUBE-SEP-X -s fd00:10:244::5/128 -j KUBE-MARK-MASQ"
    b = "-A KUBE-SEP-X -s fd00:10:244::5 -j KUBE-MARK-MASQ"
    assert canonical_rule(a, 6) == canonical_rule(b, 6)


def test_only_chains_held_exactly_are_adoptable() -> None:
    saved = chains_in_save(
        "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SVC-B - [0:0]\n:KUBE-SVC-C - [0:0]\n"
        "-A KUBE-SVC-A -j KUBE-SEP-1\n-A KUBE-SVC-B -j KUBE-SEP-2\n-A KUBE-SVC-B -j KUBE-SEP-3\nCOMMIT\n"
    )
    wanted = {
        "KUBE-SVC-A": ("-A KUBE-SVC-A -j KUBE-SEP-1",),
        "KUBE-SVC-B": ("-A KUBE-SVC-B -j KUBE-SEP-2",),
        "KUBE-SVC-C": (),
        "KUBE-SVC-D": (),
    }
    assert adoptable(saved, wanted, 4) == {"KUBE-SVC-A", "KUBE-SVC-C"}
