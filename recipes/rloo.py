"""RLOO on the offline arithmetic task with generation_backend="atlas".

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/rloo.py --config recipes/configs/rloo.yaml

Other launch configs: recipes/accelerate/{cpu_ddp,multi_gpu,deepspeed_zero2,deepspeed_zero3}.yaml. Any field of
the YAML can be overridden on the command line as ``--set key=value`` (e.g. ``--set steps=20``).
"""

import argparse
import shlex
import sys

import yaml

from atlas_rl.trainers.runner import TaskRunConfig, run_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML with TaskRunConfig fields (+ 'extra': trainer fields)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a YAML field")
    args = parser.parse_args()
    with open(args.config) as f:
        fields = yaml.safe_load(f) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    fields.setdefault("algo", "rloo")
    run_dir = run_task(TaskRunConfig(**fields), command=" ".join(shlex.quote(a) for a in sys.argv))
    print(f"run directory: {run_dir} (report: {run_dir / 'report.html'})")


if __name__ == "__main__":
    main()
