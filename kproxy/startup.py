"""What `kproxy run` checks and sets up before it serves, as kube-proxy does at start.

Checks come first and print nothing on success; each failure is a StartupError naming the
thing and the fix, which the command line prints as one line and exits 1 with. Nothing
is changed on the host until every check has passed.

Then the privileged set-up (also all `--init-only` does): the conntrack sysctls from the
`conntrack` block and oom_score_adj. The sysctl rules are kube-proxy's
(pkg/proxy/conntrack/sysctls.go): nf_conntrack_max = max(maxPerCore x CPUs, min), capped
at 2^20, written only when the kernel's is lower, and the module's hashsize raised to a
quarter of it; each timeout written only when set (> 0) and different; tcp_be_liberal only
when true. A failed write is fatal, as upstream. The timeouts and tcp_be_liberal are per
network namespace; nf_conntrack_max and hashsize can only be raised from the host's.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from typing import Protocol

from kproxy.errors import ConfigError, StartupError
from kproxy.infra import log
from kproxy.settings import Settings

CAP_NET_ADMIN = 12
CONNTRACK_MAX_CAP = 1 << 20
NF = "/proc/sys/net/netfilter/"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


class Sysfs(Protocol):
    """Integer files under /proc/sys and /sys: the one edge the conntrack set-up writes through."""

    def read(self, path: str) -> int: ...

    def write(self, path: str, value: int) -> None: ...


class HostSysfs:
    def read(self, path: str) -> int:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])

    def write(self, path: str, value: int) -> None:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{value}\n")


def conntrack_max(s: Settings, cpus: int) -> int:
    """kube-proxy's nf_conntrack_max for these settings; 0 means leave the kernel's alone."""
    if s.conntrack_max_per_core <= 0:
        return 0
    scaled = s.conntrack_max_per_core * cpus
    if scaled > CONNTRACK_MAX_CAP:
        return CONNTRACK_MAX_CAP
    return max(scaled, s.conntrack_min)


def apply_conntrack(s: Settings, sysfs: Sysfs, cpus: int) -> list[tuple[str, int]]:
    """Write the conntrack sysctls kube-proxy would; returns what was written."""
    written: list[tuple[str, int]] = []

    def current(path: str) -> int | None:
        try:
            return sysfs.read(path)
        except (OSError, ValueError):
            return None

    def put(path: str, value: int, option: str) -> None:
        try:
            sysfs.write(path, value)
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise StartupError(
                f"cannot set {path} to {value} ({why})",
                f"run as root in the host's network namespace, or set {option} to 0 to leave it alone",
            ) from None
        written.append((path, value))
        log.info("sysctl_set", path=path, value=value)

    wanted = conntrack_max(s, cpus)
    if wanted > 0:
        have = current(NF + "nf_conntrack_max")
        if have is None or have < wanted:
            put(NF + "nf_conntrack_max", wanted, "--conntrack-max-per-core")
        hashsize = current(HASHSIZE)
        if hashsize is None:
            raise StartupError(
                f"cannot read {HASHSIZE}", "load the nf_conntrack module (modprobe nf_conntrack)"
            )
        if hashsize < wanted // 4:
            put(HASHSIZE, wanted // 4, "--conntrack-max-per-core")
    timeouts = (
        (
            "nf_conntrack_tcp_timeout_established",
            s.conntrack_tcp_established_timeout,
            "--conntrack-tcp-timeout-established",
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            s.conntrack_tcp_close_wait_timeout,
            "--conntrack-tcp-timeout-close-wait",
        ),
        (
            "nf_conntrack_tcp_be_liberal",
            1.0 if s.conntrack_tcp_be_liberal else 0.0,
            "--conntrack-tcp-be-liberal",
        ),
        ("nf_conntrack_udp_timeout", s.conntrack_udp_timeout, "--conntrack-udp-timeout"),
        ("nf_conntrack_udp_timeout_stream", s.conntrack_udp_stream_timeout, "--conntrack-udp-timeout-stream"),
    )
    for name, seconds, option in timeouts:
        value = int(seconds)
        if value <= 0:
            continue
        if current(NF + name) != value:
            put(NF + name, value, option)
    return written


def cpu_count() -> int:
    """Online CPUs of the host (not this process's affinity), as kube-proxy counts them."""
    try:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            total = 0
            for part in f.read().strip().split(","):
                lo, _, hi = part.partition("-")
                total += int(hi or lo) - int(lo) + 1
            if total > 0:
                return total
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def set_oom_score_adj(value: int | None, path: str = "/proc/self/oom_score_adj") -> None:
    """As kube-proxy: a failure is logged, not fatal (a container may forbid lowering it)."""
    if value is None:
        return
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{value}\n")
    except OSError as e:
        log.warn("oom_score_adj_failed", value=value, error=e.strerror or str(e))


# ------------------------------------------------------------------ checks


def has_cap_net_admin(status_path: str = "/proc/self/status") -> bool:
    try:
        with open(status_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def check_source(s: Settings) -> None:
    if s.manifests:
        if not os.path.isdir(s.manifests):
            raise StartupError(
                f"--manifests {s.manifests}: no such directory", "create it or point --manifests at one"
            )
        return
    if s.kubeconfig:
        if not os.path.exists(s.kubeconfig):
            raise StartupError(
                f"kubeconfig {s.kubeconfig}: no such file",
                "pass --kubeconfig (or clientConnection.kubeconfig) the path of a kubeconfig file",
            )
        _try_client(s, f"kubeconfig {s.kubeconfig}: not a usable kubeconfig", "fix the file or pass another")
        return
    if s.master:
        return
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise StartupError(
            "no API server to talk to: not running in a cluster (KUBERNETES_SERVICE_HOST is unset)",
            "pass --kubeconfig PATH, --master URL, or --manifests DIR",
        )
    _try_client(s, "in-cluster config is incomplete", "mount the service account token, or pass --kubeconfig")


def _try_client(s: Settings, thing: str, fix: str) -> None:
    from kproxy.sources.apiwatch import make_api_client

    try:
        make_api_client(kubeconfig=s.kubeconfig or None, master=s.master or None)
    except ConfigError as e:
        raise StartupError(f"{thing} ({e.reason.splitlines()[0] if e.reason else 'invalid'})", fix) from None
    except Exception as e:  # the client library raises anything at all on a malformed file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StartupError(f"{thing} ({first})", fix) from None


def check_privileges() -> None:
    if not has_cap_net_admin():
        raise StartupError(
            "no CAP_NET_ADMIN: kproxy cannot change this node's rules",
            "run as root (in the DaemonSet: securityContext.privileged: true)",
        )


def check_tools(s: Settings) -> None:
    """The iptables commands of the chosen (or any, with auto) backend, for each family served."""
    from kproxy.netfilter.restore import BACKENDS, tool

    backends = BACKENDS if s.iptables_backend == "auto" else (s.iptables_backend,)
    missing: list[str] = []
    for backend in backends:
        need = [tool(backend, f, suffix) for f in s.families for suffix in ("-save", "-restore")]  # type: ignore[arg-type]
        absent = [t for t in need if shutil.which(t) is None]
        if not absent:
            return
        missing.extend(absent)
    raise StartupError(
        f"iptables tools missing ({', '.join(sorted(set(missing)))} not on PATH)",
        "install the iptables package (apt-get install iptables)",
    )


def check_bind(s: Settings) -> None:
    from kproxy.infra.httpd import split_host_port

    for option, address in (
        ("--healthz-bind-address", s.healthz_bind_address),
        ("--metrics-bind-address", s.metrics_bind_address),
    ):
        if not address:
            continue
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"{address} ({option}) is already in use: kube-proxy (or another kproxy) may still be "
                        "running on this node",
                        f"stop it first, or pass another {option}",
                    ) from None
                raise StartupError(
                    f"cannot listen on {address} ({option}): {e.strerror}",
                    f"pass an address of this node to {option}",
                ) from None


def preflight(s: Settings) -> None:
    """Every check `run` needs, in the order a user would fix them; raises the first failure."""
    check_source(s)
    check_privileges()
    check_tools(s)
    check_bind(s)


def init_node(s: Settings, sysfs: Sysfs | None = None) -> None:
    """kube-proxy's privileged start-up steps: oom_score_adj, then the conntrack sysctls."""
    set_oom_score_adj(s.oom_score_adj)
    apply_conntrack(s, sysfs or HostSysfs(), cpu_count())


__all__ = [
    "HostSysfs",
    "StartupError",
    "Sysfs",
    "apply_conntrack",
    "conntrack_max",
    "init_node",
    "preflight",
]
