"""A tiny TCP+UDP echo-who server that stands in for a pod in kernel tests.

Run inside a namespace: `ip netns exec NS python3 tests/support/podserver.py --name pod-1 --port 8080 8081`.
Every TCP connection and every UDP datagram is answered with one line, `NAME HOST:PORT`, where
HOST:PORT is the client address this pod saw (IPv6 in brackets, IPv4-mapped addresses unwrapped).
That single line is what lets a test tell which endpoint got a packet and whether it was
masqueraded. Stdlib only, no name lookups (a namespace without DNS would stall them), one thread.
It prints `ready` once every socket is listening, so the harness waits on that, never on a sleep.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys


def _who(name: str, addr: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    if ":" in host:
        host = f"[{host}]"
    return f"{name} {host}:{port}\n".encode()


def _dual_stack(kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    sock.setblocking(False)
    return sock


def serve(name: str, ports: list[int], *, watch_stdin: bool = False) -> None:
    sel = selectors.DefaultSelector()
    if watch_stdin:
        sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    for port in ports:
        sel.register(_dual_stack(socket.SOCK_STREAM, port), selectors.EVENT_READ, "tcp")
        sel.register(_dual_stack(socket.SOCK_DGRAM, port), selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return  # the harness is gone: never outlive it
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "tcp":
                    conn, addr = sock.accept()
                    with conn:
                        conn.settimeout(1.0)
                        conn.sendall(_who(name, addr))
                else:
                    _, addr = sock.recvfrom(2048)
                    sock.sendto(_who(name, addr), addr)
            except OSError:
                continue  # a client that went away must not stop the server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, nargs="+", action="extend", required=True)
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when stdin closes, i.e. when the harness dies"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.name, args.port, watch_stdin=args.exit_on_stdin_eof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
