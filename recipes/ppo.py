"""PPO on the offline arithmetic task with generation_backend="atlas" (policy, value head, frozen reference).

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/ppo.py --config recipes/configs/ppo.yaml

Other launch configs: recipes/accelerate/{cpu_ddp,multi_gpu,deepspeed_zero2}.yaml. Any field of the YAML can be
overridden on the command line as ``--set key=value`` (e.g. ``--set steps=20``); PPO fields go under ``extra``
(``--set 'extra={num_ppo_epochs: 2, kl_coef: 0.02}'``).
"""

from atlas_rl.trainers.runner import recipe_main

if __name__ == "__main__":
    run_dir = recipe_main("ppo", __doc__)
    print(f"run directory: {run_dir} (report: {run_dir / 'report.html'})")
