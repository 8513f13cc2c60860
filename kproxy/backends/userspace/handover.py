"""Restarts no client notices: the listening sockets outlive the kproxy that opened them.

On SIGTERM, userspace mode hands its listening sockets to a small holder process
(`python -m kproxy.backends.userspace.handover`, started in its own session with the
sockets as inherited descriptors) and only then closes its own copies. The sockets stay
open in the kernel the whole time: a new connection waits in the accept queue and a
datagram in the receive buffer, instead of being refused at a closed port. The holder
listens on an abstract unix socket, which belongs to the network namespace, so exactly
the kproxy of the same node finds it. The next kproxy connects at start-up, receives
every socket (SCM_RIGHTS, in batches) with its `listener_key` and the digest of the
portal rules its predecessor wrote, serves the same ports, and adopts those rules
instead of rewriting them when they still match. A holder nobody claims within the
timeout (kproxy stopped for good) exits and the sockets close.

Limits: the holder must outlive kproxy, so in a container where kproxy is PID 1 it dies
with the container unless the pod shares a PID namespace that lives on (hostPID). After
SIGKILL there is nothing to hand over: the next kproxy opens new listeners and rewrites
the rules, and connections in that gap are refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from kproxy import log

ADDRESS: Final = b"\0kproxy-userspace-handover"
"""Abstract unix address: one per network namespace, gone with the process holding it."""
TIMEOUT_ENV: Final = "KPROXY_HANDOVER_TIMEOUT"
DEFAULT_TIMEOUT: Final = 60.0
"""Seconds a holder waits for the next kproxy before it gives the sockets up."""
_BATCH: Final = 200
"""Descriptors per message: the kernel takes at most 253 in one SCM_RIGHTS message."""
_MAX_MSG: Final = 1 << 20


@dataclass
class Received:
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """What the previous kproxy recorded for each family, e.g. the digest of the rules it wrote."""


def hold(sockets: Mapping[str, socket.socket], state: Mapping[str, Any], ready_timeout: float = 5.0) -> bool:
    """Start a holder for `sockets`; True once it holds them (the caller may then close its copies)."""
    if not sockets:
        return False
    keys = list(sockets)
    fds = [sockets[k].fileno() for k in keys]
    timeout = _timeout()
    spec = json.dumps({"keys": keys, "fds": fds, "state": dict(state), "timeout": timeout})
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kproxy.backends.userspace.handover"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=fds,
            start_new_session=True,
        )
    except OSError as e:
        log.error("userspace_handover_failed", listeners=len(keys), error=repr(e))
        return False
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(spec.encode() + b"\n")
        proc.stdin.close()
        line = _readline(proc.stdout, ready_timeout)
    except OSError as e:
        line = repr(e).encode()
    proc.stdout.close()
    if line.strip() != b"ready":
        log.error(
            "userspace_handover_failed",
            listeners=len(keys),
            holder=proc.pid,
            said=line[:200].decode(errors="replace"),
        )
        if proc.poll() is None:
            proc.kill()
        return False
    log.info("userspace_handover_held", listeners=len(keys), holder=proc.pid, timeout=timeout)
    return True


def receive(connect_timeout: float = 2.0) -> Received | None:
    """Take the sockets of a holder in this network namespace; None when there is none."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(connect_timeout)
    try:
        conn.connect(ADDRESS)
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
        conn.close()
        return None
    got = Received()
    try:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MSG, _BATCH)
            if not msg:
                break
            body = json.loads(msg)
            keys = body["keys"]
            if len(keys) != len(fds):
                raise ValueError(f"{len(keys)} keys for {len(fds)} descriptors")
            for key, fd in zip(keys, fds, strict=True):
                got.sockets[key] = socket.socket(fileno=fd)
            got.state.update(body.get("state", {}))
            if not body.get("more"):
                break
    except (OSError, ValueError, KeyError) as e:
        log.error("userspace_handover_receive_failed", received=len(got.sockets), error=repr(e))
    finally:
        conn.close()
    log.info("userspace_handover_received", listeners=len(got.sockets))
    return got


def _timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def _readline(pipe: Any, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([pipe], [], [], timeout)
    return bytes(pipe.readline()) if ready else b"no answer"


def _holder() -> int:
    """The holder process: bind, say ready, hand everything to the first kproxy that connects."""
    spec = json.loads(sys.stdin.readline())
    keys: list[str] = spec["keys"]
    fds: list[int] = spec["fds"]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        srv.bind(ADDRESS)
    except OSError as e:
        print(f"bind failed: {e!r}", flush=True)
        return 1
    srv.listen(1)
    print("ready", flush=True)
    sys.stdout.close()
    deadline = time.monotonic() + float(spec["timeout"])
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warn("userspace_handover_expired", listeners=len(keys), reason="no kproxy took the sockets")
            return 0
        srv.settimeout(left)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                for i in range(0, max(len(keys), 1), _BATCH):
                    body = {"keys": keys[i : i + _BATCH], "more": i + _BATCH < len(keys)}
                    if i == 0:
                        body["state"] = spec["state"]
                    socket.send_fds(conn, [json.dumps(body).encode()], fds[i : i + _BATCH])
            except OSError as e:
                log.warn("userspace_handover_send_failed", error=repr(e))
                continue
        return 0


if __name__ == "__main__":
    sys.exit(_holder())
