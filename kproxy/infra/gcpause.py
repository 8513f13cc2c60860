"""Holding the cyclic garbage collector off during batch work, shared by every batch.

Parsing a list page, building a view and rendering a full ruleset each allocate hundreds
of thousands of fresh objects and no reference cycles; with the collector on, they set
off pass after pass over a growing heap (a third or more of the time, measured in
bench/). Reference counting still frees everything. Pauses nest and may overlap across
threads (watch threads parse while the sync thread renders): the collector comes back
only when the last pause ends, and only if it was on before the first.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_restore = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()
