"""`kproxy cleanup`: remove what any kube-proxy mode, or kproxy, leaves on a node.

A node switching proxies (to kproxy, back to kube-proxy, or to a CNI's own service
proxy) must not keep a previous proxy's rules: they would keep steering service
traffic. kube-proxy's `--cleanup` runs every mode's CleanupLeftovers; so does this:

  * iptables and userspace modes (both backends, both families): the jumps from
    built-in chains into proxy chains, then the proxy chains themselves, in nat,
    filter and mangle (the canaries);
  * ipvs mode: the IPVS virtual servers it owns (address on `kube-ipvs0`, or a
    node port listed in its node-port ipsets), the `kube-ipvs0` interface, its
    iptables chains, then its ipsets (last: a set still referenced by a rule
    cannot be destroyed);
  * nftables mode: the `ip kube-proxy` and `ip6 kube-proxy` tables.

Ownership is by name and table, as kube-proxy's: kubelet's chains (KUBE-FIREWALL
and KUBE-KUBELET-CANARY in filter, KUBE-MARK-DROP, KUBE-IPTABLES-HINT) and anybody
else's chains, sets and virtual servers stay. One difference: kube-proxy's ipvs
cleanup flushes every IPVS virtual server on the node; kproxy deletes only those it
can tell kube-proxy made, so a node's own load balancer (keepalived, LVS) survives.

Nothing is created: a table is read only with tools that list existing tables
(`iptables-save` without `-t`, `nft list tables`), and written only when it held
something to remove. On an nft-only node `iptables-legacy -t nat ...` would create
an empty legacy table, after which every iptables-save warns; this never does.
IPVS and ipsets are looked at only when their kernel modules are already loaded,
so cleanup never loads one either.

Every step runs even when an earlier one failed; what could not be read or removed
is raised at the end as one CleanupError naming each step (cli exits non-zero).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.errors import CleanupError, KproxyError
from kproxy.infra import log
from kproxy.netfilter.restore import BACKENDS, CommandRestorer, XtablesBackend, tool
from kproxy.netfilter.ruleset import OWNED_PREFIXES
from kproxy.state.model import FAMILIES, Family

_IPTABLES_MODE = {
    "nat": ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"),
    "filter": (
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    ),
    "mangle": ("KUBE-PROXY-CANARY",),
}
_USERSPACE_MODE = {
    "nat": ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "KUBE-NODEPORT-CONTAINER", "KUBE-NODEPORT-HOST"),
    "filter": ("KUBE-NODEPORT-NON-LOCAL",),
}
_IPVS_MODE = {
    # KUBE-FIREWALL here is old ipvs mode's nat chain; kubelet's KUBE-FIREWALL lives in filter.
    "nat": ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-FIREWALL"),
    "filter": (
        "KUBE-FORWARD",
        "KUBE-NODE-PORT",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ),
}
PROXY_CHAINS: Mapping[str, frozenset[str]] = {
    table: frozenset(c for mode in (_IPTABLES_MODE, _USERSPACE_MODE, _IPVS_MODE) for c in mode.get(table, ()))
    for table in ("nat", "filter", "mangle")
}
"""Fixed-name chains a service proxy owns, per table."""
NAT_PREFIXES = (*OWNED_PREFIXES, "KUBE-XLB-")
"""Per-service and per-endpoint nat chains (KUBE-XLB-: kube-proxy before 1.24)."""

NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
IPVS_DEVICE = "kube-ipvs0"
_IPSETS = (
    "LOOP-BACK",
    "CLUSTER-IP",
    "EXTERNAL-IP",
    "EXTERNAL-IP-LOCAL",
    "LOAD-BALANCER",
    "LOAD-BALANCER-FW",
    "LOAD-BALANCER-LOCAL",
    "LOAD-BALANCER-SOURCE-IP",
    "LOAD-BALANCER-SOURCE-CIDR",
    "NODE-PORT-TCP",
    "NODE-PORT-LOCAL-TCP",
    "NODE-PORT-UDP",
    "NODE-PORT-LOCAL-UDP",
    "NODE-PORT-SCTP",
    "NODE-PORT-LOCAL-SCTP",
    "NODE-PORT-SCTP-HASH",
    "NODE-PORT-LOCAL-SCTP-HASH",
    "HEALTH-CHECK-NODE-PORT",
    "IPVS-IPS",
)
IPSETS = frozenset(f"{prefix}{name}" for prefix in ("KUBE-", "KUBE-6-") for name in _IPSETS)
"""kube-proxy's ipvs-mode sets, IPv4 (KUBE-) and IPv6 (KUBE-6-) names, old and new."""
_NODE_PORT_SETS = {
    "-t": ("NODE-PORT-TCP", "NODE-PORT-LOCAL-TCP"),
    "-u": ("NODE-PORT-UDP", "NODE-PORT-LOCAL-UDP"),
    "--sctp-service": (
        "NODE-PORT-SCTP",
        "NODE-PORT-LOCAL-SCTP",
        "NODE-PORT-SCTP-HASH",
        "NODE-PORT-LOCAL-SCTP-HASH",
    ),
}
"""ipvsadm's service flag -> the sets listing that protocol's node ports."""


