"""Train the static speculator once on broad data, evaluate it on held-out prompts, and ship it.

    .venv/bin/python recipes/train_static_speculator.py --config recipes/configs/static_speculator.yaml

Steps (the work is done by :func:`atlas_rl.training.static.train_static_speculator`):

1. the broad offline prompt set (``atlas_rl.data.broad_prompts``), split group-wise into train / held-out;
2. every prompt chat-templated with the target's tokenizer (``add_generation_prompt=True``; a prompt's
   ``system`` field becomes the system message);
3. the target answers the training prompts through the engine (self-distillation; no downloads) while the capture
   hook keeps features and soft labels — cached in ``<output_dir>/data`` so a retrain does not regenerate;
4. draft vocabulary, training-time-test training, held-out evaluation (static vs suffix vs none, k=4, T=0/1);
5. ``<output_dir>/static_head/`` (the EAGLE-3 directory vLLM loads, card inside), copied to ``ship_to``.

Options (``--help`` lists them): ``--config FILE`` (YAML), then typed flags for any key (``--epochs 1
--fuse_layers 3,15,28``) or ``key=value`` overrides as YAML lines (e.g. ``epochs=1 fuse_layers=[3,15,28]
ship_to=null``); ``--data-only`` stops after step 3 (and the corpus), ``--corpus-only`` only builds the
teacher-forced corpus cache (``corpus_tokens``; resumable). Keys: :class:`RecipeConfig` (target, prompts, shipping) and
:class:`atlas_rl.training.static.StaticSpeculatorConfig` (data, head, training, evaluation). To continue a trained
head (a run cut by ``max_train_minutes``, or the shipped head on your own data) instead of starting afresh:
``init_from=HEAD_DIR teacher_forced_fraction=0 epochs=0.5 lr=3e-4 min_lr_ratio=0.2``.
"""

import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atlas_rl.argparsing import ConfigParser
from atlas_rl.data.broad_prompts import broad_prompts, split_prompts
from atlas_rl.models import load_target
from atlas_rl.training.static import (
    StaticSpeculatorConfig,
    StaticSpeculatorResult,
    cached_samples,
    chat_prompt_ids,
    train_static_speculator,
)
from atlas_rl.training.static_corpus import cached_corpus_samples


