"""`kproxy dry-run --proxy-mode nftables --explain`: the same reading of a service as in
iptables mode (addresses, shares, what is left out and why), with the nftables objects each
address leads to; every map and chain it names is in the script the same dry run prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kproxy.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "manifests" / "examples" / "cluster.yaml")
NODE = ["--node-name", "node-a"]


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["dry-run", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


NFT = ["--proxy-mode", "nftables"]
SERVICES = [
    "demo/web",
    "demo/shop",
    "demo/sticky",
    "demo/node-cache",
    "demo/empty",
    "demo/ingress",
    "demo/dual",
]


def named_objects(text: str) -> set[str]:
    """Every map, set and chain an explanation names (after `->` and on the `chains:` line)."""
    names: set[str] = set()
    for line in text.splitlines():
        if "  -> " in line:
            where = line.split("  -> ", 1)[1].split("  (only from", 1)[0]
            for part in where.split("; "):
                part = part.removesuffix(" (one element per endpoint)")
                m, _, verdict = part.partition(": ")
                names.add(m)
                if verdict.startswith("goto "):
                    names.add(verdict.removeprefix("goto "))
        elif line.startswith("  chains: ") and "none" not in line:
            names.update(n.removeprefix("set ") for n in line.removeprefix("  chains: ").split(", "))
    return names


@pytest.mark.parametrize("family", ["4", "6"])
@pytest.mark.parametrize("service", SERVICES)
def test_explain_names_only_what_the_script_holds(
    capsys: pytest.CaptureFixture[str], service: str, family: str
) -> None:
    rc, script, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *NFT, "--ip-family", family)
    assert rc == 0
    rc, text, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *NFT, "--ip-family", family, "--explain", service)
    assert rc == 0, text
    assert "KUBE-" not in text, "iptables chain names in an nftables explanation"
    declared = set(re.findall(r"^add (?:chain|map|set) ip6? kube-proxy (\S+)", script, re.M))
    declared |= set(re.findall(r"^\t(?:chain|map|set) (\S+) \{", script, re.M))
    missing = named_objects(text) - declared
    assert not missing, f"{service}: explanation names objects the script does not have: {missing}\n{text}"


def test_explain_says_where_each_address_goes(capsys: pytest.CaptureFixture[str]) -> None:
    _, web, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *NFT, "--explain", "demo/web", "--ip-family", "4")
    assert "cluster IP   10.96.10.10:80  -> plain-cluster-ips; endpoints-2 (one element per endpoint)" in web
    assert "chains: none (map elements only)" in web and "50.0%" in web
    _, shop, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *NFT, "--explain", "demo/shop", "--ip-family", "4")
    assert "firewall-ips: goto firewall-" in shop and "(only from 203.0.113.0/24" in shop
    _, empty, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *NFT, "--explain", "demo/empty", "--ip-family", "4")
    assert "no-endpoint-services: goto reject-chain" in empty and "REJECT" in empty
    _, ipt, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/web", "--ip-family", "4")
    assert "-> KUBE-SVC-" in ipt, "iptables mode's explanation is unchanged"
