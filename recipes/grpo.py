"""GRPO on the offline arithmetic task with generation_backend="atlas".

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/grpo.py --config recipes/configs/grpo.yaml

Other launch configs: recipes/accelerate/{cpu_ddp,multi_gpu,deepspeed_zero2,deepspeed_zero3}.yaml. Any option can
be given on the command line, typed: a field of the YAML (``--steps 20 --learning_rate 5e-5``) or of the trainer
config (``--atlas_controller fixed``); ``--set key=value`` (a YAML line, e.g. ``--set steps=20``) works too.
``--help`` lists the run's options.
"""

from atlas_rl.openmp import preload_intel_openmp
from atlas_rl.trainers.runner import recipe_main

if __name__ == "__main__":
    preload_intel_openmp()  # where this environment ships Intel OpenMP (the vLLM venv): vLLM on CPU ~2x faster
    run_dir = recipe_main("grpo", __doc__)
    print(f"run directory: {run_dir} (report: {run_dir / 'report.html'})")
