"""TCP (and one-to-one SCTP) forwarding on plain non-blocking sockets: the default engine.

Same job and same policy as `tcp.py` (dial timeouts, next endpoint on failure,
half-close, connection limit, drain), built for connection rate as well as bytes:

- One edge-triggered epoll set (`Reactor`) holds every proxied socket and is watched by
  the event loop as a single descriptor. A socket is registered once and leaves the set
  when it is closed; writability is watched only while connecting or while a peer is
  slow. That is three epoll_ctl calls per proxied connection, where per-socket
  `add_reader`/`add_writer` cost fourteen (libuv and uvloop each remove a descriptor
  on every stop), counted with strace on this VM.
- No Task, future or transport per connection: a connect is `connect_ex` plus the
  socket's first writable edge; dial timeouts share one ticking timer per service.
- Bytes move with `recv_into` a shared buffer and `send`, so nothing is allocated per
  chunk unless the peer is slow; a direction that proves to be bulk switches to
  socket -> pipe -> socket `os.splice` (when `splice` is on), never entering Python.

Back-pressure is explicit: when `send` takes less than was read, the rest is kept,
reading from that source stops, and the destination's next writable edge resumes it.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

from kproxy.backends.userspace.balancer import Balancer, Target
from kproxy.backends.userspace.tcp import DIAL_TIMEOUTS, PARK_BACKOFF, PARK_LIMIT, SHORT_OF_FDS, Gate
from kproxy.infra import log

_BUF_SIZE: Final = 256 * 1024
_BUF = bytearray(_BUF_SIZE)
_VIEW = memoryview(_BUF)
_ACCEPT_BURST: Final = 256
_ACCEPT_BACKOFF: Final = PARK_BACKOFF
_ACCEPT_WARN_EVERY: Final = 5.0
_POLL_BATCH: Final = 1024
_LINGER0: Final = struct.pack("ii", 1, 0)
_SPLICE_CHUNK: Final = 1 << 20
_SPLICE_AT: Final = 64 * 1024
"""A direction switches from copying to splice(2) once a single read returns this much: bulk, not chat."""
_PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SHUT_WR: Final = socket.SHUT_WR
_SOCK_STREAM: Final = socket.SOCK_STREAM
_SOCK_STREAM_NB: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_IN_PROGRESS: Final = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)
_TICK: Final = 0.05
"""Granularity of dial timeouts: one timer per service while dials are pending, not one per connection."""
_RD: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_RDWR: Final = _RD | select.EPOLLOUT
"""Writability is watched only while a connect or a slow peer needs it: a socket watched
for EPOLLOUT reports an event for every ACK that frees send space."""
_IN: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_ENDING: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_FAILED: Final = select.EPOLLHUP | select.EPOLLERR
Sock = _socket.socket
"""The C socket type: no Python-level __init__/close per connection, as `socket.socket` has."""
Handler = Callable[[int], None]


def splice_available() -> bool:
    return hasattr(os, "splice")


class Reactor:
    """An epoll set of our own, nested in the event loop as one readable descriptor.

    Closing a socket during a dispatch batch is deferred to the end of the batch, so a
    descriptor number cannot be reused (and receive a stale event) within one batch."""

    __slots__ = ("_closing", "_dispatching", "ep", "handlers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self._closing: list[Sock] = []
        self._dispatching = False
        loop.add_reader(self.ep.fileno(), self._dispatch)

    def add(self, fd: int, handler: Handler, events: int = _RD) -> None:
        self.ep.register(fd, events)
        self.handlers[fd] = handler

    def watch(self, fd: int, events: int) -> None:
        with contextlib.suppress(OSError):
            self.ep.modify(fd, events)

    def close_sock(self, s: Sock) -> None:
        self.handlers.pop(s.fileno(), None)
        if self._dispatching:
            self._closing.append(s)
        else:
            s.close()

    def remove(self, fd: int) -> None:
        """Explicit removal, for descriptors that stay open (a closed listener's socket is closed right after)."""
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)

    def close(self) -> None:
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()
        self.handlers.clear()

    def _dispatch(self) -> None:
        handlers = self.handlers
        self._dispatching = True
        try:
            for fd, ev in self.ep.poll(0, _POLL_BATCH):
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h(ev)
                    except Exception as e:  # one broken connection must not cost the batch its edges
                        log.error("userspace_handler_failed", fd=fd, error=repr(e))
                        owner = getattr(h, "__self__", None)
                        if isinstance(owner, _Half):
                            owner = owner.conn
                        if isinstance(owner, _Conn):
                            owner.abort()
        finally:
            self._dispatching = False
            if self._closing:
                for s in self._closing:
                    s.close()
                self._closing.clear()


