"""Imports run one way (DESIGN.md): core <- verification / speculators / controller <- rollout <- training <-
trainers <- bench / cli / recipes. Every import of every module is read with ``ast`` (function-level imports
included), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer of a module: the first prefix that matches; a module may import its own layer and those below
LAYERS: list[tuple[str, int]] = [
    ("atlas_rl.types", 0),
    ("atlas_rl.config", 0),
    ("atlas_rl.models", 0),
    ("atlas_rl.jsonio", 0),
    ("atlas_rl.argparsing", 0),
    ("atlas_rl.data", 0),
    ("atlas_rl.verification", 1),
    ("atlas_rl.speculators", 1),
    ("atlas_rl.controller", 1),
    ("atlas_rl.metrics", 1),
    ("atlas_rl.rollout", 2),
    ("atlas_rl.training", 3),
    ("atlas_rl.trainers", 4),
    ("atlas_rl.bench", 5),
    ("atlas_rl.cli", 5),
    ("recipes", 5),
    ("atlas_rl", 0),  # the package's __init__: the public names of the core
]
NAMES = {0: "core", 1: "verification/speculators/controller/metrics", 2: "rollout", 3: "training", 4: "trainers"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] in ("rollout", "trainers"):  # installed as atlas_rl.rollout / atlas_rl.trainers
        parts = ["atlas_rl", *parts]
    return ".".join(parts)


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None  # third-party or stdlib


def _sources() -> list[Path]:
    out = []
    for folder in ("atlas_rl", "rollout", "trainers", "recipes"):
        out += [p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(out)


def _walk_runtime(tree: ast.AST):
    """Every node, except the bodies of ``if TYPE_CHECKING:`` (imports for annotations, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in ast.unparse(test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports at run time, at any depth (``from x import y`` counts
    ``x.y`` too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _violations() -> list[str]:
    bad = []
    for path in _sources():
        own = _layer(_module_name(path))
        for imported in sorted(imports_of(path)):
            layer = _layer(imported)
            if own is not None and layer is not None and layer > own:
                bad.append(f"{path.relative_to(ROOT)} (layer {own}) imports {imported} (layer {layer})")
    return bad


def test_imports_run_one_way_through_the_layers():
    assert _violations() == []


@pytest.mark.parametrize("forbidden", ["atlas_rl.bench", "atlas_rl.cli", "atlas_rl.trainers", "trl"])
def test_engine_and_core_never_import_the_applications_or_trl(forbidden):
    low = [p for p in _sources() if (_layer(_module_name(p)) or 0) <= 3]
    assert len(low) > 20
    offenders = [
        str(p.relative_to(ROOT))
        for p in low
        if any(m == forbidden or m.startswith(forbidden + ".") for m in imports_of(p))
        and not (forbidden == "trl" and _module_name(p) == "atlas_rl.argparsing")  # the one config parser
    ]
    assert offenders == []


def test_layering_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: lazy upward imports inside a function of the engine are found."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "rollout").mkdir()
    probe = tmp_path / "rollout" / "probe.py"
    probe.write_text(
        "if TYPE_CHECKING:\n    from atlas_rl.cli import main\n"
        "def f():\n    from atlas_rl.bench.run import run_bench\n    from ..trainers import runner\n"
    )
    assert _module_name(probe) == "atlas_rl.rollout.probe"
    found = imports_of(probe)
    assert {"atlas_rl.bench.run", "atlas_rl.trainers.runner"} <= found and "atlas_rl.cli" not in found
    assert _layer("atlas_rl.trainers.runner") > _layer("atlas_rl.rollout.probe")
