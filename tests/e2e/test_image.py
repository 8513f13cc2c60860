"""The container image: built from this checkout, then run exactly as manifests/30-daemonset.yaml runs it.

The build needs no registry and no network inside it: the base is a Debian bookworm root file
system made by debootstrap from Debian's package archive and imported into podman (cached as a
local image named after its package list, so only the first run pays for it), the wheels are
built on the host and mounted into the build, and the build itself runs with `--network none`.

The container is started from the DaemonSet's own pod spec, read from the manifest: its command
and args, its env (NODE_NAME from spec.nodeName, the kproxy-apiserver ConfigMap's
KUBERNETES_SERVICE_HOST/PORT), every volume mount (ConfigMap, hostPath, emptyDir) at its path,
the service account's token and CA where Kubernetes mounts them, and its securityContext turned
into podman's flags: the capabilities it adds and nothing else, read-only root, no privilege
escalation, not privileged. hostNetwork becomes the lab's node network namespace. The API
server is the stand-in, serving HTTPS inside that namespace, reached through in-cluster config
as on a real node. A manifest field this translation does not know fails the test rather than
being ignored, so the test keeps following the manifest.

Nothing here asserts a duration; waits are bounded and a failure shows the container's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.support.apiserver_standin import ApiServerStandIn
from tests.support.cluster import http_get
from tests.support.netns import PREFIX, Host, Reply, Topology, entered, exec_in, netns_guard
from tests.support.netns import request as send
from tests.support.privileges import REQUIRED

# the module's first test also builds the image (and, once per package list, the base)
pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.timeout(900)]

__all__ = ["netns_guard"]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "manifests" / "30-daemonset.yaml"
CONFIGMAP = ROOT / "manifests" / "20-configmap.yaml"
BUDGET_MB = 250
TOOLS = ("podman", "runc", "debootstrap", "openssl")
SUITE = "bookworm"
MIRROR = os.environ.get("KPROXY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "ca-certificates",
    "iptables",
    "nftables",
    "conntrack",
    "ipvsadm",
    "ipset",
)
"""What the Containerfile's final stage would otherwise install from the network, plus Python."""
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists")
"""Emptied in the base as Debian's own container images do; /var/cache/apt goes too (debootstrap's .debs)."""
BASE_REPO = "localhost/kproxy-test-base"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NS = "image"
VIP = "10.96.15.1"
NODE_PORT = 30080
POD_PORT = 8080
SOON = 60.0
"""Bound for "the container has started and synced": an interpreter start in a container on a busy VM."""


# ------------------------------------------------------------------ helpers


def eventually(probe: Callable[[], T], ok: Callable[[T], bool], what: str, log: Callable[[], str]) -> T:
    deadline = time.monotonic() + SOON
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {SOON:.0f}s; last seen: {value!r}\n{log()}", pytrace=False)
        time.sleep(0.2)


def sh(argv: Sequence[str], *, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure fails the test with the command and its output."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
            pytrace=False,
        )
    return done


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Rootful podman on runc: Debian's default crun cannot run on this host's hybrid cgroups."""
    argv = ["podman", "--runtime", "runc", *args]
    if check:
        return sh(argv, timeout=timeout)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def ulimits() -> list[str]:
    """Limits podman may set here: its defaults (and this host's own nproc) are refused by setrlimit,
    so open files are the test process's own and processes a few thousand, plenty for kproxy."""
    nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else min(nofile, 1 << 20)
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line on the terminal whatever the capture mode, and in junit's properties."""
    request.node.user_properties.append(("image", line))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"[image] {line}")


# ------------------------------------------------------------------ building


def base_image(workdir: Path) -> tuple[str, str]:
    """The local Debian base, made once per package list; (its name, "reused" or how long it took)."""
    recipe = json.dumps({"suite": SUITE, "packages": BASE_PACKAGES, "trimmed": TRIMMED, "v": 1})
    tag = f"{BASE_REPO}:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag, "reused"
    started = time.monotonic()
    rootfs = workdir / "rootfs"
    try:
        _debootstrap(rootfs, tag, recipe)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag, f"debootstrapped in {time.monotonic() - started:.0f}s"


