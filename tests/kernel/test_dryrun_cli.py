"""`kproxy dry-run`: what a user sees on stdout and stderr, exit codes, and that the kernel takes it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.cli import main
from tests.support.netns import BACKENDS, Backend, create_netns, delete_netns, restore_command, run
from tests.support.tracer import Tracer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "manifests" / "examples" / "cluster.yaml")
BROKEN = str(ROOT / "manifests" / "examples" / "broken" / "bad.yaml")
NODE = ["--node-name", "node-a"]
CIDRS = ["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"]


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["dry-run", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def chains_of_payload(payload: str) -> dict[tuple[str, str], list[str]]:
    """iptables-restore input back into chains (only what our payloads contain)."""
    chains: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chains.setdefault((table, line[1:].split()[0]), [])
        elif line.startswith("-A "):
            chains[table, line.split()[1]].append(line)
        else:
            assert line == "COMMIT", line
    return chains


def test_payload_on_stdout_only(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS)
    assert rc == 0
    assert err == ""
    assert out.startswith("*filter\n") and out.endswith("COMMIT\n")
    assert "-j KUBE-SVC-" in out and "--to-destination 10.244.0.11:8080" in out
    assert "fd00:" not in out  # IPv4 unless asked


def test_rendered_example_routes_web_to_both_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS)
    chains = chains_of_payload(out)
    tracer = Tracer(chains, ["192.168.50.10"])
    got = tracer.trace("10.244.0.200", "tcp", "10.96.10.10", 80)
    assert set(got.endpoints) == {"10.244.0.11:8080", "10.244.1.12:8080"}
    assert not got.masquerade
    assert tracer.trace("10.244.0.200", "tcp", "10.96.10.80", 80).verdict == "REJECT"  # demo/empty


def test_ipv6_payload(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS, "--ip-family", "6")
    assert rc == 0
    assert "fd00:10:96::" in out and "10.96." not in out
    assert "! -s fd00:10:244::/56 -j KUBE-MARK-MASQ" in out
    assert "10.244.0.0/16" not in out


def test_cluster_cidr_of_the_rendered_family(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS)
    assert "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in out


def test_two_cidrs_of_one_family_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = dry_run(capsys, "-f", EXAMPLE, *NODE, "--cluster-cidr", "10.244.0.0/16,10.245.0.0/16")
    assert rc == 2 and out == "" and "one per family" in err


def test_bad_cidr_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dry-run", "-f", EXAMPLE, *NODE, "--cluster-cidr", "10.244.0.0/99"])
    assert exc.value.code == 2
    assert "is not a CIDR" in capsys.readouterr().err


def test_nodeport_addresses_pick_node_ips(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--nodeport-addresses", "192.168.50.0/24,fd00:50::/64")
    tail = [
        line for line in out.splitlines() if line.endswith("-j KUBE-NODEPORTS") and "KUBE-SERVICES" in line
    ]
    assert len(tail) == 1 and "-d 192.168.50.10/32" in tail[0]
    assert "--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" not in out


def test_masquerade_all(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS, "--masquerade-all")
    svc_chains = [
        rules for (_, name), rules in chains_of_payload(out).items() if name.startswith("KUBE-SVC-")
    ]
    assert svc_chains
    for rules in svc_chains:
        assert rules[0].endswith("-j KUBE-MARK-MASQ") and "! -s" not in rules[0]


def test_skipped_objects_warn_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = dry_run(capsys, "-f", EXAMPLE, "-f", BROKEN, *NODE)
    assert rc == 0
    assert out.endswith("COMMIT\n")
    lines = err.splitlines()
    assert len(lines) >= 3
    for line in lines:
        assert line.startswith("kproxy: skipped ") and "bad.yaml" in line
    assert any("Service demo/bad-port" in line and "spec.ports[1].port" in line for line in lines)
    assert any("EndpointSlice demo/bad-port-abcde" in line and "addresses[0]" in line for line in lines)
    assert "bad-port" not in out and "bad-name" not in out and "10.244.0.5 -j ACCEPT" not in out


def test_strict_fails_on_skipped_objects(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = dry_run(capsys, "-f", EXAMPLE, "-f", BROKEN, *NODE, "--strict")
    assert rc == 1
    assert out.endswith("COMMIT\n")  # still printed: the good objects render
    assert dry_run(capsys, "-f", EXAMPLE, *NODE, "--strict")[0] == 0


def test_unknown_node_still_renders(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = dry_run(capsys, "-f", EXAMPLE, "--node-name", "node-zz")
    assert rc == 0
    assert "KUBE-SVC-" in out
    assert "no Node 'node-zz'" in err


def test_explain_shares_and_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/web")
    assert rc == 0
    assert "cluster IP   10.96.10.10:80" in out and "50.0%" in out and "node-a (this node)" in out
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/catalog")
    assert "hinted for another zone" in out
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/checkout")
    assert "terminating (ready endpoints exist)" in out
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/node-cache")
    assert "not on this node" in out and "100.0%" in out
    _, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/empty")
    assert "REJECT" in out


def test_explain_families(capsys: pytest.CaptureFixture[str]) -> None:
    _, both, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/dual")
    assert "demo/dual:http TCP IPv4" in both and "demo/dual:http TCP IPv6" in both
    assert "not used for" not in both
    _, v4, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/dual", "--ip-family", "4")
    assert "IPv6" in v4 and "IPv6 endpoint, not used for IPv4" in v4 and "TCP IPv6" not in v4


def test_explain_unknown_service(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, "--explain", "demo/nope")
    assert rc == 1 and "not found" in out


def test_python_dash_m() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kproxy", "dry-run", "-f", EXAMPLE, *NODE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("*filter\n")


# ------------------------------------------------------------------ the kernel accepts it


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"krender{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


@pytest.mark.privileged
@pytest.mark.parametrize("backend", BACKENDS)
def test_example_payload_accepted_by_kernel(
    capsys: pytest.CaptureFixture[str], netns: str, backend: Backend
) -> None:
    for family in (4, 6):
        rc, out, _ = dry_run(capsys, "-f", EXAMPLE, *NODE, *CIDRS, "--ip-family", str(family))
        assert rc == 0
        run(["ip", "netns", "exec", netns, restore_command(backend, family), "--test"], input=out)
        # and for real, then read back: every chain we declared exists
        run(["ip", "netns", "exec", netns, restore_command(backend, family)], input=out)
        saved = run(
            ["ip", "netns", "exec", netns, restore_command(backend, family).replace("-restore", "-save")]
        ).stdout
        for (_, chain), _rules in chains_of_payload(out).items():
            assert f":{chain} " in saved


def test_ignored_fields_are_warned_about_and_the_service_still_renders(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 10.3: a loopback external IP and an implausible kproxy annotation are left out with a
    warning naming the object and field; the Service renders, and --strict does not fail on it."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "odd", "namespace": "demo", "annotations": {"kproxy.io/lb-algorithm": 7}},
        "spec": {"clusterIP": "10.96.9.9", "externalIPs": ["127.0.0.1"], "ports": [{"port": 80}]},
    }
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(svc))
    rc, out, err = dry_run(capsys, "-f", str(path), *NODE, *CIDRS, "--strict")
    assert rc == 0
    assert "-d 10.96.9.9/32" in out and "127.0.0.1" not in out
    assert f"warning: {path}:1: Service demo/odd: spec.externalIPs[0]: 127.0.0.1 is ignored" in err
    assert "metadata.annotations[kproxy.io/lb-algorithm]: must be a string" in err
