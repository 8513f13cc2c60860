"""Manifest files and directories as a source of objects (dry runs, the no-cluster mode, tests).

A directory contributes its *.yaml, *.yml and *.json files in name order; by default only
its own files, so a subdirectory (such as manifests/examples/broken/) is not pulled in
by accident. Nothing here raises for bad input: unreadable files and bad objects come
back as ObjectErrors beside the objects that did load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kproxy.errors import ObjectError
from kproxy.state.model import ObjectRef
from kproxy.state.parse import Parsed, parse_stream

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _file_error(path: str, reason: str) -> ObjectError:
    return ObjectError(ObjectRef("File", "", path), "", reason, path)


def manifest_files(path: str, *, recursive: bool = False) -> list[str]:
    """The manifest files of a directory, sorted; hidden entries skipped (a ConfigMap mount's `..data` too).

    Symlinks are followed (ConfigMap mounts are made of them), each directory visited once.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def visit(d: str) -> None:
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                continue
            if is_dir:
                if recursive:
                    visit(e.path)
            elif e.name.endswith(MANIFEST_SUFFIXES):
                found.append(e.path)

    visit(path)
    return found


def load_paths(paths: Sequence[str], *, recursive: bool = False) -> tuple[list[Parsed], list[ObjectError]]:
    """Objects from files and directories, in the order given (directories in name order)."""
    objs: list[Parsed] = []
    errors: list[ObjectError] = []
    for path in paths:
        files = manifest_files(path, recursive=recursive) if os.path.isdir(path) else [path]
        for f in files:
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except FileNotFoundError:
                errors.append(_file_error(f, "no such file or directory"))
                continue
            except UnicodeDecodeError as e:
                errors.append(_file_error(f, f"not UTF-8 text (byte {e.start})"))
                continue
            except OSError as e:
                errors.append(_file_error(f, e.strerror or type(e).__name__))
                continue
            got, errs = parse_stream(text, f)
            objs.extend(got)
            errors.extend(errs)
    return objs, errors
