"""The strict JSON writer: valid JSON whatever a report holds; one metrics.jsonl reader."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from atlas_rl.jsonio import append_jsonl, dumps, write_json
from atlas_rl.metrics.runlog import RunLogError, read_run, series


def _strict_load(text: str):
    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


@dataclass
class _Point:
    x: float
    where: Path


def test_dumps_writes_null_for_nan_and_inf_at_any_depth():
    text = dumps({"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, math.nan)})
    assert _strict_load(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, None]}


def test_dumps_converts_numpy_torch_dataclasses_and_paths():
    x = {
        "np_float": np.float32(1.5),
        "np_nan": np.float64("nan"),
        "np_int": np.int64(3),
        "np_array": np.array([1.0, np.nan]),
        "torch_scalar": torch.tensor(2.5),
        "torch_vec": torch.tensor([1, 2]),
        "point": _Point(math.inf, Path("/tmp/x")),
        "set": {4},
    }
    assert _strict_load(dumps(x)) == {
        "np_float": 1.5,
        "np_nan": None,
        "np_int": 3,
        "np_array": [1.0, None],
        "torch_scalar": 2.5,
        "torch_vec": [1, 2],
        "point": {"x": None, "where": "/tmp/x"},
        "set": [4],
    }


def test_write_json_and_append_jsonl_produce_strict_files(tmp_path):
    path = write_json(tmp_path / "r.json", {"loss": math.nan})
    assert _strict_load(path.read_text()) == {"loss": None}
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed over the target
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1, "loss": math.inf})
    append_jsonl(log, {"step": 2, "loss": 0.5})
    assert [_strict_load(line) for line in log.read_text().splitlines()] == [
        {"step": 1, "loss": None},
        {"step": 2, "loss": 0.5},
    ]


def test_read_run_keeps_training_steps_and_drops_the_final_summary(tmp_path):
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 1, "loss": 0.1, "reward": 0.5})
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 2, "loss": 0.2, "atlas/mean_acceptance_length": 1.5})
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 2, "train_runtime": 9.0, "atlas/policy_version": 0.5})
    write_json(tmp_path / "run.json", {"model": "tiny"})
    run = read_run(tmp_path)
    assert [s["step"] for s in run.steps] == [1, 2] and run.meta == {"model": "tiny"}
    assert series(run.steps, "reward")[0] == 0.5 and math.isnan(series(run.steps, "reward")[1])


def test_read_run_names_the_broken_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n{broken\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_run(tmp_path)
