"""On-policy check at full size: the engine's logprobs of its sampled tokens vs the model's own forward.

One GRPO-shaped rollout (8 arithmetic prompts of different lengths x 8 samples, T=1, 128 tokens) through the
engine, then one plain forward of the model over the left-padded prompt+completion sequences (how TRL
recomputes them); prints the largest absolute difference of the sampled tokens' logprobs. The unit tests check
this on a tiny model; this is the same check on the real target at the shape of the GRPO runs.

    python -m atlas_rl.bench.logprob_check [--model DIR] [--seed 7]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from atlas_rl.bench.common import check_options
from atlas_rl.jsonio import dumps

logger = logging.getLogger(__name__)


@dataclass
class LogprobCheckOptions:
    model: str | None = field(default=None, metadata={"help": "Target; None = the embedded default."})
    seed: int = field(default=7, metadata={"help": "Sampling seed of the rollout."})
    max_new_tokens: int = field(default=128, metadata={"help": "Completion tokens per sample."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.types import SamplingParams

    from .workloads import grpo_workload, left_pad

    args = check_options(LogprobCheckOptions, "logprob_check", __doc__, argv)
    model, tok = load_target(args.model)
    model.eval()
    ids = grpo_workload(tok, 8, 8, args.max_new_tokens, seed=0).prompt_ids
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    engine = RolloutEngine(model, speculators=[], eos_token_ids=eos)
    sp = SamplingParams(
        temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed, stop_token_ids=tuple(eos), ignore_eos=True
    )
    batch = engine.generate(ids, sp, num_generations=8)
    rows = [p_ for p_ in ids for _ in range(8)]  # TRL's order: each prompt repeated num_generations times
    seqs = [r + c for r, c in zip(rows, batch.completion_ids)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    inp, att = left_pad(seqs, pad)  # [64, width] each
    width = inp.shape[1]
    worst, tokens = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(seqs), 16):
            logp = torch.log_softmax(model(input_ids=inp[lo : lo + 16], attention_mask=att[lo : lo + 16]).logits, -1)
            for j in range(logp.shape[0]):
                comp = batch.completion_ids[lo + j]
                n = len(comp)
                ref = logp[j, width - n - 1 : width - 1].gather(-1, torch.tensor(comp)[:, None])[:, 0]  # [n]
                diff = (ref - torch.tensor(batch.logprobs[lo + j], dtype=ref.dtype)).abs().max().item()
                worst, tokens = max(worst, diff), tokens + n
    out = {
        "rows": len(seqs),
        "distinct_prompt_lengths": len(set(map(len, ids))),
        "sampled_tokens": tokens,
        "max_abs_logprob_diff": worst,
        "within_1e-4": worst <= 1e-4,
    }
    logger.info("%s", dumps(out))
    return out


if __name__ == "__main__":
    main()
