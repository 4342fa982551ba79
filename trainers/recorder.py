"""``RunRecorder``: writes a run directory (``run.json`` + ``metrics.jsonl``, and ``rollouts.jsonl`` when a backend
is attached: per logged step, the last rollout's decode steps as active rows and tokens per row, 1 = speculation
off) that ``atlas-rl report`` reads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from atlas_rl.jsonio import append_jsonl, write_json


class RunRecorder(TrainerCallback):
    """Appends every TRL log entry (with its step) to ``RUN_DIR/metrics.jsonl``; ``run.json`` says what ran."""

    def __init__(self, run_dir: str | Path, meta: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.meta = dict(meta or {})
        self._t0 = time.time()
        self.backend: Any = None  # an AtlasRolloutBackend: its last rollout's decode steps go to rollouts.jsonl

    def _write_trace(self, step: int) -> None:
        stats = getattr(self.backend, "last_stats", None)
        if stats is None or not stats.steps:
            return
        rec = {
            "step": step,
            "rows": [s.num_rows for s in stats.steps],
            "query_len": [s.query_len for s in stats.steps],
            "segments": list(getattr(self.backend, "last_segments", [])),  # decode steps per engine call, in order
        }
        append_jsonl(self.run_dir / "rollouts.jsonl", rec)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if state.is_world_process_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.meta}
            for k in ("generation_backend", "atlas_speculators", "atlas_controller", "atlas_num_speculative_tokens"):
                if hasattr(args, k):
                    meta.setdefault(k, getattr(args, k))
            for k in (
                "num_generations",
                "max_completion_length",
                "temperature",
                "learning_rate",
                "max_steps",
                "per_device_train_batch_size",
            ):
                if hasattr(args, k):
                    meta.setdefault(k, getattr(args, k))
            write_json(self.run_dir / "run.json", meta)
            (self.run_dir / "metrics.jsonl").write_text("")
            (self.run_dir / "rollouts.jsonl").write_text("")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and logs:
            rec = {"step": state.global_step, "time_s": time.time() - self._t0}
            rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str)) or v is None})
            append_jsonl(self.run_dir / "metrics.jsonl", rec)
            if "loss" in logs:
                self._write_trace(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            path = self.run_dir / "run.json"
            meta = json.loads(path.read_text()) if path.exists() else {}
            meta["wall_s"] = time.time() - self._t0
            meta["global_steps"] = state.global_step
            write_json(path, meta)
        return control
