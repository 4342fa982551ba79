"""The shipped static speculator on the embedded default (SmolLM2-135M-Instruct): it loads automatically, keeps
greedy decoding token-identical to plain decoding, and drafts well on held-out broad prompts (a loose floor that
still catches a broken head; the card holds the full held-out figures). Run with ``make test-slow``."""

from __future__ import annotations

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.data.broad_prompts import broad_prompts, split_prompts
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.defaults import default_speculators, load_static_speculator
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.training.static import chat_prompt_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    from atlas_rl.models import load_target

    return load_target()


@pytest.fixture(scope="module")
def held_out(target):
    """Six held-out prompts from different categories, chat-templated."""
    _, tok = target
    _, held = split_prompts(broad_prompts())
    picked, seen = [], set()
    for p in held:
        if p["category"] not in seen:
            seen.add(p["category"])
            picked.append(chat_prompt_ids(tok, p))
        if len(picked) == 6:
            break
    return picked


def test_embedded_default_gets_the_shipped_static_head(target):
    model, _ = target
    spec = load_static_speculator(model)
    assert isinstance(spec, DraftHeadSpeculator)
    assert spec.head.config.fuse_layers and spec.head.config.draft_vocab_size >= 1024
    assert isinstance(default_speculators(model)[0], DraftHeadSpeculator)


def test_static_head_is_lossless_and_accepts_on_held_out_prompts(target, held_out):
    model, _ = target
    sp = SamplingParams(temperature=0, max_new_tokens=48)
    base = RolloutEngine(model).generate(held_out, sp)
    eng = RolloutEngine(model, speculators=[load_static_speculator(model)], controller=FixedController(4))
    out = eng.generate(held_out, sp)
    assert out.completion_ids == base.completion_ids
    tau = out.stats.mean_acceptance_length
    assert tau > 1.5, f"mean acceptance length {tau:.2f} at T=0, k=4 on held-out prompts"


def test_static_head_sampling_keeps_exact_logprobs(target, held_out):
    """T=1 with soft drafts from the head: returned logprobs equal a teacher-forced recompute."""
    model, _ = target
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=0)
    eng = RolloutEngine(model, speculators=[load_static_speculator(model)], controller=FixedController(4))
    out = eng.generate(held_out[:3], sp)
    assert out.stats.num_accepted_tokens > 0
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-4)
