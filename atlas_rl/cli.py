"""The ``atlas-rl`` command: ``bench``, ``demo``, ``report`` and ``export-speculator``.

Every option is a field of a config dataclass (``atlas-rl bench``: the scenario's options, e.g.
:class:`atlas_rl.bench.run.BenchOptions`; ``atlas-rl demo``: :class:`atlas_rl.trainers.runner.TaskRunConfig`),
parsed by :class:`atlas_rl.argparsing.ConfigParser` (TRL's ``TrlParser``): ``--config FILE.yaml``, typed flags
(``--max-new-tokens 64`` or ``--max_new_tokens 64``, lists as ``--ks 2,4``), ``--set KEY=VALUE``. A flag on the
command line always wins over the ``--quick`` preset and the config file.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from atlas_rl.argparsing import ConfigParser

BENCH_HELP = "Compare HF generate, the engine (k=0) and speculation side by side, in one run, as ratios."
DEMO_HELP = "A GRPO run with generation_backend='atlas' on the embedded default and a verifiable arithmetic task."
REPORT_HELP = "Write report.md, report.html and report.json for a run directory."
EXPORT_HELP = "Write a draft head (a head dir, a trainer checkpoint or run dir) in the layout vLLM serves (eagle3)."


def _quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------------ bench
@dataclass
class BenchCommand:
    """Which bench runs (the options of the chosen scenario follow)."""

    scenario: Literal["default", "grid", "tail", "policy-drift", "adapt", "controller-drift", "drift"] = field(
        default="default",
        metadata={
            "help": "default: HF generate vs engine k=0 vs speculation; grid: the auto controller vs the best fixed "
            "configurations per batch size; tail: few active rows on held-out prompts, T=0 and T=1; policy-drift "
            "(alias: drift): speculators while the policy is fine-tuned Python -> C; adapt: traffic shifts to a "
            "format the static head never saw and the adaptive head learns it window by window; controller-drift: the "
            "controller following two synthetic speculators whose quality drifts. "
            "`atlas-rl bench --scenario NAME --help` lists that scenario's options."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "A small smoke run (a few minutes at most): the scenario's QUICK preset (flags override)."},
    )


def bench_parser(argv: list[str]) -> tuple[ConfigParser, Any]:
    """The parser of ``atlas-rl bench ARGV``: :class:`BenchCommand` + the chosen scenario's options dataclass,
    with the scenario's ``--quick`` preset as defaults when ``--quick`` is given; and the scenario."""
    from atlas_rl.bench.scenarios import get_scenario

    head = ConfigParser([BenchCommand], prog="atlas-rl bench", add_help=False).peek(argv)
    scenario = get_scenario(head.scenario)
    parser = ConfigParser(
        [BenchCommand, scenario.options_class],
        prog="atlas-rl bench",
        description=f"{BENCH_HELP} Scenario {scenario.name}: {scenario.help}.",
    )
    if head.quick:
        parser.set_defaults(**scenario.quick)
    return parser, scenario


def _cmd_bench(argv: list[str]) -> int:
    from atlas_rl.bench.common import BenchInputError

    parser, scenario = bench_parser(argv)
    _, opts = parser.parse(argv)
    try:
        report = scenario.run_fn(opts, command=_quote(["atlas-rl", "bench", *argv]))
    except BenchInputError as e:
        print(f"atlas-rl bench: error: {e}", file=sys.stderr)
        return 2
    print(scenario.render_fn(report))
    out = scenario.outputs
    print(f"wrote {out}.json and {out}.md into {opts.out_dir} ({report['wall_s']:.0f} s)")
    return 0


# ------------------------------------------------------------------------------------------------ demo
def demo_parser() -> ConfigParser:
    """``atlas-rl demo``: the fields of :class:`~atlas_rl.trainers.runner.TaskRunConfig`, plus ``--no-baseline``."""
    from atlas_rl.trainers.runner import TaskRunConfig

    parser = ConfigParser(
        [TaskRunConfig],
        prog="atlas-rl demo",
        description="Trains a few GRPO steps (rollouts through the atlas engine, a paired no-speculation rollout "
        "per step as the baseline), writes a run directory and prints the report summary. Defaults finish in "
        "about 14 minutes on a 2-core CPU; scale up with the options.",
    )
    parser.add_argument(
        "--no-baseline",
        "--no_baseline",
        dest="baseline_every",
        action="store_const",
        const=0,
        default=argparse.SUPPRESS,
        help="skip the paired no-speculation rollouts (= --baseline_every 0)",
    )
    return parser


