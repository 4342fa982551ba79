"""One strict JSON writer for every file atlas-rl writes (reports, run logs, bench results).

Strict means the output is valid JSON (RFC 8259) that any parser reads: NaN and ±inf become ``null`` (Python's
``json`` would write the bare tokens ``NaN``/``Infinity``), and the values our reports hold are converted on the
way: numpy and torch scalars (and small arrays/tensors) become numbers or lists, dataclasses become objects,
tuples and sets become lists, paths and other objects become strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["dumps", "to_jsonable", "write_json", "append_jsonl"]


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _array_like(x: Any) -> Any:
    """numpy/torch scalars and arrays (duck-typed: neither package is imported here)."""
    if hasattr(x, "tolist") and callable(x.tolist):
        return to_jsonable(x.tolist())
    if hasattr(x, "item") and callable(x.item):
        return to_jsonable(x.item())
    return str(x)


def to_jsonable(x: Any) -> Any:
    """``x`` as plain JSON values (dict, list, str, int, finite float, bool, None); see the module docstring."""
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, int):
        return int(x)  # IntEnum and other int subclasses
    if isinstance(x, float):
        return _number(float(x))
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return _array_like(x)


def dumps(x: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``x`` (``allow_nan=False`` after :func:`to_jsonable`: a bare NaN can never come out)."""
    return json.dumps(to_jsonable(x), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | Path, x: Any, indent: int | None = 1) -> Path:
    """Write ``x`` as strict JSON to ``path`` atomically (a temporary file renamed over the target); creates the
    parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(x, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one strict JSON line to ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(record) + "\n")
