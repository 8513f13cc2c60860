"""Stale UDP conntrack cleanup on a big table, kproxy's netlink reader against pyroute2's Conntrack API.

    .venv/bin/python bench/conntrack_bench.py [--flows 20000] [--pyroute2]

Needs root. Builds a throwaway node namespace (deleted on exit), sends `--flows`
UDP datagrams from distinct sockets to two DNATed service IPs (half each), then
times one listing and one cleanup pass that removes the half whose endpoint "went
away". Unreplied UDP entries live 30 s, so a slow pass finds fewer left to delete.
Keep --flows well below net.netfilter.nf_conntrack_max: the table is shared with
every namespace on the machine.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kproxy.netfilter.conntrack import (
    ConntrackClient,
    NetlinkConntrack,
    clean_stale_entries,
)
from tests.support.conntrack import (
    NEW_POD_IP,
    POD_IP,
    VIP_DEAD,
    VIP_LIVE,
    PyrouteConntrack,
    ep,
    node_and_pod,
    sp,
)
from tests.support.netns import entered


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=20000)
    ap.add_argument("--pyroute2", action="store_true", help="use pyroute2's Conntrack API instead")
    args = ap.parse_args()
    flows = min(args.flows, 50000)
    with node_and_pod() as (node, _pod):
        with entered(node):
            t = time.monotonic()
            for i in range(flows):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"q", (VIP_DEAD if i % 2 else VIP_LIVE, 53))
            print(f"sent {flows} datagrams in {time.monotonic() - t:.2f} s")
        client: ConntrackClient = (
            PyrouteConntrack(netns=node) if args.pyroute2 else NetlinkConntrack(netns=node)
        )
        t = time.monotonic()
        listed = client.list_udp(4)
        print(f"{type(client).__name__}: listed {len(listed)} UDP entries in {time.monotonic() - t:.3f} s")
        view = [
            (sp(name="dead", ip=VIP_DEAD), (ep(NEW_POD_IP),)),
            (sp(name="live", ip=VIP_LIVE), (ep(POD_IP),)),
        ]
        r = clean_stale_entries(client, 4, view)
        print(f"cleanup pass: examined {r.examined}, deleted {r.deleted} in {r.seconds:.3f} s {r.error}")


if __name__ == "__main__":
    main()
