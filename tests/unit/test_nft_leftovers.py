"""Removing nftables mode's table when another mode takes over: only kube-proxy's table of the
family, and a failed removal is tried again at the next full sync (not given up)."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from kproxy.backends.nftables.leftovers import NftablesLeftovers, remove_table


class FakeNft:
    """`nft` as remove_table calls it: lists the tables present, deletes one, or fails."""

    def __init__(self, present: set[str], fail_delete: bool = False) -> None:
        self.present = present
        self.fail_delete = fail_delete
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[Any]:
        self.calls.append(argv)
        if argv[1] == "list":
            listed = "".join(f"table {t}\n" for t in sorted(self.present) if t.startswith(f"{argv[3]} "))
            return subprocess.CompletedProcess(argv, 0, listed, "")
        if self.fail_delete:
            return subprocess.CompletedProcess(
                argv, 1, "", "Error: Could not process rule: Device or resource busy"
            )
        self.present.discard(f"{argv[3]} {argv[4]}")
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_remove_table_touches_only_kube_proxys_table_of_the_family() -> None:
    nft = FakeNft({"ip kube-proxy", "ip6 kube-proxy", "ip filter", "ip kube-proxy-other"})
    assert remove_table(4, nft) == 1
    assert nft.present == {"ip6 kube-proxy", "ip filter", "ip kube-proxy-other"}
    assert remove_table(4, nft) == 0, "absent: nothing to do"
    assert remove_table(6, nft) == 1 and nft.present == {"ip filter", "ip kube-proxy-other"}


def test_a_failed_removal_is_retried_at_the_next_full_sync() -> None:
    nft = FakeNft({"ip kube-proxy"}, fail_delete=True)
    leftovers = NftablesLeftovers(lambda family: remove_table(family, nft))
    asyncio.run(leftovers.after_full_sync(4))
    assert nft.present == {"ip kube-proxy"}
    nft.fail_delete = False
    asyncio.run(leftovers.after_full_sync(4))
    assert nft.present == set()
    calls = len(nft.calls)
    asyncio.run(leftovers.after_full_sync(4))
    assert len(nft.calls) == calls, "once removed, later full syncs do not look again"