def _debootstrap(rootfs: Path, tag: str, recipe: str) -> None:
    sh(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
            MIRROR,
        ],
        timeout=900,
    )
    for sub in (*TRIMMED, "var/cache/apt"):
        target = rootfs / sub
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
    with subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
    ) as tar:
        imported = subprocess.run(
            ["podman", "import", "--message", recipe, "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    if imported.returncode != 0 or tar.returncode != 0:
        pytest.fail(f"podman import of the debootstrap base failed: {imported.stderr}", pytrace=False)


@dataclass(frozen=True)
class Built:
    tag: str
    size_mb: float
    base: str
    seconds: float


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        reason = f"needs {', '.join(missing)} (apt-get install podman runc debootstrap openssl)"
        if REQUIRED:
            pytest.fail(f"KPROXY_REQUIRE_PRIVILEGED=1 but the image test {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    base, base_note = base_image(work)
    wheels = work / "wheelhouse"
    sh(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(ROOT), "setuptools>=68"],
        timeout=600,
    )
    tag = f"localhost/kproxy-test:{secrets.token_hex(4)}"
    try:
        podman(
            "build",
            "--network",
            "none",
            "--layers=false",
            "--force-rm",
            *ulimits(),
            "--volume",
            f"{wheels}:/wheelhouse:ro",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--tag",
            tag,
            "--file",
            str(ROOT / "Containerfile"),
            str(ROOT),
            timeout=900,
        )
        size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
        yield Built(tag, size / 1e6, f"{base} ({base_note})", time.monotonic() - started)
    finally:
        podman("rmi", "--force", tag, check=False)
        shutil.rmtree(wheels, ignore_errors=True)


# ------------------------------------------------------------------ the DaemonSet, as podman flags


def load(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}"
    doc: dict[str, Any] = found[0]
    return doc


def expand(value: str, env: Mapping[str, str]) -> str:
    for name, val in env.items():
        value = value.replace(f"$({name})", val)
    return value


@dataclass(frozen=True)
class PodFiles:
    """Host directories standing in for what the kubelet would mount into the pod."""

    config_dir: Path
    service_account_dir: Path


def container_argv(
    name: str, image: str, node_ns: str, node_name: str, files: PodFiles, apiserver: tuple[str, int]
) -> tuple[list[str], list[str]]:
    """(podman run flags, the container's command) for the DaemonSet's one container on this node."""
    pod = load(DAEMONSET, "DaemonSet")["spec"]["template"]["spec"]
    assert pod.get("hostNetwork") is True, "the DaemonSet should use the node's network"
    (ctr,) = pod["containers"]
    flags = ["--name", name, "--network", f"ns:/run/netns/{node_ns}", *ulimits()]
    if pod.get("priorityClassName") in CRITICAL and can_lower_oom_score():
        flags.append(f"--oom-score-adj={CRITICAL_OOM_SCORE_ADJ}")  # what the kubelet sets for it

    sc = dict(ctr.get("securityContext", {}))
    assert sc.pop("privileged", False) is False, "the image test runs unprivileged, as the DaemonSet should"
    caps = sc.pop("capabilities", {})
    assert caps.get("drop") == ["ALL"], "capabilities are granted one by one over an empty set"
    flags += ["--cap-drop", "all"] + [f"--cap-add={c}" for c in caps.get("add", [])]
    if sc.pop("allowPrivilegeEscalation", True) is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.pop("readOnlyRootFilesystem", False):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if "runAsUser" in sc:
        flags += ["--user", str(sc.pop("runAsUser"))]
    seccomp = sc.pop("seccompProfile", {}).get("type", "RuntimeDefault")
    assert seccomp == "RuntimeDefault", f"seccompProfile {seccomp} has no podman equivalent here"
    assert not sc, f"securityContext fields this test does not translate: {sorted(sc)}"

    env: dict[str, str] = {}
    for var in ctr.get("env", []):
        field_path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field_path == "spec.nodeName" or "value" in var, f"env {var['name']} not translated"
        env[var["name"]] = node_name if field_path else var["value"]
    for source in ctr.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        assert ref == "kproxy-apiserver", f"envFrom {source} not translated"
        # the ConfigMap the DaemonSet offers for a real API server address
        env |= {"KUBERNETES_SERVICE_HOST": apiserver[0], "KUBERNETES_SERVICE_PORT": str(apiserver[1])}
    for key, val in env.items():
        flags += ["--env", f"{key}={val}"]

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in ctr.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        if "configMap" in vol:
            assert vol["configMap"]["name"] == "kproxy", f"volume {vol['name']}: unknown ConfigMap"
            flags += ["--volume", f"{files.config_dir}:{mount['mountPath']}{ro}"]
        elif "hostPath" in vol:
            host = Path(vol["hostPath"]["path"])
            kind = vol["hostPath"].get("type", "")
            if kind == "FileOrCreate":
                host.touch(exist_ok=True)
            elif kind == "" and not host.exists():
                # the runtime creates a missing untyped hostPath as an empty directory; so does
                # this test, elsewhere than on the host's root file system
                host = files.config_dir.parent / f"hostpath-{vol['name']}"
                host.mkdir(exist_ok=True)
            else:
                assert kind in ("Directory", "File", ""), f"volume {vol['name']}: hostPath type {kind}"
                assert host.exists(), f"volume {vol['name']}: {host} ({kind}) is missing on this host"
            flags += ["--volume", f"{host}:{mount['mountPath']}{ro}"]
        elif "emptyDir" in vol:
            flags += ["--tmpfs", mount["mountPath"]]
        else:
            pytest.fail(f"volume {vol['name']}: kind not translated: {sorted(vol)}")
    # what the kubelet mounts for the pod's service account (automountServiceAccountToken)
    flags += ["--volume", f"{files.service_account_dir}:{SERVICE_ACCOUNT_DIR}:ro"]

    command = [expand(a, env) for a in [*ctr.get("command", []), *ctr.get("args", [])]]
    assert command, "the DaemonSet should say what it runs"
    return flags, command


def pod_files(tmp: Path, cert: Path) -> PodFiles:
    config_dir = tmp / "config"
    config_dir.mkdir()
    for key, text in load(CONFIGMAP, "ConfigMap")["data"].items():
        (config_dir / key).write_text(text)
    sa = tmp / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("image-test-token")
    (sa / "namespace").write_text("kube-system")
    shutil.copy(cert, sa / "ca.crt")
    return PodFiles(config_dir, sa)


def tls_context(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A self-signed certificate for 127.0.0.1, as the service account's CA."""
    key, cert = tmp / "apiserver.key", tmp / "apiserver.crt"
    sh(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kproxy-image-test-apiserver",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


# ------------------------------------------------------------------ objects


def node_obj(topo: Topology) -> dict[str, Any]:
    node = topo.node
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "spec": {"podCIDR": node.pod_cidr(4), "podCIDRs": [node.pod_cidr(4)]},
        "status": {"addresses": [{"type": "InternalIP", "address": node.ipv4}]},
    }


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "NodePort",
            "clusterIP": VIP,
            "clusterIPs": [VIP],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": POD_PORT, "nodePort": NODE_PORT}
            ],
        },
    }