def owned(table: str, chain: str) -> bool:
    if chain in PROXY_CHAINS.get(table, frozenset()):
        return True
    return table == "nat" and chain.startswith(NAT_PREFIXES)


def cleanup_payload(save_text: str) -> str:
    """The `--noflush` restore input removing our chains from the tables in `save_text`.

    `save_text` is iptables-save output, any tables: only those present are written to.
    """
    out: list[str] = []
    table = ""
    chains: list[str] = []
    unhook: list[str] = []
    for line in save_text.splitlines():
        if line.startswith("*"):
            table, chains, unhook = line[1:], [], []
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if owned(table, name):
                chains.append(name)
        elif line.startswith("-A "):
            args = shlex.split(line)
            target = args[args.index("-j") + 1] if "-j" in args else ""
            if not owned(table, args[1]) and owned(table, target):
                unhook.append("-D " + line[3:])
        elif line == "COMMIT" and table and (chains or unhook):
            out.append(f"*{table}")
            out.extend(unhook)
            out.extend(f":{name} - [0:0]" for name in chains)
            out.extend(f"-X {name}" for name in chains)
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def nft_tables(listing: str) -> set[tuple[str, str]]:
    """(family, name) of each table in `nft list tables` output."""
    out = set()
    for line in listing.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table":
            out.add((words[1], words[2]))
    return out


@dataclass(frozen=True, slots=True)
class VirtualServer:
    flag: str
    """ipvsadm's service flag: -t, -u, --sctp-service or -f."""
    address: str
    """As ipvsadm -S -n writes it: 10.96.0.1:443, [fd00::1]:443, or a firewall mark."""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else 0


def virtual_servers(saved: str) -> list[VirtualServer]:
    """The virtual servers in `ipvsadm -S -n` output (its `-A` lines)."""
    out = []
    for line in saved.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "-A":
            out.append(VirtualServer(words[1], words[2]))
    return out


def owned_virtual_servers(
    servers: Iterable[VirtualServer], device_ips: Iterable[str], node_ports: Mapping[str, set[int]]
) -> list[VirtualServer]:
    """Those kube-proxy's ipvs mode made: on an address it bound to kube-ipvs0 (cluster, external and
    load-balancer IPs), or on a port its node-port set of that protocol lists (node ports)."""
    ips = set(device_ips)
    out = []
    for vs in servers:
        host, port = vs.host_port
        if host in ips or port in node_ports.get(vs.flag, set()):
            out.append(vs)
    return out


def _set_ports(listing: str) -> set[int]:
    """Ports in `ipset list NAME`: bitmap:port members are "30080", hash:ip,port ones "10.0.0.1,sctp:30080"."""
    ports = set()
    members = False
    for line in listing.splitlines():
        if line.startswith("Members:"):
            members = True
        elif members and line.strip():
            last = line.split()[0].rpartition(":")[2].rpartition(",")[2]
            if last.isdigit():
                ports.add(int(last))
    return ports


# ------------------------------------------------------------------ I/O


@dataclass
class CleanupReport:
    chains: int = 0
    nft_tables: list[str] = field(default_factory=list)
    virtual_servers: int = 0
    device: bool = False
    ipsets: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"removed {self.chains} chains"]
        if self.nft_tables:
            parts.append(f"nftables tables {', '.join(self.nft_tables)}")
        if self.virtual_servers:
            parts.append(f"{self.virtual_servers} IPVS virtual servers")
        if self.device:
            parts.append(f"interface {IPVS_DEVICE}")
        if self.ipsets:
            parts.append(f"{len(self.ipsets)} ipsets")
        return ", ".join(parts)


class CleanupHost:
    """Commands in the node's network namespace (or a named one, for tests); tests may fake it."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._prefix: tuple[str, ...] = ("nsenter", f"--net=/run/netns/{netns}") if netns else ()

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self._prefix, *argv], capture_output=True, text=True, check=False, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess(list(argv), 1, "", str(e))

    def which(self, name: str) -> bool:
        return shutil.which(name) is not None

    def ipset_loaded(self) -> bool:
        """ip_set loaded (module or built in); without it no set exists, and `ipset` would load it."""
        return self.which("ipset") and os.path.isdir("/sys/module/ip_set")

    def readable(self, path: str) -> bool:
        """A /proc/net file, as the namespace sees it."""
        return self.run(["cat", path]).returncode == 0

    def device(self) -> tuple[int, list[str]] | None:
        """kube-ipvs0's index and addresses; None when there is no such interface."""
        with self._iproute() as ipr:
            found = ipr.link_lookup(ifname=IPVS_DEVICE)
            if not found:
                return None
            return found[0], [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=found[0])]

    def delete_device(self, index: int) -> None:
        with self._iproute() as ipr:
            ipr.link("del", index=index)

    def _iproute(self) -> Any:
        from pyroute2 import IPRoute, NetNS

        return NetNS(self.netns, flags=0) if self.netns else IPRoute()


