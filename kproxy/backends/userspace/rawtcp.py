"""TCP (and one-to-one SCTP) forwarding on plain non-blocking sockets: the fast engine.

Same job and same policy as `tcp.py` (dial timeouts, next endpoint on failure,
half-close, connection limit, drain), but each connection is two sockets watched with
`loop.add_reader`/`add_writer` instead of two uvloop transports. Measured on this VM
(see the report in bench/RESULTS-userspace.md) that saves about half the user CPU of a
new connection (no Task, no future, no transport objects, no weak-reference
bookkeeping) and moves bytes with `recv_into` a shared buffer plus `send`, so nothing
is allocated per chunk unless the peer is slow. Optionally bytes move with `os.splice`
through a pipe, so they never enter Python at all.

Back-pressure is explicit: when `send` takes less than was read, the rest is kept,
reading from the source stops and the destination is watched for writability.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import socket
import struct
from typing import Final

from kproxy import log
from kproxy.backends.userspace.balancer import Balancer, Target
from kproxy.backends.userspace.tcp import DIAL_TIMEOUTS, Gate

_BUF_SIZE: Final = 256 * 1024
_BUF = bytearray(_BUF_SIZE)
_VIEW = memoryview(_BUF)
_ACCEPT_BURST: Final = 128
_LINGER0: Final = struct.pack("ii", 1, 0)
_SPLICE_CHUNK: Final = 1 << 20
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SHUT_WR: Final = socket.SHUT_WR
_SOCK_STREAM: Final = socket.SOCK_STREAM
_IN_PROGRESS: Final = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)
_TICK: Final = 0.05
"""Granularity of dial timeouts: one timer per service while dials are pending, not one per connection."""
Sock = _socket.socket
"""The C socket type: no Python-level __init__/close per connection, as `socket.socket` has."""


def splice_available() -> bool:
    return hasattr(os, "splice")


class RawTcpService:
    """The listener of one TCP/SCTP service port and its open connections."""

    __slots__ = (
        "_tick",
        "balancer",
        "connecting",
        "conns",
        "dial_timeouts",
        "family",
        "gate",
        "lfd",
        "loop",
        "lsock",
        "name",
        "nodelay",
        "proto_number",
        "splice",
    )

    def __init__(
        self,
        name: str,
        balancer: Balancer,
        gate: Gate,
        *,
        loop: asyncio.AbstractEventLoop,
        proto_number: int = 0,
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
        splice: bool = False,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.gate = gate
        self.loop = loop
        self.proto_number = proto_number
        self.dial_timeouts = dial_timeouts
        self.splice = splice and splice_available()
        self.nodelay = proto_number == 0
        self.conns: set[_Conn] = set()
        self.connecting: dict[_Conn, float] = {}
        self._tick: asyncio.TimerHandle | None = None
        self.lsock: socket.socket | None = None
        self.lfd = -1
        self.family = socket.AF_INET

    def open(self, bind_ip: str, port: int = 0, backlog: int = 4096) -> int:
        self.family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
        sock = socket.socket(self.family, socket.SOCK_STREAM, self.proto_number)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((bind_ip, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.lsock = sock
        self.lfd = sock.fileno()
        self.loop.add_reader(self.lfd, self._on_accept)
        return int(sock.getsockname()[1])

    def close_listener(self) -> None:
        """Stop accepting; open connections go on until they end."""
        if self.lsock is not None:
            self.loop.remove_reader(self.lfd)
            self.lsock.close()
            self.lsock = None

    def abort_all(self) -> None:
        for c in list(self.conns):
            c.abort()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def watch_dial(self, conn: _Conn, timeout: float) -> None:
        self.connecting[conn] = self.loop.time() + timeout
        if self._tick is None:
            self._tick = self.loop.call_later(_TICK, self._expire_dials)

    def _expire_dials(self) -> None:
        self._tick = None
        now = self.loop.time()
        late = [c for c, deadline in self.connecting.items() if deadline <= now]
        for c in late:
            c.connect_timeout()
        if self.connecting:
            self._tick = self.loop.call_later(_TICK, self._expire_dials)

    def _on_accept(self) -> None:
        lsock = self.lsock
        if lsock is None:
            return
        gate = self.gate
        family, proto = self.family, self.proto_number
        for _ in range(_ACCEPT_BURST):
            try:
                fd, addr = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE/ENFILE: the kernel queue keeps the connection; try again on the next wakeup.
                log.warn("userspace_accept_failed", service=self.name, error=repr(e))
                return
            c = Sock(family, _SOCK_STREAM, proto, fd)
            if gate.open >= gate.limit:
                _reset(c)
                gate.refuse(self.name)
                continue
            c.setblocking(False)
            gate.open += 1
            conn = _Conn(self, c, addr[0])
            self.conns.add(conn)
            conn.dial()


def _reset(s: Sock) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    s.close()


class _Half:
    """One direction of a connection: read from `src`, write to `dst`. Tracks what it has
    registered with the loop so that ending a connection makes no needless loop calls."""

    __slots__ = (
        "conn",
        "dfd",
        "done",
        "dst",
        "eof",
        "loop",
        "peer",
        "pending",
        "reading",
        "sfd",
        "src",
        "writing",
    )

    def __init__(self, conn: _Conn, src: Sock, dst: Sock) -> None:
        self.conn = conn
        self.loop = conn.svc.loop
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pending: bytes | None = None
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.peer: _Half | None = None

    def start(self) -> None:
        self.loop.add_reader(self.sfd, self.readable)
        self.reading = True

    def readable(self) -> None:
        try:
            n = self.src.recv_into(_BUF)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.abort()
            return
        if not n:
            self.on_eof()
            return
        try:
            sent = self.dst.send(_VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.conn.abort()
            return
        if sent != n:
            self.pending = _VIEW[sent:n].tobytes()
            self.wait_writable()

    def wait_writable(self) -> None:
        self.loop.remove_reader(self.sfd)
        self.reading = False
        self.loop.add_writer(self.dfd, self.writable)
        self.writing = True

    def writable(self) -> None:
        pending = self.pending
        if pending is None:
            self.flushed()
            return
        try:
            sent = self.dst.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.abort()
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self.pending = None
        self.flushed()

    def flushed(self) -> None:
        self.loop.remove_writer(self.dfd)
        self.writing = False
        if self.eof:
            self.shut()
        else:
            self.loop.add_reader(self.sfd, self.readable)
            self.reading = True

    def on_eof(self) -> None:
        self.eof = True
        if self.pending is None:
            self.shut()
        else:
            self.loop.remove_reader(self.sfd)
            self.reading = False

    def shut(self) -> None:
        """Pass the half-close on; once both directions are done the connection ends."""
        self.done = True
        peer = self.peer
        if peer is not None and peer.done:
            self.conn.close()  # closing sends the FIN: no separate shutdown needed
            return
        if self.reading:
            self.loop.remove_reader(self.sfd)
            self.reading = False
        with contextlib.suppress(OSError):
            self.dst.shutdown(_SHUT_WR)

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sfd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dfd)
            self.writing = False


class _SpliceHalf(_Half):
    """A direction that moves bytes socket -> pipe -> socket with splice(2), never through Python."""

    __slots__ = ("in_pipe", "pr", "pw")

    def __init__(self, conn: _Conn, src: Sock, dst: Sock) -> None:
        super().__init__(conn, src, dst)
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_pipe = 0

    def readable(self) -> None:
        try:
            n = os.splice(self.sfd, self.pw, _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.abort()
            return
        if not n:
            self.on_eof()
            return
        self.in_pipe += n
        if not self._drain():
            self.pending = b""
            self.wait_writable()

    def _drain(self) -> bool:
        """Move what the pipe holds to the socket; False if the socket would block."""
        while self.in_pipe:
            try:
                n = os.splice(self.pr, self.dfd, self.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.conn.abort()
                return False
            self.in_pipe -= n
        return True

    def writable(self) -> None:
        if self._drain():
            self.pending = None
            self.flushed()

    def stop(self) -> None:
        super().stop()
        if self.pr >= 0:
            os.close(self.pr)
            os.close(self.pw)
            self.pr = self.pw = -1


class _Conn:
    """One proxied connection: the accepted socket, the dial, then two `_Half`s."""

    __slots__ = ("attempt", "c", "c2u", "client_ip", "closed", "svc", "target", "tried", "u", "u2c")

    def __init__(self, svc: RawTcpService, c: Sock, client_ip: str) -> None:
        self.svc = svc
        self.c = c
        self.client_ip = client_ip
        self.u: Sock | None = None
        self.c2u: _Half | None = None
        self.u2c: _Half | None = None
        self.target: Target | None = None
        self.tried: list[Target] = []
        self.attempt = 0
        self.closed = False

    # -- dialing

    def dial(self) -> None:
        """Try the next endpoint; give up (reset the client) after the last timeout."""
        svc = self.svc
        while not self.closed:
            if self.attempt >= len(svc.dial_timeouts):
                self._give_up()
                return
            balancer = svc.balancer
            target = balancer.pick(self.client_ip, self.tried)
            if target is None and self.tried:
                self.tried.clear()
                target = balancer.pick(self.client_ip, self.tried)
            if target is None:
                self._give_up()
                return
            self.target = target
            timeout = svc.dial_timeouts[self.attempt]
            self.attempt += 1
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            try:
                u = Sock(family, _SOCK_STREAM, svc.proto_number)
            except OSError as e:
                log.error("userspace_socket_failed", service=svc.name, error=repr(e))
                self._give_up()
                return
            u.setblocking(False)
            if svc.nodelay:
                u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = u.connect_ex(target)
            self.u = u
            if err == 0:
                self._connected()
                return
            if err in _IN_PROGRESS:
                svc.loop.add_writer(u.fileno(), self._connect_done)
                svc.watch_dial(self, timeout)
                return
            self._failed(os.strerror(err))

    def _connect_done(self) -> None:
        u = self.u
        assert u is not None
        self.svc.connecting.pop(self, None)
        err = u.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.svc.loop.remove_writer(u.fileno())
            self._failed(os.strerror(err))
            self.dial()
        else:
            self._connected()
            self.svc.loop.remove_writer(u.fileno())  # after add_reader: the fd keeps its poll handle

    def connect_timeout(self) -> None:
        self.svc.connecting.pop(self, None)
        u = self.u
        if u is None or self.closed:
            return
        self.svc.loop.remove_writer(u.fileno())
        self._failed("timeout")
        self.dial()

    def _failed(self, why: str) -> None:
        svc = self.svc
        target = self.target
        assert target is not None
        if self.u is not None:
            self.u.close()
            self.u = None
        self.tried.append(target)
        svc.balancer.failed(self.client_ip, target)
        ep = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
        svc.gate.hooks.dial_failure(svc.name, ep)
        log.debug("userspace_dial_failed", service=svc.name, endpoint=ep, error=why)
        self.target = None

    def _give_up(self) -> None:
        log.warn("userspace_no_endpoint", service=self.svc.name, client=self.client_ip, tried=len(self.tried))
        self.abort()

    def _connected(self) -> None:
        svc = self.svc
        u = self.u
        assert u is not None and self.target is not None
        svc.balancer.acquire(self.target)
        c = self.c
        if svc.nodelay:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c2u: _Half
        u2c: _Half
        if svc.splice:
            try:
                c2u = _SpliceHalf(self, c, u)
                try:
                    u2c = _SpliceHalf(self, u, c)
                except OSError:
                    c2u.stop()
                    raise
            except OSError as e:  # out of descriptors for the pipes: copy instead
                log.warn("userspace_splice_unavailable", service=svc.name, error=repr(e))
                c2u, u2c = _Half(self, c, u), _Half(self, u, c)
        else:
            c2u, u2c = _Half(self, c, u), _Half(self, u, c)
        c2u.peer, u2c.peer = u2c, c2u
        self.c2u, self.u2c = c2u, u2c
        c2u.start()
        u2c.start()

    # -- ending

    def close(self) -> None:
        self._end(reset=False)

    def abort(self) -> None:
        self._end(reset=True)

    def _end(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        svc = self.svc
        c2u, u2c = self.c2u, self.u2c
        if c2u is not None and u2c is not None:
            c2u.stop()
            u2c.stop()
        u = self.u
        if u is not None:
            if c2u is None:  # still connecting
                svc.connecting.pop(self, None)
                svc.loop.remove_writer(u.fileno())
            elif self.target is not None:
                svc.balancer.release(self.target)
            if reset:
                _reset(u)
            else:
                u.close()
        if reset:
            _reset(self.c)
        else:
            self.c.close()
        svc.gate.leave()
        svc.conns.discard(self)
