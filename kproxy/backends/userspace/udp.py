"""UDP forwarding: one connected backend socket per client address, closed when idle.

Plain non-blocking sockets driven by `loop.add_reader` rather than datagram transports:
a burst of datagrams is drained in one callback with no per-datagram future, and the
listener can use `recvmsg`/`sendmsg` with packet info. When the listener is bound to a
wildcard address, each reply leaves with the source address the client's datagram was
sent to (IP_PKTINFO / IPV6_PKTINFO), so conntrack can undo a REDIRECT and the client
sees the answer come from the address it asked.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final

from kproxy import log
from kproxy.backends.userspace.balancer import Balancer, Target

IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
_BURST: Final = 64
_MAX_DGRAM: Final = 65535
_CMSG_SPACE: Final = socket.CMSG_SPACE(32)

Address = tuple[str, int]


class _Session:
    """One client address and its connected backend socket."""

    __slots__ = ("addr", "ancillary", "fd", "last", "sock", "svc", "target")

    def __init__(self, svc: UdpService, addr: Address, target: Target, sock: socket.socket) -> None:
        self.svc = svc
        self.addr = addr
        self.target = target
        self.sock = sock
        self.fd = sock.fileno()
        self.last = 0.0
        self.ancillary: list[tuple[int, int, bytes]] = []

    def on_reply(self) -> None:
        svc = self.svc
        recv = self.sock.recv
        listener = svc.sock
        if listener is None:
            return
        addr = self.addr
        anc = self.ancillary
        got = False
        for _ in range(_BURST):
            try:
                data = recv(_MAX_DGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP unreachable from the endpoint surfaces here; the client just sees no reply.
                continue
            got = True
            try:
                if anc:
                    listener.sendmsg((data,), anc, 0, addr)
                else:
                    listener.sendto(data, addr)
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
        "sessions",
        "sock",
    )

    def __init__(
        self,
        name: str,
        balancer: Balancer,
        *,
        loop: asyncio.AbstractEventLoop,
        bind_ip: str,
        idle_timeout: float = 1.0,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.loop = loop
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
        self.loop.add_reader(sock.fileno(), self._on_datagrams)
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
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _on_datagrams(self) -> None:
        sock = self.sock
        if sock is None:
            return
        sessions = self.sessions
        now = self.loop.time()
        pktinfo = self.pktinfo
        for _ in range(_BURST):
            try:
                if pktinfo:
                    data, anc, _flags, addr = sock.recvmsg(_MAX_DGRAM, _CMSG_SPACE)
                else:
                    data, addr = sock.recvfrom(_MAX_DGRAM)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            key: Address = (addr[0], addr[1])
            s = sessions.get(key)
            if s is None:
                s = self._start(key)
                if s is None:
                    continue
            if anc:
                s.ancillary = _reply_ancillary(anc)
            s.last = now
            try:
                s.sock.send(data)
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
        self.loop.add_reader(s.fd, s.on_reply)
        if self._sweeper is None:
            self._schedule_sweep()
        return s

    def _end(self, s: _Session) -> None:
        if self.sessions.pop(s.addr, None) is None:
            return
        self.loop.remove_reader(s.fd)
        s.sock.close()
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
