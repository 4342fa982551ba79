"""Draft-vocabulary coverage of the held-out completions vs the draft vocabulary size, for a given training data mix.

    .venv/bin/python recipes/static_vocab_coverage.py --selfdistill /work/cache/static_v3/selfdistill \
        --corpus /work/cache/static_v3/corpus --sizes 8192 12288 16384 24576 32768

The held-out completions are the target's greedy answers (128 tokens, plain decoding through the engine) to the
held-out split of the broad prompt set (as the recipe's evaluation; cached in ``--completions``). The vocabulary is
built from each data mix as stage 2 of the recipe does (:func:`atlas_rl.training.static_vocab.build_draft_vocab`):
self-distilled samples alone, the corpus alone, and both. Prints a markdown table.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from atlas_rl.data.broad_prompts import broad_prompts, split_prompts
from atlas_rl.models import load_target
from atlas_rl.training.static_corpus import load_corpus_samples
from atlas_rl.training.static_data import chat_prompt_ids, load_samples
from atlas_rl.training.static_vocab import coverage_curve


def held_out_completions(model, tokenizer, path: Path, max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of the held-out prompts (cached as JSON in ``path``)."""
    if path.is_file():
        return json.loads(path.read_text())
    from atlas_rl import SamplingParams
    from atlas_rl.rollout import RolloutEngine

    _, held = split_prompts(broad_prompts(seed=0), held_out_fraction=0.1, seed=0)
    ids = [chat_prompt_ids(tokenizer, p) for p in held]
    engine = RolloutEngine(model, speculators=[])
    try:
        batch = engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    finally:
        engine.release()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(batch.completion_ids))
    return batch.completion_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selfdistill", help="directory of samples_T*.safetensors (self-distilled data)")
    ap.add_argument("--corpus", help="corpus cache directory (load_corpus_samples)")
    ap.add_argument("--corpus-tokens", type=int, default=None, help="use this prefix of the corpus")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 12288, 16384, 24576, 32768])
    ap.add_argument("--completions", default="runs/held_out_completions_T0_128.json")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    model, tokenizer = load_target()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    held = held_out_completions(model, tokenizer, Path(args.completions), args.max_new_tokens)
    print(f"held-out completions: {len(held)} rows, {sum(map(len, held))} tokens", flush=True)
    mixes = {}
    if args.selfdistill:
        sd = [s for p in sorted(Path(args.selfdistill).glob("samples_T*.safetensors")) for s in load_samples(p)[0]]
        mixes["self-distilled"] = sd
    if args.corpus:
        corpus = load_corpus_samples(args.corpus, args.corpus_tokens)
        mixes["corpus"] = corpus
        if args.selfdistill:
            mixes["self-distilled + corpus"] = mixes["self-distilled"] + corpus
    print("| training data | labelled tokens | " + " | ".join(str(n) for n in args.sizes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.sizes) + " |")
    for name, samples in mixes.items():
        curve = coverage_curve(samples, vocab, args.sizes, held)
        labels = sum(s.num_labels for s in samples)
        print(f"| {name} | {labels} | " + " | ".join(f"{100 * curve[n]:.2f}%" for n in args.sizes) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
