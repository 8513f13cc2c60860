"""SCTP forwarding, where the kernel has it.

One-to-one style SCTP sockets (SOCK_STREAM + IPPROTO_SCTP) read and write like TCP
sockets, so SCTP reuses the TCP forwarder unchanged: only how the listening and the
dialing sockets are created differs. Multi-homing and stream numbers are not carried
across (a single association each way), which is what kube-proxy's modes offer too.
"""

from __future__ import annotations

import asyncio
import functools
import socket

from kproxy.backends.userspace.tcp import TcpService
from kproxy.infra import log

IPPROTO_SCTP: int = getattr(socket, "IPPROTO_SCTP", 132)


@functools.cache
def sctp_unsupported(family: int = socket.AF_INET) -> str | None:
    """None when this kernel can make SCTP sockets of `family`, else the reason (logged once)."""
    try:
        s = socket.socket(family, socket.SOCK_STREAM, IPPROTO_SCTP)
    except OSError as e:
        reason = f"kernel has no SCTP support ({e.strerror or e})"
        log.warn("userspace_sctp_unsupported", family=int(family), reason=reason)
        return reason
    s.close()
    return None


async def open_listener(svc: TcpService, bind_ip: str, port: int = 0, backlog: int = 1024) -> asyncio.Server:
    """A listening one-to-one SCTP socket served by the TCP forwarder's protocol."""
    family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_SCTP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return await svc.loop.create_server(svc.protocol, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        raise
