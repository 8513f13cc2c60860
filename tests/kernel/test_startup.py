"""Start-up set-up as kube-proxy does it: the conntrack sysctls (kube-proxy's rules, against a
fake and against a real network namespace's /proc/sys) and the checks' verdicts."""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from kproxy.errors import StartupError
from kproxy.settings import Settings
from kproxy.startup import HASHSIZE, NF, apply_conntrack, conntrack_max, has_cap_net_admin
from tests.support.netns import PREFIX, create_netns, delete_netns, exec_in

ROOT = Path(__file__).resolve().parents[2]
MAX = NF + "nf_conntrack_max"
EST = NF + "nf_conntrack_tcp_timeout_established"
CLOSE_WAIT = NF + "nf_conntrack_tcp_timeout_close_wait"
LIBERAL = NF + "nf_conntrack_tcp_be_liberal"
UDP = NF + "nf_conntrack_udp_timeout"
UDP_STREAM = NF + "nf_conntrack_udp_timeout_stream"


@dataclass
class FakeSysfs:
    """In-memory sysctl files: `values` by path; a write to a path in `refuse` fails with that errno."""

    values: dict[str, int] = field(default_factory=dict)
    refuse: dict[str, int] = field(default_factory=dict)
    writes: list[tuple[str, int]] = field(default_factory=list)

    def read(self, path: str) -> int:
        if path not in self.values:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.values[path]

    def write(self, path: str, value: int) -> None:
        if path in self.refuse:
            raise PermissionError(self.refuse[path], os.strerror(self.refuse[path]), path)
        self.writes.append((path, value))
        self.values[path] = value


def kernel(**over: int) -> FakeSysfs:
    """A kernel with its stock values (as this VM's), some overridden."""
    values = {MAX: 262144, HASHSIZE: 65536, EST: 432000, CLOSE_WAIT: 60, LIBERAL: 0, UDP: 30, UDP_STREAM: 120}
    names = {"max": MAX, "hashsize": HASHSIZE, "est": EST, "close_wait": CLOSE_WAIT, "udp": UDP}
    values.update({names[k]: v for k, v in over.items()})
    return FakeSysfs(values)


@pytest.mark.parametrize(
    ("per_core", "floor", "cpus", "want"),
    [
        (32768, 131072, 2, 131072),  # kube-proxy's defaults on a small node: the floor
        (32768, 131072, 8, 262144),
        (32768, 131072, 64, 1 << 20),  # capped at 2^20, as upstream
        (0, 131072, 8, 0),  # 0: leave it alone, min ignored
        (1000, 0, 4, 4000),
    ],
)
def test_conntrack_max_is_kube_proxys(per_core: int, floor: int, cpus: int, want: int) -> None:
    s = Settings(conntrack_max_per_core=per_core, conntrack_min=floor)
    assert conntrack_max(s, cpus) == want


@pytest.mark.parametrize(
    ("settings", "cpus", "before", "writes"),
    [
        # defaults, kernel already larger: only the two TCP timeouts kube-proxy defaults
        (Settings(), 2, kernel(), [(EST, 86400), (CLOSE_WAIT, 3600)]),
        # the kernel's limit is lower: raised, and the hash table with it
        (
            Settings(),
            8,
            kernel(max=65536, hashsize=16384),
            [(MAX, 262144), (HASHSIZE, 65536), (EST, 86400), (CLOSE_WAIT, 3600)],
        ),
        # values equal to the kernel's are not rewritten
        (Settings(), 2, kernel(est=86400, close_wait=3600), []),
        # everything zero: nothing touched (kubeadm's kind config uses maxPerCore: 0)
        (
            Settings(
                conntrack_max_per_core=0,
                conntrack_tcp_established_timeout=0,
                conntrack_tcp_close_wait_timeout=0,
            ),
            2,
            kernel(max=1),
            [],
        ),
        (
            Settings(
                conntrack_max_per_core=0,
                conntrack_tcp_be_liberal=True,
                conntrack_udp_timeout=45,
                conntrack_udp_stream_timeout=200,
            ),
            2,
            kernel(),
            [(EST, 86400), (CLOSE_WAIT, 3600), (LIBERAL, 1), (UDP, 45), (UDP_STREAM, 200)],
        ),
    ],
)
def test_sysctls_written_only_where_set_and_different(
    settings: Settings, cpus: int, before: FakeSysfs, writes: list[tuple[str, int]]
) -> None:
    apply_conntrack(settings, before, cpus)
    assert before.writes == writes


def test_a_refused_write_is_fatal_and_names_the_sysctl_and_the_flag() -> None:
    sysfs = kernel(max=1000)
    sysfs.refuse[MAX] = errno.EACCES
    with pytest.raises(StartupError) as e:
        apply_conntrack(Settings(), sysfs, 2)
    assert "nf_conntrack_max" in str(e.value) and "--conntrack-max-per-core" in str(e.value)
    assert "\n" not in str(e.value)


