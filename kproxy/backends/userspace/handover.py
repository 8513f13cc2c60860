"""Restarts no client notices: the listening sockets outlive the kproxy that opened them.

Userspace mode starts a small keeper process (`python -m kproxy.backends.userspace.handover`,
in its own session) and passes it a duplicate of every listener it opens, and the digest of
the portal rules it writes, over a unix socket pair; closing a listener tells the keeper to
drop its copy. However kproxy ends (SIGTERM, a crash, SIGKILL), the keeper sees the pair
close and then offers everything it holds on an abstract unix address, which belongs to the
network namespace, so exactly the next kproxy of the same node finds it. The sockets stay
open in the kernel the whole time: a new connection waits in the accept queue and a
datagram in the receive buffer instead of being refused at a closed port. The next kproxy
receives every socket (SCM_RIGHTS, in batches) with its `listener_key`, serves the same
ports, and adopts the portal rules instead of rewriting them when they still match. A
keeper nobody claims within the timeout (kproxy stopped for good) exits and the sockets
close; `release()` claims and closes them at once.

Limits: the keeper must outlive kproxy, so in a container where kproxy is PID 1 it dies
with the container unless the pod shares a PID namespace that lives on (hostPID); under
systemd it needs KillMode=process. Connections kproxy had already accepted are its own and
end with it on SIGKILL.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kproxy.infra import log

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


class Keeper:
    """kproxy's side of the keeper. Calls are cheap (one message per batch of changes) and never
    raise: a keeper that fails costs the next restart its handover, not this kproxy its service."""

    def __init__(self) -> None:
        self._chan: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def update(
        self,
        opened: Mapping[str, socket.socket],
        closed: Sequence[str],
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """Tell the keeper about listeners opened and closed since the last call, and the rules' state."""
        if self._failed or (self._chan is None and not opened):
            return
        try:
            chan = self._chan if self._chan is not None else self._start()
            if closed:
                chan.sendall(json.dumps({"remove": list(closed)}).encode())
            keys = list(opened)
            for i in range(0, len(keys), _BATCH):
                part = keys[i : i + _BATCH]
                body = json.dumps({"add": part}).encode()
                socket.send_fds(chan, [body], [opened[k].fileno() for k in part])
            if state is not None:
                chan.sendall(json.dumps({"state": dict(state)}).encode())
        except OSError as e:
            # Service is unaffected; only the next restart loses its handover, hence a warning.
            self._failed = True
            log.warn("userspace_keeper_failed", error=repr(e), effect="the next restart opens new listeners")
            self.close()

    def close(self) -> None:
        """Let the keeper offer what it holds to the next kproxy (it would on our exit anyway)."""
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kproxy.backends.userspace.handover",
                    str(theirs.fileno()),
                    str(_timeout()),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._chan = ours
        log.info("userspace_keeper_started", keeper=self._proc.pid)
        return ours


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


def release() -> int:
    """Claim a waiting keeper's sockets in this network namespace and close them; how many there were."""
    got = receive(connect_timeout=0.5)
    if got is None:
        return 0
    for sock in got.sockets.values():
        sock.close()
    return len(got.sockets)


def _keep(chan_fd: int, timeout: float) -> int:
    """The keeper process: hold while kproxy lives, then hand everything to the next kproxy."""
    chan = socket.socket(fileno=chan_fd)
    held: dict[str, socket.socket] = {}
    state: dict[str, Any] = {}
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, _MAX_MSG, _BATCH)
        except OSError:
            break
        if not msg:
            for fd in fds:
                os.close(fd)
            break
        body = json.loads(msg)
        for key in body.get("remove", ()):
            old = held.pop(key, None)
            if old is not None:
                old.close()
        keys = body.get("add", [])
        for i, fd in enumerate(fds):
            sock = socket.socket(fileno=fd)
            if i >= len(keys):
                sock.close()
                continue
            old = held.pop(keys[i], None)
            if old is not None:
                old.close()
            held[keys[i]] = sock
        if "state" in body:
            state = body["state"]
    chan.close()
    if held:
        _offer(held, state, timeout)
    return 0


def _offer(held: dict[str, socket.socket], state: dict[str, Any], timeout: float) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.monotonic() + timeout
    while True:
        try:
            srv.bind(ADDRESS)
            break
        except OSError as e:
            # an older keeper still offering (two restarts in quick succession): wait for it
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                log.error("userspace_keeper_bind_failed", listeners=len(held), error=repr(e))
                return
            time.sleep(0.05)
    srv.listen(1)
    keys = list(held)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warn("userspace_keeper_expired", listeners=len(keys), reason="no kproxy took the sockets")
            return
        srv.settimeout(left)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        srv.close()  # one successor: a later connect is refused, not left waiting
        with conn:
            try:
                for i in range(0, len(keys), _BATCH):
                    part = keys[i : i + _BATCH]
                    body: dict[str, Any] = {"keys": part, "more": i + _BATCH < len(keys)}
                    if i == 0:
                        body["state"] = state
                    socket.send_fds(conn, [json.dumps(body).encode()], [held[k].fileno() for k in part])
            except OSError as e:
                log.warn("userspace_keeper_send_failed", listeners=len(keys), error=repr(e))
        return


def _log_format() -> str:
    """The format kproxy logs in, so the keeper's few lines (it shares stderr) read the same."""
    handlers = logging.getLogger("kproxy").handlers
    return "json" if handlers and isinstance(handlers[0].formatter, log.JsonFormatter) else "text"


if __name__ == "__main__":
    log.setup("INFO", sys.argv[3] if len(sys.argv) > 3 else "text")
    sys.exit(_keep(int(sys.argv[1]), float(sys.argv[2])))
