"""The layering contract covers the whole package: a module left out of it is unchecked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_top_level_module_is_in_a_layer() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    package = ROOT / "kproxy"
    modules = {f"kproxy.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"kproxy.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert sorted(modules - placed) == [], "add these to [tool.importlinter] layers in pyproject.toml"


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support; a test module importing another runs its tests twice
    and ties unrelated files together."""
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from|import) tests(\.\w+)*\.(test_\w+|conftest)\b", line)
    ]
    assert offenders == []
