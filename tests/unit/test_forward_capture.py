"""ForwardCapture (draft-head samples from the trainer's own forward) and the trainers' ``atlas_capture="trainer"``."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import TOK, prompt_dataset, tiny_model, trainer_kwargs
from trl import GRPOTrainer

from atlas_rl.models import tiny_llama
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer, AtlasRLOOConfig, AtlasRLOOTrainer
from atlas_rl.training.forward_capture import ForwardCapture
from atlas_rl.training.offline import samples_from_sequences
from atlas_rl.training.samples import SequenceSample, topk_labels

PAD = 127

# mixed prompt and completion lengths; row 1's completion is a single token, row 3's has none (masked, e.g. truncated)
PROMPTS = [[1, 5, 9], [2, 7, 3, 8, 4], [6, 6], [3, 9, 1, 2]]
COMPLETIONS = [[11, 12, 13, 14], [21], [31, 32, 33, 34, 35, 36], []]


def _trl_batch(
    prompts: list[list[int]], completions: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, int]:  # input_ids [B, P + C], attention_mask [B, P + C], C
    """TRL's layout: prompts left-padded, completions right-padded (padding after EOS masked)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    ids = torch.full((len(prompts), P + C), PAD, dtype=torch.long)
    att = torch.zeros((len(prompts), P + C), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p) : P] = torch.tensor(p)
        att[b, P - len(p) : P] = 1
        ids[b, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        att[b, P : P + len(c)] = 1
    return ids, att, C


def _check_against_reference(got, ref, feat_atol: float, prob_atol: float, feat_rtol: float = 0.0) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert torch.equal(g.tokens, r.tokens)
        assert torch.equal(g.has_feats, r.has_feats)
        assert torch.equal(g.label_mask, r.label_mask)
        assert g.feats.dtype == r.feats.dtype
        torch.testing.assert_close(g.feats.double(), r.feats.double(), atol=feat_atol, rtol=feat_rtol)
        m = r.label_mask
        assert torch.equal(g.label_ids[m], r.label_ids[m])
        torch.testing.assert_close(g.label_probs[m], r.label_probs[m], atol=prob_atol, rtol=0)
        assert bool((g.label_ids[~m] == -1).all()) and bool((g.label_probs[~m] == 0).all())
        assert g.policy_version == 7


def _row_reference(model, ids, att, C: int, fuse_layers, top_k: int) -> list[SequenceSample]:
    """Each row alone through ``output_hidden_states=True``, at the positions it has in the padded batch (HF numbers
    the positions of a left-padded row from the first column: its RoPE angles differ from an unpadded run's)."""
    out = []
    for b in range(ids.shape[0]):
        cols = att[b].nonzero().flatten()
        n, pl = int(cols.numel()), int(att[b, : ids.shape[1] - C].sum())  # real tokens, prompt length
        res = model(input_ids=ids[b, cols][None], position_ids=cols[None], output_hidden_states=True)
        feats = torch.cat([res.hidden_states[la] for la in fuse_layers], -1)[0]  # [n, F]
        lids, lprobs = topk_labels(res.logits[0], top_k)  # [n, K]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[max(pl - 1, 0) : n - 1] = True
        has = torch.ones(n, dtype=torch.bool)
        has[n - 1] = False
        out.append(SequenceSample(ids[b, cols], feats.detach(), has, lids, lprobs, mask, policy_version=7))
    return out


@pytest.mark.parametrize("fuse_layers", [(1, 2, 3), (0, 2, -1)])
@torch.no_grad()
def test_samples_equal_a_hidden_states_reference_float64_mixed_lengths(fuse_layers):
    model = tiny_llama(num_layers=4, dtype=torch.float64, seed=3)
    ids, att, C = _trl_batch(PROMPTS, COMPLETIONS)
    with ForwardCapture(model, fuse_layers, top_k=8, feat_dtype=torch.float64) as cap:
        model(input_ids=ids[:3], attention_mask=att[:3])  # two row chunks, as TRL's batch_size chunking does
        model(input_ids=ids[3:], attention_mask=att[3:])
    got = cap.samples(ids, att, C, policy_version=7)
    _check_against_reference(got, _row_reference(model, ids, att, C, fuse_layers, 8), feat_atol=1e-10, prob_atol=1e-12)
    assert [s.num_labels for s in got] == [4, 1, 6, 0]
    # offline.py runs every sequence from position 0: equal up to HF's float32 RoPE tables at shifted positions
    seqs = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    ref = samples_from_sequences(
        model, seqs, [len(p) for p in PROMPTS], fuse_layers, top_k=8, policy_version=7, feat_dtype=torch.float64
    )
    _check_against_reference(got, ref, feat_atol=1e-4, prob_atol=1e-5)


def test_samples_equal_the_reference_through_trls_fused_forward_float32_fp16_storage(tmp_path):
    """TRL never materialises the logits (fused LM head): labels come from the captured final hidden states."""
    trainer = _grpo_trainer("transformers", tmp_path)
    model = trainer.model
    ids, att, C = _trl_batch(PROMPTS, COMPLETIONS)
    with ForwardCapture(model, (1, 2), top_k=8) as cap:
        GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, att, C, batch_size=3)
    got = cap.samples(ids, att, C, policy_version=7)
    seqs = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    ref = samples_from_sequences(model, seqs, [len(p) for p in PROMPTS], (1, 2), top_k=8, policy_version=7)
    # float32 forwards over other paddings and positions agree to ~1e-5; both stored as float16: one rounding step
    _check_against_reference(got, ref, feat_atol=1e-3, prob_atol=1e-4, feat_rtol=2**-10)


