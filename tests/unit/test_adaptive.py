"""Adaptive head: lighter than the static head, warm-started from it (copy / slice / first-N vocabulary), lossless
as a speculator, and its frozen vocabulary rows can follow the target."""

from __future__ import annotations

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.adaptive import (
    AdaptiveHeadConfig,
    build_adaptive_head,
    head_cost_macs,
    rank_vocab,
    refresh_frozen_rows,
    set_draft_vocab,
)
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator

V = 96
PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, seed=0)


def _static(model, fuse=(1, -1)) -> DraftHead:
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=64, fuse_layers=fuse, intermediate_size=96)
    ranked = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:64]  # "frequency-ranked"
    head = DraftHead(cfg, draft_to_target=ranked).bind_target(model, init_lm_head=True)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init (nor the target's rows): copies are recognisable
    return head


def test_warm_start_copies_what_matches_slices_the_mlp_and_keeps_the_first_tokens(model):
    static = _static(model)
    head = build_adaptive_head(model, static, AdaptiveHeadConfig(draft_vocab_size=24, intermediate_size=32))
    assert head.config.fuse_layers == (1, -1) and head.config.draft_vocab_size == 24
    assert torch.equal(head.draft_to_target, static.draft_to_target[:24])
    assert torch.equal(head.lm_head.weight, static.lm_head.weight[:24])  # the static head's trained rows
    assert not head.config.train_lm_head and not head.rows_follow_target  # frozen, not refreshed from the target
    layer = "layers.0."
    names = ["fc.weight", "norm.weight"] + [
        layer + n
        for n in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight", "hidden_norm.weight")
    ]
    for name in names:
        assert torch.equal(head.state_dict()[name], static.state_dict()[name]), name
    # the MLP keeps the 32 hidden units of largest |gate| |up| |down|, in their original order
    sm, hm = static.layers[0].mlp, head.layers[0].mlp
    score = sm.gate_proj.weight.norm(dim=1) * sm.up_proj.weight.norm(dim=1) * sm.down_proj.weight.norm(dim=0)
    keep = score.argsort(descending=True)[:32].sort().values
    assert torch.equal(hm.gate_proj.weight, sm.gate_proj.weight[keep])
    assert torch.equal(hm.up_proj.weight, sm.up_proj.weight[keep])
    assert torch.equal(hm.down_proj.weight, sm.down_proj.weight[:, keep])
    assert head_cost_macs(head.config) < 0.75 * head_cost_macs(static.config)
    cold = build_adaptive_head(model, static, AdaptiveHeadConfig(24, 32, warm_start=False))
    assert not torch.equal(cold.fc.weight, static.fc.weight)
    assert torch.equal(cold.lm_head.weight, model.lm_head.weight[static.draft_to_target[:24]])  # the target's rows
    other = build_adaptive_head(model, static, AdaptiveHeadConfig(24, 32, fuse_layers=(-1,)))
    H = model.config.hidden_size
    assert other.config.fuse_layers == (-1,) and other.fc.weight.shape == (H, H)  # fc of another width: not copied


def test_adaptive_drafts_keep_the_engine_lossless(model):
    head = build_adaptive_head(model, _static(model), AdaptiveHeadConfig(draft_vocab_size=24, intermediate_size=32))
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    base = RolloutEngine(model).generate(PROMPTS, sp, num_generations=2)
    eng = RolloutEngine(model, speculators=[DraftHeadSpeculator(head, name="adaptive")], controller=FixedController(3))
    out = eng.generate(PROMPTS, sp, num_generations=2)
    assert out.completion_ids == base.completion_ids and out.stats.num_draft_tokens > 0
    assert out.stats.per_speculator["adaptive"].num_drafts > 0


def test_rank_vocab_orders_by_frequency_with_prior_tie_break():
    seqs = [[5, 5, 5, 2, 2, 9], [2, 5, 7]]
    assert rank_vocab(seqs, 10, 4).tolist() == [5, 2, 7, 9]  # 5:4, 2:3, then 7 and 9 once each (lower id first)
    prior = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert rank_vocab(seqs, 10, 5, prior=prior).tolist() == [5, 2, 9, 7, 8]  # ties and unseen by the prior


def test_vocab_swap_and_row_refresh_follow_the_target(model):
    head = build_adaptive_head(model, config=AdaptiveHeadConfig(draft_vocab_size=16, intermediate_size=16))
    assert torch.equal(head.draft_to_target, torch.arange(16))
    new = torch.arange(40, 56).flip(0)
    set_draft_vocab(head, model, new)
    assert torch.equal(head.draft_to_target, new) and torch.equal(head.lm_head.weight, model.lm_head.weight[new])
    assert int(head.target_to_draft[55]) == 0 and int(head.target_to_draft[0]) == -1
    moved = tiny_llama(vocab_size=V, seed=0)
    with torch.no_grad():
        moved.lm_head.weight.add_(1.0)  # a policy update
    refresh_frozen_rows(head, moved)
    assert torch.equal(head.lm_head.weight, moved.lm_head.weight[new])
    with pytest.raises(ValueError, match="duplicate"):
        set_draft_vocab(head, model, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_adaptive_head(model, _static(model), AdaptiveHeadConfig(draft_vocab_size=80))
    with pytest.raises(ValueError, match="intermediate_size"):
        AdaptiveHeadConfig(intermediate_size=0)


@pytest.mark.parametrize("engine", ["atlas", "vllm"])
def test_the_adaptive_head_starts_as_an_exact_copy_of_the_static_head(engine):
    """Both engines: the production adaptive head has the static head's shapes and the warm start alone makes it
    the static head's exact copy (trained output rows included), so adaptation starts at the static head's τ
    (vLLM's one drafter takes either head as well)."""
    from atlas_rl.rollout.build import build_speculators
    from atlas_rl.trainers.vllm_backend import _same_shape_adaptive

    model = tiny_llama(seed=0)
    static = _static(model)
    with torch.no_grad():
        static.lm_head.weight.add_(1.0)  # trained rows, not the target's
    if engine == "vllm":
        head = _same_shape_adaptive(model, static, seed=1)
    else:
        head = build_speculators(model, ["adaptive"], static_head=static, seed=1).adaptive_head
    ref = static.state_dict()
    assert set(head.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in head.state_dict().items())


def test_the_engine_prices_a_heads_drafts_by_its_macs_before_timing_them(model):
    """A draft head states its MACs per drafted token; the engine hands the auto controller that share of the
    target's MACs as the drafting-cost prior (so a fresh engine's first, seeded, call does not draft as if free)."""
    from atlas_rl.controller import AutoController, AutoControllerConfig
    from atlas_rl.speculators.draft_head import head_cost_macs

    seen: dict[str, float] = {}

    class Recording(AutoController):
        def set_draft_cost_priors(self, relative: dict[str, float]) -> None:
            seen.update(relative)
            super().set_draft_cost_priors(relative)

    head = _static(model)
    spec = DraftHeadSpeculator(head, name="static")
    assert spec.draft_macs_per_token == head_cost_macs(head.config)
    eng = RolloutEngine(
        model, speculators=[spec], controller=Recording(AutoControllerConfig(num_speculative_tokens=2))
    )
    eng.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    target = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert seen == {"static": pytest.approx(head_cost_macs(head.config) / target)}
