"""Every command the documentation shows either runs here as written, or is excluded on purpose.

Commands come from the shell blocks of README.md and bench/README.md, from inline `kproxy ...`
spans in README.md's prose, and from the header comments of manifests/ files and the
Containerfile (lines indented under a `#`). Each is matched against RULES: it is run from the
repository root with the test's venv first on PATH (what activating the venv does), inside a
network namespace made for it when it touches iptables, or skipped with the reason it cannot
run here (it needs a cluster, a container engine, installs packages...). A command no rule
matches fails, so a new command in the docs is either run or consciously excluded.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DOCS = (REPO / "README.md", REPO / "bench" / "README.md")
HEADER_FILES = (
    *sorted((REPO / "manifests").rglob("*.yaml")),
    REPO / "manifests" / "Kustomization",
    REPO / "Containerfile",
)
COMMAND_WORDS = ("kproxy", ".venv/bin/", "kubectl", "kubeadm", "podman", "docker", "python", "sudo", "curl")


@dataclass(frozen=True)
class Rule:
    pattern: str
    action: str  # "run"; "netns": root, in a namespace of its own; "agent": as netns, until healthy; "skip"
    reason: str = ""


RULES: tuple[Rule, ...] = (
    Rule(r"apt-get ", "skip", "installs system packages on the machine"),
    Rule(r"python3 -m venv \.venv$", "skip", "creates the venv these tests already run in"),
    Rule(r"\.venv/bin/pip install ", "skip", "installs the package these tests already run from"),
    Rule(r"\. \.venv/bin/activate$", "skip", "activating the venv is what this test's PATH does"),
    Rule(r"\.venv/bin/python -m pytest", "skip", "is this test suite"),
    Rule(
        r"\.venv/bin/(lint-imports|ruff check \.|ruff format --check \.|mypy)$",
        "skip",
        "a static check: .ci/run runs it before this suite and fails on any finding",
    ),
    Rule(r"(podman|docker) ", "skip", "needs a container engine and a registry"),
    Rule(
        r"(debootstrap |rm -rf /tmp/rootfs/|tar -C /tmp/rootfs |pip wheel --wheel-dir /tmp/wheelhouse )",
        "skip",
        "the image's offline base and wheels: tests/e2e/test_image.py runs these steps",
    ),
    Rule(
        r"kubectl ", "skip", "needs a cluster (tests/unit/test_kubeadm_switch.py runs the manifests offline)"
    ),
    Rule(r"kubeadm ", "skip", "needs a kubeadm control-plane node"),
    Rule(r"curl ", "skip", "needs a node agent running in a cluster"),
    Rule(
        r"kproxy (run|dry-run)( --manifests DIR| --proxy-mode (userspace|nftables))?$",
        "skip",
        "a fragment in prose, not a whole command line",
    ),
    Rule(r"kproxy run --help$", "run"),
    Rule(r"kproxy --version$", "run"),
    Rule(
        r"kproxy --config=/var/lib/kube-proxy/",
        "skip",
        "kubeadm's DaemonSet command line: needs the pod's mounts",
    ),
    Rule(
        r"kproxy run --write-config-to=FILE$",
        "skip",
        "a placeholder path; tests/unit/test_kubeadm_config.py writes and reloads it",
    ),
    Rule(r"kproxy run --manifests manifests/examples/ ", "agent"),
    Rule(r"kproxy run --kubeconfig ", "skip", "needs a cluster's API server"),
    Rule(
        r"kproxy run --config=/etc/kproxy/",
        "skip",
        "the DaemonSet's command line: needs the pod's mounts and an API server",
    ),
    Rule(r"kproxy dry-run [^|]*\| iptables-restore --test$", "netns"),
    Rule(r"(\.venv/bin/)?kproxy dry-run [^|]*$", "run"),
    Rule(r"kproxy cleanup$", "netns"),
)


@dataclass(frozen=True)
class Command:
    text: str
    source: str


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _logical_lines(lines: list[str]) -> Iterator[str]:
    joined = ""
    for raw in lines:
        line = raw.strip()
        if line.endswith("\\"):
            joined += line[:-1].strip() + " "
            continue
        joined += line
        if joined and not joined.startswith("#"):
            yield _strip_comment(joined)
        joined = ""


def _steps(line: str) -> list[str]:
    return [step.strip() for step in line.split(" && ") if step.strip()]


def doc_commands(path: Path) -> Iterator[Command]:
    text = path.read_text()
    name = path.relative_to(REPO)
    for block in re.finditer(r"^[ \t]*```(?:sh|bash|shell)\n(.*?)^[ \t]*```", text, re.M | re.S):
        for line in _logical_lines(block.group(1).splitlines()):
            for step in _steps(line):
                yield Command(step, str(name))
    if path.name == "README.md" and path.parent == REPO:
        prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.M | re.S)
        for span in re.findall(r"`(kproxy [^`]+)`", prose):
            yield Command(span.strip(), f"{name} (prose)")


def header_commands(path: Path) -> Iterator[Command]:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return
        m = re.match(r"#\s{2,}(\S.*)$", line)
        if m and m.group(1).startswith(COMMAND_WORDS):
            for step in _steps(_strip_comment(m.group(1))):
                yield Command(step, f"{path.relative_to(REPO)} (header)")


def all_commands() -> list[Command]:
    seen: dict[str, Command] = {}
    for doc in DOCS:
        for c in doc_commands(doc):
            seen.setdefault(c.text, c)
    for path in HEADER_FILES:
        for c in header_commands(path):
            seen.setdefault(c.text, c)
    return list(seen.values())


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, command)), None)


def _params() -> list[object]:
    """The commands that run here; those a skip rule excludes are checked by the test below."""
    params: list[object] = []
    for c in all_commands():
        rule = rule_for(c.text)
        if rule is not None and rule.action == "skip":
            continue
        marks = [pytest.mark.privileged] if rule is not None and rule.action in ("netns", "agent") else []
        params.append(pytest.param(c, rule, marks=marks, id=c.text[:90]))
    return params


def test_every_excluded_command_says_why() -> None:
    """A command that cannot run here is excluded by a rule with a reason, never silently."""
    excluded = {c.text: rule_for(c.text) for c in all_commands()}
    reasons = {text: r.reason for text, r in excluded.items() if r is not None and r.action == "skip"}
    assert all(reasons.values()), reasons
    assert len(reasons) < len(excluded), "every documented command is excluded: nothing would run"


def _shell(command: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    command = re.sub(r"(^|\s)\.venv/bin/", rf"\g<1>{VENV_BIN}/", command)
    argv = ["bash", "-o", "pipefail", "-c", command]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_documentation_has_commands_from_every_source() -> None:
    sources = {c.source for c in all_commands()}
    assert {"README.md", "bench/README.md", "README.md (prose)"} <= sources
    assert any(s.startswith("manifests/examples/") for s in sources), sources


@pytest.mark.parametrize(("command", "rule"), _params())
def test_documented_command(command: Command, rule: Rule | None) -> None:
    assert rule is not None, (
        f"{command.source}: `{command.text}` matches no rule in {Path(__file__).name}: "
        "make it run here, or add a skip rule saying why it cannot"
    )
    if rule.action == "run":
        done = _shell(command.text)
        assert done.returncode == 0, (
            f"{command.source}: `{command.text}` exited {done.returncode}:\n{done.stderr}"
        )
        return
    netns = f"kpdoc{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        if rule.action == "agent":
            _run_agent_until_healthy(command, netns)
            return
        done = _shell(command.text, netns)
        assert done.returncode == 0, (
            f"{command.source}: `{command.text}` exited {done.returncode}:\n{done.stderr}"
        )
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False, timeout=30)


def _healthz(netns: str) -> int | None:
    from tests.support.netns import entered

    with entered(netns):
        try:
            with urllib.request.urlopen("http://127.0.0.1:10256/healthz", timeout=2) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return None


def _run_agent_until_healthy(command: Command, netns: str) -> None:
    """Start the agent as documented, wait (bounded) for /healthz 200, stop it with SIGTERM."""
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=30)
    argv = shlex.split(command.text)
    argv[0] = str(VENV_BIN / argv[0])
    # The log goes to a file, not a pipe, so the agent never blocks writing it.
    with tempfile.TemporaryFile(mode="w+") as log:
        agent = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            status = None
            for _ in range(300):
                status = _healthz(netns)
                if status == 200 or agent.poll() is not None:
                    break
                time.sleep(0.1)
            log.seek(0)
            assert status == 200, f"`{command.text}`: /healthz answered {status}:\n{log.read()}"
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
            log.seek(0)
            assert agent.returncode == 0, (
                f"`{command.text}` exited {agent.returncode} on SIGTERM:\n{log.read()}"
            )
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=30)


def test_bench_readme_covers_every_benchmark() -> None:
    text = (REPO / "bench" / "README.md").read_text()
    scripts = sorted(p.stem for p in (REPO / "bench").glob("*_bench.py"))
    assert scripts
    missing = [s for s in scripts if f"bench/{s}.py" not in text and f"bench.{s}" not in text]
    assert not missing, f"bench/README.md does not say how to run {missing}"


@pytest.mark.parametrize("doc", [*DOCS, *sorted((REPO / "bench").glob("RESULTS-*.md"))], ids=lambda p: p.name)
def test_images_and_links_in_committed_docs_exist(doc: Path) -> None:
    """A picture or link in a committed Markdown file points at a committed file (not bench/results/)."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", doc.read_text())
    local = [t for t in targets if "://" not in t]
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"
    ignored = subprocess.run(
        ["git", "check-ignore", *[str(doc.parent / t) for t in local]],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert not ignored, f"{doc.relative_to(REPO)} links to files git ignores: {ignored}"
