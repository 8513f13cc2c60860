"""The edge where nftables scripts reach the kernel: one script, one atomic transaction.

Two writers with one method. `LibNftables` calls libnftables (Debian's libnftables1,
the library behind the `nft` command) in-process through ctypes: no process start
per write, and one context kept for the life of the agent. `NftCommand` pipes the
script into `nft -f -`: for full syncs (see SplitWriter) and hosts without the library. Either way the whole script is
one netlink batch: the kernel applies all of it or none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import Protocol

from kproxy.errors import NftablesError

LIBRARY = "libnftables.so.1"


CANARY = "nodeport-ips"
"""A small set every table of ours has: listing it tells whether the table is still there
in a fraction of a millisecond, where listing the table reads every element."""


def canary_command(family: int) -> str:
    return f"list set {'ip6' if family == 6 else 'ip'} kube-proxy {CANARY}\n"


class NftWriter(Protocol):
    def apply(self, family: int, script: str) -> None:
        """Run `script` as one transaction; raise NftablesError (nothing applied) when refused."""

    def table_present(self, family: int) -> bool:
        """Our table of this family exists (someone may have flushed the ruleset)."""

    def read(self, family: int, command: str) -> str:
        """The output of one listing command; NftablesError when it fails."""


class NftCommand:
    """`nft -f -` with the script on stdin (`argv` may wrap it, e.g. in `ip netns exec NS nft`)."""

    def __init__(self, argv: Sequence[str] = ("nft",), timeout_s: float = 120.0) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s

    def apply(self, family: int, script: str) -> None:
        try:
            res = subprocess.run(
                [*self.argv, "-f", "-"], input=script, capture_output=True, text=True, timeout=self.timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftablesError(family, -1, str(e)) from e
        if res.returncode != 0:
            raise NftablesError(family, res.returncode, res.stderr)

    def table_present(self, family: int) -> bool:
        try:
            self.apply(family, canary_command(family))
        except NftablesError:
            return False
        return True

    def read(self, family: int, command: str) -> str:
        try:
            res = subprocess.run(
                [*self.argv, "-f", "-"], input=command, capture_output=True, text=True, timeout=self.timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftablesError(family, -1, str(e)) from e
        if res.returncode != 0:
            raise NftablesError(family, res.returncode, res.stderr)
        return res.stdout


class LibNftables:
    """libnftables through ctypes, output and errors captured into buffers (never printed)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lock = threading.Lock()
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._ctx = ctx

    @classmethod
    def load(cls) -> LibNftables | None:
        """The library, or None when this host does not have it."""
        name = ctypes.util.find_library("nftables") or LIBRARY
        try:
            return cls(ctypes.CDLL(name))
        except OSError:
            return None

    def apply(self, family: int, script: str) -> None:
        self.read(family, script)

    def read(self, family: int, command: str) -> str:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            # Reading a buffer also empties it: without this, they grow with every call.
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            if rc != 0:
                raise NftablesError(family, rc, err.decode(errors="replace"))
            return out.decode(errors="replace")

    def table_present(self, family: int) -> bool:
        try:
            self.apply(family, canary_command(family))
        except NftablesError:
            return False
        return True


class SplitWriter:
    """Small scripts (partial syncs) in-process; large ones (full syncs) through `nft -f` in a
    child process. Parsing a 10,000-service table takes libnftables a few hundred MB, which an
    agent would keep as resident memory for good; a child gives it back when it exits, and
    costs no more time than the library at that size."""

    def __init__(self, small: NftWriter, large: NftWriter, threshold: int = 1 << 20) -> None:
        self.small = small
        self.large = large
        self.threshold = threshold

    def apply(self, family: int, script: str) -> None:
        (self.large if len(script) >= self.threshold else self.small).apply(family, script)

    def table_present(self, family: int) -> bool:
        return self.small.table_present(family)

    def read(self, family: int, command: str) -> str:
        return self.small.read(family, command)


def host_writer() -> NftWriter:
    """libnftables when the host has it (with the `nft` command for large scripts), else the
    `nft` command alone; NftablesError when neither."""
    lib = LibNftables.load()
    if lib is not None:
        return SplitWriter(lib, NftCommand()) if shutil.which("nft") else lib
    if shutil.which("nft") is None:
        raise NftablesError(
            0, -1, "neither libnftables.so.1 nor the nft command found; install the nftables package"
        )
    return NftCommand()
