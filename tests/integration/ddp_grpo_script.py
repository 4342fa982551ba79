"""Run by tests/integration/test_trainers_ddp.py under `accelerate launch` with 2 CPU processes: 2 GRPO steps with
the atlas backend, then each rank writes its adaptive head's weights to OUT_DIR/rank{r}.safetensors."""

import os
import sys

import torch
from datasets import Dataset

from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer


def main(out_dir: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(16)])

    def reward(completions, **kw):
        return [float(sum(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    cfg = AtlasGRPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        ddp_backend="gloo",
        atlas_adaptive_train_min_s=0.5,
    )
    trainer = AtlasGRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    backend = trainer.atlas_backend
    backend._before_rollout()  # join the last background retraining, publish and broadcast, as a rollout would
    from safetensors.torch import save_file

    rank = trainer.accelerator.process_index
    state = {k: v.contiguous() for k, v in backend.adaptive_head.state_dict().items()}
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    steps = backend.adaptive_trainer.num_steps
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{steps} {backend.policy_version} {torch.distributed.get_world_size()}\n")


if __name__ == "__main__":
    main(sys.argv[1])
