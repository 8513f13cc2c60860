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
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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
    action: str  # "run", "netns" (root, in a namespace of its own) or "skip"
    reason: str = ""


RULES: tuple[Rule, ...] = (
    Rule(r"apt-get ", "skip", "installs system packages on the machine"),
    Rule(r"python3 -m venv \.venv$", "skip", "creates the venv these tests already run in"),
    Rule(r"\.venv/bin/pip install ", "skip", "installs the package these tests already run from"),
    Rule(r"\. \.venv/bin/activate$", "skip", "activating the venv is what this test's PATH does"),
    Rule(r"\.venv/bin/python -m pytest", "skip", "is this test suite"),
    Rule(r"(podman|docker) ", "skip", "needs a container engine and a registry"),
    Rule(r"kubectl ", "skip", "needs a cluster (tests/test_kubeadm_switch.py runs the manifests offline)"),
    Rule(r"kubeadm ", "skip", "needs a kubeadm control-plane node"),
    Rule(r"curl ", "skip", "needs a node agent running in a cluster"),
    Rule(r"kproxy (run|dry-run)$", "skip", "names the subcommand in prose; its command lines are listed"),
    Rule(r"kproxy run --help$", "run"),
    Rule(r"kproxy run\b", "skip", "runs until stopped; tests/test_agent_e2e.py starts the agent"),
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
    params: list[object] = []
    for c in all_commands():
        rule = rule_for(c.text)
        marks: list[pytest.MarkDecorator] = []
        if rule is not None and rule.action == "skip":
            marks.append(pytest.mark.skip(reason=f"by design: {rule.reason}"))
        elif rule is not None and rule.action == "netns":
            marks.append(pytest.mark.privileged)
        params.append(pytest.param(c, rule, marks=marks, id=c.text[:90]))
    return params


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
    netns = None
    if rule.action == "netns":
        netns = f"kpdoc{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        done = _shell(command.text, netns)
    finally:
        if netns is not None:
            subprocess.run(["ip", "netns", "delete", netns], check=False, timeout=30)
    assert done.returncode == 0, (
        f"{command.source}: `{command.text}` exited {done.returncode}:\n{done.stderr}"
    )


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
