"""Switching a kubeadm cluster's kube-proxy DaemonSet to kproxy's image (manifests/kubeadm/).

The input is kubeadm's own DaemonSet, ConfigMap and RBAC, reconstructed from kubeadm's source
in tests/data/kubeadm/. The patch is applied the two ways the README gives, with the real
kubectl (`kubectl patch --local`, `kubectl kustomize`), both offline, and the result is
compared field by field with kubeadm's: only the image may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBEADM = REPO / "tests" / "data" / "kubeadm"
OVERLAY = REPO / "manifests" / "kubeadm"
PATCH = OVERLAY / "kproxy-image.yaml"
WRAPPER = REPO / "image" / "kube-proxy"
IMAGE_PATH = ("spec", "template", "spec", "containers", 0, "image")

Obj = dict[str, Any]
Path_ = tuple[str | int, ...]

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def load(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubeadm_daemonset() -> Obj:
    (ds,) = load(KUBEADM / "kube-proxy-daemonset.yaml")
    return ds


def kubeadm(kind: str, name: str) -> Obj:
    for path in sorted(KUBEADM.glob("kube-proxy-*.yaml")):
        for obj in load(path):
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
    raise AssertionError(f"no {kind} {name} in {KUBEADM}")


def patch_image() -> str:
    (patch,) = load(PATCH)
    image: str = patch["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def differences(a: Any, b: Any, at: Path_ = ()) -> list[Path_]:
    """Paths where two decoded objects differ (a missing key counts as a difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[Path_] = []
        for key in sorted(set(a) | set(b)):
            out.extend(differences(a.get(key), b.get(key), (*at, key)))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in differences(x, y, (*at, i))]
    return [] if a == b else [at]


