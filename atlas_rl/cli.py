"""The ``atlas-rl`` command."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="Compare HF generate, the engine (k=0) and speculation side by side, in one run, as ratios.",
        description="Runs every configuration on the same prompts and seeds, interleaved, and writes "
        "bench.json, bench.md and cost_table.json into --out.",
    )
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    p.add_argument("--workloads", default="grpo,greedy,tail", help="comma list of grpo, greedy, tail")
    p.add_argument("--ks", type=_ints, default=(2, 4, 8), help="fixed draft lengths of the suffix speculator")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions per configuration")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--no-cost-table", action="store_true", help="skip the verification cost table")
    p.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes at most)")
    p.add_argument(
        "--scenario",
        choices=("default", "grid", "drift"),
        default="default",
        help="default: HF generate vs k=0 vs suffix at fixed k; grid: the auto controller vs every speculator at "
        "its best fixed k at 1/4/16/64 active rows; drift: two speculators whose quality drifts over rounds",
    )
    p.add_argument("--batch-sizes", type=_ints, default=None, help="grid: active rows per cell (default 1,4,16,64)")


def _cmd_bench_scenario(args: argparse.Namespace) -> int:
    from atlas_rl.rollout.bench.grid import (
        GridOptions,
        render_drift_markdown,
        render_grid_markdown,
        run_drift,
        run_grid,
    )

    kw: dict = dict(model=args.model, out_dir=args.out, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    if args.ks != (2, 4, 8):  # the default bench's default: the scenarios use their own unless --ks is given
        kw["ks"] = args.ks
    if args.batch_sizes:
        kw["batch_sizes"] = args.batch_sizes
    if args.quick:
        kw.update(max_new_tokens=min(args.max_new_tokens, 32), drift_rows=2, drift_rounds=3)
        kw.setdefault("ks", (1, 2, 4))
        kw.setdefault("batch_sizes", (1, 4, 16))
    try:
        opts = GridOptions(**kw)
    except ValueError as e:
        print(f"atlas-rl bench: {e}", file=sys.stderr)
        return 2
    command = "atlas-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.scenario == "grid":
        report = run_grid(opts, command=command)
        print(render_grid_markdown(report))
    else:
        report = run_drift(opts, command=command)
        print(render_drift_markdown(report))
    print(f"wrote {args.scenario}.json and {args.scenario}.md into {opts.out_dir} ({report['wall_s']:.0f} s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario != "default":
        return _cmd_bench_scenario(args)
    from atlas_rl.rollout.bench.run import BenchOptions, run_bench

    kw: dict = dict(
        model=args.model,
        out_dir=args.out,
        workloads=tuple(w.strip() for w in args.workloads.split(",") if w.strip()),
        ks=args.ks,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        with_hf=not args.no_hf,
        cost_table=not args.no_cost_table,
    )
    if args.quick:
        kw.update(
            max_new_tokens=min(args.max_new_tokens, 32),
            grpo_prompts=2,
            grpo_generations=4,
            greedy_prompts=4,
            cost_rows=(1, 4),
            cost_tokens=(1, 3, 5, 9),
        )
    try:
        opts = BenchOptions(**kw)
    except ValueError as e:
        print(f"atlas-rl bench: {e}", file=sys.stderr)
        return 2
    from atlas_rl.rollout.bench.run import render_markdown

    report = run_bench(opts, command="atlas-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(render_markdown(report))
    print(f"wrote {os.path.join(opts.out_dir, 'bench.json')} and bench.md ({report['wall_s']:.0f} s)")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="Roll out a few GRPO-style groups on the embedded default, with and without speculation."
    )
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--prompts", type=int, default=2, help="prompts (arithmetic word problems)")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)


def _cmd_demo(args: argparse.Namespace) -> int:
    from atlas_rl import SamplingParams
    from atlas_rl.controller import FixedController
    from atlas_rl.data.tasks import arithmetic_reward, arithmetic_tasks
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.rollout.bench.workloads import chat_ids
    from atlas_rl.speculators import SuffixSpeculator

    model, tok = load_target(args.model)
    tasks = arithmetic_tasks(args.prompts, seed=0)
    prompts = [chat_ids(tok, t.messages()) for t in tasks]
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    rows = []
    for name, specs, ctrl in [("no speculation", [], None), ("suffix k=2", [SuffixSpeculator()], FixedController(2))]:
        eng = RolloutEngine(model, speculators=specs, controller=ctrl)
        b = eng.generate(prompts, sp, num_generations=args.generations)
        rewards = [
            arithmetic_reward(tok.decode(c, skip_special_tokens=True), tasks[g].answer)
            for c, g in zip(b.completion_ids, b.group_ids)
        ]
        rows.append((name, b, sum(rewards) / len(rewards)))
    first = rows[0][1]
    print(f"prompt: {tasks[0].prompt}\nsample: {tok.decode(first.completion_ids[0], skip_special_tokens=True)!r}\n")
    for name, b, r in rows:
        s = b.stats
        print(
            f"{name:16s} {s.tokens_per_s:6.1f} tok/s  mean acceptance length {s.mean_acceptance_length:.2f}  "
            f"reward {r:.2f}  ({b.num_completion_tokens} tokens)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-rl", description="Lossless speculative rollouts for RL fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "demo":
        return _cmd_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
