"""The real `kproxy` entry point in a subprocess, as a user meets it: every anticipated failure
exits non-zero with one line on stderr naming the thing and the fix, and never a traceback.

Nothing here gets past the start-up checks, so no test changes the host (each failure is
caught before kproxy touches a rule or a sysctl)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "manifests" / "examples" / "cluster.yaml"
KUBEADM = ROOT / "tests" / "data" / "kubeadm"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


def kproxy(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = (), stdin: str | None = None
) -> Result:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "kproxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={**base, **(env or {})},
        input=stdin,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def one_line(r: Result, code: int, *words: str) -> str:
    assert r.code == code, r
    assert len(r.lines) == 1, r.err
    line = r.lines[0]
    assert line.startswith("kproxy: "), line
    for w in words:
        assert w in line, line
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ run: start-up checks


def test_missing_kubeconfig_names_its_path(tmp_path: Path) -> None:
    r = kproxy("run", "--kubeconfig", str(tmp_path / "nope"), "--hostname-override", "node-a")
    one_line(r, 1, str(tmp_path / "nope"), "no such file", "--kubeconfig")


def test_invalid_kubeconfig_names_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("this: is: not: a kubeconfig\n")
    r = kproxy("run", "--kubeconfig", str(bad), "--hostname-override", "node-a")
    one_line(r, 1, str(bad), "not a usable kubeconfig")


def test_kubeconfig_from_a_kubeadm_config_file_is_checked_too(tmp_path: Path) -> None:
    r = kproxy("run", f"--config={KUBEADM / 'kubeadm-1.29.yaml'}", "--hostname-override=node-a")
    one_line(r, 1, "/var/lib/kube-proxy/kubeconfig.conf", "no such file")


def test_no_cluster_and_no_source_says_what_to_pass() -> None:
    r = kproxy("run", "--hostname-override", "node-a")
    one_line(r, 1, "KUBERNETES_SERVICE_HOST", "--kubeconfig", "--manifests")


@pytest.mark.privileged
def test_port_in_use_says_kube_proxy_may_still_be_running(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = kproxy(
            "run",
            "--manifests",
            str(tmp_path),
            "--healthz-bind-address",
            f"127.0.0.1:{port}",
            "--iptables-backend",
            "nft",
        )
    one_line(r, 1, f"127.0.0.1:{port}", "already in use", "kube-proxy", "--healthz-bind-address")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.privileged
def test_without_cap_net_admin_run_refuses(tmp_path: Path) -> None:
    drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    r = kproxy("run", "--manifests", str(tmp_path), prefix=drop)
    one_line(r, 1, "CAP_NET_ADMIN", "run as root")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.privileged
def test_without_cap_net_admin_cleanup_fails_instead_of_removing_nothing() -> None:
    drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    r = kproxy("cleanup", prefix=drop)
    one_line(r, 1, "CAP_NET_ADMIN")


@pytest.mark.privileged
def test_missing_iptables_tools(tmp_path: Path) -> None:
    r = kproxy("run", "--manifests", str(tmp_path), env={"PATH": str(tmp_path)})
    one_line(r, 1, "iptables", "install")


@pytest.mark.privileged
def test_cleanup_without_iptables_tools_fails(tmp_path: Path) -> None:
    r = kproxy("cleanup", env={"PATH": str(tmp_path)})
    one_line(r, 1, "iptables")


def test_missing_manifests_directory(tmp_path: Path) -> None:
    r = kproxy("run", "--manifests", str(tmp_path / "gone"))
    one_line(r, 1, "gone", "no such directory")


# ------------------------------------------------------------------ usage errors: exit 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["run", "--iptables-sync-period", "soon"], ["--iptables-sync-period", "duration"]),
        (["run", "--detect-local-mode", "Magic"], ["--detect-local-mode"]),
        (["run", "--oom-score-adj", "5000"], ["--oom-score-adj"]),
        (["run", "--detect-local-mode=BridgeInterface"], ["--pod-bridge-interface"]),
        (["dry-run", "-f", "x", "--node-name", "a", "--bogus"], ["unrecognized arguments"]),
        (["cleanup", "--bogus"], ["unrecognized arguments"]),
    ],
)
def test_usage_errors_show_the_subcommands_usage(args: list[str], words: list[str]) -> None:
    r = kproxy(*args)
    assert r.code == 2, r
    assert r.lines[0].startswith(f"usage: kproxy {args[0]}"), r.err
    assert all(w in r.lines[-1] for w in words), r.err


def test_bad_config_file_value_is_a_usage_error_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "config.conf"
    text = (KUBEADM / "kubeadm-1.29.yaml").read_text().replace("masqueradeBit: null", "masqueradeBit: 99")
    cfg.write_text(text)
    r = kproxy("run", f"--config={cfg}")
    assert r.code == 2 and "iptables.masqueradeBit" in r.lines[-1], r


# ------------------------------------------------------------------ help, version, kube-proxy's argv


def test_bare_kproxy_prints_help() -> None:
    r = kproxy()
    assert r.code == 0 and "usage: kproxy" in r.out and "dry-run" in r.out and r.err == ""


@pytest.mark.parametrize("args", [["--version"], ["version"]])
def test_version(args: list[str]) -> None:
    r = kproxy(*args)
    assert r.code == 0 and r.out.startswith("kproxy ")


def test_every_run_flag_has_help_with_its_default() -> None:
    r = kproxy("run", "--help")
    assert r.code == 0
    for flag in ("--conntrack-max-per-core", "--iptables-sync-period", "--healthz-bind-address", "--v"):
        assert flag in r.out
    assert "(default 32768)" in r.out and "(default 30s)" in r.out
    r = kproxy("cleanup", "--help")
    assert r.code == 0 and "Remove every rule" in r.out


def test_kube_proxy_argv_without_subcommand_runs(tmp_path: Path) -> None:
    """A kube-proxy DaemonSet's command line, image swapped: `kproxy --config=... --hostname-override=...`."""
    out = tmp_path / "effective.yaml"
    r = kproxy(
        f"--config={KUBEADM / 'kubeadm-1.31-dualstack.yaml'}",
        "--hostname-override=Node-A",
        f"--write-config-to={out}",
    )
    assert r.code == 0, r
    text = out.read_text()
    assert "hostnameOverride: node-a" in text and "clusterCIDR: 10.244.0.0/16,fd00:10:244::/56" in text