def test_hooks_are_removed_on_exit_and_on_exceptions():
    model = tiny_llama(num_layers=3)
    ids, att, _ = _trl_batch(PROMPTS, COMPLETIONS)

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    before = hooks()
    with ForwardCapture(model, (1, 2, 3)):  # layers 0 and 1, the final norm (index 3)
        assert hooks() == before + 3
        model(input_ids=ids, attention_mask=att)
    assert hooks() == before
    with pytest.raises(RuntimeError, match="boom"), ForwardCapture(model, (0, 1, 2)):  # + the embeddings
        assert hooks() == before + 4
        raise RuntimeError("boom")
    assert hooks() == before


def test_capture_leaves_trls_logps_and_gradients_unchanged(tmp_path):
    trainer = _grpo_trainer("transformers", tmp_path)
    model = trainer.model
    model.train()
    ids, att, C = _trl_batch(PROMPTS, COMPLETIONS)

    def logps_and_grads(capture: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if capture:
            with ForwardCapture(model, (1, 2), top_k=8) as cap:
                logps, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    trainer, model, ids, att, C, batch_size=2, compute_entropy=True
                )
            assert len(cap.samples(ids, att, C)) == len(PROMPTS)
        else:
            logps, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, ids, att, C, batch_size=2, compute_entropy=True
            )
        (logps * att[:, -C:]).sum().backward()
        return logps.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    plain, with_capture = logps_and_grads(False), logps_and_grads(True)
    assert torch.equal(plain[0], with_capture[0]) and torch.equal(plain[1], with_capture[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], with_capture[2]))


def test_gradient_checkpointing_recompute_is_not_captured_twice():
    model = tiny_llama(num_layers=3, dtype=torch.float64)
    ids, att, C = _trl_batch(PROMPTS, COMPLETIONS)
    with ForwardCapture(model, (1, 2), feat_dtype=torch.float64) as cap:
        model(input_ids=ids, attention_mask=att)
    plain = cap.samples(ids, att, C, policy_version=7)
    model.activation_checkpointing_enable()
    model.train()
    with ForwardCapture(model, (1, 2), feat_dtype=torch.float64) as cap:
        loss = model(input_ids=ids, attention_mask=att).logits.sum()
    loss.backward()  # recomputes the layers: the hooks are gone by then
    _check_against_reference(cap.samples(ids, att, C, policy_version=7), plain, feat_atol=0.0, prob_atol=0.0)


