"""The smallest HTTP/1.1 server that probes and scrapers need, on asyncio.

kube-proxy's three HTTP faces (:10256 health, :10249 metrics, one health-check
node port per Local-policy LoadBalancer service) only answer GET with a short
body. A dependency-free responder keeps them on the agent's own loop (uvloop in
production), never resolves a peer's name (a node without DNS would stall on
reverse lookups, as Python's http.server does), and closes each connection
after one answer so a listener closes at once when asked to.

Interface: a `Handler` is a plain function `Request -> Response`; `HttpServer`
binds it to one port on one or more addresses.

    server = HttpServer(handler, hosts=["127.0.0.1"], port=0, name="healthz")
    await server.start()          # raises OSError if the port is taken
    server.ports                  # the bound ports (useful with port=0)
    await server.close()          # listener and open connections are gone on return
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kproxy.infra import log

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_MAX_HEAD = 16 * 1024
_WILDCARDS = ("", "0.0.0.0", "::")
_READ_TIMEOUT = 10.0


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, as the bind-address settings hold them."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    """The path without query string."""
    query: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Response]


def text(status: int, body: str) -> Response:
    return Response(status, body.encode())


def not_found(_: Request) -> Response:
    return text(404, "404 page not found\n")


class HttpServer:
    """One handler served on `port` at every address in `hosts` (None, [], "0.0.0.0" or "::" = every address)."""

    def __init__(self, handler: Handler, hosts: Sequence[str] | None, port: int, name: str = "http") -> None:
        self._handler = handler
        # Like Go's listener (and so kube-proxy), a wildcard of either family means both.
        wildcard = not hosts or all(h in _WILDCARDS for h in hosts)
        self._hosts = None if wildcard else list(hosts or ())
        self._port = port
        self._name = name
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ports(self) -> tuple[int, ...]:
        if self._server is None:
            return ()
        return tuple(sorted({s.getsockname()[1] for s in self._server.sockets}))

    @property
    def port(self) -> int:
        """The one bound port (the configured one, or the kernel's pick for port 0)."""
        ports = self.ports
        return ports[0] if ports else self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, host=self._hosts, port=self._port, reuse_address=True, limit=_MAX_HEAD
        )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            resp, head_only = await self._answer(reader)
            writer.write(_encode(resp, head_only))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except Exception as exc:  # a handler bug must not kill the listener
            log.error("http_handler_failed", server=self._name, error=repr(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return text(400, "bad request\n"), False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return text(405, "method not allowed\n"), False
        path, _, query = target.partition("?")
        return self._handler(Request(method, path, query)), method == "HEAD"


def _encode(resp: Response, head_only: bool) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    lines = [
        f"HTTP/1.1 {resp.status} {reason}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
        "Connection: close",
    ]
    lines.extend(f"{k}: {v}" for k, v in resp.headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body