def endpoint_slice(name: str, pods: Sequence[Host], node: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-a", "namespace": NS, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [p.ipv4], "conditions": {"ready": True}, "nodeName": node} for p in pods],
    }


# ------------------------------------------------------------------ the lab


@pytest.fixture(scope="module")
def lab(netns_guard: None) -> Iterator[Topology]:
    with Topology(nodes=1, pods=2, clients=1) as topo:
        topo.start_servers([POD_PORT])
        yield topo


def answered_by(topo: Topology, ip: str, port: int, want: set[str], log: Callable[[], str]) -> None:
    """Until requests from the outside client to ip:port have been answered by every pod in `want`
    and by no other."""
    seen: set[str] = set()

    def probe() -> tuple[set[str], Reply]:
        reply = send(topo.client_hosts[0].ns, ip, port, timeout=1.0)
        if reply.ok:
            assert reply.name in want, f"{ip}:{port} answered by {reply.name}, not one of {sorted(want)}"
            seen.add(reply.name)
        return set(seen), reply

    eventually(probe, lambda v: v[0] == want, f"{ip}:{port} answered by each of {sorted(want)}", log)


def serves(topo: Topology, log: Callable[[], str]) -> None:
    """The Service through its cluster IP and through its node port on the node's address."""
    pods = {p.name for p in topo.node.pods}
    answered_by(topo, VIP, 80, pods, log)
    answered_by(topo, topo.node.ipv4, NODE_PORT, pods, log)


