"""`kproxy cleanup` removes what a service proxy owns, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kproxy.errors import CleanupError
from kproxy.netfilter.cleanup import (
    IPSETS,
    CleanupHost,
    VirtualServer,
    _set_ports,
    cleanup,
    cleanup_payload,
    owned,
    owned_virtual_servers,
    virtual_servers,
)

REPO = Path(__file__).resolve().parents[2]

SAVED = """\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m tcp -j DNAT --to-destination 10.244.0.5:80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
"""


def test_payload_unhooks_and_deletes_only_proxy_chains() -> None:
    payload = cleanup_payload(SAVED)
    lines = payload.splitlines()
    assert '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in lines
    assert sorted(line for line in lines if line.startswith("-X")) == [
        "-X KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-X KUBE-SERVICES",
        "-X KUBE-SVC-XPGD46QRK7WJZT7O",
    ]
    assert "CNI-HOSTPORT-DNAT" not in payload
    assert "KUBE-FIREWALL" not in payload, "kubelet's chain is not ours to delete"
    assert "*filter" not in payload


@pytest.mark.parametrize(
    ("table", "chain", "ours"),
    [
        ("nat", "KUBE-SERVICES", True),
        ("nat", "KUBE-SVC-XPGD46QRK7WJZT7O", True),
        ("nat", "KUBE-XLB-XPGD46QRK7WJZT7O", True),
        ("nat", "KUBE-PORTALS-CONTAINER", True),
        ("nat", "KUBE-NODEPORT-HOST", True),
        ("filter", "KUBE-NODEPORT-NON-LOCAL", True),
        ("nat", "KUBE-NODE-PORT", True),
        ("nat", "KUBE-LOAD-BALANCER", True),
        ("nat", "KUBE-FIREWALL", True),
        ("filter", "KUBE-FIREWALL", False),
        ("filter", "KUBE-IPVS-FILTER", True),
        ("filter", "KUBE-IPVS-OUT-FILTER", True),
        ("filter", "KUBE-SOURCE-RANGES-FIREWALL", True),
        ("filter", "KUBE-PROXY-FIREWALL", True),
        ("mangle", "KUBE-PROXY-CANARY", True),
        ("mangle", "KUBE-KUBELET-CANARY", False),
        ("nat", "KUBE-MARK-DROP", False),
        ("mangle", "KUBE-IPTABLES-HINT", False),
        ("filter", "KUBE-SVC-XPGD46QRK7WJZT7O", False),
        ("nat", "CNI-HOSTPORT-DNAT", False),
    ],
)
def test_which_chains_a_service_proxy_owns(table: str, chain: str, ours: bool) -> None:
    """Every chain any kube-proxy mode (iptables, ipvs, userspace) or kproxy made; kubelet's stay."""
    assert owned(table, chain) is ours


def test_kubelets_filter_firewall_stays_while_ipvs_nat_firewall_goes() -> None:
    saved = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-MARK-DROP - [0:0]\nCOMMIT\n"
        "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-NODEPORT-NON-LOCAL - [0:0]\n"
        "-A INPUT -j KUBE-FIREWALL\n-A INPUT -j KUBE-NODEPORT-NON-LOCAL\nCOMMIT\n"
    )
    assert cleanup_payload(saved).splitlines() == [
        "*nat",
        ":KUBE-FIREWALL - [0:0]",
        "-X KUBE-FIREWALL",
        "COMMIT",
        "*filter",
        "-D INPUT -j KUBE-NODEPORT-NON-LOCAL",
        ":KUBE-NODEPORT-NON-LOCAL - [0:0]",
        "-X KUBE-NODEPORT-NON-LOCAL",
        "COMMIT",
    ]


IPVSADM_SAVE = """\
-A -t 10.96.0.1:443 -s rr
-a -t 10.96.0.1:443 -r 192.168.1.5:6443 -m -w 1
-A -u 10.96.0.10:53 -s rr
-A -t 192.168.1.5:30080 -s rr
-A -t [fd00:10:96::1]:443 -s rr
-A -t 192.168.1.5:8080 -s wrr
-A --sctp-service 192.168.1.5:30999 -s rr
-A -f 7 -s rr
"""


