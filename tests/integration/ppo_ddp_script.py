"""Run by tests/integration/test_ppo_distributed.py under `accelerate launch` with 2 CPU processes: 2 PPO updates
with the atlas backend, then each rank writes its policy, value model and adaptive head to OUT_DIR/rank{r}.safetensors
and its last logged metrics to OUT_DIR/rank{r}.json."""

import json
import os
import sys

import torch
from datasets import Dataset

from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.trainers import AtlasPPOConfig, AtlasPPOTrainer


def letters(completions, **kw):
    return [sum(ch.isalpha() for ch in c[0]["content"]) / max(len(c[0]["content"]), 1) for c in completions]


def main(out_dir: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(32)])
    cfg = AtlasPPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        response_length=8,
        temperature=1.0,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        ddp_backend="gloo",
        kl_coef=0.05,
        atlas_adaptive_train_min_s=0.3,
        disable_tqdm=True,
    )
    trainer = AtlasPPOTrainer(model=model, reward_funcs=letters, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    backend = trainer.atlas_backend
    backend._before_rollout()  # join the last background retraining, publish and broadcast, as a rollout would
    from safetensors.torch import save_file

    rank = trainer.accelerator.process_index
    state = {f"policy.{k}": v for k, v in trainer.policy.state_dict().items() if k != "lm_head.weight"}
    state.update({f"value.{k}": v for k, v in trainer.value_model.state_dict().items()})
    state.update({f"head.{k}": v for k, v in backend.adaptive_head.state_dict().items()})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"logs": logs, "world": torch.distributed.get_world_size(), "version": backend.policy_version}, f)


if __name__ == "__main__":
    main(sys.argv[1])
