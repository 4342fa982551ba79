"""Held-out mean acceptance length of a draft head per prompt domain (chat, writing, reasoning, arithmetic, code per
language, JSON, tool calls), through the real engine with ``FixedController(k)``.

    python -m atlas_rl.bench.head_domains [--head DIR] [--k 4] [--temperatures 0,1] [--max_new_tokens 128]
                                           [--out docs/results/static_head_domains.md]

The prompts are the held-out split of the broad prompt set (the static head's split: ``broad_prompts(seed=0)``,
``split_prompts(held_out_fraction=0.1, seed=0)``), one ``generate`` call per domain and temperature; ``--head``
defaults to the head shipped for the embedded model. τ = emitted tokens per target forward of a sequence.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class DomainOptions:
    head: str | None = field(default=None, metadata={"help": "Head directory (None: the shipped static head)."})
    k: int = field(default=4, metadata={"help": "Draft tokens per step (FixedController)."})
    temperatures: tuple[float, ...] = field(default=(0.0, 1.0), metadata={"help": "Sampling temperatures."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens per answer."})
    seed: int = field(default=1234, metadata={"help": "Sampling seed (T > 0)."})
    out: str | None = field(default=None, metadata={"help": "Write the markdown table here."})

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_new_tokens < 1:
            raise ValueError("k and max_new_tokens must be >= 1")


def held_out_by_domain(tokenizer: Any) -> dict[str, list[list[int]]]:
    """Chat-templated held-out prompts grouped by their ``category``."""
    from atlas_rl.bench.workloads import chat_ids
    from atlas_rl.data.broad_prompts import broad_prompts, split_prompts

    _, held = split_prompts(broad_prompts(seed=0), held_out_fraction=0.1, seed=0)
    groups: dict[str, list[list[int]]] = defaultdict(list)
    for it in held:
        msgs = [{"role": "system", "content": it["system"]}] if it.get("system") else []
        groups[it["category"]].append(chat_ids(tokenizer, msgs + [{"role": "user", "content": it["prompt"]}]))
    return dict(groups)


def domain_taus(model: Any, head: Any, groups: dict[str, list[list[int]]], opts: DomainOptions) -> dict[str, Any]:
    """``{domain: {"T=<t>": tau, "prompts": n}}`` plus ``"all"`` (token-weighted over the domains)."""
    from atlas_rl import SamplingParams
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator

    rows: dict[str, Any] = {}
    tot: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for dom, prompts in sorted(groups.items()):
        rows[dom] = {"prompts": len(prompts)}
        for t in opts.temperatures:
            sp = SamplingParams(temperature=t, max_new_tokens=opts.max_new_tokens, seed=None if t == 0 else opts.seed)
            spec = DraftHeadSpeculator(head, seed=opts.seed)
            eng = RolloutEngine(model, speculators=[spec], controller=FixedController(opts.k))
            st = eng.generate(prompts, sp).stats
            eng.release()
            key = f"T={t:g}"
            rows[dom][key] = round(st.mean_acceptance_length, 3)
            tot[key][0] += st.num_completion_tokens
            tot[key][1] += st.num_completion_tokens / st.mean_acceptance_length
            logger.info("%-16s %s tau %.3f", dom, key, st.mean_acceptance_length)
    rows["all"] = {"prompts": sum(len(p) for p in groups.values())}
    rows["all"] |= {key: round(a / b, 3) for key, (a, b) in tot.items() if b}
    return rows


def markdown(rows: dict[str, Any], opts: DomainOptions, head_name: str) -> str:
    keys = [f"T={t:g}" for t in opts.temperatures]
    lines = [
        f"# Held-out τ per domain — {head_name}",
        "",
        f"k={opts.k}, {opts.max_new_tokens} new tokens, FixedController, held-out split of the broad prompt set.",
        "",
        "| domain | prompts | " + " | ".join(f"τ {k}" for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for dom, r in rows.items():
        lines.append(f"| {dom} | {r['prompts']} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in keys) + " |")
    cmd = "python -m atlas_rl.bench.head_domains" + (f" --head {opts.head}" if opts.head else "")
    lines += ["", f"Command: `{cmd}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from atlas_rl.argparsing import ConfigParser
    from atlas_rl.models import load_target
    from atlas_rl.speculators.defaults import static_head_path
    from atlas_rl.speculators.draft_head import DraftHead

    opts = ConfigParser([DomainOptions], prog="python -m atlas_rl.bench.head_domains").parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, tok = load_target()
    path = Path(opts.head) if opts.head else static_head_path(model)
    if path is None:
        sys.stderr.write("no head given and none shipped for this model\n")
        return 2
    head = DraftHead.from_pretrained(path, target=model).eval()
    rows = domain_taus(model, head, held_out_by_domain(tok), opts)
    text = markdown(rows, opts, path.name)
    sys.stdout.write(text)
    if opts.out:
        Path(opts.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
