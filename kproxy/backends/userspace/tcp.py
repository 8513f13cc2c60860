"""TCP (and one-to-one SCTP) forwarding on uvloop transports: the Protocol engine.

Selected with `UserspaceProxier(engine="protocol")`; the default engine is `rawtcp`,
which this VM measured cheaper per connection (see bench/RESULTS-userspace.md). Both
share `Gate` and `Hooks` from here and the same dialing policy.

Built on asyncio Protocols rather than streams: a stream proxy pays for a reader task,
a buffer object and two awaits per chunk, a Protocol pair pays one method call and one
`write`. Each accepted connection is a `_Client` protocol; once its upstream connects,
an `_Upstream` protocol forwards the other way. Back-pressure is the transports' own:
when one side's write buffer passes the high-water mark its protocol gets
`pause_writing` and stops reading the *other* side until the buffer drains.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from kproxy.backends.userspace.balancer import Balancer, Target
from kproxy.infra import log

DIAL_TIMEOUTS: Final[tuple[float, ...]] = (0.25, 0.5, 1.0, 2.0)
"""Per-attempt connect timeouts; each failure moves on to the next endpoint, as kube-proxy's userspace mode did."""
SHORT_OF_FDS: Final = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PARK_BACKOFF: Final = 0.1
PARK_LIMIT: Final = 300
"""A dial that finds no free descriptor waits PARK_BACKOFF and tries again, up to 30 s in all,
rather than failing the endpoint or resetting the client."""
WRITE_HIGH: Final = 256 * 1024
WRITE_LOW: Final = 64 * 1024
_LIMIT_LOG_INTERVAL: Final = 5.0


def _noop_limit(service: str) -> None:
    return None


def _noop_dial(service: str, endpoint: str) -> None:
    return None


@dataclass(slots=True)
class Hooks:
    """Where metrics plug in; the defaults do nothing so the forwarder needs no metrics module."""

    connection_limit: Callable[[str], None] = _noop_limit
    """Called with the service port name each time a connection is refused at the limit."""
    dial_failure: Callable[[str, str], None] = _noop_dial
    """Called with (service port name, endpoint "ip:port") for each failed connect attempt."""


@dataclass(slots=True)
class Gate:
    """The proxier-wide cap on open connections (TCP + SCTP)."""

    limit: int
    hooks: Hooks = field(default_factory=Hooks)
    open: int = 0
    refused: int = 0
    _last_log: float = -1e9
    _idle: asyncio.Event | None = None

    def leave(self) -> None:
        self.open -= 1
        if self.open <= 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no connection is open."""
        if self.open <= 0:
            return
        self._idle = asyncio.Event()
        try:
            await self._idle.wait()
        finally:
            self._idle = None

    def refuse(self, service: str) -> None:
        self.refused += 1
        self.hooks.connection_limit(service)
        now = time.monotonic()
        if now - self._last_log >= _LIMIT_LOG_INTERVAL:
            self._last_log = now
            log.warn(
                "userspace_connection_limit_reached",
                service=service,
                limit=self.limit,
                open=self.open,
                refused_total=self.refused,
            )


class TcpService:
    """Everything the connections of one service port share."""

    __slots__ = (
        "balancer",
        "connections",
        "dial_timeouts",
        "gate",
        "loop",
        "name",
        "proto_number",
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
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.gate = gate
        self.loop = loop
        self.proto_number = proto_number
        """0 for TCP; IPPROTO_SCTP to dial one-to-one SCTP sockets instead."""
        self.dial_timeouts = dial_timeouts
        self.connections: set[_Client] = set()

    def protocol(self) -> _Client:
        return _Client(self)

    def abort_all(self) -> None:
        for c in list(self.connections):
            c.abort()


class _Upstream(asyncio.Protocol):
    __slots__ = ("client", "transport")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def me(self) -> _Upstream:
        """Protocol factory for the one connection this object serves."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return self.client.peer_eof(upstream=True)

    def pause_writing(self) -> None:
        t = self.client.transport
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None:
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)


