"""Is speculation on-policy on a real model? Plain decoding (k=0) and speculating engines sample the same prompts at
T=1 many times; their samples must come from one distribution.

    .venv/bin/python -m atlas_rl.bench.onpolicy_check --rounds 4 --out bench_out/onpolicy_check.json

The unit tests check the rejection sampler against a reference and a chi-square on small vocabularies; this checks
the whole stack the user runs (the embedded model, its shipped static head, the suffix index, the auto controller,
the CPU kernels) on the demo's arithmetic prompts. Per completion: the mean logprob of its tokens (a sampler biased
toward drafts — the tokens a draft head favours — raises it), its length and whether it states its answer on a line
of its own (the demo's format reward). Per speculating engine against k=0: two-sided Mann-Whitney U and
Kolmogorov-Smirnov tests of the first two (significance level 0.01). Seeds are fixed; every call samples one prompt
``generations`` times (few rows: where the controller speculates most). Needs scipy (the ``dev`` extra).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atlas_rl.bench.common import check_options
from atlas_rl.jsonio import dumps, write_json

logger = logging.getLogger(__name__)

SIGNIFICANCE = 0.01
STATS = ("mean_logprob", "length")


@dataclass
class OnPolicyCheckOptions:
    """What ``python -m atlas_rl.bench.onpolicy_check`` samples."""

    model: str | None = field(default=None, metadata={"help": "Target; None = the embedded default."})
    tiny: bool = field(default=False, metadata={"help": "A tiny random model (tests; no static head ships for it)."})
    rounds: int = field(default=4, metadata={"help": "Rounds over the prompts per engine (interleaved)."})
    prompts: int = field(default=8, metadata={"help": "Arithmetic prompts (the demo's task, seed 0)."})
    generations: int = field(default=4, metadata={"help": "Samples per prompt and call."})
    max_new_tokens: int = field(default=96, metadata={"help": "Completion tokens per sample."})
    out: str = field(default="bench_out/onpolicy_check.json", metadata={"help": "Where the JSON result goes."})

    def __post_init__(self) -> None:
        for name in ("rounds", "prompts", "generations", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def sample_stats(engine: Any, prompts: list[list[int]], generations: int, max_new_tokens: int, seed: int) -> dict:
    """One round: every prompt sampled ``generations`` times at T=1 (one call per prompt); per completion its mean
    token logprob, its length and its token ids, and the round's mean acceptance length."""
    from atlas_rl.types import SamplingParams

    out: dict[str, list] = {"mean_logprob": [], "length": [], "completions": [], "tau": []}
    for j, p in enumerate(prompts):
        sp = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + j)
        batch = engine.generate([p], sp, num_generations=generations)
        out["tau"].append(batch.stats.mean_acceptance_length)
        for c, lp in zip(batch.completion_ids, batch.logprobs):
            out["mean_logprob"].append(float(np.mean(lp)) if lp else 0.0)
            out["length"].append(len(c))
            out["completions"].append(c)
    return out


def compare(a: dict[str, list], b: dict[str, list]) -> dict[str, Any]:
    """Two-sided Mann-Whitney U and KS p-values of each statistic of ``a`` against ``b``; ``differ``: any p under
    :data:`SIGNIFICANCE`."""
    from scipy import stats as st

    out: dict[str, Any] = {}
    for s in STATS:
        out[f"{s}_p_mann_whitney"] = float(st.mannwhitneyu(a[s], b[s]).pvalue)
        out[f"{s}_p_ks"] = float(st.ks_2samp(a[s], b[s]).pvalue)
    out["differ"] = min(out.values()) < SIGNIFICANCE
    return out


def _engines(model: Any, eos: list[int], static: bool) -> dict[str, Callable[[], Any]]:
    from atlas_rl.config import EngineConfig
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.rollout.build import build_speculators
    from atlas_rl.speculators.defaults import default_speculators

    out = {"k0": lambda: RolloutEngine(model, eos_token_ids=eos, config=EngineConfig(num_speculative_tokens=0))}
    if static:  # the most drafting there is: the shipped head asked for four tokens at every step
        out["static_k4"] = lambda: RolloutEngine(
            model,
            speculators=build_speculators(model, ["static"]).speculators,
            eos_token_ids=eos,
            controller=FixedController(4, "static"),
            config=EngineConfig(controller="fixed", num_speculative_tokens=4),
        )
    out["default"] = lambda: RolloutEngine(model, speculators=default_speculators(model), eos_token_ids=eos)
    return out