def test_cap_net_admin_is_read_from_the_effective_set(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_cap_net_admin(str(status))
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_cap_net_admin(str(status))


# ------------------------------------------------------------------ a real namespace


@pytest.fixture
def netns() -> object:
    name = f"{PREFIX}{secrets.token_hex(4)}-sysctl"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


def read_in(ns: str, path: str) -> int:
    return int(exec_in(ns, ["cat", path]).stdout.split()[0])


def init_only(ns: str, manifests: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "run", "--init-only"]
    argv += ["--manifests", str(manifests), "--metrics-bind-address=", "--healthz-bind-address=", *flags]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)


@pytest.mark.privileged
def test_init_only_sets_the_conntrack_sysctls_of_its_namespace(netns: str, tmp_path: Path) -> None:
    """`kproxy run --init-only` with conntrack flags, in a namespace: that namespace's sysctls
    change, the host's do not, and it exits 0 without serving."""
    host_before = {p: int(Path(p).read_text().split()[0]) for p in (EST, LIBERAL, UDP, UDP_STREAM)}
    done = init_only(
        netns,
        tmp_path,
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=45s",
        "--conntrack-udp-timeout-stream=3m",
    )
    assert done.returncode == 0, done.stderr
    got = {p: read_in(netns, p) for p in (EST, LIBERAL, UDP, UDP_STREAM)}
    assert got == {EST: 7200, LIBERAL: 1, UDP: 45, UDP_STREAM: 180}
    assert {p: int(Path(p).read_text().split()[0]) for p in host_before} == host_before


@pytest.mark.privileged
def test_a_limit_a_namespace_cannot_raise_stops_start_up_with_one_line(netns: str, tmp_path: Path) -> None:
    """nf_conntrack_max is the host's; asking for more than it has from inside a namespace fails
    as in kube-proxy, with one line naming the sysctl and the flag that leaves it alone."""
    current = read_in(netns, MAX)
    done = init_only(netns, tmp_path, f"--conntrack-max-per-core={current}", "--conntrack-min=0")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("kproxy: ")]
    assert len(line) == 1 and "nf_conntrack_max" in line[0] and "--conntrack-max-per-core" in line[0]


def test_defaults_change_nothing_but_timeouts_on_a_large_kernel() -> None:
    s = replace(Settings(), conntrack_tcp_established_timeout=0, conntrack_tcp_close_wait_timeout=0)
    sysfs = kernel()
    apply_conntrack(s, sysfs, 2)
    assert sysfs.writes == []


@pytest.mark.privileged
def test_kube_proxy_cleanup_flag_removes_the_rules_and_exits(netns: str) -> None:
    """`kproxy --cleanup` (kube-proxy's argv, no subcommand) does what `kproxy cleanup` does."""
    rules = (
        "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
    )
    exec_in(netns, ["iptables-nft-restore", "--noflush"], input=rules)
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "kproxy", "--cleanup"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "KUBE-SERVICES" not in exec_in(netns, ["iptables-nft-save", "-t", "nat"]).stdout


def test_settings_reach_the_render_config() -> None:
    """What the config file says about local detection, localhost node ports and the node's
    primary IP (bindAddress) is what the renderer is given."""
    from kproxy.agent import NodeAgent
    from tests.support.recorder import Recorder

    s = Settings(
        node_name="node-a",
        families=(4, 6),
        detect_local_mode="InterfaceNamePrefix",
        interface_name_prefix="veth",
        localhost_nodeports=False,
        bind_address="10.0.0.9",
        nodeport_addresses=("10.0.0.0/8",),
    )
    a = NodeAgent(s, Recorder(), node_ips=("10.0.0.5", "10.0.0.9", "fd00::5"))
    cfgs = a._render_configs()
    assert (cfgs[4].detect_local_mode, cfgs[4].interface_name_prefix) == ("InterfaceNamePrefix", "veth")
    assert cfgs[4].localhost_nodeports is False
    assert cfgs[4].node_ip == "10.0.0.9" and cfgs[6].node_ip == "fd00::5"
    # nodePortAddresses without 127.0.0.1 would turn localhost node ports off, as upstream
    a = NodeAgent(
        replace(s, localhost_nodeports=True, bind_address="0.0.0.0", nodeport_addresses=()),
        Recorder(),
        node_ips=("10.0.0.5",),
    )
    cfgs = a._render_configs()
    assert cfgs[4].localhost_nodeports is True and cfgs[6].localhost_nodeports is False
    assert cfgs[4].node_ip == "10.0.0.5"