def cleanup(netns: str | None = None, *, host: CleanupHost | None = None) -> CleanupReport:
    """Remove every mode's leftovers; raises CleanupError listing what failed, after doing the rest."""
    host = host or CleanupHost(netns)
    report = CleanupReport()
    failures: list[tuple[str, str]] = []
    device = _device(host, failures)
    _ipvs(host, device[1] if device else [], report, failures)
    if device is not None:
        try:
            host.delete_device(device[0])
            report.device = True
            log.info("cleanup", removed=IPVS_DEVICE)
        except OSError as e:
            failures.append((f"interface {IPVS_DEVICE}", str(e)))
    for backend in BACKENDS:
        for family in FAMILIES:
            report.chains += _iptables(host, backend, family, failures)
    _nftables(host, report, failures)
    _ipsets(host, report, failures)
    if failures:
        for what, why in failures:
            log.error("cleanup_failed", what=what, error=why)
        raise CleanupError(failures)
    return report


def _device(host: CleanupHost, failures: list[tuple[str, str]]) -> tuple[int, list[str]] | None:
    try:
        return host.device()
    except OSError as e:
        failures.append((f"interface {IPVS_DEVICE}", str(e)))
        return None


def _iptables(
    host: CleanupHost, backend: XtablesBackend, family: Family, failures: list[tuple[str, str]]
) -> int:
    save = tool(backend, family, "-save")
    if not host.which(save):
        return 0
    what = f"iptables-{backend} IPv{family}"
    # Without -t, iptables-save lists only the tables that exist; with it, legacy would create one.
    done = host.run([save])
    if done.returncode != 0:
        failures.append((what, f"{save}: {done.stderr.strip() or f'exit {done.returncode}'}"))
        return 0
    payload = cleanup_payload(done.stdout)
    if not payload:
        return 0
    try:
        CommandRestorer(backend, netns=host.netns).apply(family, payload, noflush=True)
    except KproxyError as e:
        failures.append((what, str(e)))
        return 0
    removed = payload.count("\n-X ")
    log.info("cleanup", backend=backend, family=family, chains_removed=removed)
    return removed


def _nftables(host: CleanupHost, report: CleanupReport, failures: list[tuple[str, str]]) -> None:
    if not host.which("nft"):
        log.info("cleanup_skipped", what="nftables", reason="nft not installed")
        return
    listed = host.run(["nft", "list", "tables"])
    if listed.returncode != 0:
        failures.append(("nftables", f"nft list tables: {listed.stderr.strip()}"))
        return
    present = nft_tables(listed.stdout)
    for family, name in NFT_TABLES:
        if (family, name) not in present:
            continue
        done = host.run(["nft", "delete", "table", family, name])
        if done.returncode != 0:
            failures.append((f"nftables table {family} {name}", done.stderr.strip()))
            continue
        report.nft_tables.append(f"{family} {name}")
        log.info("cleanup", removed=f"nftables table {family} {name}")


def _ipvs(
    host: CleanupHost, device_ips: list[str], report: CleanupReport, failures: list[tuple[str, str]]
) -> None:
    if not host.which("ipvsadm") or not host.readable("/proc/net/ip_vs"):
        return  # no ip_vs module in this kernel (or not loaded): no virtual servers can exist
    saved = host.run(["ipvsadm", "-S", "-n"])
    if saved.returncode != 0:
        failures.append(("IPVS", f"ipvsadm -S -n: {saved.stderr.strip()}"))
        return
    node_ports: dict[str, set[int]] = {}
    if host.ipset_loaded():
        for flag, names in _NODE_PORT_SETS.items():
            for name in names:
                for prefix in ("KUBE-", "KUBE-6-"):
                    listed = host.run(["ipset", "list", prefix + name])
                    if listed.returncode == 0:
                        node_ports.setdefault(flag, set()).update(_set_ports(listed.stdout))
    for vs in owned_virtual_servers(virtual_servers(saved.stdout), device_ips, node_ports):
        done = host.run(["ipvsadm", "-D", vs.flag, vs.address])
        if done.returncode != 0:
            failures.append((f"IPVS virtual server {vs.flag} {vs.address}", done.stderr.strip()))
            continue
        report.virtual_servers += 1
    if report.virtual_servers:
        log.info("cleanup", removed="IPVS virtual servers", count=report.virtual_servers)


def _ipsets(host: CleanupHost, report: CleanupReport, failures: list[tuple[str, str]]) -> None:
    if not host.ipset_loaded():
        return
    listed = host.run(["ipset", "list", "-n"])
    if listed.returncode != 0:
        failures.append(("ipsets", f"ipset list -n: {listed.stderr.strip()}"))
        return
    for name in listed.stdout.split():
        if name not in IPSETS:
            continue
        done = host.run(["ipset", "destroy", name])
        if done.returncode != 0:
            failures.append((f"ipset {name}", done.stderr.strip()))
            continue
        report.ipsets.append(name)
    if report.ipsets:
        log.info("cleanup", removed="ipsets", names=",".join(report.ipsets))
