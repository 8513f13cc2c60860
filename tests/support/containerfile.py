"""The Containerfile read as (INSTRUCTION, arguments) pairs, for the tests that check the image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CONTAINERFILE = Path(__file__).resolve().parents[2] / "Containerfile"


def instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical = ""
    for line in CONTAINERFILE.read_text().splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        word, _, rest = logical.partition(" ")
        yield word.upper(), rest.strip()
        logical = ""
