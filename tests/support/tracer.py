"""A packet tracer over rendered rules, in the spirit of kube-proxy's proxier_test.go tracer.

It walks one packet through nat KUBE-SERVICES (where PREROUTING and OUTPUT send it),
then, with the destination rewritten by the first DNAT reached, through the filter
chains kproxy owns, and reports the endpoints reached, whether the packet was marked
for masquerade, and any REJECT or DROP. Random spreading (`-m statistic`) is treated
as "take every branch" so one trace yields the whole endpoint set; affinity checks
(`-m recent --rcheck`) never match, as for a client seen for the first time.

It understands exactly the matches kproxy emits and raises on anything else, so a
new kind of rule cannot slip past the tests unexamined.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BUILTIN_TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"})
"""Targets that are not chains of ours; a `-j` to anything else must be a chain in the ruleset."""

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
ChainKey = tuple[str, str]


class TraceError(AssertionError):
    pass


@dataclass
class Rule:
    text: str
    src: tuple[Net, bool] | None = None
    dst: tuple[Net, bool] | None = None
    proto: str = ""
    dport: int = 0
    dst_local: bool = False
    src_local: bool = False
    random: bool = False
    recent_check: bool = False
    mark_match: bool | None = None
    """None: no mark match; True: needs the masquerade mark; False: needs it absent."""
    ctstates: frozenset[str] | None = None
    target: str = ""
    to_destination: str = ""
    mark_op: str = ""


_VALUED = {
    "--comment",
    "-p",
    "--dport",
    "--dst-type",
    "--src-type",
    "--mode",
    "--probability",
    "--name",
    "--seconds",
    "--mark",
    "--ctstate",
    "--to-destination",
    "--or-mark",
    "--xor-mark",
    "--reject-with",
    "-j",
    "-s",
    "-d",
    "-m",
}
_FLAGS = {"--rcheck", "--reap", "--set", "--random-fully"}
_MODULES = {"comment", "tcp", "udp", "sctp", "addrtype", "statistic", "recent", "mark", "conntrack"}


def parse_rule(line: str) -> tuple[str, Rule]:
    toks = shlex.split(line)
    if len(toks) < 2 or toks[0] != "-A":
        raise TraceError(f"not an append rule: {line!r}")
    chain = toks[1]
    rule = Rule(line)
    i = 2
    neg = False
    while i < len(toks):
        tok = toks[i]
        if tok == "!":
            neg = True
            i += 1
            continue
        if tok in _FLAGS:
            if tok == "--rcheck":
                rule.recent_check = True
            i += 1
            neg = False
            continue
        if tok not in _VALUED or i + 1 >= len(toks):
            raise TraceError(f"tracer does not understand {tok!r} in {line!r}")
        val = toks[i + 1]
        i += 2
        if tok == "-m":
            if val not in _MODULES:
                raise TraceError(f"unknown match module {val!r} in {line!r}")
        elif tok in ("-s", "-d"):
            net = (ipaddress.ip_network(val, strict=False), neg)
            if tok == "-s":
                rule.src = net
            else:
                rule.dst = net
        elif tok == "-p":
            rule.proto = val
        elif tok == "--dport":
            rule.dport = int(val)
        elif tok in ("--dst-type", "--src-type"):
            if val != "LOCAL" or neg:
                raise TraceError(f"unsupported addrtype {line!r}")
            if tok == "--dst-type":
                rule.dst_local = True
            else:
                rule.src_local = True
        elif tok == "--mode":
            rule.random = val == "random"
        elif tok == "--mark":
            rule.mark_match = not neg
        elif tok == "--ctstate":
            rule.ctstates = frozenset(val.split(","))
        elif tok == "-j":
            rule.target = val
        elif tok == "--to-destination":
            rule.to_destination = val
        elif tok in ("--or-mark", "--xor-mark"):
            rule.mark_op = tok
        neg = False
    return chain, rule


@dataclass
class Trace:
    endpoints: frozenset[str] = frozenset()
    masquerade: bool = False
    verdict: str = ""
    """"REJECT", "DROP" or "" (delivered, to an endpoint or to the node itself)."""
    path: list[str] = field(default_factory=list)


@dataclass
class _Packet:
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: str
    dport: int
    src_local: bool
    dst_local: bool


class Tracer:
    def __init__(self, chains: Mapping[Any, Iterable[str]], node_ips: Iterable[str] = ()) -> None:
        """`chains`: (table, chain) -> rule lines, as `assemble` returns them."""
        self.node_ips = {ipaddress.ip_address(ip) for ip in node_ips}
        self.chains: dict[ChainKey, list[Rule]] = {}
        for (table, name), lines in chains.items():
            parsed = []
            for line in lines:
                chain, rule = parse_rule(line)
                if chain != name:
                    raise TraceError(f"rule {line!r} filed under chain {name}")
                parsed.append(rule)
            self.chains[table, name] = parsed
        for (table, _), rules in self.chains.items():
            for rule in rules:
                if (
                    rule.target
                    and rule.target not in BUILTIN_TARGETS
                    and (table, rule.target) not in self.chains
                ):
                    raise TraceError(f"jump to undefined chain {rule.target} in {rule.text!r}")

    def trace(self, src: str, proto: str, dst: str, dport: int, *, dst_local: bool | None = None) -> Trace:
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        local = d in self.node_ips if dst_local is None else dst_local
        pkt = _Packet(s, d, proto.lower(), dport, s in self.node_ips, local)
        out = _Out()
        self._run("nat", "KUBE-SERVICES", pkt, out, depth=0)
        if out.dnat:
            host = out.dnat[0].rsplit(":", 1)[0].strip("[]")
            pkt.dst = ipaddress.ip_address(host)
            pkt.dst_local = pkt.dst in self.node_ips
        for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
            if ("filter", chain) in self.chains and not out.verdict:
                self._run("filter", chain, pkt, out, depth=0)
        return Trace(frozenset(out.dnat), out.masq, out.verdict, out.path)

    def _matches(self, r: Rule, p: _Packet) -> bool:
        if r.proto and r.proto != p.proto:
            return False
        if r.dport and r.dport != p.dport:
            return False
        for cond, addr in ((r.src, p.src), (r.dst, p.dst)):
            if cond is not None:
                net, neg = cond
                inside = addr.version == net.version and addr in net
                if inside == neg:
                    return False
        if r.dst_local and not p.dst_local:
            return False
        if r.src_local and not p.src_local:
            return False
        if r.recent_check:
            return False
        if r.mark_match is not None:
            return False  # only KUBE-POSTROUTING / KUBE-FORWARD test marks; not traced
        return r.ctstates is None or "NEW" in r.ctstates

    def _run(self, table: str, chain: str, p: _Packet, out: _Out, depth: int) -> bool:
        """True when the packet's fate in this table is settled (DNAT, ACCEPT, DROP, REJECT)."""
        if depth > 16:
            raise TraceError(f"jump loop through {chain}")
        for r in self.chains.get((table, chain), []):
            if not self._matches(r, p):
                continue
            out.path.append(r.text)
            t = r.target
            if not t:
                continue
            if t == "RETURN":
                return False
            if t == "MARK":
                out.masq = out.masq or r.mark_op == "--or-mark"
                continue
            if t == "DNAT":
                out.dnat.append(r.to_destination)
                return True
            if t in ("ACCEPT", "DROP", "REJECT"):
                if t != "ACCEPT":
                    out.verdict = t
                return True
            if t not in BUILTIN_TARGETS:
                done = self._run(table, t, p, out, depth + 1)
                if done and not r.random:
                    return True
                continue
            raise TraceError(f"tracer does not handle target {t} in {r.text!r}")
        return False


@dataclass
class _Out:
    dnat: list[str] = field(default_factory=list)
    masq: bool = False
    verdict: str = ""
    path: list[str] = field(default_factory=list)