def test_only_the_virtual_servers_kube_proxy_made_are_deleted() -> None:
    servers = virtual_servers(IPVSADM_SAVE)
    assert len(servers) == 7
    mine = owned_virtual_servers(
        servers, ["10.96.0.1", "10.96.0.10", "fd00:10:96::1"], {"-t": {30080}, "-u": {30053}}
    )
    assert mine == [
        VirtualServer("-t", "10.96.0.1:443"),
        VirtualServer("-u", "10.96.0.10:53"),
        VirtualServer("-t", "192.168.1.5:30080"),
        VirtualServer("-t", "[fd00:10:96::1]:443"),
    ], "the node's own LVS on :8080, an SCTP port not in the sets and a fwmark service stay"


class IpvsNode(CleanupHost):
    """A node with ip_vs, as this test kernel is not: ipvsadm, ipset and kube-ipvs0 played from memory."""

    def __init__(self, fail: str = "") -> None:
        super().__init__(None)
        self.fail = fail
        self.calls: list[list[str]] = []
        self.sets = {"KUBE-NODE-PORT-TCP": "Members:\n30080\n", "KUBE-CLUSTER-IP": "", "other": ""}
        self.device_deleted = False

    def which(self, name: str) -> bool:
        return name in ("ipvsadm", "ipset")

    def ipset_loaded(self) -> bool:
        return True

    def readable(self, path: str) -> bool:
        return path == "/proc/net/ip_vs"

    def device(self) -> tuple[int, list[str]] | None:
        return None if self.device_deleted else (7, ["10.96.0.1", "10.96.0.10", "fd00:10:96::1"])

    def delete_device(self, index: int) -> None:
        assert index == 7
        self.device_deleted = True

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        if argv == ["ipvsadm", "-S", "-n"]:
            return subprocess.CompletedProcess(argv, 0, IPVSADM_SAVE, "")
        if argv[:2] == ["ipvsadm", "-D"]:
            ok = self.fail != argv[3]
            return subprocess.CompletedProcess(
                argv, 0 if ok else 2, "", "" if ok else "Memory allocation problem"
            )
        if argv[:2] == ["ipset", "list"]:
            if argv[2:] == ["-n"]:
                return subprocess.CompletedProcess(argv, 0, "\n".join(self.sets) + "\n", "")
            listing = self.sets.get(argv[2])
            code = 0 if listing is not None else 1
            return subprocess.CompletedProcess(argv, code, listing or "", "" if code == 0 else "no such set")
        if argv[:2] == ["ipset", "destroy"]:
            del self.sets[argv[2]]
            return subprocess.CompletedProcess(argv, 0, "", "")
        raise AssertionError(f"unexpected command {argv}")


def test_ipvs_leftovers_removed_in_kube_proxys_order() -> None:
    """Virtual servers it owns (device addresses, node ports in its sets) first, then kube-ipvs0,
    its ipsets last; the node's own virtual servers and sets stay."""
    node = IpvsNode()
    report = cleanup(host=node)
    deleted = [c[2:] for c in node.calls if c[:2] == ["ipvsadm", "-D"]]
    assert deleted == [
        ["-t", "10.96.0.1:443"],
        ["-u", "10.96.0.10:53"],
        ["-t", "192.168.1.5:30080"],
        ["-t", "[fd00:10:96::1]:443"],
    ]
    assert node.device_deleted and report.device
    assert report.virtual_servers == 4
    assert list(node.sets) == ["other"] and sorted(report.ipsets) == ["KUBE-CLUSTER-IP", "KUBE-NODE-PORT-TCP"]
    first_destroy = next(i for i, c in enumerate(node.calls) if c[:2] == ["ipset", "destroy"])
    assert all(c[0] == "ipset" for c in node.calls[first_destroy:]), "sets go last"


def test_a_virtual_server_that_cannot_be_deleted_fails_the_cleanup_after_the_rest() -> None:
    node = IpvsNode(fail="10.96.0.10:53")
    with pytest.raises(CleanupError) as err:
        cleanup(host=node)
    assert err.value.failures == [("IPVS virtual server -u 10.96.0.10:53", "Memory allocation problem")]
    assert node.device_deleted and list(node.sets) == ["other"], "everything else was still removed"


