"""Every function in library code (atlas_rl/, rollout/, trainers/) is at most 60 lines long (issue 12).

Length counts the ``def`` line through the last line of the body, docstring included, decorators excluded; a
nested function counts inside its parent and on its own. Functions still being cut down are named in
``length_allowlist.txt`` beside this file (one ``path::Qualified.name`` a line); the list may only shrink: an entry
whose function is now short enough (or gone) fails the test too, so it is deleted when the function is fixed.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 60
REPO = Path(__file__).resolve().parents[2]
LIBRARY_ROOTS = ("atlas_rl", "rollout", "trainers")
ALLOWLIST = Path(__file__).with_name("length_allowlist.txt")


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """``(qualified name, length in lines)`` of every function under ``tree``, nested ones included."""
    found: list[tuple[str, int]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            found.append((name, node.end_lineno - node.lineno + 1))
            found.extend(_functions(node, name + "."))
        elif isinstance(node, ast.ClassDef):
            found.extend(_functions(node, prefix + node.name + "."))
        else:
            found.extend(_functions(node, prefix))
    return found


def long_functions(repo: Path = REPO, max_lines: int = MAX_LINES) -> dict[str, int]:
    """``{"path::qualname": lines}`` for every library function longer than ``max_lines``."""
    out: dict[str, int] = {}
    for root in LIBRARY_ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            for name, lines in _functions(ast.parse(path.read_text(encoding="utf-8"))):
                if lines > max_lines:
                    out[f"{rel}::{name}"] = lines
    return out


def _allowlist() -> set[str]:
    lines = ALLOWLIST.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_library_functions_at_most_60_lines_outside_allowlist() -> None:
    offenders = {key: n for key, n in long_functions().items() if key not in _allowlist()}
    listing = "\n".join(f"  {key}: {n} lines" for key, n in sorted(offenders.items()))
    assert not offenders, f"functions longer than {MAX_LINES} lines (cut them into named steps):\n{listing}"


def test_allowlist_names_only_functions_still_too_long() -> None:
    stale = sorted(_allowlist() - set(long_functions()))
    assert not stale, "now short enough or gone; delete from length_allowlist.txt:\n  " + "\n  ".join(stale)


def test_long_function_detected_when_nested_in_class(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    (tmp_path / "atlas_rl").mkdir()
    source = f"class A:\n    def f(self):\n{body}\n\n    def g(self):\n        pass\n"
    (tmp_path / "atlas_rl" / "m.py").write_text(source)
    assert long_functions(tmp_path) == {"atlas_rl/m.py::A.f": 61}