def test_bad_fuse_layers_fail_clearly():
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="out of range"):
        ForwardCapture(model, (5,))
    with pytest.raises(ValueError, match="at least one"):
        ForwardCapture(model, ())


# ---------------------------------------------------------------------------------------------- trainers
def _reward(completions, **kwargs):  # noqa: ANN001, ANN003 - TRL reward signature
    return [float(sum(ch.isdigit() for ch in c[0]["content"])) for c in completions]


def _args(tmp_path, backend: str, cls=AtlasGRPOConfig, **kw):
    return cls(**trainer_kwargs(tmp_path, backend, **{"max_steps": 3, **kw}))


def _grpo_trainer(backend: str, tmp_path, **kw) -> AtlasGRPOTrainer:
    model = tiny_model()
    args = _args(tmp_path, backend, **kw)
    return AtlasGRPOTrainer(
        model=model, reward_funcs=_reward, args=args, train_dataset=prompt_dataset(), processing_class=TOK
    )


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trainer_capture_fills_the_buffer_by_policy_version_and_the_head_trains(tmp_path, algo):
    if algo == "grpo":
        trainer = _grpo_trainer("atlas", tmp_path, atlas_capture="trainer")
    else:
        model = tiny_model()
        args = _args(tmp_path, "atlas", AtlasRLOOConfig, atlas_capture="trainer", beta=0.0)
        trainer = AtlasRLOOTrainer(
            model=model, reward_funcs=_reward, args=args, train_dataset=prompt_dataset(), processing_class=TOK
        )
    trainer.train()
    backend = trainer.atlas_backend
    assert backend.capture_mode == "trainer"
    samples = backend.buffer.samples()
    assert len(samples) == 12  # 3 rollouts x 4 completions, each captured once
    assert [s.policy_version for s in samples] == [0] * 4 + [1] * 4 + [2] * 4  # the policy that generated them
    assert all(s.num_labels >= 1 and s.feats.dtype == torch.float16 for s in samples)
    assert backend.buffer.stats()["records"] == 0  # the engine's capture hook never ran
    assert backend.adaptive_trainer.metrics()["steps"] > 0  # the adaptive head trained on the trainer's data
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["atlas/rollout_capture_s"] > 0 for h in logs)


def test_trainer_capture_takes_every_slice_once_across_iterations(tmp_path):
    """steps_per_generation=2 splits a rollout into two loss steps; num_iterations=2 scores both twice."""
    trainer = _grpo_trainer(
        "atlas", tmp_path, atlas_capture="trainer", max_steps=4, steps_per_generation=2, num_iterations=2
    )
    trainer.train()
    cap = trainer._atlas_trainer_capture()
    samples = trainer.atlas_backend.buffer.samples()
    assert cap.num_captured_rows == 8 and len(samples) == 8  # one rollout of 8 rows (2 prompts x 4)
    assert {s.policy_version for s in samples} == {0}
    assert len({tuple(s.tokens.tolist()) for s in samples}) >= 2  # both prompts' rows, not one slice twice


def test_a_failing_capture_does_not_stop_training(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("capture broke")

    monkeypatch.setattr(ForwardCapture, "samples", broken)
    trainer = _grpo_trainer("atlas", tmp_path, atlas_capture="trainer", max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and trainer._atlas_trainer_capture().num_failures == 2
    assert len(trainer.atlas_backend.buffer) == 0


def test_engine_capture_mode_leaves_the_trainer_forward_alone(tmp_path):
    trainer = _grpo_trainer("atlas", tmp_path, atlas_capture="engine", max_steps=1)
    trainer.train()
    assert trainer._atlas_trainer_capture().num_captured_rows == 0
    assert trainer.atlas_backend.buffer.stats()["records"] > 0