class RawTcpService:
    """The listener of one TCP/SCTP service port and its open connections."""

    __slots__ = (
        "_accept_warned",
        "_tick",
        "accept_paused",
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
        "reactor",
        "splice",
    )

    def __init__(
        self,
        name: str,
        balancer: Balancer,
        gate: Gate,
        reactor: Reactor,
        *,
        proto_number: int = 0,
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
        splice: bool = False,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.gate = gate
        self.reactor = reactor
        self.loop = reactor.loop
        self.proto_number = proto_number
        self.dial_timeouts = dial_timeouts
        self.splice = splice and splice_available()
        self.nodelay = proto_number == 0
        self.conns: set[_Conn] = set()
        self.connecting: dict[_Conn, float] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._accept_warned = -1e9
        self.accept_paused = False
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
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
            sock.bind((bind_ip, port))
            sock.listen(backlog)
            sock.setblocking(False)
            self.lfd = sock.fileno()
            self.reactor.add(self.lfd, self._on_accept, select.EPOLLIN)  # level-triggered: bursts stay fair
        except BaseException:
            sock.close()
            raise
        self.lsock = sock
        return int(sock.getsockname()[1])

    def adopt(self, sock: socket.socket) -> int:
        """Serve a listening socket opened by an earlier kproxy (same options as `open` set)."""
        self.family = sock.family
        sock.setblocking(False)
        self.lfd = sock.fileno()
        self.reactor.add(self.lfd, self._on_accept, select.EPOLLIN)
        self.lsock = sock
        return int(sock.getsockname()[1])

    def close_listener(self) -> None:
        """Stop accepting; open connections go on until they end."""
        if self.lsock is not None:
            self.reactor.remove(self.lfd)
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
        for c in [c for c, deadline in self.connecting.items() if deadline <= now]:
            c.connect_timeout()
        if self.connecting:
            self._tick = self.loop.call_later(_TICK, self._expire_dials)

    def _on_accept(self, _ev: int) -> None:
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
                # EMFILE/ENFILE: the kernel queue keeps the connection.
                self.pause_accept(e)
                return
            c = Sock(family, _SOCK_STREAM, proto, fd)
            if gate.open >= gate.limit:
                _reset(c)
                gate.refuse(self.name)
                continue
            c.setblocking(False)
            try:
                conn = _Conn(self, c, addr[0])
            except OSError as e:  # epoll set full (fs.epoll.max_user_watches) or out of memory
                log.warn("userspace_watch_failed", service=self.name, error=repr(e))
                _reset(c)
                continue
            gate.open += 1
            self.conns.add(conn)
            conn.dial()

    def pause_accept(self, e: OSError) -> None:
        """Out of descriptors: stop watching the (level-triggered) listener for a moment
        rather than spin on it; connections wait in the kernel's accept queue meanwhile."""
        now = self.loop.time()
        if now - self._accept_warned >= _ACCEPT_WARN_EVERY:
            self._accept_warned = now
            log.warn("userspace_accept_failed", service=self.name, error=repr(e), open=self.gate.open)
        if self.lsock is not None and not self.accept_paused:
            self.accept_paused = True
            self.reactor.watch(self.lfd, 0)
            self.loop.call_later(_ACCEPT_BACKOFF, self._resume_accept)

    def _resume_accept(self) -> None:
        self.accept_paused = False
        if self.lsock is not None:
            self.reactor.watch(self.lfd, select.EPOLLIN)


def _reset(s: Sock) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    s.close()


class _Half:
    """One direction of a connection: read from `src`, write to `dst`.

    Edge-triggered: reads run until the socket is drained, and a paused direction retries
    reading as soon as it resumes, since the edge it missed will not come again. Bytes are
    copied through the shared buffer until the direction proves to be bulk (one read fills
    `_SPLICE_AT`), then, when splicing is allowed, they move socket -> pipe -> socket with
    splice(2): request/response traffic never pays for a pipe, bulk never enters Python."""

    __slots__ = (
        "conn",
        "dfd",
        "done",
        "dst",
        "eof",
        "in_pipe",
        "peer",
        "pending",
        "pr",
        "pw",
        "reactor",
        "sfd",
        "src",
    )

    def __init__(self, conn: _Conn, src: Sock, dst: Sock) -> None:
        self.conn = conn
        self.reactor = conn.svc.reactor
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pending: bytes | None = None
        """Bytes read but not yet written (copy mode); b"" marks a paused splice."""
        self.eof = False
        self.done = False
        self.peer: _Half | None = None
        self.pr = self.pw = -1
        self.in_pipe = 0

    def readable(self, ev: int = _ENDING) -> None:
        """Read until drained. A short read counts as drained unless the event also
        reported the peer's FIN or an error, which must be read to be seen."""
        if self.pr >= 0:
            self._splice_readable()
            return
        recv_into, send = self.src.recv_into, self.dst.send
        short_ok = not ev & _ENDING
        fin_seen = ev & _ENDING == select.EPOLLRDHUP
        while self.pending is None and not self.eof:
            try:
                n = recv_into(_BUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.conn.abort()
                return
            if not n:
                self.on_eof()
                return
            try:
                sent = send(_VIEW[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.conn.abort()
                return
            if sent != n:
                self.pending = _VIEW[sent:n].tobytes()
                self.reactor.watch(self.dfd, _RDWR)
                return
            if n >= _SPLICE_AT and self.conn.svc.splice and self._to_splice():
                self._splice_readable()
                return
            if n < _BUF_SIZE:
                if short_ok:
                    return  # a short read drained the socket; new data brings a new edge
                if fin_seen:
                    # The FIN was in before this read, and a short read took everything
                    # queued ahead of it: end of stream, no recv needed to learn it.
                    self.on_eof()
                    return

    def _to_splice(self) -> bool:
        try:
            self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # out of descriptors: keep copying
            log.debug("userspace_splice_unavailable", service=self.conn.svc.name, error=repr(e))
            return False
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pw, _F_SETPIPE_SZ, _PIPE_SIZE)
        return True

    def _splice_readable(self) -> None:
        while self.pending is None and not self.eof:
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
                return

    def _drain(self) -> bool:
        """Move what the pipe holds to the socket; False (paused, or aborted) if it cannot finish."""
        while self.in_pipe:
            try:
                n = os.splice(self.pr, self.dfd, self.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if self.pending is None:
                    self.reactor.watch(self.dfd, _RDWR)
                self.pending = b""
                return False
            except OSError:
                self.conn.abort()
                return False
            self.in_pipe -= n
        return True

    def writable(self) -> None:
        pending = self.pending
        if pending is None:
            return
        if self.pr >= 0:
            if self._drain():
                self.pending = None
                self.resume()
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
        self.resume()

    def on_event(self, ev: int) -> None:
        """Events of this direction's source socket: readable for us, writable for the peer
        (whose destination it is). Installed as the socket's handler once connected."""
        if ev & _IN:
            self.readable(ev)
        if ev & _OUT and not self.conn.closed:
            self.peer.writable()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.reactor.watch(self.dfd, _RD)
        if self.eof:
            self.shut()
        else:
            self.readable()

    def on_eof(self) -> None:
        self.eof = True
        if self.pending is None:
            self.shut()

    def shut(self) -> None:
        """Pass the half-close on; once both directions are done the connection ends."""
        if self.done:
            return
        self.done = True
        peer = self.peer
        if peer is not None and peer.done:
            self.conn.close()  # closing sends the FIN: no separate shutdown needed
            return
        with contextlib.suppress(OSError):
            self.dst.shutdown(_SHUT_WR)

    def stop(self) -> None:
        if self.pr >= 0:
            os.close(self.pr)
            os.close(self.pw)
            self.pr = self.pw = -1


class _Conn:
    """One proxied connection: the accepted socket, the dial, then two `_Half`s."""

    __slots__ = (
        "attempt",
        "c",
        "c2u",
        "client_ev",
        "client_ip",
        "closed",
        "parked",
        "svc",
        "target",
        "tried",
        "u",
        "u2c",
    )

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
        self.parked = 0
        self.closed = False
        self.client_ev = 0
        """Client events seen while dialing: the edge is spent, so it is replayed once connected."""
        svc.reactor.add(c.fileno(), self.on_client)

    # -- events

    def on_client(self, ev: int) -> None:
        c2u = self.c2u
        if c2u is None:
            self.client_ev |= ev
            return
        if ev & _IN:
            c2u.readable(ev)
        if ev & _OUT and not self.closed:
            self.u2c.writable()  # type: ignore[union-attr]

    def on_upstream(self, ev: int) -> None:
        u2c = self.u2c
        if u2c is None:
            if ev & _OUT:
                self._connect_done(ev)
            return
        if ev & _IN:
            u2c.readable(ev)
        if ev & _OUT and not self.closed:
            self.c2u.writable()  # type: ignore[union-attr]

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
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            try:
                u = Sock(family, _SOCK_STREAM_NB, svc.proto_number)
            except OSError as e:
                self.target = None
                if e.errno in SHORT_OF_FDS and self.parked < PARK_LIMIT:
                    # Our shortage, not the endpoint's failure: no attempt is spent, and the
                    # client waits until a closing connection frees a descriptor.
                    self.parked += 1
                    svc.pause_accept(e)
                    svc.loop.call_later(_ACCEPT_BACKOFF, self.dial)
                    return
                log.error("userspace_socket_failed", service=svc.name, error=repr(e))
                self._give_up()
                return
            self.attempt += 1
            if svc.nodelay:
                u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = u.connect_ex(target)
            if err != 0 and err not in _IN_PROGRESS:
                u.close()
                self._failed(os.strerror(err))
                continue
            try:
                svc.reactor.add(u.fileno(), self.on_upstream, _RD if err == 0 else _RDWR)
            except OSError as e:
                u.close()
                log.warn("userspace_watch_failed", service=svc.name, error=repr(e))
                self._give_up()
                return
            self.u = u
            if err == 0:
                self._connected(_ENDING)
            else:
                svc.watch_dial(self, timeout)
            return

    def _connect_done(self, ev: int) -> None:
        u = self.u
        assert u is not None
        self.svc.connecting.pop(self, None)
        # Writable without an error flag is a completed connect; only a failure needs SO_ERROR.
        err = u.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ev & _FAILED else 0
        if err:
            self._drop_upstream()
            self._failed(os.strerror(err))
            self.dial()
        else:
            self.svc.reactor.watch(u.fileno(), _RD)
            self._connected(ev)

    def connect_timeout(self) -> None:
        self.svc.connecting.pop(self, None)
        if self.u is None or self.closed:
            return
        self._drop_upstream()
        self._failed("timeout")
        self.dial()

    def _drop_upstream(self) -> None:
        u = self.u
        if u is not None:
            self.svc.reactor.close_sock(u)
            self.u = None

    def _failed(self, why: str) -> None:
        svc = self.svc
        target = self.target
        assert target is not None
        self.tried.append(target)
        svc.balancer.failed(self.client_ip, target)
        ep = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
        svc.gate.hooks.dial_failure(svc.name, ep)
        log.debug("userspace_dial_failed", service=svc.name, endpoint=ep, error=why)
        self.target = None

    def _give_up(self) -> None:
        log.warn("userspace_no_endpoint", service=self.svc.name, client=self.client_ip, tried=len(self.tried))
        self.abort()

    def _connected(self, up_ev: int) -> None:
        svc = self.svc
        u = self.u
        assert u is not None and self.target is not None
        svc.balancer.acquire(self.target)
        c = self.c
        c2u, u2c = _Half(self, c, u), _Half(self, u, c)
        c2u.peer, u2c.peer = u2c, c2u
        self.c2u, self.u2c = c2u, u2c
        handlers = svc.reactor.handlers
        handlers[c2u.sfd] = c2u.on_event
        handlers[u2c.sfd] = u2c.on_event
        if self.client_ev & _IN:
            c2u.readable(self.client_ev)  # what the client sent while we dialed
        if up_ev & _IN and not self.closed:
            u2c.readable(up_ev)  # a server that speaks first

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
        reactor = svc.reactor
        c2u, u2c = self.c2u, self.u2c
        if c2u is not None and u2c is not None:
            c2u.stop()
            u2c.stop()
        u = self.u
        if u is not None:
            if c2u is None:
                svc.connecting.pop(self, None)
            elif self.target is not None:
                svc.balancer.release(self.target)
            if reset:
                with contextlib.suppress(OSError):
                    u.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            reactor.close_sock(u)
        if reset:
            with contextlib.suppress(OSError):
                self.c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        reactor.close_sock(self.c)
        svc.gate.leave()
        svc.conns.discard(self)
        # Break the conn <-> halves cycles so memory goes back at once, not at the next GC pass.
        if c2u is not None and u2c is not None:
            c2u.peer = u2c.peer = None
        self.c2u = self.u2c = None