def test_node_ports_read_from_ipset_listings() -> None:
    bitmap = "Name: KUBE-NODE-PORT-TCP\nType: bitmap:port\nMembers:\n30080\n31000\n"
    hashed = "Name: KUBE-NODE-PORT-SCTP-HASH\nMembers:\n192.168.1.5,sctp:30999\n"
    assert _set_ports(bitmap) == {30080, 31000}
    assert _set_ports(hashed) == {30999}


def test_ipv4_and_ipv6_ipset_names() -> None:
    assert {"KUBE-CLUSTER-IP", "KUBE-6-CLUSTER-IP", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"} <= IPSETS


def test_nothing_to_clean_is_an_empty_payload() -> None:
    assert cleanup_payload("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


@pytest.mark.privileged
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_cleanup_empties_a_node_of_proxy_rules_in_both_families(backend: str) -> None:
    ns = f"kpclean{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        exec_ns = ["ip", "netns", "exec", ns]
        for family in ("4", "6"):
            payload = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kproxy",
                    "dry-run",
                    "-f",
                    str(REPO / "manifests/examples"),
                    "--node-name",
                    "node-a",
                    "--ip-family",
                    family,
                    "--iptables-localhost-nodeports=false",  # else KUBE-FIREWALL: kubelet's, kept
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            restore = f"ip{'6' if family == '6' else ''}tables-{backend}-restore"
            subprocess.run([*exec_ns, restore], input=payload, text=True, check=True)
            iptables = f"ip{'6' if family == '6' else ''}tables-{backend}"
            subprocess.run([*exec_ns, iptables, "-t", "nat", "-N", "SOMEONE-ELSES"], check=True)
        cleanup(netns=ns)
        for family in ("", "6"):
            saved = subprocess.run(
                [*exec_ns, f"ip{family}tables-{backend}-save"], capture_output=True, text=True, check=True
            ).stdout
            chains = [line.split()[0][1:] for line in saved.splitlines() if line.startswith(":")]
            assert not [c for c in chains if c.startswith("KUBE-")], saved
            assert "SOMEONE-ELSES" in chains
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# ------------------------------------------------------------ an nft-only node

KUBE_PROXY_EXTRAS = """\
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" -j KUBE-PORTALS-CONTAINER
-A OUTPUT -m addrtype --dst-type LOCAL -j KUBE-NODEPORT-HOST
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER
-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORT-NON-LOCAL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m comment --comment "Ensure that non-local NodePort traffic can flow" -j KUBE-NODEPORT-NON-LOCAL
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A KUBE-FIREWALL -m comment --comment "kubernetes firewall for dropping marked packets" -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
"""
"""What kube-proxy's userspace and ipvs modes and kubelet leave beside the iptables-mode rules."""
KUBELET = {("nat", "KUBE-MARK-DROP"), ("nat", "KUBE-KUBELET-CANARY"), ("filter", "KUBE-FIREWALL")}
KUBELET |= {("filter", "KUBE-KUBELET-CANARY"), ("mangle", "KUBE-KUBELET-CANARY")}


def _sh(ns: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _chains(ns: str, family: str) -> set[tuple[str, str]]:
    table, out = "", set()
    for line in _sh(ns, f"ip{family}tables-nft-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.add((table, line[1:].split()[0]))
    return out


def _legacy_tables(ns: str) -> list[str]:
    names = []
    for path in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        done = subprocess.run(["ip", "netns", "exec", ns, "cat", path], capture_output=True, text=True)
        names += [f"{path}:{n}" for n in done.stdout.split()]
    return names


@pytest.fixture
def nft_node() -> Iterator[str]:
    """A namespace shaped like an nft-only node kube-proxy ran on, in every mode, beside kubelet.

    IPVS leftovers as far as this kernel allows: the ipsets and the iptables rules that use them,
    and the kube-ipvs0 interface with a service address on it. The kernel has neither ip_vs (so
    no virtual servers) nor the dummy driver, so kube-ipvs0 is a bridge here, same name.
    """
    ns = f"kpclean{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for name, kind in (("KUBE-CLUSTER-IP", "hash:ip,port"), ("KUBE-LOAD-BALANCER", "hash:ip,port")):
            _sh(ns, "ipset", "create", name, kind)
        _sh(ns, "ipset", "create", "KUBE-6-CLUSTER-IP", "hash:ip,port", "family", "inet6")
        _sh(ns, "ipset", "create", "KUBE-NODE-PORT-TCP", "bitmap:port", "range", "0-65535")
        _sh(ns, "ipset", "create", "someone-elses", "hash:ip")
        for family in ("4", "6"):
            examples = str(REPO / "manifests/examples")
            payload = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kproxy",
                    "dry-run",
                    "-f",
                    examples,
                    "--node-name",
                    "node-a",
                    "--ip-family",
                    family,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            v6 = "6" if family == "6" else ""
            _sh(ns, f"ip{v6}tables-nft-restore", stdin=payload)
            extras = KUBE_PROXY_EXTRAS
            if family == "6":
                extras = "\n".join(line for line in extras.splitlines() if "--match-set" not in line)
            _sh(ns, f"ip{v6}tables-nft-restore", "--noflush", stdin=extras + "\n")
        for family in ("ip", "ip6"):
            _sh(ns, "nft", "add", "table", family, "kube-proxy")
            _sh(ns, "nft", "add", "chain", family, "kube-proxy", "services")
        _sh(ns, "nft", "add", "table", "inet", "someone-elses")
        _sh(ns, "ip", "link", "add", "kube-ipvs0", "type", "bridge")
        _sh(ns, "ip", "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0")
        _sh(ns, "ip", "link", "add", "cni0", "type", "bridge")
        assert _legacy_tables(ns) == [], "the setup itself must not touch legacy tables"
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _kproxy_cleanup(ns: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "cleanup"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.privileged
def test_cleanup_leaves_an_nft_only_node_with_no_proxy_state_and_no_legacy_tables(nft_node: str) -> None:
    ns = nft_node
    before = _chains(ns, "")
    assert ("filter", "KUBE-NODEPORT-NON-LOCAL") in before and ("nat", "KUBE-LOAD-BALANCER") in before

    done = _kproxy_cleanup(ns)
    assert done.returncode == 0, done.stderr
    assert "nftables tables ip kube-proxy, ip6 kube-proxy" in done.stderr
    assert "interface kube-ipvs0" in done.stderr and "4 ipsets" in done.stderr

    assert _legacy_tables(ns) == [], "cleanup must not create iptables-legacy tables"
    for family in ("", "6"):
        left = _chains(ns, family)
        assert not [c for c in left if c[1].startswith("KUBE-") and c not in KUBELET], left
        assert left >= KUBELET, "kubelet's chains stay"
        assert ("nat", "CNI-HOSTPORT-DNAT") in left
        rules = _sh(ns, f"ip{family}tables-nft-save")
        assert "-A INPUT -j KUBE-FIREWALL" in rules, "kubelet's jump stays"
    assert "kube-proxy" not in _sh(ns, "nft", "list", "tables")
    assert "table inet someone-elses" in _sh(ns, "nft", "list", "tables")
    assert _sh(ns, "ipset", "list", "-n").split() == ["someone-elses"]
    links = _sh(ns, "ip", "-o", "link")
    assert "kube-ipvs0" not in links and "cni0" in links

    again = _kproxy_cleanup(ns)
    assert (again.returncode, again.stderr.strip()) == (0, "kproxy: removed 0 chains"), "idempotent"
    assert _legacy_tables(ns) == []


@pytest.mark.privileged
def test_cleanup_that_cannot_read_a_table_exits_non_zero_naming_it_and_does_the_rest(
    nft_node: str, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    broken = bindir / "iptables-nft-save"
    broken.write_text("#!/bin/sh\necho 'iptables-nft-save: cannot open netlink socket' >&2\nexit 4\n")
    broken.chmod(0o755)
    done = _kproxy_cleanup(nft_node, {"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kproxy: cleanup failed: iptables-nft IPv4:"), done.stderr
    assert "cannot open netlink socket" in last
    assert "kube-proxy" not in _sh(nft_node, "nft", "list", "tables"), "the other steps still ran"
    assert not [c for c in _chains(nft_node, "6") if c[1].startswith("KUBE-") and c not in KUBELET]
