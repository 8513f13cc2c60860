"""The I/O edge of the iptables backend: writing payloads, reading chains, built-in jumps.

Which path does what, and why:

- **Rule payloads** (every per-service and top-level chain) always go through
  `ip[6]tables-{legacy,nft}-restore --noflush --wait=N`: one atomic transaction per
  table, the only way to rewrite thousands of rules at once, and `--noflush` leaves
  chains of other owners (CNI plugins, kubelet, docker) alone. stderr is kept and the
  failing line number is parsed out of it, so a `RestoreError` names the line.
- **Reading which chains exist** (stale chains on a full sync after start, a failure or
  a flush): on legacy, `iptables-legacy-save -t TABLE` (the kernel hands over the table
  as one blob). On nft, `iptables-nft-save` decodes every rule back into iptables
  syntax (seconds at 10,000 services), so the chain list comes from `nft list chains`
  (names only; the nftables package), with the save as fallback.
- **The canary check** (before each partial sync): `iptables -t nat -S
  KUBE-PROXY-CANARY`. On nft this reads one chain (1-3 ms at 10,000 services). On legacy, listing one chain copies the
  whole table out of the kernel (0.75 s at 10,000 services), so the engine first reads
  the table header (rule count and size, `IPT_SO_GET_INFO`, a few bytes through
  ctypes): unchanged since kproxy's own last write means nobody touched the table and
  the listing is skipped. The same token lets a periodic full sync skip re-checking the
  built-in jumps.
- **Built-in-chain jumps** (PREROUTING/OUTPUT -> KUBE-SERVICES, ...): these live in
  chains kproxy does not own, so they are checked and inserted rule by rule, never
  rewritten. On legacy this uses python-iptables (`iptc`): it reads each table once,
  checks every jump against it, inserts what is missing and commits once, where the
  command line would copy the whole table from and to the kernel for every `-C` and
  every `-I` (seconds, with 400,000 rules). libiptc takes no lock of its own, so the
  xtables lock (/run/xtables.lock) is taken around it, as `iptables -w` would.
  python-iptables does not speak nf_tables, so on nft the jumps use `iptables-nft -S
  CHAIN` (one chain read, milliseconds), then `-C` only for a rule not listed verbatim,
  and `-I` for a missing one.
- **Backend detection**: the backend that already holds rules wins, as the
  iptables-wrapper of kube-proxy's image decides: kubelet's marker chains
  (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY) first, then whichever backend holds more
  rules; a tie (an empty host) means nft. A flag overrides.
- **Namespaces**: with `netns` set, commands run under `nsenter --net=/run/netns/NAME`
  and python-iptables runs in a forked child that joined the namespace, so tests and
  the benchmark never touch the host's tables.

nft chunking: iptables-nft-restore (1.8.9) with `--noflush` spends time quadratic in
the size of one payload (about 2.5 s for 1,000 services x 10 endpoints, 10 s for 2,000,
over ten minutes for 10,000), but each call also pays a fixed cost that grows with the
table (about 0.35 s at 110,000 chains). `chunk_limit` balances the two: chunks of
about sqrt(200 x chains in the table) chains, at least 1,000. Legacy rewrites the whole
table on each call, so it is never split.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import os
import pickle
import re
import shlex
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypeVar

from kproxy.errors import ConfigError, RestoreError
from kproxy.infra import log
from kproxy.netfilter.ruleset import ChainKey, Table
from kproxy.state.model import Family

XtablesBackend = Literal["legacy", "nft"]
BACKENDS: tuple[XtablesBackend, ...] = ("legacy", "nft")
KUBELET_MARKERS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
NFT_MIN_CHUNK = 1000
"""Fewest chains per nft restore call on large writes; see the module docstring."""

_FAILED_LINE = re.compile(r"line (\d+) failed|at line: (\d+)")
_T = TypeVar("_T")


class Restorer(Protocol):
    """What the sync engine needs from the kernel, per address family."""

    def chunk_limit(self, table_chains: int) -> int | None:
        """Split writes of more chains than this into several restores (None: never), for
        a table holding about `table_chains` chains."""

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        """Apply an iptables-restore payload atomically, or raise RestoreError."""

    def save(self, family: Family, table: Table) -> str:
        """iptables-save text of one table."""

    def chains(self, family: Family, tables: Sequence[Table]) -> dict[Table, set[str]]:
        """Per table, the names of all its chains (built-in ones included)."""

    def has_chain(self, family: Family, table: Table, chain: str) -> bool: ...

    def generation(self, family: Family, table: Table) -> object | None:
        """A cheap token that changes whenever the table changes, or None when the backend
        has none. Equal tokens let the engine skip the (dearer) canary check."""

    def ensure_jumps(self, family: Family, jumps: Mapping[ChainKey, tuple[str, ...]]) -> int:
        """Insert, at the top of each built-in chain, the given `-A CHAIN ...` rules that are
        missing; returns how many were inserted."""


def tool(backend: XtablesBackend, family: Family, suffix: str = "") -> str:
    """`iptables-nft`, `ip6tables-legacy-restore`, ..."""
    return f"{'ip6' if family == 6 else 'ip'}tables-{backend}{suffix}"


def failed_line(stderr: str) -> int | None:
    """legacy says "line N failed", nft "Error occurred at line: N"."""
    m = _FAILED_LINE.search(stderr)
    return int(m.group(1) or m.group(2)) if m else None


def count_rules(save_text: str) -> int:
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def chain_names(save_text: str) -> set[str]:
    """Chain declarations (`:NAME POLICY [p:b]`) of iptables-save output."""
    return {line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line.startswith(":")}


def rule_args(line: str) -> list[str]:
    """`-A CHAIN args...` -> args, split as a shell would (comments are quoted)."""
    parts = shlex.split(line)
    if len(parts) < 2 or parts[0] != "-A":
        raise ValueError(f"not an append rule: {line!r}")
    return parts[2:]


def nft_chain_names(listing: str) -> dict[str, set[str]]:
    """Per table, the chains of `nft list chains FAMILY` output."""
    out: dict[str, set[str]] = {}
    current: set[str] | None = None
    for raw in listing.splitlines():
        words = raw.split()
        if len(words) >= 3 and words[0] == "table":
            current = out.setdefault(words[2], set())
        elif len(words) >= 2 and words[0] == "chain" and current is not None:
            current.add(words[1])
    return out


Runner = Callable[[Sequence[str]], str]


def detect_backend(override: str | None = None, run: Runner | None = None) -> XtablesBackend:
    """The backend already in use on this host (see the module docstring)."""
    if override:
        for known in BACKENDS:
            if override == known:
                return known
        raise ConfigError("--iptables-backend", f"must be one of {', '.join(BACKENDS)}, not {override!r}")
    run = run or _run_quiet
    texts: dict[XtablesBackend, str] = {}
    backend: XtablesBackend
    for backend in ("nft", "legacy"):
        # kubelet's marker lives in mangle; legacy must not be asked for one table (asking
        # creates it), so it is read whole, as the wrapper does.
        args: tuple[str, ...] = ("-t", "mangle") if backend == "nft" else ()
        text = run([tool(backend, 4, "-save"), *args]) + run([tool(backend, 6, "-save"), *args])
        if any(f":{marker} " in text for marker in KUBELET_MARKERS):
            log.info("iptables_backend_detected", backend=backend, reason="kubelet chains")
            return backend
        texts[backend] = text
    nft_rules = count_rules(run([tool("nft", 4, "-save")]) + run([tool("nft", 6, "-save")]))
    legacy_rules = count_rules(texts["legacy"])
    backend = "legacy" if legacy_rules > nft_rules else "nft"
    log.info("iptables_backend_detected", backend=backend, legacy_rules=legacy_rules, nft_rules=nft_rules)
    return backend


def _run_quiet(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


class CommandRestorer:
    """The real kernel, through the iptables tools of one backend."""

    def __init__(self, backend: XtablesBackend, *, netns: str | None = None, wait_s: int = 5) -> None:
        self.backend: XtablesBackend = backend
        self.netns = netns
        self.wait_s = wait_s
        self._prefix: tuple[str, ...] = ("nsenter", f"--net=/run/netns/{netns}") if netns else ()

    def chunk_limit(self, table_chains: int) -> int | None:
        if self.backend != "nft":
            return None
        return max(NFT_MIN_CHUNK, math.isqrt(200 * table_chains))

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._prefix, *argv], input=stdin, capture_output=True, text=True, check=False, timeout=600
        )

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        argv = [tool(self.backend, family, "-restore"), f"--wait={self.wait_s}"]
        if noflush:
            argv.append("--noflush")
        done = self._run(argv, payload)
        if done.returncode != 0:
            raise RestoreError(family, done.returncode, done.stderr, failed_line(done.stderr))

    def save(self, family: Family, table: Table) -> str:
        done = self._run([tool(self.backend, family, "-save"), "-t", table])
        if done.returncode != 0:
            raise RestoreError(family, done.returncode, done.stderr)
        return done.stdout

    def chains(self, family: Family, tables: Sequence[Table]) -> dict[Table, set[str]]:
        if self.backend == "nft" and shutil.which("nft"):
            done = self._run(["nft", "list", "chains", "ip6" if family == 6 else "ip"])
            if done.returncode == 0:
                listing = nft_chain_names(done.stdout)
                return {table: listing.get(table, set()) for table in tables}
        return {table: chain_names(self.save(family, table)) for table in tables}

    def has_chain(self, family: Family, table: Table, chain: str) -> bool:
        done = self._run([tool(self.backend, family), f"--wait={self.wait_s}", "-t", table, "-S", chain])
        return done.returncode == 0

    def generation(self, family: Family, table: Table) -> object | None:
        if self.backend != "legacy":
            return None  # nft's canary check is already a few milliseconds
        if not self.netns:
            return legacy_table_info(family, table)  # a few bytes; not worth a fork
        return call_in_netns(self.netns, legacy_table_info, family, table)

    def ensure_jumps(self, family: Family, jumps: Mapping[ChainKey, tuple[str, ...]]) -> int:
        if self.backend == "legacy":
            return self._in_netns(_ensure_jumps_iptc, family, dict(jumps), self.wait_s)
        inserted = 0
        binary = tool(self.backend, family)
        for (table, chain), rules in jumps.items():
            # `-S CHAIN` reads one chain (milliseconds); `-C` resolves the jump target
            # against every chain of the table (0.1 s at 10,000 services), so it only
            # confirms a rule the listing does not show verbatim.
            listed = self._run(
                [binary, f"--wait={self.wait_s}", "-t", table, "-S", chain]
            ).stdout.splitlines()
            for line in reversed(rules):
                if line in listed:
                    continue
                args = rule_args(line)
                check = self._run([binary, f"--wait={self.wait_s}", "-t", table, "-C", chain, *args])
                if check.returncode == 0:
                    continue
                done = self._run([binary, f"--wait={self.wait_s}", "-t", table, "-I", chain, "1", *args])
                if done.returncode != 0:
                    raise RestoreError(family, done.returncode, f"{table} {line}: {done.stderr}")
                inserted += 1
        return inserted

    def _in_netns(self, fn: Callable[..., _T], *args: Any) -> _T:
        return call_in_netns(self.netns, fn, *args)


# ------------------------------------------------------------ python-iptables (legacy)

_SO_GET_INFO = 64  # IPT_SO_GET_INFO and IP6T_SO_GET_INFO
_INFO_SIZE = 84  # struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size


def legacy_table_info(family: Family, table: str) -> tuple[int, int] | None:
    """(rule count, blob size) of a legacy table, straight from the kernel.

    Listing a chain with iptables-legacy copies the whole table out of the kernel (a
    restore's worth of time at 10,000 services); this header is a few bytes, and any
    flush, deletion or insertion by someone else changes it."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(table.encode(), _INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    af, level = (socket.AF_INET6, socket.IPPROTO_IPV6) if family == 6 else (socket.AF_INET, socket.IPPROTO_IP)
    with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        if libc.getsockopt(sock.fileno(), level, _SO_GET_INFO, buf, ctypes.byref(size)) != 0:
            return None
    entries, blob = struct.unpack_from("=II", buf.raw, 76)
    return entries, blob


_CLONE_NEWNET = 0x40000000


def call_in_netns(netns: str | None, fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn(*args)` in a forked child, in network namespace `netns` if given.

    setns() switches only the calling thread, and libiptc opens its sockets in whatever
    namespace the thread is in; a throw-away child keeps the parent where it was. The
    child also keeps libiptc's copy of a whole table (tens of MB at 10,000 services)
    out of the long-lived agent."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        result: tuple[bool, Any]
        try:
            if netns:
                fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            result = (True, fn(*args))
        except BaseException as exc:  # everything goes back to the parent
            result = (False, f"{type(exc).__name__}: {exc}")
        with os.fdopen(wfd, "wb") as out:
            out.write(pickle.dumps(result))
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    if not data:
        raise RestoreError(0, 1, f"child process (netns {netns or '-'}) died")
    ok, value = pickle.loads(data)
    if not ok:
        raise RestoreError(0, 1, str(value))
    return value  # type: ignore[no-any-return]


@contextmanager
def xtables_lock(wait_s: float) -> Iterator[None]:
    """The lock `iptables -w` takes, for code that drives libiptc directly."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RestoreError(0, 4, f"xtables lock {path} held for more than {wait_s} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _iptc_rule(iptc: Any, family: Family, line: str) -> Any:
    """A python-iptables Rule from `-A CHAIN args`, for the small vocabulary of jump rules
    (-m MATCH --opt value, optional `!`, -s/-d/-p/-i/-o, -j TARGET --opt value)."""
    rule = iptc.Rule6() if family == 6 else iptc.Rule()
    fields = {"-s": "src", "-d": "dst", "-p": "protocol", "-i": "in_interface", "-o": "out_interface"}
    args = rule_args(line)
    module: Any = None
    negate = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "!":
            negate = True
            i += 1
            continue
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg == "-m":
            module = rule.create_match(value)
        elif arg == "-j":
            module = rule.create_target(value)
        elif arg in fields:
            setattr(rule, fields[arg], ("!" if negate else "") + value)
        elif arg.startswith("--"):
            module.set_parameter(arg[2:], ("!" if negate else "") + value)
        else:
            raise ValueError(f"unsupported argument {arg!r} in {line!r}")
        negate = False
        i += 2
    return rule


def _ensure_jumps_iptc(family: Family, jumps: dict[ChainKey, tuple[str, ...]], wait_s: int) -> int:
    import iptc  # python-iptables: loaded only where used (it needs the legacy libiptc)

    inserted = 0
    with xtables_lock(wait_s):
        for table_name in sorted({table for table, _ in jumps}):
            table = iptc.Table6(table_name) if family == 6 else iptc.Table(table_name)
            table.autocommit = False
            table.refresh()
            try:
                before = inserted
                for (t, chain_name), rules in jumps.items():
                    if t != table_name:
                        continue
                    chain = iptc.Chain(table, chain_name)
                    present = chain.rules
                    for line in reversed(rules):
                        rule = _iptc_rule(iptc, family, line)
                        if rule not in present:
                            chain.insert_rule(rule)
                            inserted += 1
                if inserted > before:  # a commit rewrites the whole table: only when needed
                    table.commit()
            finally:
                table.autocommit = True
    return inserted


# ------------------------------------------------------------------------- fake
