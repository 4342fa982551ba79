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
    p.add_argument("--no-stack", action="store_true", help="skip the static/full-stack configurations")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM even when it is available")
    p.add_argument("--vllm-python", default=None, help="Python with vLLM (default: .venv-vllm/bin/python if present)")
    p.add_argument(
        "--scenario",
        choices=("default", "grid", "drift", "controller-drift"),
        default="default",
        help="default: HF generate vs k=0 vs suffix at fixed k; grid: the auto controller vs every speculator at "
        "its best fixed k at 1/4/16/64 active rows; drift: the policy fine-tuned Python -> C over versions, "
        "static / suffix / adaptive / all three per version, the adaptive head retrained in between; "
        "controller-drift: two synthetic speculators whose quality drifts over rounds",
    )
    p.add_argument(
        "--speculators",
        default=None,
        help="grid: comma list, e.g. suffix,static (default: suffix + static if shipped)",
    )
    p.add_argument("--batch-sizes", type=_ints, default=None, help="grid: active rows per cell (default 1,4,16,64)")
    p.add_argument("--static-head", default=None, help="drift: static head checkpoint (default: the shipped one)")
    p.add_argument("--versions", type=int, default=None, help="drift: policy versions, v0 included (default 5)")


def _cmd_bench_scenario(args: argparse.Namespace) -> int:
    from atlas_rl.bench.grid import (
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
    if args.speculators and args.scenario == "grid":
        kw["speculators"] = tuple(s.strip() for s in args.speculators.split(",") if s.strip())
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
    name = "grid" if args.scenario == "grid" else "drift"  # controller-drift writes drift.json / drift.md
    print(f"wrote {name}.json and {name}.md into {opts.out_dir} ({report['wall_s']:.0f} s)")
    return 0


def _cmd_bench_drift(args: argparse.Namespace) -> int:
    from atlas_rl.bench.drift import DriftOptions, render_policy_drift_markdown, run_policy_drift

    kw: dict = dict(model=args.model, out_dir=args.out, repeats=args.repeats, static_head=args.static_head)
    if args.max_new_tokens != 128:  # the default bench's default: drift uses its own unless given
        kw["max_new_tokens"] = args.max_new_tokens
    if args.ks != (2, 4, 8):
        kw["k"] = args.ks[0]
    if args.versions is not None:
        kw["num_versions"] = args.versions
    try:
        opts = DriftOptions.quick(**kw) if args.quick else DriftOptions(**kw)
    except ValueError as e:
        print(f"atlas-rl bench: {e}", file=sys.stderr)
        return 2
    report = run_policy_drift(opts, command="atlas-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(render_policy_drift_markdown(report))
    print(f"wrote policy_drift.json and policy_drift.md into {opts.out_dir} ({report['wall_s']:.0f} s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario == "drift":
        return _cmd_bench_drift(args)
    if args.scenario != "default":
        return _cmd_bench_scenario(args)
    from atlas_rl.bench.run import BenchOptions, run_bench

    kw: dict = dict(
        model=args.model,
        out_dir=args.out,
        workloads=tuple(w.strip() for w in args.workloads.split(",") if w.strip()),
        ks=args.ks,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        with_hf=not args.no_hf,
        cost_table=not args.no_cost_table,
        with_stack=not args.no_stack,
        vllm_python="none" if args.no_vllm else args.vllm_python,
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
    from atlas_rl.bench.run import render_markdown

    report = run_bench(opts, command="atlas-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(render_markdown(report))
    print(f"wrote {os.path.join(opts.out_dir, 'bench.json')} and bench.md ({report['wall_s']:.0f} s)")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="A GRPO run with generation_backend='atlas' on the embedded default and a verifiable arithmetic task.",
        description="Trains a few GRPO steps (rollouts through the atlas engine, a paired no-speculation rollout per "
        "step as the baseline), writes a run directory and prints the report summary. Defaults finish in about "
        "14 minutes on a 2-core CPU (it prints its expected duration); scale up with the flags.",
    )
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and byte tokenizer (smoke test)")
    p.add_argument("--algo", choices=["grpo", "rloo"], default="grpo")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default 8)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="completion tokens (default 96)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--speculators", default="auto", help="'auto', 'none' or a list of static,adaptive,suffix")
    p.add_argument("--no-baseline", action="store_true", help="skip the paired no-speculation rollouts")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)


def _cmd_demo(args: argparse.Namespace) -> int:
    from atlas_rl.trainers.runner import TaskRunConfig, run_task

    try:
        cfg = TaskRunConfig(
            algo=args.algo,
            model=args.model,
            tiny=args.tiny,
            steps=args.steps,
            prompts=args.prompts,
            generations=args.generations,
            max_new_tokens=args.max_new_tokens,
            learning_rate=args.lr,
            speculators=args.speculators,
            baseline_every=0 if args.no_baseline else 1,
            seed=args.seed,
            run_dir=args.out,
        )
    except ValueError as e:
        print(f"atlas-rl demo: {e}", file=sys.stderr)
        return 2
    try:
        run_dir = run_task(cfg, command="atlas-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except (FileNotFoundError, ValueError) as e:
        print(f"atlas-rl demo: {e}", file=sys.stderr)
        return 2
    _print_summary(run_dir)
    return 0


def _print_summary(run_dir) -> None:
    import json

    rep = json.loads((run_dir / "report.json").read_text())
    h = rep["headline"]

    def f(v, nd=2):
        return "n/a" if v is None else f"{v:.{nd}f}"

    off = h.get("spec_off_fraction")
    print(f"\nrun directory: {run_dir}")
    print(f"report:        {run_dir / 'report.html'} (also report.md, report.json)")
    print(f"speed-up:      {f(h.get('speedup'))}x rollout tokens/s vs {h.get('baseline')}")
    print(
        f"throughput:    {f(h.get('rollout_tokens_per_s'), 1)} tok/s atlas, "
        f"{f(h.get('baseline_rollout_tokens_per_s'), 1)} tok/s without speculation (medians over steps)"
    )
    print(
        f"mean acceptance length: {f(h.get('mean_acceptance_length'))} tokens per target forward; "
        f"speculation off in {f(off if off is None else 100 * off, 0)}% "
        "of row-steps"
    )
    print(f"reward:        {f(h.get('reward_first'))} (first step) -> {f(h.get('reward_last'))} (last step)")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Write report.md, report.html and report.json for a run directory.")
    p.add_argument("run_dir", help="a run directory written by `atlas-rl demo` or a recipe")


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from atlas_rl.metrics.report import ReportError, write_report

    try:
        paths = write_report(args.run_dir)
    except ReportError as e:
        print(f"atlas-rl report: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind:5s} {path}")
    _print_summary(Path(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-rl", description="Lossless speculative rollouts for RL fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_demo(sub)
    _add_report(sub)
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
    if args.command == "report":
        return _cmd_report(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
