"""The userspace proxier: one listener per service port, kept in step with the view.

`sync` takes the same per-family view the iptables backend renders from and makes the
listeners match it: new service ports get a listener on a kernel-chosen port, removed
ones stop listening, and endpoint changes only touch the port's `Balancer`, so
established connections are never dropped by a sync (connections to a removed
endpoint drain on their own). `listener_ports()` is what the steering rules need.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kproxy.backends.userspace.balancer import Balancer, Target, is_known_algorithm, parse_algorithm
from kproxy.backends.userspace.rawtcp import RawTcpService, Reactor
from kproxy.backends.userspace.sctp import IPPROTO_SCTP, open_listener, sctp_unsupported
from kproxy.backends.userspace.tcp import DIAL_TIMEOUTS, Gate, Hooks, TcpService
from kproxy.backends.userspace.udp import UdpService
from kproxy.infra import log
from kproxy.state import topology
from kproxy.state.model import Endpoint, Family, ServicePort, ServicePortName, View

Engine = Literal["raw", "protocol"]


Role = Literal["internal", "external"]


@dataclass(frozen=True, slots=True)
class Choice:
    """Where new connections of one listener may go, from `state.topology` as the kernel modes decide it."""

    targets: tuple[Target, ...]
    has_any: bool
    """Usable endpoints exist somewhere: an empty `targets` then means "none local" (drop), not "none" (reject)."""


def choose(
    sp: ServicePort, endpoints: Sequence[Endpoint], node_zone: str = ""
) -> tuple[Choice, Choice | None]:
    """The internal listener's endpoints (cluster IP, and pod or node traffic to external
    addresses) and, under externalTrafficPolicy Local, the external listener's (node-local
    only); None when external traffic shares the internal listener."""
    sel = topology.categorize(sp, tuple(endpoints), node_zone)
    internal = sel.local if sp.internal_local else sel.cluster
    inner = Choice(tuple((e.ip, e.port) for e in internal), sel.has_any)
    if not topology.external_local(sp):
        return inner, None
    return inner, Choice(tuple((e.ip, e.port) for e in sel.local), sel.has_any)


@dataclass(slots=True)
class _Listener:
    sp: ServicePort
    balancer: Balancer
    port: int
    role: Role = "internal"
    choice: Choice = Choice((), False)
    tcp: TcpService | None = None
    server: asyncio.AbstractServer | None = None
    udp: UdpService | None = None
    raw: RawTcpService | None = None
    endpoints: tuple[Endpoint, ...] = ()
    """The endpoints last synced, so an unchanged port costs one tuple comparison."""
    zone: str = ""


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
        self._ports: dict[ServicePortName, _Listener] = {}
        self._external: dict[ServicePortName, _Listener] = {}
        self._inherited: dict[str, socket.socket] = {}
        self._opened: dict[str, socket.socket] = {}
        self._closed: list[str] = []
        self._lock = asyncio.Lock()

    # -- queries

    def listener_ports(self) -> dict[ServicePortName, int]:
        return {name: p.port for name, p in self._ports.items()}

    def external_ports(self) -> dict[ServicePortName, int]:
        """Listeners of node-local endpoints, for ports under externalTrafficPolicy Local."""
        return {name: p.port for name, p in self._external.items()}

    def choices(self, name: ServicePortName) -> tuple[Choice | None, Choice | None]:
        """(internal, external) endpoint choice of a port, for the steering's drop/reject rules."""
        p, e = self._ports.get(name), self._external.get(name)
        return (p.choice if p else None, e.choice if e else None)

    def port_of(self, name: ServicePortName, role: Role = "internal") -> int | None:
        p = (self._ports if role == "internal" else self._external).get(name)
        return p.port if p is not None else None

    def balancer_of(self, name: ServicePortName, role: Role = "internal") -> Balancer | None:
        p = (self._ports if role == "internal" else self._external).get(name)
        return p.balancer if p is not None else None

    @property
    def open_connections(self) -> int:
        return self.gate.open

    # -- handover

    def inherit(self, sockets: Mapping[str, socket.socket]) -> None:
        """Listening sockets a previous kproxy handed over, by `listener_key`: the next sync
        serves them instead of opening new ones, so their ports, the portal rules pointing at
        them and the connections waiting in their accept queues all carry over."""
        self._inherited.update(sockets)

    def listener_changes(self) -> tuple[dict[str, socket.socket], list[str]]:
        """Listeners opened and closed (by `listener_key`) since the last call, for the keeper
        that hands them to the next kproxy: what a sync changed, never the whole set."""
        opened, closed = self._opened, self._closed
        self._opened, self._closed = {}, []
        return opened, closed

    # -- sync

    async def sync(self, ports: View, node_zone: str = "") -> None:
        """Make the listeners match `ports`. Ports that fail to open are logged and retried on the next sync."""
        async with self._lock:
            for table in (self._ports, self._external):
                for name in [n for n in table if n not in ports]:
                    self._close_port(name, table.pop(name))
            for name, (sp, endpoints) in ports.items():
                current = self._ports.get(name)
                if current is not None and _listener_key(current.sp) != _listener_key(sp):
                    self._close_port(name, self._ports.pop(name))
                    ext = self._external.pop(name, None)
                    if ext is not None:
                        self._close_port(name, ext)
                    current = None
                ext = self._external.get(name)
                if (
                    current is not None
                    and current.endpoints == endpoints
                    and current.sp == sp
                    and current.zone == node_zone
                    and (ext is not None) == topology.external_local(sp)
                ):
                    continue
                inner, outer = choose(sp, endpoints, node_zone)
                if current is None:
                    opened = await self._open_port(name, sp, endpoints, inner, "internal")
                    if opened is None:
                        continue
                    self._ports[name] = current = opened
                else:
                    self._update_port(name, current, sp, endpoints, inner)
                current.zone = node_zone
                if outer is None:
                    if ext is not None:
                        self._close_port(name, self._external.pop(name))
                elif ext is None:
                    opened = await self._open_port(name, sp, endpoints, outer, "external")
                    if opened is not None:
                        self._external[name] = opened
                else:
                    self._update_port(name, ext, sp, endpoints, outer)
            for key, sock in self._inherited.items():
                log.info("userspace_inherited_listener_closed", listener=key)
                sock.close()
            self._inherited.clear()

    def _update_port(
        self,
        name: ServicePortName,
        p: _Listener,
        sp: ServicePort,
        endpoints: Sequence[Endpoint],
        choice: Choice,
    ) -> None:
        if sp != p.sp:
            if sp.lb_algorithm != p.sp.lb_algorithm:
                _warn_algorithm(name, sp.lb_algorithm)
            p.balancer.configure(
                algorithm=parse_algorithm(sp.lb_algorithm), affinity_timeout=float(sp.affinity_timeout)
            )
            p.sp = sp
        p.endpoints = tuple(endpoints)
        p.choice = choice
        targets = choice.targets
        if tuple(sorted(targets)) != tuple(sorted(p.balancer.targets)):
            p.balancer.update(targets)
            log.debug("userspace_endpoints_updated", service=str(name), role=p.role, endpoints=len(targets))

    async def _open_port(
        self,
        name: ServicePortName,
        sp: ServicePort,
        endpoints: Sequence[Endpoint],
        choice: Choice,
        role: Role,
    ) -> _Listener | None:
        if role == "internal":
            _warn_algorithm(name, sp.lb_algorithm)
        balancer = Balancer(
            choice.targets,
            algorithm=parse_algorithm(sp.lb_algorithm),
            affinity_timeout=float(sp.affinity_timeout),
            rng=random.Random(self._rng.random()),
        )
        loop = asyncio.get_running_loop()
        label = str(name) if role == "internal" else f"{name} (external)"
        inherited = self._inherited.pop(listener_key(name, sp, role, self.bind_ip), None)
        eps = tuple(endpoints)
        try:
            if sp.protocol == "UDP":
                udp = UdpService(
                    label,
                    balancer,
                    reactor=self._reactor_on(loop),
                    bind_ip=self.bind_ip,
                    idle_timeout=self.udp_idle_timeout,
                )
                port = udp.adopt(inherited) if inherited is not None else udp.open()
                p = _Listener(sp, balancer, port, role, choice, udp=udp, endpoints=eps)
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
                    if inherited is not None:
                        port = raw.adopt(inherited)
                    else:
                        port = raw.open(self.bind_ip, 0, self.backlog)
                    p = _Listener(sp, balancer, port, role, choice, raw=raw, endpoints=eps)
                else:
                    tcp = TcpService(
                        label,
                        balancer,
                        self.gate,
                        loop=loop,
                        proto_number=IPPROTO_SCTP if sctp else 0,
                        dial_timeouts=self.dial_timeouts,
                    )
                    if inherited is not None:
                        server = await loop.create_server(tcp.protocol, sock=inherited, backlog=self.backlog)
                    elif sctp:
                        server = await open_listener(tcp, self.bind_ip, 0, self.backlog)
                    else:
                        server = await loop.create_server(
                            tcp.protocol, self.bind_ip, 0, backlog=self.backlog, reuse_address=True
                        )
                    port = int(server.sockets[0].getsockname()[1])
                    p = _Listener(sp, balancer, port, role, choice, tcp=tcp, server=server, endpoints=eps)
        except OSError as e:
            if inherited is not None:
                inherited.close()
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
            inherited=inherited is not None,
        )
        sock = _listening_socket(p)
        if sock is not None:
            self._opened[listener_key(name, sp, role, self.bind_ip)] = sock
        return p

    def _reactor_on(self, loop: asyncio.AbstractEventLoop) -> Reactor:
        if self._reactor is None:
            self._reactor = Reactor(loop)
        return self._reactor

    def _close_port(self, name: ServicePortName, p: _Listener) -> None:
        """Stop accepting; connections already open run to their natural end."""
        key = listener_key(name, p.sp, p.role, self.bind_ip)
        if self._opened.pop(key, None) is None:
            self._closed.append(key)
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
            ports = [*self._ports.items(), *self._external.items()]
            self._ports.clear()
            self._external.clear()
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


def listener_key(name: ServicePortName, sp: ServicePort, role: Role, bind_ip: str) -> str:
    """Names one listener across processes: a handed-over socket is reused only by the same
    service port, role, protocol, family and bind address."""
    return f"{sp.family}|{bind_ip}|{name.namespace}/{name.name}:{name.port_name}/{sp.protocol}|{role}"


def _listening_socket(p: _Listener) -> socket.socket | None:
    if p.raw is not None:
        return p.raw.lsock
    if p.udp is not None:
        return p.udp.sock
    if p.server is not None:
        socks = p.server.sockets  # type: ignore[attr-defined]
        if socks:
            return socket.socket(fileno=os.dup(socks[0].fileno()))
    return None


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
