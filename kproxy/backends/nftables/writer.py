"""The edge where nftables scripts reach the kernel: one script, one atomic transaction.

Two writers with one method. `LibNftables` calls libnftables (Debian's libnftables1,
the library behind the `nft` command) in-process through ctypes: no process start
per write, and one context kept for the life of the agent. `NftCommand` pipes the
script into `nft -f -`, for hosts without the library. Either way the whole script is
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


class NftWriter(Protocol):
    def apply(self, family: int, script: str) -> None:
        """Run `script` as one transaction; raise NftablesError (nothing applied) when refused."""


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
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            if rc != 0:
                err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
                raise NftablesError(family, rc, err.decode(errors="replace"))


def host_writer() -> NftWriter:
    """libnftables when the host has it, else the `nft` command; NftablesError when neither."""
    lib = LibNftables.load()
    if lib is not None:
        return lib
    if shutil.which("nft") is None:
        raise NftablesError(
            0, -1, "neither libnftables.so.1 nor the nft command found; install the nftables package"
        )
    return NftCommand()