def kubectl(*args: str, cwd: Path = REPO) -> Obj:
    done = subprocess.run(
        ["kubectl", *args, "-o", "json"] if args[0] == "patch" else ["kubectl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert done.returncode == 0, done.stderr
    if args[0] == "patch":
        obj: Obj = json.loads(done.stdout)
        return obj
    (only,) = load_text(done.stdout)
    return only


def load_text(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.mark.parametrize("path", sorted(KUBEADM.glob("kube-proxy-*.yaml")), ids=lambda p: p.name)
def test_reconstructed_kubeadm_objects_are_valid(path: Path) -> None:
    for obj in load(path):
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_patch_targets_kubeadms_daemonset_and_container() -> None:
    (patch,) = load(PATCH)
    ds = kubeadm_daemonset()
    assert (patch["kind"], patch["metadata"]) == (
        "DaemonSet",
        {"name": ds["metadata"]["name"], "namespace": ds["metadata"]["namespace"]},
    )
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container == {"name": "kube-proxy", "image": container["image"]}
    # The same image as kproxy's own DaemonSet: one name to replace when publishing.
    (own,) = load(REPO / "manifests" / "30-daemonset.yaml")
    assert container["image"] == own["spec"]["template"]["spec"]["containers"][0]["image"]


# Strategic-merge keys of the lists a pod template holds (from the Kubernetes API's
# patchMergeKey tags); any other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """The part of a strategic-merge patch a DaemonSet image patch uses, for hosts without kubectl."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, key) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = list(base)
        for item in patch:
            at = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
            if at is None:
                out.append(item)
            else:
                out[at] = strategic_merge(out[at], item)
        return out
    return patch


def test_patch_changes_only_the_image() -> None:
    """The same check as below without kubectl (CI's image has none): a small strategic merge."""
    before = kubeadm_daemonset()
    (patch,) = load(PATCH)
    after = strategic_merge(before, patch)
    assert differences(before, after) == [IMAGE_PATH]
    kubernetes_validate.validate(after, "1.30", strict=True)


@needs_kubectl
def test_kubectl_patch_changes_only_the_image() -> None:
    before = kubeadm_daemonset()
    after = kubectl(
        "patch", "--local", "-f", str(KUBEADM / "kube-proxy-daemonset.yaml"), "--patch-file", str(PATCH)
    )
    assert differences(before, after) == [IMAGE_PATH]
    assert after["spec"]["template"]["spec"]["containers"][0]["image"] == patch_image()
    kubernetes_validate.validate(after, "1.30", strict=True)
    # The small merge above agrees with kubectl's.
    (patch,) = load(PATCH)
    assert strategic_merge(before, patch) == after


@needs_kubectl
def test_kustomize_overlay_changes_only_the_image(tmp_path: Path) -> None:
    overlay = tmp_path / "kubeadm"
    shutil.copytree(OVERLAY, overlay)
    # What the README's first step saves from the cluster.
    shutil.copy(KUBEADM / "kube-proxy-daemonset.yaml", overlay / "kube-proxy.yaml")
    after = kubectl("kustomize", str(overlay))
    assert differences(kubeadm_daemonset(), after) == [IMAGE_PATH]


def test_patched_daemonset_keeps_kubeadms_configmap_args_and_identity() -> None:
    """What kproxy relies on in kubeadm's DaemonSet, checked on the input the patch leaves alone."""
    spec = kubeadm_daemonset()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == [
        "/usr/local/bin/kube-proxy",
        "--config=/var/lib/kube-proxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
    ]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["kube-proxy"] == "/var/lib/kube-proxy"
    assert volumes["kube-proxy"]["configMap"]["name"] == "kube-proxy"
    configmap = kubeadm("ConfigMap", "kube-proxy")
    assert {"config.conf", "kubeconfig.conf"} <= set(configmap["data"])
    config = yaml.safe_load(configmap["data"]["config.conf"])
    # The API server's real address reaches kproxy through the mounted kubeconfig, so the
    # switch needs no kproxy-apiserver ConfigMap.
    assert config["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert spec["serviceAccountName"] == "kube-proxy"


def test_node_proxier_role_grants_every_call_kproxy_makes() -> None:
    """kubeadm binds kube-proxy's ServiceAccount to system:node-proxier; kproxy needs no more.

    kproxy lists and watches Services, EndpointSlices (or legacy Endpoints) and its own Node
    (a field-selected list), and may report Events; it never gets, creates or updates anything else.
    """
    binding = kubeadm("ClusterRoleBinding", "kubeadm:node-proxier")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}
    ]
    role = kubeadm("ClusterRole", binding["roleRef"]["name"])
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        *(
            (g, r, v)
            for g, r in [
                ("", "services"),
                ("", "endpoints"),
                ("discovery.k8s.io", "endpointslices"),
                ("", "nodes"),
            ]
            for v in ("list", "watch")
        ),
        *((g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")),
    }
    assert needed <= granted, f"missing: {sorted(needed - granted)}"


def test_image_answers_kube_proxys_command_as_kproxy_run() -> None:
    """The image's /usr/local/bin/kube-proxy (image/kube-proxy) runs `kproxy run` with kube-proxy's argv."""
    assert os.access(WRAPPER, os.X_OK)
    kproxy = shutil.which("kproxy", path=str(Path(sys.executable).parent))
    if kproxy is None:
        pytest.skip("the kproxy console script is not installed beside this Python")
    env = {**os.environ, "PATH": f"{Path(kproxy).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(WRAPPER), "--help"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: kproxy run")

    from kproxy.settings import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    argv = [
        a.replace("$(NODE_NAME)", "node-a")
        for a in kubeadm_daemonset()["spec"]["template"]["spec"]["containers"][0]["command"][1:]
    ]
    args = parser.parse_args(argv)
    assert (args.config, args.node_name) == ("/var/lib/kube-proxy/config.conf", "node-a")


def test_containerfile_installs_the_wrapper_where_kubeadms_command_points() -> None:
    from tests.support.containerfile import instructions

    command = kubeadm_daemonset()["spec"]["template"]["spec"]["containers"][0]["command"][0]
    copies = [args.split() for word, args in instructions() if word == "COPY" and "--from" not in args]
    assert [str(WRAPPER.relative_to(REPO)), command] in copies
    verified = " ".join(args for word, args in instructions() if word == "RUN")
    assert f"{command} --help" in verified, "the build should fail if the wrapper cannot start kproxy"