def _cmd_demo(argv: list[str]) -> int:
    from atlas_rl.trainers.runner import run_task

    cfg = demo_parser().parse(argv)
    try:
        run_dir = run_task(cfg, command=_quote(["atlas-rl", "demo", *argv]))
    except (FileNotFoundError, ValueError) as e:
        print(f"atlas-rl demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    _print_summary(run_dir)
    return 0


def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _print_summary(run_dir: Path) -> None:
    import json

    h = json.loads((run_dir / "report.json").read_text())["headline"]
    off = h.get("spec_off_fraction")
    print(f"\nrun directory: {run_dir}")
    print(f"report:        {run_dir / 'report.html'} (also report.md, report.json)")
    print(f"speed-up:      {_f(h.get('speedup'))}x rollout tokens/s vs {h.get('baseline')}")
    print(
        f"throughput:    {_f(h.get('rollout_tokens_per_s'), 1)} tok/s atlas, "
        f"{_f(h.get('baseline_rollout_tokens_per_s'), 1)} tok/s without speculation (medians over steps)"
    )
    print(
        f"mean acceptance length: {_f(h.get('mean_acceptance_length'))} tokens per target forward; "
        f"speculation off in {_f(off if off is None else 100 * off, 0)}% of row-steps"
    )
    print(f"reward:        {_f(h.get('reward_first'))} (first step) -> {_f(h.get('reward_last'))} (last step)")


# ------------------------------------------------------------------------------------------------ report
@dataclass
class ReportCommand:
    run_dir: str = field(metadata={"help": "A run directory written by `atlas-rl demo` or a recipe (positional)."})


def _cmd_report(argv: list[str]) -> int:
    from atlas_rl.metrics.report import ReportError, write_report

    if argv and not argv[0].startswith("-"):  # `atlas-rl report RUN_DIR`
        argv = ["--run_dir", *argv]
    args = ConfigParser([ReportCommand], prog="atlas-rl report", description=REPORT_HELP).parse(argv)
    try:
        paths = write_report(args.run_dir)
    except ReportError as e:
        print(f"atlas-rl report: error: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind:5s} {path}")
    _print_summary(Path(args.run_dir))
    return 0


# ------------------------------------------------------------------------------------------------ export-speculator
@dataclass
class ExportCommand:
    source: str = field(
        metadata={
            "help": "A head directory, a trainer checkpoint (checkpoint-N, head in atlas/atlas_adaptive_head/) or "
            "a run directory (its newest checkpoint-N) (first positional)."
        }
    )
    out_dir: str = field(metadata={"help": "Where the vLLM-loadable head directory is written (second positional)."})
    dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float16", metadata={"help": "Weight dtype of the exported head."}
    )


def _cmd_export(argv: list[str]) -> int:
    from atlas_rl.speculators.export import ExportError, export_head

    positional = []
    while argv and not argv[0].startswith("-") and len(positional) < 2:  # `atlas-rl export-speculator SRC DIR`
        positional.append(argv.pop(0))
    argv = [x for name, v in zip(("--source", "--out_dir"), positional) for x in (name, v)] + argv
    args = ConfigParser([ExportCommand], prog="atlas-rl export-speculator", description=EXPORT_HELP).parse(argv)
    try:
        out = export_head(args.source, args.out_dir, dtype=args.dtype)
    except ExportError as e:
        print(f"atlas-rl export-speculator: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}); serve it with speculative_config={{'method': 'eagle3', 'model': '{out}'}}")
    return 0


# ------------------------------------------------------------------------------------------------ main
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "bench": (BENCH_HELP, _cmd_bench),
    "demo": (DEMO_HELP, _cmd_demo),
    "report": (REPORT_HELP, _cmd_report),
    "export-speculator": (EXPORT_HELP, _cmd_export),
}


def main(argv: list[str] | None = None) -> int:
    """``atlas-rl [-v] COMMAND [OPTIONS]``; returns the exit status (2 for a usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="atlas-rl", description="Lossless speculative rollouts for RL fine-tuning.", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # each command parses its own options
    try:
        args, _ = parser.parse_known_args(argv)
        rest = argv[argv.index(args.command) + 1 :]
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return COMMANDS[args.command][1](rest)
    except SystemExit as e:  # --help (0) and usage errors (2), already printed
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
