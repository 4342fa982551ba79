"""The models around PPO's policy: the value model (a scalar head on a backbone), the policy+value wrapper the
optimizer and ``accelerate`` see, and the padded batch layout every forward shares.

Layout of a batch of (prompt, completion) pairs: prompts left-padded to ``P`` columns, completions right-padded
to ``R`` columns, ``input_ids [b, P + R]``. The logits at columns ``P - 1 .. P + R - 2`` predict the completion
tokens; the value at column ``P - 1 + t`` is the value of the state before completion token ``t``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [b, P + R]
    attention_mask: torch.Tensor  # [b, P + R]
    position_ids: torch.Tensor  # [b, P + R]
    responses: torch.Tensor  # [b, R] completion tokens, pad_id where masked
    response_mask: torch.Tensor  # [b, R] bool, prefix mask
    context_length: int  # P

    def rows(self, idx: torch.Tensor) -> PackedBatch:
        return PackedBatch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.position_ids[idx],
            self.responses[idx],
            self.response_mask[idx],
            self.context_length,
        )


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device) -> PackedBatch:
    """Left-pad the prompts, right-pad the completions (each needs >= 1 token)."""
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token")
    p_len, r_len = max(len(p) for p in prompts), max(len(c) for c in completions)
    n = len(prompts)
    ids = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, p_len + r_len), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len : p_len + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, p_len - len(p) : p_len + len(c)] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return PackedBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        responses=ids[:, p_len:].to(device),
        response_mask=mask[:, p_len:].bool().to(device),
        context_length=p_len,
    )


def response_logprobs(
    logits: torch.Tensor,  # [b, P + R, vocab]
    batch: PackedBatch,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # logprobs [b, R], entropy [b, R]
    """``log_softmax(logits / temperature)`` of each completion token (TRL's convention) and the entropy of the
    same tempered distribution."""
    p = batch.context_length
    lg = _upcast(logits[:, p - 1 : -1]) / temperature
    logp_all = torch.log_softmax(lg, dim=-1)
    logprobs = torch.gather(logp_all, -1, batch.responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def scalar_per_token(model: nn.Module, batch: PackedBatch) -> torch.Tensor:  # [b, P + R]
    """The scalar head of a value/reward model on every position: ``model.score(backbone(...).last_hidden_state)``,
    where the backbone is ``getattr(model, model.base_model_prefix)`` (``AutoModelForSequenceClassification``
    layout, and :class:`ValueHead`'s)."""
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return _upcast(model.score(out.last_hidden_state).squeeze(-1))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_scalar_model(model: nn.Module, role: str) -> None:
    """A value or reward model must expose ``base_model_prefix`` (its backbone) and a one-output ``score``."""
    prefix = getattr(model, "base_model_prefix", None)
    score = getattr(model, "score", None)
    if not prefix or not hasattr(model, prefix) or not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ValueError(
            f"the {role} must look like AutoModelForSequenceClassification(num_labels=1): a backbone named by "
            f"base_model_prefix and a `score` nn.Linear with one output; got {type(model).__name__}"
        )


class ValueHead(nn.Module):
    """The default value model: a copy of the policy's backbone with a scalar ``score`` head (zero-initialised,
    so the first values are 0)."""

    base_model_prefix = "model"

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        prefix = getattr(policy, "base_model_prefix", None)
        if not prefix or not hasattr(policy, prefix):
            raise ValueError(
                f"cannot build a value head on {type(policy).__name__} (no backbone under base_model_prefix): pass "
                "value_model=AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)"
            )
        backbone = getattr(policy, prefix)
        self.model = copy.deepcopy(backbone)
        hidden = int(policy.config.hidden_size)
        dtype = next(backbone.parameters()).dtype
        self.score = nn.Linear(hidden, 1, bias=True, dtype=dtype)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)


class PolicyAndValue(nn.Module):
    """What the optimizer, DDP and DeepSpeed wrap: one module holding the policy and the value model, whose forward
    returns the policy's logits and the values (so one backward reaches both)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids: torch.Tensor,  # [b, T]
        attention_mask: torch.Tensor,  # [b, T]
        position_ids: torch.Tensor,  # [b, T]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [b, T, vocab], values [b, T]
        batch = PackedBatch(input_ids, attention_mask, position_ids, input_ids[:, :0], input_ids[:, :0].bool(), 0)
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        return logits, scalar_per_token(self.value_model, batch)
