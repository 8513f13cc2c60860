"""`--manifests DIR` keeps the last good state: bad input never removes a working service.

Driven through ManifestDirectory.poll (what the agent's watcher runs off the event loop) and
the real change tracker; what a user would notice is asserted: the objects the tracker holds,
the one log line per problem, the files-in-error count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.sources.dirwatch import ManifestDirectory, off_loop, watch_directory
from kproxy.state.model import ServiceKey
from kproxy.tracking.changes import ChangeTracker
from kproxy.tracking.events import apply_event
from tests.support.kobjects import at, endpoint_slice, node, service

Event = dict[str, Any]


@pytest.fixture
def events() -> Iterator[list[Event]]:
    got: list[Event] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            name, fields = getattr(record, "kproxy_fields", ("", {}))
            got.append({"event": name, "level": record.levelname, **fields})

    logger = logging.getLogger("kproxy")
    handler, saved = Grab(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(saved)


def named(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e["event"] == name]


def write(path: Path, *objs: dict[str, Any]) -> Path:
    """Atomically, as an editor or a ConfigMap swap would."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"---\n{json.dumps(o)}\n" for o in objs))
    os.replace(tmp, path)
    return path


def bump(path: Path) -> None:
    """Make sure a rewrite is seen even within one mtime tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class Lab:
    def __init__(self, root: Path) -> None:
        self.dir = root / "manifests"
        self.dir.mkdir()
        self.tracker = ChangeTracker(node_name="node-a", wait_for=frozenset({"Service", "EndpointSlice"}))
        self.md = ManifestDirectory(str(self.dir))

    def poll(self) -> None:
        if self.md.poll():
            self.md.apply(lambda ev: apply_event(self.tracker, ev))

    def services(self) -> set[str]:
        return {str(k) for k in self.tracker.services}

    def endpoints(self, name: str) -> list[str]:
        return [e.address for s in self.tracker.slices_of(ServiceKey("demo", name)) for e in s.endpoints]


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path)
    write(lab.dir / "node.yaml", node())
    write(lab.dir / "web.yaml", service(), endpoint_slice())
    write(lab.dir / "api.json", service("api", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"]))
    lab.poll()
    assert lab.services() == {"demo/web", "demo/api"} and lab.tracker.ready
    return lab


def test_a_file_that_fails_to_parse_keeps_its_objects_with_one_error(lab: Lab, events: list[Event]) -> None:
    web = lab.dir / "web.yaml"
    web.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo\nspec: [\n")
    bump(web)
    for _ in range(3):
        lab.poll()
    assert lab.services() == {"demo/web", "demo/api"}, "the broken file's service is still served"
    assert lab.endpoints("web") == ["10.244.0.5", "10.244.1.6"]
    (err,) = named(events, "manifest_file_not_loaded")
    assert err["level"] == "ERROR" and err["file"] == str(web) and err["at"].startswith(f"{web}:")
    assert err["reason"].startswith("YAML: ") and err["kept"] == 2
    assert lab.md.files_in_error == 1
    write(web, service(), endpoint_slice(endpoints=[]))
    lab.poll()
    assert lab.md.files_in_error == 0 and lab.endpoints("web") == []
    assert named(events, "manifest_file_recovered")


def test_a_half_written_file_truncated_inside_an_object_keeps_its_objects(
    lab: Lab, events: list[Event]
) -> None:
    web = lab.dir / "web.yaml"
    text = "".join(f"---\n{json.dumps(o)}\n" for o in (service(), endpoint_slice()))
    web.write_text(text[: len(text) * 2 // 3])
    bump(web)
    lab.poll()
    assert lab.services() == {"demo/web", "demo/api"}
    assert lab.endpoints("web") == ["10.244.0.5", "10.244.1.6"]
    assert lab.md.files_in_error == 1


def test_a_json_file_error_says_json(lab: Lab, events: list[Event]) -> None:
    api = lab.dir / "api.json"
    api.write_text('{"kind": "Service", "metadata": {"name": "api",}}')
    bump(api)
    lab.poll()
    (err,) = named(events, "manifest_file_not_loaded")
    assert "JSON: " in err["reason"] and "YAML" not in err["reason"]
    assert "demo/api" in lab.services()


def test_an_object_made_invalid_keeps_its_last_good_version(lab: Lab, events: list[Event]) -> None:
    web = lab.dir / "web.yaml"
    write(web, at(service(), "spec.ports[0].port", 70000), endpoint_slice(endpoints=[]))
    bump(web)
    for _ in range(2):
        lab.poll()
    assert lab.tracker.services[ServiceKey("demo", "web")].ports[0].port == 80
    assert lab.endpoints("web") == [], "the valid object of the same file is taken"
    (skip,) = named(events, "object_skipped")
    assert skip["field"] == "spec.ports[0].port" and skip["serving"] == "last good version"
    assert lab.md.files_in_error == 0


def test_a_warning_is_logged_once_per_change_of_the_object(lab: Lab, events: list[Event]) -> None:
    web = lab.dir / "web.yaml"
    odd = at(service(), "metadata.annotations", {"kproxy.io/lb-algorithm": "léast-connections"})
    write(web, odd, endpoint_slice())
    lab.poll()
    write(web, odd, endpoint_slice(endpoints=[]))  # another object of the file changes
    bump(web)
    lab.poll()
    warned = named(events, "field_ignored")
    assert len(warned) == 1 and warned[0]["object"] == "Service demo/web"
    assert warned[0]["field"] == "metadata.annotations[kproxy.io/lb-algorithm]"
    assert lab.tracker.services[ServiceKey("demo", "web")].lb_algorithm == ""


def test_a_vanished_directory_keeps_every_service(lab: Lab, events: list[Event], tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    lab.dir.rename(moved)
    for _ in range(3):
        lab.poll()
    assert lab.services() == {"demo/web", "demo/api"}
    (warned,) = named(events, "manifests_unreadable")
    assert warned["level"] == "WARNING" and warned["kept"] == 4
    moved.rename(lab.dir)
    (lab.dir / "api.json").unlink()
    lab.poll()
    assert lab.services() == {"demo/web"}, "once back, its content is the truth again"
    assert named(events, "manifests_readable")


def test_an_emptied_directory_is_an_instruction(lab: Lab) -> None:
    for f in lab.dir.iterdir():
        f.unlink()
    lab.poll()
    assert lab.services() == set()


def test_fifo_socket_and_symlink_loop_are_reported_and_never_opened(lab: Lab, events: list[Event]) -> None:
    import socket

    os.mkfifo(lab.dir / "pipe.yaml")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(lab.dir / "sock.yaml"))
    (lab.dir / "a.yaml").symlink_to(lab.dir / "b.yaml")
    (lab.dir / "b.yaml").symlink_to(lab.dir / "a.yaml")
    (lab.dir / "gone.yaml").symlink_to(lab.dir / "nothing-here")
    write(lab.dir / "more.yaml", service("more", clusterIP="10.96.0.12", clusterIPs=["10.96.0.12"]))
    try:
        done = threading.Event()

        def polls() -> None:
            for _ in range(3):
                lab.poll()
            done.set()

        t = threading.Thread(target=polls, daemon=True)
        t.start()
        t.join(30)
        assert done.is_set(), "a poll blocked: the FIFO was opened"
    finally:
        sock.close()
    assert "demo/more" in lab.services(), "the regular files around them still load"
    reported = {Path(e["file"]).name: e["reason"] for e in named(events, "manifest_file_not_loaded")}
    assert reported == {
        "pipe.yaml": "a FIFO, not read",
        "sock.yaml": "a socket, not read",
        "a.yaml": "symlink loop",
        "b.yaml": "symlink loop",
        "gone.yaml": "dangling symlink",
    }
    assert len(named(events, "manifest_file_not_loaded")) == 5, "each once, not at every poll"
    assert lab.md.files_in_error == 5


def test_load_paths_reports_a_fifo_instead_of_blocking(tmp_path: Path) -> None:
    from kproxy.sources.files import load_paths

    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "svc.yaml").write_text(json.dumps(service()))
    objs, errs = load_paths([str(tmp_path)])
    assert [type(o).__name__ for o in objs] == ["Service"]
    assert [(Path(e.source).name, e.reason) for e in errs] == [("pipe.yaml", "a FIFO, not read")]


def test_a_hung_read_does_not_hold_up_the_loop_or_its_shutdown() -> None:
    """off_loop runs the poll in a daemon thread: cancelling the watcher (SIGTERM) returns at
    once even while a read hangs, as on a stuck network filesystem."""
    release = threading.Event()

    async def main() -> str:
        task = asyncio.create_task(off_loop(lambda: release.wait(60)))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    try:
        assert asyncio.run(main()) == "cancelled"
    finally:
        release.set()


def test_watch_directory_reports_files_in_error(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    write(d / "web.yaml", service())
    (d / "bad.yaml").write_text("kind: [")
    tracker = ChangeTracker(node_name="node-a", wait_for=frozenset({"Service"}))
    seen: list[int] = []

    async def main() -> None:
        task = asyncio.create_task(
            watch_directory(
                str(d), lambda ev: apply_event(tracker, ev), lambda: None, interval=0.01, report=seen.append
            )
        )
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen and seen[-1] == 1 and tracker.ready
    assert {str(k) for k in tracker.services} == {"demo/web"}
    shutil.rmtree(d)


def test_a_single_manifest_file_is_served_too(tmp_path: Path) -> None:
    one = write(tmp_path / "all.yaml", service())
    tracker = ChangeTracker(node_name="node-a", wait_for=frozenset({"Service"}))
    md = ManifestDirectory(str(one))
    assert md.poll() and md.apply(lambda ev: apply_event(tracker, ev)) == 1
    assert {str(k) for k in tracker.services} == {"demo/web"}


def test_dry_run_reads_a_pipe_it_was_named_explicitly(tmp_path: Path) -> None:
    """`dry-run -f <(kubectl get ...)`: a pipe the user names is read as asked (only a pipe met in a
    directory is skipped)."""
    from kproxy.sources.files import load_paths

    pipe = tmp_path / "in.yaml"
    os.mkfifo(pipe)

    def writer() -> None:
        with open(pipe, "w") as fh:
            fh.write(json.dumps(service()))

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    objs, errs = load_paths([str(pipe)])
    t.join(10)
    assert errs == [] and [type(o).__name__ for o in objs] == ["Service"]
