"""Switching away from nftables mode: the other modes remove its tables once they serve.

kube-proxy in iptables mode deletes nftables mode's `ip kube-proxy` / `ip6 kube-proxy`
tables, and nftables mode deletes iptables mode's chains, so a node switching modes does
not keep the old mode's rules catching packets (and stale services) for good. kproxy's
modes do the same, each family only after its own first full sync has succeeded, so there
is never a moment with neither mode's rules.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable

from kproxy.infra import log
from kproxy.state.model import Family

TABLE = "kube-proxy"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def remove_table(family: Family, run: Callable[[list[str]], subprocess.CompletedProcess[str]] = _run) -> int:
    """Delete nftables mode's table of `family`: 1 removed, 0 there was none, -1 it could not
    be removed (the error is logged; the caller retries at its next full sync)."""
    fam = "ip6" if family == 6 else "ip"
    if run is _run and shutil.which("nft") is None:
        return 0  # no nft command: nothing of ours could have made the table either
    try:
        listed = run(["nft", "list", "tables", fam])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warn("nftables_mode_cleanup_failed", family=family, table=f"{fam} {TABLE}", error=str(e))
        return -1
    if listed.returncode != 0:
        log.warn("nftables_mode_cleanup_failed", family=family, error=listed.stderr.strip())
        return -1
    if f"table {fam} {TABLE}" not in {line.strip() for line in listed.stdout.splitlines()}:
        return 0
    try:
        done = run(["nft", "delete", "table", fam, TABLE])
    except (OSError, subprocess.TimeoutExpired) as e:
        done = subprocess.CompletedProcess([], -1, "", str(e))
    if done.returncode != 0:
        log.warn(
            "nftables_mode_cleanup_failed", family=family, table=f"{fam} {TABLE}", error=done.stderr.strip()
        )
        return -1
    log.info("nftables_mode_table_removed", family=family, table=f"{fam} {TABLE}")
    return 1


class NftablesLeftovers:
    """For iptables and userspace mode: `after_full_sync(family)` removes nftables mode's table
    of that family, once per family per process (again after a failure)."""

    def __init__(self, remove: Callable[[Family], int] = remove_table) -> None:
        self._remove = remove
        self._done: set[Family] = set()

    async def after_full_sync(self, family: Family) -> None:
        if family in self._done:
            return
        if await asyncio.to_thread(self._remove, family) >= 0:
            self._done.add(family)
