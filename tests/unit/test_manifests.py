"""Offline checks of what a cluster operator applies and builds: manifests/ and the Containerfile.

Nothing here talks to a cluster or a container engine. Manifests are validated against the
Kubernetes 1.30 OpenAPI schema shipped by `kubernetes-validate`, in strict mode so a
misspelt field fails here instead of being silently dropped (or rejected) by the API server.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kproxy.settings import Settings, load_config_file
from kproxy.startup import apply_conntrack
from tests.support.containerfile import instructions

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
EXAMPLES = MANIFESTS / "examples"
CONTAINERFILE = REPO / "Containerfile"
KUBERNETES_VERSION = "1.30"
# What `kubectl apply -f <dir>` reads: these extensions, top level only.
KUBECTL_EXTENSIONS = (".yaml", ".yml", ".json")

Obj = dict[str, Any]


def kubectl_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in KUBECTL_EXTENSIONS)


def load_objects(path: Path) -> list[Obj]:
    objs: list[Obj] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List"):
            objs.extend(doc.get("items") or [])
        else:
            objs.append(doc)
    return objs


def all_manifest_objects() -> list[Obj]:
    return [obj for path in kubectl_files(MANIFESTS) for obj in load_objects(path)]


def the(kind: str) -> Obj:
    found = [o for o in all_manifest_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} in manifests/, found {len(found)}"
    return found[0]


def pod_spec() -> Obj:
    spec: Obj = the("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> Obj:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    first: Obj = containers[0]
    return first


def proxy_config() -> Obj:
    data = the("ConfigMap")["data"]
    assert set(data) == {"config.yaml"}
    parsed: Obj = yaml.safe_load(data["config.yaml"])
    return parsed


def validate(obj: Obj, where: str) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{where}: {e.message} (kubectl apply would reject it too)")


# ---- manifests/ -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", kubectl_files(MANIFESTS), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    objs = load_objects(path)
    assert objs, f"{path.name} holds no object"
    for obj in objs:
        validate(obj, path.name)


def test_manifests_hold_each_kind_the_node_agent_needs() -> None:
    kinds = sorted(o["kind"] for o in all_manifest_objects())
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"])


def test_kustomization_lists_every_manifest_in_apply_order() -> None:
    kustomization = MANIFESTS / "Kustomization"
    # kubectl apply -f skips it only because it has no .yaml/.yml/.json extension.
    assert kustomization.suffix not in KUBECTL_EXTENSIONS
    for name in ("kustomization.yaml", "kustomization.yml"):
        assert not (MANIFESTS / name).exists(), f"{name} would break `kubectl apply -f manifests/`"
    doc = yaml.safe_load(kustomization.read_text())
    assert doc["kind"] == "Kustomization"
    assert doc["resources"] == [p.name for p in kubectl_files(MANIFESTS)]


def test_rbac_is_read_only_except_for_events() -> None:
    granted: set[tuple[str, str, str]] = set()
    for rule in the("ClusterRole")["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    read = ("get", "list", "watch")
    expected = {
        *((g, r, v) for g, r in [("", "services"), ("", "endpoints"), ("", "nodes")] for v in read),
        *(("discovery.k8s.io", "endpointslices", v) for v in read),
        *((g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")),
    }
    assert granted == expected
    assert not any("*" in part for triple in granted for part in triple)


def test_binding_gives_the_role_to_the_daemonsets_service_account() -> None:
    account = the("ServiceAccount")["metadata"]
    binding = the("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": the("ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    daemonset = the("DaemonSet")
    assert daemonset["metadata"]["namespace"] == account["namespace"] == "kube-system"
    assert pod_spec()["serviceAccountName"] == account["name"]


def test_daemonset_runs_on_every_node_in_the_host_network() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "must tolerate every taint"
    strategy = the("DaemonSet")["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (1, "10%")


def test_daemonset_probes_hit_the_health_server() -> None:
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    healthz_port = int(proxy_config()["healthzBindAddress"].rsplit(":", 1)[1])
    assert healthz_port == 10256
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == healthz_port
        # A probe host would be the node's loopback, and Pod Security (baseline) forbids it.
        assert "host" not in c[probe]["httpGet"]


def test_daemonset_has_iptables_capabilities_not_full_privilege() -> None:
    security = container()["securityContext"]
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}


def test_daemonset_mounts_xtables_lock_modules_and_config() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}

    lock = mounts["/run/xtables.lock"]
    assert volumes[lock["name"]]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not lock.get("readOnly", False), "iptables takes a write lock on it"

    modules = mounts["/lib/modules"]
    assert modules["readOnly"] is True
    assert volumes[modules["name"]]["hostPath"]["path"] == "/lib/modules"

    config_arg = next(a for a in container()["args"] if a.startswith("--config="))
    config_path = Path(config_arg.split("=", 1)[1])
    config_mount = mounts[str(config_path.parent)]
    configmap = volumes[config_mount["name"]]["configMap"]
    assert configmap["name"] == the("ConfigMap")["metadata"]["name"]
    assert config_path.name in the("ConfigMap")["data"]


def test_daemonset_passes_its_node_name() -> None:
    c = container()
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["args"][0] == "run"
    assert "--hostname-override=$(NODE_NAME)" in c["args"]


def test_configmap_holds_a_kube_proxy_configuration() -> None:
    config = proxy_config()
    assert config["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert config["kind"] == "KubeProxyConfiguration"
    assert config["mode"] in ("iptables", "userspace")
    assert config["detectLocalMode"] in ("ClusterCIDR", "NodeCIDR")
    assert 0 <= config["iptables"]["masqueradeBit"] <= 31
    assert config["metricsBindAddress"].endswith(":10249")


class _ReadOnlyProcSys:
    """/proc/sys as an unprivileged container sees it: readable, every write refused."""

    def read(self, path: str) -> int:
        return 1024  # lower than anything kube-proxy's defaults would ask for

    def write(self, path: str, value: int) -> None:
        raise PermissionError(errno.EROFS, "Read-only file system", path)


def test_configmap_needs_no_sysctl_the_unprivileged_container_cannot_write(tmp_path: Path) -> None:
    """The DaemonSet grants NET_ADMIN, not privileged: kproxy must start without writing /proc/sys."""
    path = tmp_path / "config.yaml"
    path.write_text(the("ConfigMap")["data"]["config.yaml"])
    settings = dataclasses.replace(Settings(), **load_config_file(str(path)))
    assert not settings.localhost_nodeports, "route_localnet would have to be set"
    assert apply_conntrack(settings, _ReadOnlyProcSys(), cpus=64) == []


# ---- manifests/examples/ ------------------------------------------------------------------------


def example_files() -> list[Path]:
    return kubectl_files(EXAMPLES) if EXAMPLES.is_dir() else []


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="manifests/examples/ does not exist")
def test_examples_directory_is_not_empty() -> None:
    assert example_files(), "manifests/examples/ exists but holds no .yaml/.yml/.json file"


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_validates_against_kubernetes_schema(path: Path) -> None:
    objs = load_objects(path)
    assert objs, f"{path.name} holds no object"
    for obj in objs:
        validate(obj, f"examples/{path.name}")


# ---- Containerfile ------------------------------------------------------------------------------


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def final(instruction: str) -> str:
    found = [args for word, args in instructions() if word == instruction]
    assert found, f"Containerfile has no {instruction}"
    return found[-1]


def pyproject() -> Obj:
    loaded: Obj = tomllib.loads((REPO / "pyproject.toml").read_text())
    return loaded


def copied_sources() -> list[str]:
    sources: list[str] = []
    for word, args in instructions():
        if word not in ("COPY", "ADD"):
            continue
        parts = exec_form(args) if args.startswith("[") else shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        sources.extend(p for p in parts[:-1] if not p.startswith("--"))
    return sources


def test_containerfile_copies_only_paths_that_exist() -> None:
    sources = copied_sources()
    assert {"pyproject.toml", "kproxy/"} <= set(sources)
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"Containerfile copies paths missing from the repository: {missing}"


def test_ignore_files_let_every_copied_path_into_the_build_context() -> None:
    containerignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == containerignore, (
        "podman and docker must see the same context"
    )
    allowed = {line[1:].rstrip("/") for line in containerignore.splitlines() if line.startswith("!")}
    for source in copied_sources():
        assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"


def test_containerfile_builds_on_debian_python_with_iptables() -> None:
    # Every stage's base is the BASE_IMAGE build argument; its default is what a real build uses.
    defaults = dict(args.partition("=")[::2] for word, args in instructions() if word == "ARG")
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args.split()[0])
        for word, args in instructions()
        if word == "FROM"
    ]
    assert all(b == bases[-1] for b in bases), "the build stage must share the final stage's base"
    match = re.fullmatch(r"(?:docker\.io/library/)?python:3\.(\d+)-slim(?:-\w+)?", bases[-1])
    assert match, f"final stage should be a Debian python slim image, is {bases[-1]}"
    required = pyproject()["project"]["requires-python"]
    assert required == ">=3.11" and int(match.group(1)) >= 11
    installs = " ".join(args for word, args in instructions() if word == "RUN" and "apt-get install" in args)
    assert re.search(r"\biptables\b", installs) and re.search(r"\bconntrack\b", installs)


def test_entrypoint_is_the_console_script_and_cmd_runs_the_agent() -> None:
    scripts = pyproject()["project"]["scripts"]
    entrypoint = exec_form(final("ENTRYPOINT"))
    assert entrypoint == ["kproxy"] and "kproxy" in scripts
    cmd = exec_form(final("CMD"))
    assert cmd[0] == "run"
    # The DaemonSet mounts its ConfigMap where the image's default command looks.
    config_arg = next(a for a in container()["args"] if a.startswith("--config="))
    assert cmd[cmd.index("--config") + 1] == config_arg.split("=", 1)[1]


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_console_script_target_starts() -> None:
    target = pyproject()["project"]["scripts"]["kproxy"]
    module, function = target.split(":")
    code = f"import sys; from {module} import {function} as main; sys.argv = ['kproxy', '--help']; sys.exit(main())"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_python_m_kproxy_help_starts() -> None:
    result = run_python("-m", "kproxy", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_daemonset_args_and_configmap_load_as_kproxy_settings(tmp_path: Path) -> None:
    from kproxy.settings import add_run_arguments, from_args

    config_file = tmp_path / "config.yaml"
    config_file.write_text(the("ConfigMap")["data"]["config.yaml"])
    args = []
    for arg in container()["args"][1:]:
        if arg.startswith("--config="):
            arg = f"--config={config_file}"
        args.append(arg.replace("$(NODE_NAME)", "node-a"))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    settings = from_args(parser.parse_args(args))
    config = proxy_config()
    assert settings.node_name == "node-a"
    assert settings.proxy_mode == config["mode"]
    assert settings.masquerade_bit == config["iptables"]["masqueradeBit"]
    assert settings.healthz_bind_address == config["healthzBindAddress"]
    assert settings.sync_period == 30.0 and settings.min_sync_period == 1.0
