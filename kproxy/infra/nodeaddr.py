"""The node's own addresses, read and followed over netlink with pyroute2.

Needed where kube-proxy needs them: `--nodeport-addresses` CIDRs are matched against the
addresses the node actually holds, and the node's primary IP lets it reach its own
load-balancer IPs past source ranges. Loopback and link-local addresses never count.
Addresses come and go (DHCP renewals, a second NIC, a floating IP), so the agent follows
RTM_NEWADDR/RTM_DELADDR and re-renders when the set changes, rather than keep what it saw
at start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final

from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

from kproxy.infra import log

_SETTLE: Final = 0.2
"""Address events come in bursts (an interface going up brings several): read once after it."""
_RETRY: Final = (1.0, 30.0)
_ADDRESS_GROUPS: Final = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR


def _usable(values: Iterable[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if not value:
            continue
        ip = ipaddress.ip_address(value)
        if ip.is_loopback or ip.is_link_local:
            continue
        out.append(str(ip))
    return tuple(dict.fromkeys(out))


def _read_addresses() -> tuple[str, ...]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return _usable(msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr())


def node_addresses() -> tuple[str, ...]:
    try:
        return _read_addresses()
    except OSError as e:
        log.warn("node_addresses_unavailable", error=str(e))
        return ()


def _drain(sock: socket.socket, woke: asyncio.Event) -> None:
    """Any message in the address groups means "read again"; its content does not matter."""
    while True:
        try:
            if not sock.recv(65536):
                break
        except BlockingIOError:
            break
        except OSError:  # ENOBUFS: we fell behind, which also means something changed
            break
    woke.set()


async def follow_node_addresses(
    current: tuple[str, ...], on_change: Callable[[tuple[str, ...]], None]
) -> None:
    """Call `on_change` with the new address set whenever it differs from `current`.

    A bare rtnetlink socket subscribed to the address groups says when to look; pyroute2
    reads the addresses, in a worker thread (its synchronous API runs an event loop of its
    own, and its asyncio one needs datagram endpoints that uvloop does not open for
    netlink). Never returns and never raises but for cancellation: a failure is logged and
    the subscription reopened with backoff, keeping the addresses already known."""
    loop = asyncio.get_running_loop()
    delay = _RETRY[0]
    while True:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        woke = asyncio.Event()
        try:
            sock.bind((0, _ADDRESS_GROUPS))
            loop.add_reader(sock.fileno(), _drain, sock, woke)
            try:
                while True:
                    # The first pass also catches what changed between the caller's read and now.
                    fresh = await asyncio.to_thread(_read_addresses)
                    delay = _RETRY[0]
                    if fresh != current:
                        log.info("node_addresses_changed", old=",".join(current), new=",".join(fresh))
                        current = fresh
                        on_change(fresh)
                    await woke.wait()
                    await asyncio.sleep(_SETTLE)
                    woke.clear()
            finally:
                loop.remove_reader(sock.fileno())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # netlink or decoding trouble: keep the addresses we have
            log.warn("node_addresses_watch_failed", error=repr(e), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY[1])
        finally:
            sock.close()
