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

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    try:
        from scipy import stats as st
    except ImportError as e:  # a dev tool: scipy comes with the dev extra
        raise SystemExit("sampling_check needs scipy: pip install -e '.[dev]'") from e
    from transformers import GenerationConfig

    from atlas_rl.data.tasks import arithmetic_reward, arithmetic_tasks
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.types import SamplingParams

    from .workloads import grpo_workload, left_pad

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target (default: the embedded default)")
    p.add_argument("--rollouts", type=int, default=3, help="rollouts of 8 prompts x 8 generations per side")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="bench_out/sampling_check.json")
    args = p.parse_args(argv)
    if args.rollouts < 1 or args.max_new_tokens < 1:
        p.error("--rollouts and --max-new-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    model, tok = load_target(args.model)
    model.eval()
    tasks = arithmetic_tasks(8, seed=0)  # the prompts of grpo_workload(seed=0), for their answers
    ids = grpo_workload(tok, 8, 8, args.max_new_tokens, seed=0).prompt_ids  # templated as TRL does (chat_ids)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gc = GenerationConfig(  # as TRL's GRPOTrainer builds it for the transformers backend
        max_new_tokens=args.max_new_tokens,
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
    out: dict[str, dict[str, list[float]]] = {s: {"len": [], "reward": [], "seconds": []} for s in ("hf", "atlas")}
    engine = RolloutEngine(model, speculators=[])
    for rep in range(args.rollouts):
        rows = [p_ for p_ in ids for _ in range(8)]  # TRL: each prompt repeated num_generations times
        inp, att = left_pad(rows, pad)  # [64, width] each
        width = inp.shape[1]
        torch.manual_seed(1000 + rep)
        t0 = time.perf_counter()
        with torch.no_grad():
            g = model.generate(input_ids=inp, attention_mask=att, generation_config=gc)
        out["hf"]["seconds"].append(time.perf_counter() - t0)
        for i, c in enumerate(g[:, width:].tolist()):
            n = next((j + 1 for j, t in enumerate(c) if t in eos), len(c))
            out["hf"]["len"].append(n)
            text = tok.decode(c[:n], skip_special_tokens=True)
            out["hf"]["reward"].append(arithmetic_reward(text, tasks[i // 8].answer))
        sp = SamplingParams(
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            seed=1000 + rep,
            stop_token_ids=tuple(eos),
            ignore_eos=True,
        )
        t0 = time.perf_counter()
        b = engine.generate(ids, sp, num_generations=8)
        out["atlas"]["seconds"].append(time.perf_counter() - t0)
        for i, c in enumerate(b.completion_ids):
            out["atlas"]["len"].append(len(c))
            text = tok.decode(c, skip_special_tokens=True)
            out["atlas"]["reward"].append(arithmetic_reward(text, tasks[i // 8].answer))
        logger.info(
            "rollout %d: hf %.0f s, mean length %.1f | atlas %.0f s, mean length %.1f",
            rep,
            out["hf"]["seconds"][-1],
            np.mean(out["hf"]["len"][-64:]),
            out["atlas"]["seconds"][-1],
            np.mean(out["atlas"]["len"][-64:]),
        )
    h, a = np.array(out["hf"]["len"]), np.array(out["atlas"]["len"])
    summary = {
        "samples_per_side": len(a),
        "mean_length_hf_atlas": [float(h.mean()), float(a.mean())],
        "std_length_hf_atlas": [float(h.std()), float(a.std())],
        "full_length_share_hf_atlas": [
            float((h == args.max_new_tokens).mean()),
            float((a == args.max_new_tokens).mean()),
        ],
        "mean_reward_hf_atlas": [float(np.mean(out["hf"]["reward"])), float(np.mean(out["atlas"]["reward"]))],
        "rollout_s_hf_atlas": [float(sum(out["hf"]["seconds"])), float(sum(out["atlas"]["seconds"]))],
        "p_welch": float(st.ttest_ind(h, a, equal_var=False).pvalue),
        "p_mann_whitney": float(st.mannwhitneyu(h, a).pvalue),
        "p_ks": float(st.ks_2samp(h, a).pvalue),
        "significance_level": 0.01,
    }
    summary["distributions_differ"] = min(summary["p_welch"], summary["p_mann_whitney"], summary["p_ks"]) < 0.01
    logger.info("%s", json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "raw": out}, indent=1))
    return summary


if __name__ == "__main__":
    main()
