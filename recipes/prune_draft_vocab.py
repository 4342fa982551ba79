"""Keep the ``N`` most frequent tokens of a trained head's draft vocabulary and re-measure it on the held-out split.

    .venv/bin/python recipes/prune_draft_vocab.py HEAD_DIR N [--out DIR] [--data_dir D --corpus_dir C]

``draft_to_target`` of a static head is ranked most frequent first, so the first ``N`` rows (output rows and ids)
are the head with a smaller vocabulary: nothing else changes. The card's draft vocabulary, head size and held-out
figures are re-measured (same evaluation settings as the card's config) and the pruning is recorded in the card.
Used to keep the shipped head's largest tensor (the output rows) under 20 MiB.
"""

import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from atlas_rl.models import load_target
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.static_card import completion_tokens, coverage_section
from atlas_rl.training.static_eval import evaluate_acceptance


def pruned(head: DraftHead, n: int) -> DraftHead:
    """``head`` with the first ``n`` draft tokens (its most frequent)."""
    from dataclasses import replace

    out = DraftHead(replace(head.config, draft_vocab_size=n), draft_to_target=head.draft_to_target[:n].cpu())
    sd = head.state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"][:n]
    sd["draft_to_target"] = sd["draft_to_target"][:n]
    out.load_state_dict(sd)
    out.lm_head_ready = True
    return out


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="prune_draft_vocab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("head")
    p.add_argument("n", type=int)
    p.add_argument("--out", default=None)
    p.add_argument("--data_dir", default=None, help="self-distilled cache (train coverage); optional")
    p.add_argument("--corpus_dir", default=None, help="corpus cache (train coverage); optional")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, tok = load_target()
    src = Path(a.head)
    card = DraftHead.read_card(src)
    head = DraftHead.from_pretrained(src, target=model)
    if not 0 < a.n <= head.config.draft_vocab_size:
        p.error(f"n must lie in (0, {head.config.draft_vocab_size}]")
    small = pruned(head, a.n).bind_target(model).eval()
    cfg = card["config"]
    from atlas_rl.bench.head_domains import held_out_by_domain

    prompts = [q for qs in held_out_by_domain(tok).values() for q in qs]
    ev = evaluate_acceptance(
        model, small, prompts, k=cfg["eval_k"], temperatures=cfg["eval_temperatures"],
        max_new_tokens=cfg["eval_max_new_tokens"], baselines=cfg["eval_baselines"], seed=cfg["eval_seed"],
        none_temperatures=cfg["eval_none_temperatures"],
    )  # fmt: skip
    held = [c for runs in ev.pop("completions").values() for c in (runs.get("none") or runs.get("static") or [])]
    train: list[list[int]] = []
    if a.data_dir or a.corpus_dir:
        from atlas_rl.training.static_corpus import load_training_samples

        train = completion_tokens(load_training_samples(a.data_dir, a.corpus_dir))
    cov = coverage_section(small.draft_to_target, train or [[0]], held)
    if not train:
        cov["train_completion_coverage"] = None
    card["pruned_from"] = {
        "draft_vocab_size": head.config.draft_vocab_size,
        "held_out": card["held_out"],
        "draft_vocab": card["draft_vocab"],
        "command": shlex.join(["recipes/prune_draft_vocab.py", *argv]),
    }
    card["held_out"], card["draft_vocab"] = ev, cov
    card["head"]["draft_vocab_size"] = a.n
    card["head"]["stored_parameters"] = sum(v.numel() for k, v in small.state_dict().items() if k != "draft_to_target")
    small.save_pretrained(Path(a.out or src), dtype=torch.float16, card=card)
    summary = {k: ev[k]["static"] for k in ev if k.startswith("T=")}
    summary |= {"draft_vocab": cov, "greedy_identical_rows": ev.get("greedy_identical_rows")}
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