# ------------------------------------------------------------------ dry-run


def test_dry_run_missing_path_fails(tmp_path: Path) -> None:
    r = kproxy("dry-run", "-f", str(tmp_path / "nope.yaml"), "--node-name", "node-a")
    one_line(r, 1, "nope.yaml", "no such file")
    assert r.out == ""


def test_dry_run_directory_without_manifests_fails(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    r = kproxy("dry-run", "-f", str(tmp_path), "--node-name", "node-a")
    one_line(r, 1, "no manifests found")


def test_dry_run_reads_standard_input() -> None:
    r = kproxy(
        "dry-run", "-f", "-", "--hostname-override", "node-a", "--ip-families", "4", stdin=EXAMPLE.read_text()
    )
    assert r.code == 0, r
    assert "-j KUBE-SVC-" in r.out


EXPLAIN_OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.com}
"""


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("default/web", "did you mean demo/web?"),
        ("demo/wbe", "did you mean demo/web?"),
        ("demo/db", "headless"),
        ("demo/ext", "ExternalName"),
    ],
)
def test_explain_says_why_there_is_nothing(tmp_path: Path, target: str, says: str) -> None:
    f = tmp_path / "objs.yaml"
    f.write_text(EXPLAIN_OBJECTS)
    r = kproxy("dry-run", "-f", str(f), "--node-name", "node-a", "--explain", target)
    assert r.code == 1 and says in r.out, r
