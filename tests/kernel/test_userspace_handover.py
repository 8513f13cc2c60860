"""The keeper that carries userspace listeners across restarts, on its own (one namespace the
test creates, so its abstract address is the test's alone).

More listeners than fit one SCM_RIGHTS batch go in, one is closed again, kproxy's end of the
pair closes as it does when kproxy dies, and the next "kproxy" receives exactly the open ones,
on the same ports, with the recorded rules state; the keeper then exits.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import pytest

from kproxy.backends.userspace import handover
from tests.support.netns import PREFIX, create_netns, delete_netns, entered, ip_batch, netns_guard

pytestmark = pytest.mark.privileged

__all__ = ["netns_guard"]

COUNT = 260
"""More than one batch (handover._BATCH)."""


@pytest.fixture
def ns(netns_guard: None) -> Iterator[str]:
    name = f"{PREFIX}{secrets.token_hex(4)}-ho"
    create_netns(name)
    try:
        ip_batch(name, ["link set lo up"])
        yield name
    finally:
        with entered(name):
            handover.release()
        delete_netns(name)


def test_keeper_hands_the_open_listeners_to_the_next_process(ns: str) -> None:
    with entered(ns):
        listeners = {}
        for i in range(COUNT):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            listeners[f"4|0.0.0.0|default/svc-{i}:/TCP|internal"] = s
        ports = {k: s.getsockname()[1] for k, s in listeners.items()}
        keeper = handover.Keeper()
        try:
            gone = "4|0.0.0.0|default/svc-7:/TCP|internal"
            keeper.update(listeners, [])
            keeper.update({}, [gone], {"4": {"digest": "abc"}})
            pid = keeper.pid
            assert pid is not None
        finally:
            keeper.close()
            for s in listeners.values():
                s.close()
        got = None
        for _ in range(100):  # the keeper binds its address once it sees the pair close
            got = handover.receive(connect_timeout=1.0)
            if got is not None:
                break
            time.sleep(0.05)
        assert got is not None, "no keeper offered the sockets"
        try:
            assert set(got.sockets) == set(listeners) - {gone}
            assert {k: s.getsockname()[1] for k, s in got.sockets.items()} == {
                k: p for k, p in ports.items() if k != gone
            }
            assert got.state == {"4": {"digest": "abc"}}
            # still listening: a connection is queued for whoever accepts next
            key = next(iter(got.sockets))
            c = socket.create_connection(("127.0.0.1", ports[key]), timeout=2)
            c.close()
        finally:
            for s in got.sockets.values():
                s.close()
        assert handover.receive(connect_timeout=0.5) is None, "the keeper serves one successor, then exits"