class _Client(asyncio.Protocol):
    """The accepted side of one proxied connection, owner of the pair's lifetime."""

    __slots__ = ("closed", "dialing", "early", "eofs", "svc", "target", "transport", "up", "up_transport")

    def __init__(self, svc: TcpService) -> None:
        self.svc = svc
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.up_transport: asyncio.Transport | None = None
        self.target: Target | None = None
        self.closed = False
        self.eofs = 0
        self.dialing: asyncio.Task[None] | None = None
        self.early: list[bytes] | None = None
        """Bytes that arrived before the upstream connected (uvloop may deliver a read already under way)."""

    # -- accepted side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        svc = self.svc
        gate = svc.gate
        if gate.open >= gate.limit:
            self.closed = True
            transport.abort()
            gate.refuse(svc.name)
            return
        gate.open += 1
        svc.connections.add(self)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        transport.pause_reading()
        client_ip = ""
        if svc.balancer.affinity_timeout > 0:
            peer = transport.get_extra_info("peername")
            client_ip = peer[0] if peer else ""
        self.dialing = svc.loop.create_task(self._dial(client_ip))

    def data_received(self, data: bytes) -> None:
        up = self.up_transport
        if up is not None:
            up.write(data)
        elif self.early is None:
            self.early = [data]
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        return self.peer_eof(upstream=False)

    def pause_writing(self) -> None:
        if self.up_transport is not None:
            self.up_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up_transport is not None:
            self.up_transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.up_transport
        if up is not None and not up.is_closing():
            if exc is None:
                up.close()
            else:
                up.abort()
        self._finish()

    # -- upstream side, called by _Upstream

    def peer_eof(self, *, upstream: bool) -> bool:
        """Half-close: pass the EOF on and keep the other direction flowing until it ends too."""
        if self.eofs & (2 if upstream else 1):
            return True  # uvloop may report the same EOF again after resume_reading
        self.eofs |= 2 if upstream else 1
        other = self.transport if upstream else self.up_transport
        if other is not None and not other.is_closing() and other.can_write_eof():
            other.write_eof()
        if self.eofs == 3:
            if self.transport is not None:
                self.transport.close()
            if self.up_transport is not None:
                self.up_transport.close()
            return False
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            if exc is None:
                t.close()
            else:
                t.abort()

    # -- lifecycle

    async def _dial(self, client_ip: str) -> None:
        svc = self.svc
        balancer = svc.balancer
        loop = svc.loop
        tried: list[Target] = []
        parked = 0
        timeouts = iter(svc.dial_timeouts)
        timeout = next(timeouts, None)
        while timeout is not None:
            if self.closed:
                return
            target = balancer.pick(client_ip, tried)
            if target is None and tried:
                tried.clear()
                target = balancer.pick(client_ip, tried)
            if target is None:
                break
            up = _Upstream(self)
            try:
                async with asyncio.timeout(timeout):
                    if svc.proto_number:
                        transport = await self._dial_sock(loop, target, up)
                    else:
                        transport, _ = await loop.create_connection(up.me, target[0], target[1])
            except (OSError, TimeoutError) as e:
                if isinstance(e, OSError) and e.errno in SHORT_OF_FDS and parked < PARK_LIMIT:
                    # Our shortage, not the endpoint's failure: wait for a descriptor, spend no attempt.
                    parked += 1
                    await asyncio.sleep(PARK_BACKOFF)
                    continue
                tried.append(target)
                balancer.failed(client_ip, target)
                ep = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
                svc.gate.hooks.dial_failure(svc.name, ep)
                log.debug("userspace_dial_failed", service=svc.name, endpoint=ep, error=repr(e))
                timeout = next(timeouts, None)
                continue
            if self.closed:
                transport.close()
                return
            transport = cast(asyncio.Transport, transport)
            self.up = up
            self.up_transport = transport
            self.target = target
            self.dialing = None
            balancer.acquire(target)
            if self.early is not None:
                transport.write(b"".join(self.early))
                self.early = None
            if self.eofs & 1 and transport.can_write_eof():
                transport.write_eof()
            if self.transport is not None:
                self.transport.resume_reading()
            return
        if not self.closed:
            log.warn("userspace_no_endpoint", service=svc.name, client=client_ip, tried=len(tried))
            if self.transport is not None:
                self.transport.abort()

    async def _dial_sock(
        self, loop: asyncio.AbstractEventLoop, target: Target, up: _Upstream
    ) -> asyncio.BaseTransport:
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, self.svc.proto_number)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, target)
            transport, _ = await loop.create_connection(up.me, sock=sock)
        except BaseException:
            sock.close()
            raise
        return transport

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.up_transport is not None:
            self.up_transport.abort()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        svc = self.svc
        svc.gate.leave()
        svc.connections.discard(self)
        if self.target is not None:
            svc.balancer.release(self.target)
