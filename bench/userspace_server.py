"""A standalone userspace proxier for benchmarks and manual tries, with no API server.

    python -m bench.userspace_server --bind 10.77.1.1 \\
        --service web/TCP=10.77.2.2:80,10.77.3.2:80 --service echo/UDP=10.77.2.2:7

prints one JSON line `{"web/TCP": 40123, ...}` (the listener ports) once every listener
is open, then forwards until SIGTERM/SIGINT or until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import cast

import uvloop

from kproxy.backends.userspace.proxier import UserspaceProxier
from kproxy.infra import log
from kproxy.state.model import Endpoint, Family, L4Protocol, ServicePort, ServicePortName


def _service(
    spec: str, algorithm: str, affinity: int
) -> tuple[str, ServicePortName, ServicePort, tuple[Endpoint, ...]]:
    head, _, eps = spec.partition("=")
    name, _, proto = head.partition("/")
    protocol = cast(L4Protocol, (proto or "TCP").upper())
    endpoints = []
    for hp in filter(None, eps.split(",")):
        host, _, port = hp.rpartition(":")
        endpoints.append(Endpoint(host.strip("[]"), int(port)))
    family: Family = 6 if endpoints and ":" in endpoints[0].ip else 4
    spn = ServicePortName("bench", name, "", protocol)
    sp = ServicePort(spn, family, "", 0, affinity_timeout=affinity, lb_algorithm=algorithm)
    return f"{name}/{protocol}", spn, sp, tuple(endpoints)


async def _main(args: argparse.Namespace) -> None:
    services = [_service(s, args.algorithm, args.affinity) for s in args.service]
    family: Family = 6 if ":" in args.bind else 4
    proxier = UserspaceProxier(
        family=family,
        bind_ip=args.bind,
        max_connections=args.max_connections,
        udp_idle_timeout=args.udp_idle_timeout,
        engine=args.engine,
        splice=args.splice,
    )
    await proxier.sync({spn: (sp, eps) for _, spn, sp, eps in services})
    ports = {label: proxier.port_of(spn) for label, spn, _, _ in services}
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_eof:
        fd = sys.stdin.fileno()
        loop.add_reader(fd, lambda: None if os.read(fd, 4096) else stop.set())
    await stop.wait()
    await proxier.close(deadline=1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kproxy-userspace-bench-server")
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--service", action="append", default=[], help="NAME/PROTO=IP:PORT[,IP:PORT...]")
    ap.add_argument("--algorithm", default="")
    ap.add_argument("--affinity", type=int, default=0)
    ap.add_argument("--max-connections", type=int, default=100_000)
    ap.add_argument("--udp-idle-timeout", type=float, default=5.0)
    ap.add_argument("--engine", choices=("raw", "protocol"), default="raw")
    ap.add_argument(
        "--splice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="raw engine: move bulk TCP bytes with splice(2) (default on)",
    )
    ap.add_argument("--exit-on-stdin-eof", action="store_true")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    log.setup(args.log_level)
    uvloop.run(_main(args))


if __name__ == "__main__":
    main()
