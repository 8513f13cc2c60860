"""The layering contract covers the whole package: a module left out of it is unchecked."""

from __future__ import annotations

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
