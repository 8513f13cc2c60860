"""`kproxy cleanup` removes what a service proxy owns, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kproxy.backends.iptables.cleanup import cleanup, cleanup_payload

REPO = Path(__file__).resolve().parent.parent

SAVED = """\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m tcp -j DNAT --to-destination 10.244.0.5:80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
"""


def test_payload_unhooks_and_deletes_only_proxy_chains() -> None:
    payload = cleanup_payload(SAVED)
    lines = payload.splitlines()
    assert '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in lines
    assert sorted(line for line in lines if line.startswith("-X")) == [
        "-X KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-X KUBE-SERVICES",
        "-X KUBE-SVC-XPGD46QRK7WJZT7O",
    ]
    assert "CNI-HOSTPORT-DNAT" not in payload
    assert "KUBE-FIREWALL" not in payload, "kubelet's chain is not ours to delete"
    assert "*filter" not in payload


def test_nothing_to_clean_is_an_empty_payload() -> None:
    assert cleanup_payload("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


@pytest.mark.privileged
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_cleanup_empties_a_node_of_proxy_rules_in_both_families(backend: str) -> None:
    ns = f"kpclean{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        exec_ns = ["ip", "netns", "exec", ns]
        for family in ("4", "6"):
            payload = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kproxy",
                    "dry-run",
                    "-f",
                    str(REPO / "manifests/examples"),
                    "--node-name",
                    "node-a",
                    "--ip-family",
                    family,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            restore = f"ip{'6' if family == '6' else ''}tables-{backend}-restore"
            subprocess.run([*exec_ns, restore], input=payload, text=True, check=True)
            iptables = f"ip{'6' if family == '6' else ''}tables-{backend}"
            subprocess.run([*exec_ns, iptables, "-t", "nat", "-N", "SOMEONE-ELSES"], check=True)
        cleanup(netns=ns)
        for family in ("", "6"):
            saved = subprocess.run(
                [*exec_ns, f"ip{family}tables-{backend}-save"], capture_output=True, text=True, check=True
            ).stdout
            chains = [line.split()[0][1:] for line in saved.splitlines() if line.startswith(":")]
            assert not [c for c in chains if c.startswith("KUBE-")], saved
            assert "SOMEONE-ELSES" in chains
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
