"""Manifest files and directories as a source of objects (dry runs, the no-cluster mode, tests).

A directory contributes its *.yaml, *.yml and *.json files in name order; by default only
its own files, so a subdirectory (such as manifests/examples/broken/) is not pulled in
by accident. Nothing here raises for bad input: unreadable files and bad objects come
back as ObjectErrors beside the objects that did load.

Only regular files (or symlinks to them) are opened. A FIFO would block the reader until
some writer came along, a device could stream forever: both are reported by `scan` and
never opened, and `read_manifest` opens with O_NONBLOCK and checks the open file again, in
case the name was swapped between the look and the open. Reads are bounded in size.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.errors import ObjectError
from kproxy.state.model import KObject, ObjectRef
from kproxy.state.parse import parse_stream

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 256 * 1024 * 1024
"""Far above any real manifest (a 50 MB one is read fine), far below what would exhaust memory."""


def file_error(path: str, reason: str) -> ObjectError:
    return ObjectError(ObjectRef("File", "", path), "", reason, path)


def file_format(path: str) -> str:
    """How a file is parsed: a `.json` file by the JSON parser alone (its errors say JSON); any other
    as JSON when it opens as JSON does and parses as such, else as YAML."""
    return "json" if path.endswith(".json") else ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One manifest file found by a scan: `stamp` tells a change, `problem` why it is not read."""

    path: str
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(device, inode, mtime ns, size) of the file the name leads to."""
    problem: str = ""


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "no such file or directory"
    return e.strerror or type(e).__name__


def scan(path: str, *, recursive: bool = False) -> list[Entry]:
    """The manifest files of a directory, sorted; hidden entries skipped (a ConfigMap mount's `..data` too).

    Symlinks are followed (ConfigMap mounts are made of them), each directory visited once.
    Raises OSError when `path` itself cannot be listed; anything below it that cannot be
    looked at comes back as an Entry with a problem.
    """
    found: list[Entry] = []
    seen: set[tuple[int, int]] = set()

    def visit(d: str, top: bool) -> None:
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if top:
                raise
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            manifest = e.name.endswith(MANIFEST_SUFFIXES)
            try:
                st = os.stat(e.path)
            except OSError as err:
                if manifest or err.errno == errno.ELOOP:
                    dangling = err.errno == errno.ENOENT and e.is_symlink()
                    found.append(Entry(e.path, problem="dangling symlink" if dangling else _why(err)))
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    visit(e.path, False)
            elif manifest:
                if stat.S_ISREG(st.st_mode):
                    found.append(Entry(e.path, _stamp(st)))
                else:
                    found.append(Entry(e.path, _stamp(st), f"{_kind_of(st.st_mode)}, not read"))

    visit(path, True)
    return found


def scan_path(path: str) -> list[Entry]:
    """`scan` for a directory; a single regular file (`--manifests FILE`) is its own one entry."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return [Entry(path, _stamp(st))]
    return scan(path)


def manifest_files(path: str, *, recursive: bool = False) -> list[str]:
    """The readable manifest files of a directory, sorted (what `scan` finds without a problem)."""
    try:
        return [e.path for e in scan(path, recursive=recursive) if not e.problem]
    except OSError:
        return []


class ReadError(Exception):
    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        """The file changed while being read (a writer is at work): read it again, report nothing."""


def read_manifest(
    path: str, limit: int = MAX_FILE_BYTES, *, named: bool = False
) -> tuple[str, tuple[int, int, int, int]]:
    """A regular file's text and stamp; never blocks on a FIFO or device, never reads past `limit`.

    `named`: the user named this very path (`dry-run -f /dev/stdin`, a process substitution),
    so a pipe is read as they asked, blocking until its writer is done.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (0 if named else os.O_NONBLOCK)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ReadError(_why(e)) from None
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if not regular and not (named and stat.S_ISFIFO(st.st_mode)):
            raise ReadError(f"{_kind_of(st.st_mode)}, not read")
        if st.st_size > limit:
            raise ReadError(f"larger than {limit} bytes, not read")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > limit:
                raise ReadError(f"larger than {limit} bytes, not read")
            chunks.append(chunk)
        after = os.fstat(fd)
    except OSError as e:
        raise ReadError(_why(e)) from None
    finally:
        os.close(fd)
    if regular and _stamp(after) != _stamp(st):
        raise ReadError("changed while being read", transient=True)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8"), _stamp(after)
    except UnicodeDecodeError as e:
        raise ReadError(f"not UTF-8 text (byte {e.start})") from None


def load_paths(
    paths: Sequence[str], *, recursive: bool = False, warnings: list[ObjectError] | None = None
) -> tuple[list[KObject], list[ObjectError]]:
    """Objects from files and directories, in the order given (directories in name order)."""
    objs: list[KObject] = []
    errors: list[ObjectError] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                entries = scan(path, recursive=recursive)
            except OSError as e:
                errors.append(file_error(path, _why(e)))
                continue
        else:
            entries = [Entry(path)]
        named = not os.path.isdir(path)
        for entry in entries:
            if entry.problem:
                errors.append(file_error(entry.path, entry.problem))
                continue
            try:
                text, _ = read_manifest(entry.path, named=named)
            except ReadError as e:
                errors.append(file_error(entry.path, e.reason))
                continue
            got, errs = parse_stream(text, entry.path, fmt=file_format(entry.path), warnings=warnings)
            objs.extend(got)
            errors.extend(errs)
    return objs, errors
