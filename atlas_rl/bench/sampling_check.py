"""Same weights, two samplers: TRL's ``transformers`` generation path vs the atlas engine (T=1, no speculation).

    .venv/bin/python -m atlas_rl.bench.sampling_check --rollouts 3 --out bench_out/sampling_check.json

The GRPO A/B compares learning curves of the two backends; they can only agree if, at the same weights, both
sample the same distribution. This draws ``rollouts`` x (8 arithmetic prompts x 8 generations, 128 tokens) from
each — HF ``generate`` configured exactly as TRL's GRPOTrainer configures it (top_k=0, top_p=1, left padding, the
prompt repeated ``num_generations`` times) and ``RolloutEngine.generate`` — and tests whether the completion-length
distributions differ (Welch t, Mann-Whitney U, Kolmogorov-Smirnov; significance level 0.01), with the reward and
the wall time of each side. Seeds are fixed. Needs scipy (the ``dev`` extra).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from atlas_rl.bench.common import check_options
from atlas_rl.jsonio import dumps, write_json

logger = logging.getLogger(__name__)

SIDES = ("hf", "atlas")


@dataclass
class SamplingCheckOptions:
    """What ``python -m atlas_rl.bench.sampling_check`` draws."""

    model: str | None = field(default=None, metadata={"help": "Target; None = the embedded default."})
    rollouts: int = field(default=3, metadata={"help": "Rollouts of 8 prompts x 8 generations per side."})
    max_new_tokens: int = field(default=128, metadata={"help": "Completion tokens per sample."})
    out: str = field(default="bench_out/sampling_check.json", metadata={"help": "Where the JSON result goes."})

    def __post_init__(self) -> None:
        if self.rollouts < 1 or self.max_new_tokens < 1:
            raise ValueError("rollouts and max_new_tokens must be >= 1")


def _trl_generation_config(tok: Any, eos: list[int], pad: int, max_new_tokens: int):
    """HF generate configured as TRL's GRPOTrainer configures it for the transformers backend."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=tok.bos_token_id,
        disable_compile=True,
    )


def _hf_rollout(model: torch.nn.Module, ids: list[list[int]], gc: Any, pad: int, seed: int) -> tuple[list, float]:
    """One rollout through HF ``generate``: completions (cut after EOS) and seconds."""
    from .workloads import left_pad

    rows = [p for p in ids for _ in range(8)]  # TRL: each prompt repeated num_generations times
    inp, att = left_pad(rows, pad)  # [64, width] each
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        g = model.generate(input_ids=inp, attention_mask=att, generation_config=gc)
    secs = time.perf_counter() - t0
    eos = set(gc.eos_token_id)
    out = []
    for c in g[:, inp.shape[1] :].tolist():
        out.append(c[: next((j + 1 for j, t in enumerate(c) if t in eos), len(c))])
    return out, secs


def _atlas_rollout(engine: Any, ids: list[list[int]], eos: list[int], max_new_tokens: int, seed: int):
    from atlas_rl.types import SamplingParams

    sp = SamplingParams(
        temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, stop_token_ids=tuple(eos), ignore_eos=True
    )
    t0 = time.perf_counter()
    b = engine.generate(ids, sp, num_generations=8)
    return b.completion_ids, time.perf_counter() - t0


def _record(side: dict[str, list[float]], completions: list[list[int]], secs: float, tok: Any, answers: list) -> None:
    from atlas_rl.data.tasks import arithmetic_reward

    side["seconds"].append(secs)
    for i, c in enumerate(completions):
        side["len"].append(len(c))
        side["reward"].append(arithmetic_reward(tok.decode(c, skip_special_tokens=True), answers[i // 8]))


def _summary(out: dict[str, dict[str, list[float]]], max_new_tokens: int) -> dict[str, Any]:
    from scipy import stats as st

    h, a = np.array(out["hf"]["len"]), np.array(out["atlas"]["len"])
    summary = {
        "samples_per_side": len(a),
        "mean_length_hf_atlas": [float(h.mean()), float(a.mean())],
        "std_length_hf_atlas": [float(h.std()), float(a.std())],
        "full_length_share_hf_atlas": [float((h == max_new_tokens).mean()), float((a == max_new_tokens).mean())],
        "mean_reward_hf_atlas": [float(np.mean(out[s]["reward"])) for s in SIDES],
        "rollout_s_hf_atlas": [float(sum(out[s]["seconds"])) for s in SIDES],
        "p_welch": float(st.ttest_ind(h, a, equal_var=False).pvalue),
        "p_mann_whitney": float(st.mannwhitneyu(h, a).pvalue),
        "p_ks": float(st.ks_2samp(h, a).pvalue),
        "significance_level": 0.01,
    }
    summary["distributions_differ"] = min(summary["p_welch"], summary["p_mann_whitney"], summary["p_ks"]) < 0.01
    return summary


def main(argv: list[str] | None = None) -> dict:
    opts = check_options(SamplingCheckOptions, "sampling_check", __doc__, argv, needs_scipy=True)
    from atlas_rl.data.tasks import arithmetic_tasks
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine

    from .workloads import grpo_workload

    model, tok = load_target(opts.model)
    model.eval()
    answers = [t.answer for t in arithmetic_tasks(8, seed=0)]  # the prompts of grpo_workload(seed=0)
    ids = grpo_workload(tok, 8, 8, opts.max_new_tokens, seed=0).prompt_ids  # templated as TRL does (chat_ids)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gc = _trl_generation_config(tok, eos, pad, opts.max_new_tokens)
    out: dict[str, dict[str, list[float]]] = {s: {"len": [], "reward": [], "seconds": []} for s in SIDES}
    engine = RolloutEngine(model, speculators=[])
    for rep in range(opts.rollouts):
        _record(out["hf"], *_hf_rollout(model, ids, gc, pad, 1000 + rep), tok, answers)
        _record(out["atlas"], *_atlas_rollout(engine, ids, eos, opts.max_new_tokens, 1000 + rep), tok, answers)
        logger.info(
            "rollout %d: hf %.0f s, mean length %.1f | atlas %.0f s, mean length %.1f",
            rep,
            out["hf"]["seconds"][-1],
            np.mean(out["hf"]["len"][-64:]),
            out["atlas"]["seconds"][-1],
            np.mean(out["atlas"]["len"][-64:]),
        )
    summary = _summary(out, opts.max_new_tokens)
    logger.info("%s", dumps(summary))
    write_json(opts.out, {"summary": summary, "raw": out})
    return summary


if __name__ == "__main__":
    main()
