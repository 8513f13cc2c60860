"""The userspace proxier: one listener per service port, kept in step with the view.

`sync` takes the same per-family view the iptables backend renders from and makes the
listeners match it: new service ports get a listener on a kernel-chosen port, removed
ones stop listening, and endpoint changes only touch the port's `Balancer`, so
established connections are never dropped by a sync (connections to a removed
endpoint drain on their own). `listener_ports()` is what the steering rules need.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kproxy import log
from kproxy.backends.userspace.balancer import Balancer, Target, is_known_algorithm, parse_algorithm
from kproxy.backends.userspace.rawtcp import RawTcpService, Reactor
from kproxy.backends.userspace.sctp import IPPROTO_SCTP, open_listener, sctp_unsupported
from kproxy.backends.userspace.tcp import DIAL_TIMEOUTS, Gate, Hooks, TcpService
from kproxy.backends.userspace.udp import UdpService
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName

Engine = Literal["raw", "protocol"]
View = Mapping[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]


def usable_targets(sp: ServicePort, endpoints: Sequence[Endpoint]) -> list[Target]:
    """Endpoints new connections may go to: ready ones (node-local only for
    internalTrafficPolicy Local), else serving-and-terminating ones as a last resort,
    the fallback kube-proxy applies."""
    eps = [e for e in endpoints if e.is_local] if sp.internal_local else list(endpoints)
    ready = [(e.ip, e.port) for e in eps if e.ready]
    if ready:
        return ready
    return [(e.ip, e.port) for e in eps if e.serving and e.terminating]


@dataclass(slots=True)
class _Port:
    sp: ServicePort
    balancer: Balancer
    port: int
    tcp: TcpService | None = None
    server: asyncio.AbstractServer | None = None
    udp: UdpService | None = None
    raw: RawTcpService | None = None
    endpoints: tuple[Endpoint, ...] = ()
    """The endpoints last synced, so an unchanged port costs one tuple comparison."""


class UserspaceProxier:
    """Listeners for one address family. Create and use it on the running event loop."""

    def __init__(
        self,
        *,
        family: Family = 4,
        bind_ip: str | None = None,
        max_connections: int = 100_000,
        udp_idle_timeout: float = 1.0,
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
        backlog: int = 4096,
        hooks: Hooks | None = None,
        rng: random.Random | None = None,
        engine: Engine = "raw",
        splice: bool = True,
    ) -> None:
        """`engine` "raw" forwards on plain sockets (fastest here), "protocol" on uvloop
        transports; `splice` (raw only) lets a direction that proves to be bulk move its bytes with
        splice(2) instead of recv/send."""
        self.family: Family = family
        self.bind_ip = bind_ip if bind_ip is not None else ("0.0.0.0" if family == 4 else "::")
        self.udp_idle_timeout = udp_idle_timeout
        self.dial_timeouts = dial_timeouts
        self.backlog = backlog
        self.gate = Gate(limit=max_connections, hooks=hooks or Hooks())
        self._rng = rng or random.Random()
        self.engine: Engine = engine
        self.splice = splice
        self._reactor: Reactor | None = None
        self._ports: dict[ServicePortName, _Port] = {}
        self._lock = asyncio.Lock()

    # -- queries

    def listener_ports(self) -> dict[ServicePortName, int]:
        return {name: p.port for name, p in self._ports.items()}

    def port_of(self, name: ServicePortName) -> int | None:
        p = self._ports.get(name)
        return p.port if p is not None else None

    def balancer_of(self, name: ServicePortName) -> Balancer | None:
        p = self._ports.get(name)
        return p.balancer if p is not None else None

    @property
    def open_connections(self) -> int:
        return self.gate.open

    # -- sync

    async def sync(self, ports: View) -> None:
        """Make the listeners match `ports`. Ports that fail to open are logged and retried on the next sync."""
        async with self._lock:
            for name in [n for n in self._ports if n not in ports]:
                self._close_port(name, self._ports.pop(name))
            for name, (sp, endpoints) in ports.items():
                current = self._ports.get(name)
                if current is not None and _listener_key(current.sp) != _listener_key(sp):
                    self._close_port(name, self._ports.pop(name))
                    current = None
                if current is None:
                    opened = await self._open_port(name, sp, endpoints)
                    if opened is not None:
                        self._ports[name] = opened
                    continue
                self._update_port(name, current, sp, endpoints)

    def _update_port(
        self, name: ServicePortName, p: _Port, sp: ServicePort, endpoints: Sequence[Endpoint]
    ) -> None:
        if sp != p.sp:
            if sp.lb_algorithm != p.sp.lb_algorithm:
                _warn_algorithm(name, sp.lb_algorithm)
            p.balancer.configure(
                algorithm=parse_algorithm(sp.lb_algorithm), affinity_timeout=float(sp.affinity_timeout)
            )
            p.sp = sp
        if endpoints == p.endpoints:
            return
        p.endpoints = tuple(endpoints)
        targets = usable_targets(sp, endpoints)
        if tuple(sorted(targets)) != tuple(sorted(p.balancer.targets)):
            p.balancer.update(targets)
            log.debug("userspace_endpoints_updated", service=str(name), endpoints=len(targets))

    async def _open_port(
        self, name: ServicePortName, sp: ServicePort, endpoints: Sequence[Endpoint]
    ) -> _Port | None:
        _warn_algorithm(name, sp.lb_algorithm)
        balancer = Balancer(
            usable_targets(sp, endpoints),
            algorithm=parse_algorithm(sp.lb_algorithm),
            affinity_timeout=float(sp.affinity_timeout),
            rng=random.Random(self._rng.random()),
        )
        loop = asyncio.get_running_loop()
        label = str(name)
        try:
            if sp.protocol == "UDP":
                udp = UdpService(
                    label,
                    balancer,
                    reactor=self._reactor_on(loop),
                    bind_ip=self.bind_ip,
                    idle_timeout=self.udp_idle_timeout,
                )
                port = udp.open()
                p = _Port(sp, balancer, port, udp=udp, endpoints=tuple(endpoints))
            else:
                sctp = sp.protocol == "SCTP"
                if sctp:
                    reason = sctp_unsupported(_af(self.family))
                    if reason is not None:
                        log.warn("userspace_listener_skipped", service=label, protocol="SCTP", reason=reason)
                        return None
                if self.engine == "raw":
                    raw = RawTcpService(
                        label,
                        balancer,
                        self.gate,
                        self._reactor_on(loop),
                        proto_number=IPPROTO_SCTP if sctp else 0,
                        dial_timeouts=self.dial_timeouts,
                        splice=self.splice and not sctp,
                    )
                    port = raw.open(self.bind_ip, 0, self.backlog)
                    p = _Port(sp, balancer, port, raw=raw, endpoints=tuple(endpoints))
                else:
                    tcp = TcpService(
                        label,
                        balancer,
                        self.gate,
                        loop=loop,
                        proto_number=IPPROTO_SCTP if sctp else 0,
                        dial_timeouts=self.dial_timeouts,
                    )
                    if sctp:
                        server = await open_listener(tcp, self.bind_ip, 0, self.backlog)
                    else:
                        server = await loop.create_server(
                            tcp.protocol, self.bind_ip, 0, backlog=self.backlog, reuse_address=True
                        )
                    port = int(server.sockets[0].getsockname()[1])
                    p = _Port(sp, balancer, port, tcp=tcp, server=server, endpoints=tuple(endpoints))
        except OSError as e:
            log.error(
                "userspace_listener_failed",
                service=label,
                protocol=sp.protocol,
                bind=self.bind_ip,
                error=repr(e),
            )
            return None
        log.info(
            "userspace_listener_opened",
            service=label,
            protocol=sp.protocol,
            bind=self.bind_ip,
            port=port,
            endpoints=len(balancer.targets),
            algorithm=balancer.algorithm,
        )
        return p

    def _reactor_on(self, loop: asyncio.AbstractEventLoop) -> Reactor:
        if self._reactor is None:
            self._reactor = Reactor(loop)
        return self._reactor

    def _close_port(self, name: ServicePortName, p: _Port) -> None:
        """Stop accepting; connections already open run to their natural end."""
        if p.server is not None:
            p.server.close()
        if p.udp is not None:
            p.udp.close()
        if p.raw is not None:
            p.raw.close_listener()
        log.info("userspace_listener_closed", service=str(name), port=p.port)

    # -- shutdown

    async def close(self, deadline: float = 5.0) -> None:
        """Stop every listener, give open connections up to `deadline` seconds to finish, then abort the rest."""
        async with self._lock:
            ports = list(self._ports.items())
            self._ports.clear()
            for name, p in ports:
                self._close_port(name, p)
            try:
                async with asyncio.timeout(deadline):
                    await self.gate.drained()
            except TimeoutError:
                pass
            left = self.gate.open
            for _, p in ports:
                if p.tcp is not None:
                    p.tcp.abort_all()
                if p.raw is not None:
                    p.raw.abort_all()
            if left:
                log.warn("userspace_close_aborted", connections=left)
            if self._reactor is not None:
                self._reactor.close()
                self._reactor = None


def _listener_key(sp: ServicePort) -> tuple[str, int]:
    """What a listener depends on; anything else is updated in place."""
    return (sp.protocol, sp.family)


def _af(family: Family) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _warn_algorithm(name: ServicePortName, value: str) -> None:
    if not is_known_algorithm(value):
        log.warn(
            "userspace_unknown_lb_algorithm",
            service=f"{name.namespace}/{name.name}",
            value=value,
            using="round-robin",
        )
