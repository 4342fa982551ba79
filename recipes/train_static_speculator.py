"""Train the static speculator once on broad data, evaluate it on held-out prompts, and ship it.

    .venv/bin/python recipes/train_static_speculator.py --config recipes/configs/static_speculator.yaml

Steps (the work is done by :func:`atlas_rl.training.static.train_static_speculator`):

1. the broad offline prompt set (``atlas_rl.data.broad_prompts``), split group-wise into train / held-out;
2. every prompt chat-templated with the target's tokenizer (``add_generation_prompt=True``; a prompt's
   ``system`` field becomes the system message);
3. the target answers the training prompts through the engine (self-distillation; no downloads) while the capture
   hook keeps features and soft labels — cached in ``<output_dir>/data`` so a retrain does not regenerate;
4. draft vocabulary, training-time-test training, held-out evaluation (static vs suffix vs none, k=4, T=0/1);
5. ``<output_dir>/static_head.safetensors`` + JSON card, copied to ``ship_to``.

Options: ``--config FILE`` (YAML), then ``key=value`` overrides of any YAML key (values parsed as YAML, e.g.
``epochs=1 fuse_layers=[3,15,28] ship_to=null``); ``--data-only`` stops after step 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from atlas_rl.data.broad_prompts import broad_prompts, split_prompts
from atlas_rl.models import load_target
from atlas_rl.training.static import (
    StaticSpeculatorConfig,
    cached_samples,
    chat_prompt_ids,
    train_static_speculator,
)

RECIPE_KEYS = {
    "model": None,
    "prompt_seed": 0,
    "held_out_fraction": 0.1,
    "split_seed": 0,
    "max_train_prompts": None,
    "max_held_out_prompts": None,
    "ship_to": None,
}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any], bool, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (recipes/configs/static_speculator.yaml)")
    p.add_argument("--data-only", action="store_true", help="stop after generating and caching the training data")
    p.add_argument("overrides", nargs="*", help="key=value overrides of YAML keys (values parsed as YAML)")
    args = p.parse_args(argv)
    values = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.overrides:
        if "=" not in item:
            p.error(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        values[k] = yaml.safe_load(v)
    fields = {f.name for f in dataclasses.fields(StaticSpeculatorConfig)}
    unknown = sorted(set(values) - fields - set(RECIPE_KEYS))
    if unknown:
        p.error(f"unknown config keys {unknown}; valid: {sorted(fields | set(RECIPE_KEYS))}")
    recipe = {k: values.get(k, d) for k, d in RECIPE_KEYS.items()}
    static = {k: v for k, v in values.items() if k in fields}
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "recipes/train_static_speculator.py", *argv])
    return recipe, static, args.data_only, command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    recipe, static, data_only, command = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = StaticSpeculatorConfig(**static)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    model, tokenizer = load_target(recipe["model"])
    prompts = broad_prompts(seed=recipe["prompt_seed"])
    train, held_out = split_prompts(prompts, held_out_fraction=recipe["held_out_fraction"], seed=recipe["split_seed"])
    if recipe["max_train_prompts"] is not None:
        train = train[: recipe["max_train_prompts"]]
    if recipe["max_held_out_prompts"] is not None:
        held_out = held_out[: recipe["max_held_out_prompts"]]
    train_ids = [chat_prompt_ids(tokenizer, p) for p in train]
    held_ids = [chat_prompt_ids(tokenizer, p) for p in held_out]
    print(f"prompts: {len(train_ids)} train, {len(held_ids)} held-out ({len(prompts)} in the set)", flush=True)
    if data_only:
        for temp in cfg.gen_temperatures:
            samples, stats = cached_samples(model, train_ids, cfg, temp, cfg.data_cache_dir)
            print(f"T={temp:g}: {len(samples)} samples, {json.dumps(stats)}", flush=True)
        return 0
    data_info = {
        "prompt_set": f"atlas_rl.data.broad_prompts(seed={recipe['prompt_seed']}), {len(prompts)} prompts",
        "split": f"split_prompts(held_out_fraction={recipe['held_out_fraction']}, seed={recipe['split_seed']}), "
        "group-wise (no template or tool shared with held-out)",
        "chat_template": "tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "held_out_ids": [p["id"] for p in held_out],
    }
    result = train_static_speculator(model, train_ids, held_ids, cfg, data_info=data_info, command=command)
    card = result.card
    if recipe["ship_to"]:
        dst = Path(recipe["ship_to"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.checkpoint, dst)
        shutil.copyfile(result.checkpoint.with_suffix(".json"), dst.with_suffix(".json"))
        print(f"shipped {dst} ({dst.stat().st_size / 1e6:.2f} MB) and {dst.with_suffix('.json')}")
    print(f"checkpoint: {result.checkpoint} ({result.checkpoint.stat().st_size / 1e6:.2f} MB)")
    print(f"timings (s): {json.dumps(card['timings_s'])}, wall incl. loading {time.perf_counter() - t0:.0f} s")
    print(f"draft vocab coverage: {json.dumps(card['draft_vocab'])}")
    ev = card["held_out"]
    for key in (k for k in ev if k.startswith("T=")):
        row = ", ".join(f"{name} {v['mean_acceptance_length']:.3f}" for name, v in ev[key].items())
        print(f"held-out mean acceptance length (k={ev['k']}, {key}): {row}")
    if "greedy_identical_rows" in ev:
        print(f"greedy output with the static head identical to plain decoding: {ev['greedy_identical_rows']} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
