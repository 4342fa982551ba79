"""Reading a run directory: ``run.json`` (what ran), ``metrics.jsonl`` (one JSON object per logged step) and
``rollouts.jsonl`` (per logged step, the last rollout's decode steps; optional).

The one reader behind ``atlas-rl report`` (:mod:`atlas_rl.metrics.report`) and the GRPO A/B comparison
(:mod:`atlas_rl.bench.grpo_ab`); the files are written by :class:`atlas_rl.trainers.recorder.RunRecorder`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "RunLogError", "is_training_step", "read_run", "read_traces", "series"]


class RunLogError(ValueError):
    """A run directory that cannot be read (missing, not a directory, no or malformed ``metrics.jsonl``)."""


@dataclass
class RunLog:
    """A run directory's metadata and its training-step records, in logging order."""

    directory: Path
    meta: dict[str, Any]
    steps: list[dict[str, Any]]
    traces: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # step -> rows, query_len, segments


def is_training_step(rec: dict[str, Any]) -> bool:
    """A TRL log entry of an optimizer step (not the end-of-training summary, which carries ``train_runtime``)."""
    if "train_runtime" in rec:
        return False
    return "step" in rec and ("loss" in rec or "reward" in rec or any(k.startswith("atlas/") for k in rec))


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RunLogError(f"{path}:{n} is not valid JSON: {e}") from e
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunLogError(f"{path} is not valid JSON: {e}") from e


def read_run(run_dir: str | Path) -> RunLog:
    """The run in ``run_dir``; :class:`RunLogError` says what is wrong with a directory that is not a run."""
    d = Path(run_dir)
    if not d.exists():
        raise RunLogError(f"run directory {d} does not exist")
    if not d.is_dir():
        raise RunLogError(f"{d} is not a directory")
    mfile = d / "metrics.jsonl"
    if not mfile.exists():
        raise RunLogError(f"{d} has no metrics.jsonl: is it a run directory written by atlas-rl demo or a recipe?")
    steps = [rec for rec in _read_json_lines(mfile) if is_training_step(rec)]
    if not steps:
        raise RunLogError(f"{mfile} holds no training-step metrics (the run logged nothing yet)")
    return RunLog(d, _read_meta(d / "run.json"), steps, read_traces(d / "rollouts.jsonl"))


def read_traces(path: Path) -> dict[int, dict[str, list[int]]]:
    """step -> that step's rollout decode steps (``rows``, ``query_len``, and ``segments``: decode steps per engine
    call, e.g. the two interleaved halves of a paired step); {} when the run recorded none."""
    out: dict[int, dict[str, list[int]]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a trace cut short by an interrupted run: the report still renders
        if isinstance(rec, dict) and "step" in rec:
            rows = list(rec.get("rows", []))
            out[int(rec["step"])] = {
                "rows": rows,
                "query_len": list(rec.get("query_len", [])),
                "segments": list(rec.get("segments") or _restarts(rows)),
            }
    return out


def _restarts(rows: list[int]) -> list[int]:
    """Decode steps per engine call of a trace recorded without ``segments``: a call starts where rows grow."""
    cuts = [0] + [i for i in range(1, len(rows)) if rows[i] > rows[i - 1]] + [len(rows)]
    return [b - a for a, b in zip(cuts, cuts[1:]) if b > a]


def series(steps: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of every step as floats; NaN where a step lacks it (or holds null / a non-number)."""
    out = []
    for s in steps:
        v = s.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out
