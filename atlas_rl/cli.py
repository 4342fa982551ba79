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


def _cmd_bench(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-rl", description="Lossless speculative rollouts for RL fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "bench":
        return _cmd_bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