def _load(opts: OnPolicyCheckOptions) -> tuple[Any, Any, list[list[int]], bool]:
    """``(model, tokenizer, prompt ids, whether a static head ships for it)``."""
    from atlas_rl.data.tasks import arithmetic_tasks
    from atlas_rl.models import load_target, tiny_llama, tiny_token_ids, tiny_tokenizer
    from atlas_rl.speculators.defaults import static_head_path

    from .workloads import chat_ids

    if opts.tiny:
        tok = tiny_tokenizer()
        model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok))
    else:
        model, tok = load_target(opts.model)
    model.eval()
    tasks = arithmetic_tasks(opts.prompts, seed=0)
    prompts = [chat_ids(tok, t.messages()) for t in tasks]
    return model, tok, prompts, static_head_path(model) is not None


def _answer_lines(d: dict[str, list], tok: Any) -> tuple[int, int]:
    """``(completions that state their answer on a line of its own, the others)``: the demo's format reward."""
    from atlas_rl.data.tasks import format_reward

    hits = int(sum(format_reward(tok.decode(c, skip_special_tokens=True)) for c in d["completions"]))
    return hits, len(d["completions"]) - hits


def _summary(raw: dict[str, dict[str, list]], tok: Any) -> dict[str, Any]:
    from scipy import stats as st

    summary: dict[str, Any] = {"significance_level": SIGNIFICANCE}
    base = _answer_lines(raw["k0"], tok)
    for name, d in raw.items():
        lines = _answer_lines(d, tok)
        row = {
            "samples": len(d["length"]),
            "mean_logprob": float(np.mean(d["mean_logprob"])),
            "mean_length": float(np.mean(d["length"])),
            "answer_line_rate": lines[0] / max(1, len(d["completions"])),
            "tau": float(np.mean(d["tau"])),
            "seconds": float(sum(d["seconds"])),
        }
        if name != "k0":
            row |= compare(d, raw["k0"])
            row["answer_line_p_fisher"] = float(st.fisher_exact([list(lines), list(base)]).pvalue)
            row["differ"] = row["differ"] or row["answer_line_p_fisher"] < SIGNIFICANCE
        summary[name] = row
    return summary


def run(opts: OnPolicyCheckOptions) -> dict[str, Any]:
    """Sample every engine ``rounds`` times (interleaved, seeds fixed) and compare each with k=0."""
    model, tok, prompts, static = _load(opts)
    eos = [t for t in [tok.eos_token_id] if t is not None]
    engines = {name: make() for name, make in _engines(model, eos, static).items()}
    keys = ("mean_logprob", "length", "completions", "tau", "seconds")
    raw: dict[str, dict[str, list]] = {n: {k: [] for k in keys} for n in engines}
    for r in range(opts.rounds):
        for e, (name, eng) in enumerate(engines.items()):
            t0 = time.perf_counter()
            # seeds of their own per engine: a shared seed draws the same first token everywhere (correlated samples)
            seed = 1_000_000 * (e + 1) + 1000 * r
            got = sample_stats(eng, prompts, opts.generations, opts.max_new_tokens, seed)
            raw[name]["seconds"].append(time.perf_counter() - t0)
            for key, values in got.items():
                raw[name][key].extend(values)
        logger.info("round %d of %d done", r + 1, opts.rounds)
    summary = _summary(raw, tok)
    write_json(opts.out, {"summary": summary, "options": vars(opts)})
    return summary


def main(argv: list[str] | None = None) -> dict:
    opts = check_options(OnPolicyCheckOptions, "onpolicy_check", __doc__, argv, needs_scipy=True)
    summary = run(opts)
    logger.info("%s", dumps(summary))
    return summary


if __name__ == "__main__":
    main()
