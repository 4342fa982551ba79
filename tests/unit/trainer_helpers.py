"""The tiny-model TRL setup the trainer tests share: tokenizer, model, prompt dataset, trainer arguments."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer

TOK = tiny_tokenizer()


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    return tiny_llama(vocab_size=len(TOK), hidden_size=64, dtype=dtype, seed=seed, **tiny_token_ids(TOK))


def prompt_dataset(n: int = 8, conversational: bool = True) -> Dataset:
    if conversational:
        return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)])
    return Dataset.from_list([{"prompt": f"Q: what is {i} + {i}? A:"} for i in range(n)])


def trainer_kwargs(tmp_path: Any, backend: str, **kw: Any) -> dict[str, Any]:
    """AtlasGRPOConfig / AtlasRLOOConfig fields of a 2-step CPU run, 4 prompts x 4 samples x 12 tokens."""
    base = dict(
        output_dir=str(tmp_path / backend),
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
        generation_backend=backend,
        atlas_adaptive_train_min_s=0.2,
    )
    base.update(kw)
    return base