@dataclass
class RecipeConfig:
    """The recipe's own keys: which target, which prompts, where the head is shipped."""

    model: str | None = field(
        default=None, metadata={"help": "Target: None = the embedded default; else a local HF directory or hub id."}
    )
    prompt_seed: int = field(default=0, metadata={"help": "atlas_rl.data.broad_prompts(seed)."})
    held_out_fraction: float = field(default=0.1, metadata={"help": "Share of prompt groups held out."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the group-wise train / held-out split."})
    max_train_prompts: int | None = field(default=None, metadata={"help": "None = all training prompts."})
    max_held_out_prompts: int | None = field(default=None, metadata={"help": "None = all held-out prompts."})
    ship_to: str | None = field(default=None, metadata={"help": "Copy the checkpoint + card here; None = do not."})
    data_only: bool = field(default=False, metadata={"help": "Stop after generating and caching the training data."})
    corpus_only: bool = field(
        default=False,
        metadata={"help": "Only build the teacher-forced corpus cache (corpus_tokens, resumable), then stop."},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {self.held_out_fraction}")
        for name in ("max_train_prompts", "max_held_out_prompts"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {v}")


def parse_args(argv: list[str]) -> tuple[RecipeConfig, StaticSpeculatorConfig, str]:
    """The recipe's options, the static speculator config, and the command line (for the card)."""
    parser = ConfigParser(
        [RecipeConfig, StaticSpeculatorConfig], prog="recipes/train_static_speculator.py", description=__doc__
    )
    args = [a for tok in argv for a in (["--set", tok] if "=" in tok and not tok.startswith("-") else [tok])]
    recipe, cfg = parser.parse(args)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "recipes/train_static_speculator.py", *argv])
    return recipe, cfg, command


def _prompt_ids(recipe: RecipeConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], dict]:
    """Token ids of the training and held-out prompts, and how they were chosen (for the card)."""
    prompts = broad_prompts(seed=recipe.prompt_seed)
    train, held_out = split_prompts(prompts, held_out_fraction=recipe.held_out_fraction, seed=recipe.split_seed)
    train = train[: recipe.max_train_prompts] if recipe.max_train_prompts is not None else train
    held_out = held_out[: recipe.max_held_out_prompts] if recipe.max_held_out_prompts is not None else held_out
    print(f"prompts: {len(train)} train, {len(held_out)} held-out ({len(prompts)} in the set)", flush=True)
    data_info = {
        "prompt_set": f"atlas_rl.data.broad_prompts(seed={recipe.prompt_seed}), {len(prompts)} prompts",
        "split": f"split_prompts(held_out_fraction={recipe.held_out_fraction}, seed={recipe.split_seed}), "
        "group-wise (no template or tool shared with held-out)",
        "chat_template": "tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "held_out_ids": [p["id"] for p in held_out],
    }
    return [chat_prompt_ids(tokenizer, p) for p in train], [chat_prompt_ids(tokenizer, p) for p in held_out], data_info


def _ship(result: StaticSpeculatorResult, ship_to: str) -> None:
    dst = Path(ship_to)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(result.checkpoint, dst)
    print(f"shipped {dst}/ ({_megabytes(dst):.2f} MB: config.json, model.safetensors, atlas_card.json)")


def _megabytes(head_dir: Path) -> float:
    """Size of a head directory's files in MB."""
    return sum(f.stat().st_size for f in head_dir.iterdir()) / 1e6


def _print_card(card: dict) -> None:
    print(f"draft vocab coverage: {json.dumps(card['draft_vocab'])}")
    ev = card["held_out"]
    for key in (k for k in ev if k.startswith("T=")):
        row = ", ".join(f"{name} {v['mean_acceptance_length']:.3f}" for name, v in ev[key].items())
        print(f"held-out mean acceptance length (k={ev['k']}, {key}): {row}")
    if "greedy_identical_rows" in ev:
        print(f"greedy output with the static head identical to plain decoding: {ev['greedy_identical_rows']} rows")


def _data_only(recipe: RecipeConfig, cfg: StaticSpeculatorConfig, model, tokenizer) -> None:
    """``--data-only`` / ``--corpus-only``: fill the data caches (self-distillation unless corpus-only, then the
    corpus when ``corpus_tokens > 0``) and stop."""
    if not recipe.corpus_only:
        train_ids, _, _ = _prompt_ids(recipe, tokenizer)
        for temp in cfg.gen_temperatures:
            samples, stats = cached_samples(model, train_ids, cfg, temp, cfg.data_cache_dir)
            print(f"T={temp:g}: {len(samples)} samples, {json.dumps(stats)}", flush=True)
    if cfg.corpus_tokens > 0:
        samples, stats = cached_corpus_samples(model, tokenizer, cfg)
        print(f"corpus: {len(samples)} samples, {json.dumps(stats)}", flush=True)
    elif recipe.corpus_only:
        print("corpus_tokens is 0: no corpus to build", flush=True)


def main(argv: list[str] | None = None) -> int:
    recipe, cfg, command = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_target(recipe.model)
    except (OSError, ValueError) as e:
        print(f"recipes/train_static_speculator.py: error: cannot load model {recipe.model!r}: {e}", file=sys.stderr)
        return 2
    if recipe.corpus_only or recipe.data_only:
        _data_only(recipe, cfg, model, tokenizer)
        return 0
    train_ids, held_ids, data_info = _prompt_ids(recipe, tokenizer)
    result = train_static_speculator(
        model, train_ids, held_ids, cfg, data_info=data_info, command=command, tokenizer=tokenizer
    )
    if recipe.ship_to:
        _ship(result, recipe.ship_to)
    print(f"checkpoint: {result.checkpoint} ({_megabytes(result.checkpoint):.2f} MB)")
    print(f"timings (s): {json.dumps(result.card['timings_s'])}, wall incl. loading {time.perf_counter() - t0:.0f} s")
    _print_card(result.card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