def get(ns: str, ip: str, port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET to ip:port from namespace `ns`; (0, why) when nothing answers."""
    try:
        reply = http_get(ns, ip, port, path, timeout=3.0)
    except OSError as exc:
        return 0, f"{exc.__class__.__name__}: {exc}"
    return reply.status, json.dumps(reply.body)


def probes() -> list[tuple[str, int, str]]:
    """(probe, port, path) of the DaemonSet's HTTP probes: the kubelet sends them to the pod's IP,
    which with hostNetwork is the node's."""
    (ctr,) = load(DAEMONSET, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    out = []
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if kind in ctr:
            http = ctr[kind]["httpGet"]
            out.append((kind, int(http["port"]), str(http["path"])))
    assert out, "the DaemonSet should have probes"
    return out


def metrics_address(files: PodFiles) -> tuple[str, int]:
    config = yaml.safe_load((files.config_dir / "config.yaml").read_text())
    host, _, port = str(config.get("metricsBindAddress", "127.0.0.1:10249")).rpartition(":")
    return host, int(port)


def kube_chains(ns: str) -> list[str]:
    """KUBE-* chains left in the node's nat and filter tables, both backends and families."""
    found = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        for line in exec_in(ns, [tool], check=False).stdout.splitlines():
            if line.startswith(":KUBE-"):
                found.append(f"{tool}: {line.split()[0][1:]}")
    return found


CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_RESOURCE = 12, 13, 24
CRITICAL = ("system-node-critical", "system-cluster-critical")
CRITICAL_OOM_SCORE_ADJ = -997


def can_lower_oom_score() -> bool:
    """Whether this host may give a container a negative oom_score_adj, as a kubelet does for a
    critical pod; some sandboxes withhold CAP_SYS_RESOURCE even from root."""
    return bool(int(proc_status(os.getpid())["CapEff"], 16) & (1 << CAP_SYS_RESOURCE))


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


# ------------------------------------------------------------------ tests


def test_image_fits_its_budget_and_carries_no_compiler(image: Built, request: pytest.FixtureRequest) -> None:
    report(
        request,
        f"{image.tag}: {image.size_mb:.1f} MB (budget {BUDGET_MB} MB), base {image.base}, "
        f"made in {image.seconds:.0f}s",
    )
    assert image.size_mb <= BUDGET_MB, f"image is {image.size_mb:.1f} MB, over its {BUDGET_MB} MB budget"
    probe = "for t in gcc cc; do command -v $t && exit 1; done; exit 0"
    found = podman(
        "run",
        "--rm",
        *ulimits(),
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image.tag,
        "-c",
        probe,
        check=False,
    )
    assert found.returncode == 0, f"a compiler is in the final image: {found.stdout.strip()}"


def test_image_runs_as_the_daemonset_and_its_rules_outlive_it(
    image: Built, lab: Topology, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Started with the DaemonSet's spec in the node namespace (and only its capabilities, checked
    on the running process), the image's kproxy programs a Service that a client outside the node
    reaches by cluster IP and node port; the DaemonSet's probes and /metrics answer; `podman stop`
    ends it cleanly (exit 0) and the Service keeps working without it; `kproxy cleanup` run from
    the image with the same grants removes every rule."""
    started = time.monotonic()
    ctx, cert = tls_context(tmp_path)
    files = pod_files(tmp_path, cert)
    api = ApiServerStandIn(bookmark_interval=0.5, tls=ctx)
    with entered(lab.node_ns):  # the listener lives in the node namespace, like a local apiserver
        api.start()
    name = f"{PREFIX}{secrets.token_hex(4)}-kproxy"
    flags, command = container_argv(
        name, image.tag, lab.node_ns, lab.node_name, files, ("127.0.0.1", api.port)
    )

    def log() -> str:
        out = podman("logs", "--tail", "40", name, check=False)
        return f"container log (tail):\n{out.stdout}{out.stderr}"

    try:
        api.create(node_obj(lab))
        api.create(service("web"))
        api.create(endpoint_slice("web", lab.node.pods, lab.node_name))
        podman("run", "--detach", *flags, "--entrypoint", command[0], image.tag, *command[1:])

        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
        status = proc_status(pid)
        granted = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        assert int(status["CapEff"], 16) == granted, f"effective capabilities {status['CapEff']}"
        assert int(status["CapBnd"], 16) == granted, f"bounding capabilities {status['CapBnd']}"
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status

        serves(lab, log)
        for kind, port, path in probes():
            eventually(
                lambda: get(lab.node_ns, lab.node.ipv4, port, path),  # noqa: B023 (called at once)
                lambda r: r[0] == 200,
                f"{kind} {path} on the node's {lab.node.ipv4}:{port} answers 200",
                log,
            )
        host, port = metrics_address(files)
        metrics = eventually(
            lambda: get(lab.node_ns, host, port, "/metrics"), lambda r: r[0] == 200, "/metrics 200", log
        )
        assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in metrics[1], metrics[1][:500]
        assert any(e for e in api.requests if "/endpointslices" in e.path), (
            "no EndpointSlice list reached the API"
        )

        grace = load(DAEMONSET, "DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        podman("stop", "--time", str(grace), name, timeout=grace + 60)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", f"kproxy should exit 0 on SIGTERM, exited {code}\n{log()}"
        out = podman("logs", name)
        complaints = [
            line
            for line in (out.stdout + out.stderr).splitlines()
            if ("level=ERROR" in line or "level=WARNING" in line)
            # without the kubelet's -997 (see can_lower_oom_score) the agent cannot match it
            and not ("event=oom_score_adj_failed" in line and not can_lower_oom_score())
        ]
        assert not complaints, "a clean run as the DaemonSet logged:\n" + "\n".join(complaints)
        api.stop()  # nothing is left to program the node: the kernel alone serves now
        serves(lab, log)

        cleanup_flags, _ = container_argv(
            f"{name}-cleanup", image.tag, lab.node_ns, lab.node_name, files, ("127.0.0.1", api.port)
        )
        done = podman(
            "run",
            "--rm",
            *cleanup_flags,
            "--entrypoint",
            "kproxy",
            image.tag,
            "cleanup",
            check=False,
            timeout=180,
        )
        assert done.returncode == 0, f"kproxy cleanup exited {done.returncode}: {done.stderr[-2000:]}"
        assert kube_chains(lab.node_ns) == [], "kproxy cleanup left chains behind"
        for ip, port in ((VIP, 80), (lab.node.ipv4, NODE_PORT)):
            reply = send(lab.client_hosts[0].ns, ip, port, timeout=1.0)
            assert not reply.ok, f"{ip}:{port} still answers after cleanup: {reply}"
        report(
            request,
            f"ran as the DaemonSet: started, served, stopped, cleaned up in {time.monotonic() - started:.0f}s",
        )
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        podman("rm", "--force", "--time", "0", f"{name}-cleanup", check=False)
        api.stop()
        exec_in(lab.node_ns, ["nft", "flush", "ruleset"], check=False)
