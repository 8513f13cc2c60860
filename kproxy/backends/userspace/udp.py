"""UDP forwarding: one connected backend socket per client address, closed when idle.

Plain non-blocking sockets in the proxier's epoll set (`rawtcp.Reactor`, level-triggered
here) rather than datagram transports: a burst of datagrams is drained in one callback
with no per-datagram future, a session costs one epoll registration, and the listener
can use `recvmsg`/`sendmsg` with packet info. When the listener is bound to a
wildcard address, each reply leaves with the source address the client's datagram was
sent to (IP_PKTINFO / IPV6_PKTINFO), so conntrack can undo a REDIRECT and the client
sees the answer come from the address it asked.
"""

from __future__ import annotations

import asyncio
import select
import socket
from typing import Any, Final

from kproxy.backends.userspace.balancer import Balancer, Target
from kproxy.backends.userspace.rawtcp import Reactor
from kproxy.infra import log

IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
_BURST: Final = 64
_MAX_DGRAM: Final = 65535
_DBUF = bytearray(_MAX_DGRAM)
_DVIEW = memoryview(_DBUF)
_DBUFS = [_DBUF]
"""One receive buffer for every datagram: each is forwarded before the next is read."""
_CMSG_SPACE: Final = socket.CMSG_SPACE(32)

Address = tuple[Any, ...]
"""A client address as the socket reports it: (ip, port) or, for IPv6, (ip, port, flow, scope)."""


class _Session:
    """One client address and its connected backend socket."""

    __slots__ = ("addr", "anc_raw", "ancillary", "fd", "last", "sock", "svc", "target")

    def __init__(self, svc: UdpService, addr: Address, target: Target, sock: socket.socket) -> None:
        self.svc = svc
        self.addr = addr
        self.target = target
        self.sock = sock
        self.fd = sock.fileno()
        self.last = 0.0
        self.ancillary: list[tuple[int, int, bytes]] = []
        self.anc_raw = b""

    def on_reply(self, _ev: int) -> None:
        svc = self.svc
        recv_into = self.sock.recv_into
        listener = svc.sock
        if listener is None:
            return
        addr = self.addr
        anc = self.ancillary
        got = False
        for _ in range(_BURST):
            try:
                n = recv_into(_DBUF)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP unreachable from the endpoint surfaces here; the client just sees no reply.
                continue
            got = True
            try:
                if anc:
                    listener.sendmsg((_DVIEW[:n],), anc, 0, addr)
                else:
                    listener.sendto(_DVIEW[:n], addr)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
        if got:
            self.last = svc.loop.time()


class UdpService:
    """The listener of one UDP service port and its client sessions."""

    __slots__ = (
        "_sweeper",
        "balancer",
        "bind_ip",
        "family",
        "idle_timeout",
        "loop",
        "name",
        "pktinfo",
        "reactor",
        "sessions",
        "sock",
    )

    def __init__(
        self,
        name: str,
        balancer: Balancer,
        *,
        reactor: Reactor,
        bind_ip: str,
        idle_timeout: float = 1.0,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.reactor = reactor
        self.loop = reactor.loop
        self.bind_ip = bind_ip
        self.family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
        self.idle_timeout = idle_timeout
        self.sessions: dict[Address, _Session] = {}
        self.sock: socket.socket | None = None
        self.pktinfo = bind_ip in ("0.0.0.0", "::")
        self._sweeper: asyncio.TimerHandle | None = None

    def open(self, port: int = 0) -> int:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.pktinfo:
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((self.bind_ip, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reactor.add(sock.fileno(), self._on_datagrams, select.EPOLLIN)
        return int(sock.getsockname()[1])

    def adopt(self, sock: socket.socket) -> int:
        """Serve a bound socket opened by an earlier kproxy (packet info already requested)."""
        sock.setblocking(False)
        self.sock = sock
        self.reactor.add(sock.fileno(), self._on_datagrams, select.EPOLLIN)
        return int(sock.getsockname()[1])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.sock is not None else 0

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for s in list(self.sessions.values()):
            self._end(s)
        if self.sock is not None:
            self.reactor.close_sock(self.sock)
            self.sock = None

    def _on_datagrams(self, _ev: int) -> None:
        sock = self.sock
        if sock is None:
            return
        sessions = self.sessions
        now = self.loop.time()
        pktinfo = self.pktinfo
        for _ in range(_BURST):
            try:
                if pktinfo:
                    n, anc, _flags, addr = sock.recvmsg_into(_DBUFS, _CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(_DBUF)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            s = sessions.get(addr)
            if s is None:
                s = self._start(addr)
                if s is None:
                    continue
            if anc and anc[0][2] != s.anc_raw:
                s.anc_raw = anc[0][2]
                s.ancillary = _reply_ancillary(anc)
            s.last = now
            try:
                s.sock.send(_DVIEW[:n])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass

    def _start(self, addr: Address) -> _Session | None:
        target = self.balancer.pick(addr[0])
        if target is None:
            log.debug("userspace_udp_no_endpoint", service=self.name, client=addr[0])
            return None
        bs = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            bs.setblocking(False)
            bs.connect(target)
        except OSError as e:
            bs.close()
            self.balancer.failed(addr[0], target)
            log.warn(
                "userspace_udp_dial_failed",
                service=self.name,
                endpoint=f"{target[0]}:{target[1]}",
                error=repr(e),
            )
            return None
        s = _Session(self, addr, target, bs)
        self.sessions[addr] = s
        self.balancer.acquire(target)
        self.reactor.add(s.fd, s.on_reply, select.EPOLLIN)
        if self._sweeper is None:
            self._schedule_sweep()
        return s

    def _end(self, s: _Session) -> None:
        if self.sessions.pop(s.addr, None) is None:
            return
        self.reactor.close_sock(s.sock)
        self.balancer.release(s.target)

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(max(self.idle_timeout / 4, 0.02), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.idle_timeout
        for s in [s for s in self.sessions.values() if s.last < deadline]:
            self._end(s)
        if self.sessions:
            self._schedule_sweep()


def _reply_ancillary(anc: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Turn the received packet info (destination of the client's datagram) into the
    control message that makes the reply leave from that same address."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }: send from addr.
            return [(level, kind, b"\0\0\0\0" + data[8:12] + b"\0\0\0\0")]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo { in6_addr addr; int ifindex; }
            return [(level, kind, data[:16] + b"\0\0\0\0")]
    return []
