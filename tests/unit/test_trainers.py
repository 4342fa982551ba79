"""TRL integration: AtlasGRPOTrainer / AtlasRLOOTrainer on a tiny model, every backend, on CPU."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from trainer_helpers import TOK, prompt_dataset, tiny_model, trainer_kwargs

from atlas_rl.rollout.cpu_linear import bf16_matmul_available
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer, AtlasRLOOConfig, AtlasRLOOTrainer

_model = tiny_model
_dataset = prompt_dataset


class RecordingReward:
    """A real reward (digit count of the completion) that also records what it saw, in order."""

    __name__ = "digits"

    def __init__(self):
        self.completions: list[str] = []
        self.rewards: list[float] = []

    def __call__(self, completions, **kwargs):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        r = [float(sum(ch.isdigit() for ch in t)) for t in texts]
        self.completions.extend(texts)
        self.rewards.extend(r)
        return r


_common = trainer_kwargs


BACKENDS = ["atlas", "transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_two_steps_every_backend(tmp_path, backend, algo):
    reward = RecordingReward()
    model = _model()
    if algo == "grpo":
        cfg = AtlasGRPOConfig(**_common(tmp_path, backend))
        trainer = AtlasGRPOTrainer(
            model=model, reward_funcs=reward, args=cfg, train_dataset=_dataset(), processing_class=TOK
        )
    else:
        cfg = AtlasRLOOConfig(**_common(tmp_path, backend, beta=0.0))  # beta>0 reloads a reference model by name
        trainer = AtlasRLOOTrainer(
            model=model, reward_funcs=reward, args=cfg, train_dataset=_dataset(), processing_class=TOK
        )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert len(reward.completions) == 8  # 2 steps x 4 completions
    for h in logs:  # rollout time and throughput are logged for every backend (A/B runs)
        assert h["atlas/rollout_s"] > 0 and h["atlas/rollout_tokens_per_s"] > 0
        if backend == "atlas":  # where the rollout time went
            assert 0 < h["atlas/rollout_forward_s"] < h["atlas/rollout_s"]
            assert 0 < h["atlas/rollout_capture_s"] < h["atlas/rollout_s"]
    if backend == "atlas":
        h = logs[-1]
        for key in (
            "atlas/mean_acceptance_length",
            "atlas/spec_off_fraction",
            "atlas/speculator_train_loss",
            "atlas/speculator_staleness",
            "atlas/speculator_train_s",
        ):
            assert key in h, key
        assert any(k.startswith("atlas/speculator_share/") for k in h)
        assert trainer.atlas_backend.policy_version == 2
        # per step: the retraining joined before this rollout (one so far at step 2); the total accumulates
        assert 0 < h["atlas/speculator_train_s"] <= h["atlas/speculator_train_s_total"]
        for h in logs:  # every rollout: the adaptive head's estimated acceptance on its fresh captured completions
            est = h["atlas/estimated_acceptance_length/adaptive"]
            assert 1.0 <= est <= 1.0 + cfg.atlas_num_speculative_tokens


def test_plain_text_prompts_work(tmp_path):
    reward = RecordingReward()
    cfg = AtlasGRPOConfig(**_common(tmp_path, "atlas", max_steps=1))
    AtlasGRPOTrainer(
        model=_model(),
        reward_funcs=reward,
        args=cfg,
        train_dataset=_dataset(conversational=False),
        processing_class=TOK,
    ).train()
    assert len(reward.completions) == 4


def _greedy_grpo(tmp_path, backend: str, **kw) -> tuple[list[str], list[float], list[float]]:
    """A greedy GRPO run on the float64 tiny model: (completions, rewards, per-step losses)."""
    reward = RecordingReward()
    cfg = AtlasGRPOConfig(
        **_common(tmp_path, backend, generation_kwargs={"do_sample": False}, atlas_speculators="suffix,adaptive", **kw)
    )
    trainer = AtlasGRPOTrainer(
        model=_model(torch.float64), reward_funcs=reward, args=cfg, train_dataset=_dataset(), processing_class=TOK
    )
    trainer.train()
    return reward.completions, reward.rewards, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_greedy_atlas_equals_transformers(tmp_path):
    """Same seed, greedy: identical completions, rewards and step-1 loss (float64 tiny model)."""
    a = _greedy_grpo(tmp_path, "atlas", max_steps=1)
    t = _greedy_grpo(tmp_path, "transformers", max_steps=1)
    assert a[0] == t[0] and a[1] == t[1]
    assert a[2][0] == pytest.approx(t[2][0], abs=1e-9)


def test_greedy_atlas_follows_the_policy_through_updates(tmp_path):
    """On-policy after every optimizer step: with a learning rate that visibly moves a float64 tiny model, greedy
    rollouts of steps 2 and 3 (new weights) are identical under atlas and transformers, as are the losses. A
    backend generating from stale weights (or a stale copy) fails this."""
    a = _greedy_grpo(tmp_path, "atlas", max_steps=3, learning_rate=3e-2)
    t = _greedy_grpo(tmp_path, "transformers", max_steps=3, learning_rate=3e-2)
    assert len(a[0]) == 12 and a[0] == t[0]
    assert a[2] == pytest.approx(t[2], abs=1e-9)
    assert a[0][:4] != a[0][8:]  # the policy did move: step 3 rolls out differently from step 1


def test_logprobs_match_trl_recompute(tmp_path):
    """TRL's importance-sampling diagnostics compare the rollout logprobs with its own recompute: <= 1e-4 (fp32),
    also after optimizer steps that move the policy visibly (learning rate 3e-2)."""
    cfg = AtlasGRPOConfig(
        **_common(
            tmp_path,
            "atlas",
            max_steps=3,
            learning_rate=3e-2,
            atlas_importance_sampling_correction=True,
            temperature=0.9,
        )
    )
    trainer = AtlasGRPOTrainer(
        model=_model(), reward_funcs=RecordingReward(), args=cfg, train_dataset=_dataset(), processing_class=TOK
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["sampling/sampling_logp_difference/max"] <= 1e-4
        assert h["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=1e-3)


def test_resume_restores_speculator_weights_bit_exactly(tmp_path):
    args = _common(tmp_path, "atlas", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = AtlasGRPOTrainer(
        model=_model(),
        reward_funcs=RecordingReward(),
        args=AtlasGRPOConfig(**args),
        train_dataset=_dataset(),
        processing_class=TOK,
    )
    trainer.train()
    ckpt = tmp_path / "atlas" / "checkpoint-1"
    assert (ckpt / "atlas" / "atlas_adaptive_head" / "config.json").exists()  # the EAGLE-3 layout vLLM loads
    from atlas_rl.speculators.draft_head import DraftHead

    saved = DraftHead.from_pretrained(ckpt / "atlas" / "atlas_adaptive_head")
    # resume from step 1 with a fresh trainer: after loading, the serving head equals the saved one bit for bit
    args2 = dict(args, output_dir=str(tmp_path / "resumed"))
    trainer2 = AtlasGRPOTrainer(
        model=_model(),
        reward_funcs=RecordingReward(),
        args=AtlasGRPOConfig(**args2),
        train_dataset=_dataset(),
        processing_class=TOK,
    )
    seen = {}
    orig = trainer2.atlas_backend._before_rollout

    def spy():
        if "weights" not in seen:
            seen["weights"] = {k: v.clone() for k, v in trainer2.atlas_backend.adaptive_head.state_dict().items()}
        orig()

    trainer2.atlas_backend._before_rollout = spy
    trainer2.train(resume_from_checkpoint=str(ckpt))
    for k, v in saved.state_dict().items():
        if k == "lm_head.weight":
            continue
        assert torch.equal(seen["weights"][k], v), k


@pytest.mark.parametrize("config_cls", [AtlasGRPOConfig, AtlasRLOOConfig])
def test_unset_bf16_on_a_cpu_is_float32_where_bfloat16_matmuls_are_emulated(tmp_path, caplog, config_cls):
    """TRL defaults bf16 to True; on a CPU without native bfloat16 matmuls that emulates every training matmul
    (~50x slower than float32 on the AMD host). Unset means float32 there; what the user sets is kept."""
    kw = {k: v for k, v in _common(tmp_path, "atlas").items() if k != "bf16"}
    assert config_cls(**kw).bf16 is bf16_matmul_available()
    assert config_cls(**kw, bf16=False).bf16 is False
    caplog.clear()
    with caplog.at_level("WARNING", logger="atlas_rl.trainers.config"):
        assert config_cls(**kw, bf16=True).bf16 is True
    assert any("native bfloat16" in r.getMessage() for r in caplog.records) is not bf16_matmul_available()


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="generation_backend"):
        AtlasGRPOConfig(**_common(tmp_path, "foo"))
    with pytest.raises(ValueError, match="repetition_penalty"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", repetition_penalty=1.2))
    with pytest.raises(ValueError, match="atlas_acceptance_probe"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_acceptance_probe=-1))
    with pytest.raises(ValueError, match="atlas_speculators"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_speculators="medusa"))
    with pytest.raises(ValueError, match="AtlasGRPOConfig"):
        from trl import GRPOConfig

        AtlasGRPOTrainer(
            model=_model(),
            reward_funcs=RecordingReward(),
            args=GRPOConfig(output_dir=str(tmp_path / "g"), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=_dataset(),
            processing_class=TOK,
        )
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(TOK)))
    with pytest.raises(ValueError, match="gpt2"):
        AtlasGRPOTrainer(
            model=gpt2,
            reward_funcs=RecordingReward(),
            args=AtlasGRPOConfig(**_common(tmp_path, "atlas")),
            train_dataset=_dataset(),
            processing_class=TOK,
        )
    with pytest.raises(ValueError, match="static"):
        cfg = AtlasGRPOConfig(**_common(tmp_path, "atlas", max_steps=1, atlas_speculators="static"))
        AtlasGRPOTrainer(
            model=_model(), reward_funcs=RecordingReward(), args=cfg, train_dataset=_dataset(), processing_class=TOK
        ).train()


@pytest.mark.parametrize("cls", [AtlasGRPOConfig, AtlasRLOOConfig])
def test_temperature_zero_is_rejected_with_the_greedy_recipe(tmp_path, cls):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0.*do_sample"):
        cls(**_common(tmp_path, "atlas", temperature=0.0))
    with pytest.raises(ValueError, match="temperature"):
        cls(**_common(tmp_path, "transformers", temperature=0.0))  # TRL divides by it on every backend


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_unbounded_retraining_minimum_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="atlas_adaptive_train_min_s must be a finite number"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_adaptive_train_min_s=bad))


def test_old_draft_length_name_still_works_with_a_deprecation_warning(tmp_path):
    with pytest.warns(FutureWarning, match="atlas_num_speculative_tokens"):
        cfg = AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_max_draft_tokens=6))
    assert cfg.atlas_num_speculative_tokens == 6
    assert (
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_num_speculative_tokens=3)).atlas_num_speculative_tokens == 3
    )
    with pytest.raises(ValueError, match="disagree"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_max_draft_tokens=6, atlas_num_speculative_tokens=3))
    with pytest.raises(ValueError, match=r"atlas_num_speculative_tokens must be an int in \[1, 16\]"):
        AtlasGRPOConfig(**_common(tmp_path, "atlas", atlas_num_speculative_tokens=0))


def test_paired_baseline_in_halves_keeps_the_rollout_and_logs_the_measurement(tmp_path):
    """The paired no-speculation rollout runs interleaved in halves (atlas A, baseline A, baseline B, atlas B): the
    completions handed to TRL are still exactly the greedy policy's, in prompt order; the step logs the speed-up,
    its disturbed flag and where the rollout time went."""
    a = _greedy_grpo(tmp_path, "atlas", max_steps=1, per_device_train_batch_size=8, atlas_baseline_every=1)
    t = _greedy_grpo(tmp_path, "transformers", max_steps=1, per_device_train_batch_size=8)
    assert a[0] == t[0] and len(a[0]) == 8
    cfg = AtlasGRPOConfig(
        **_common(tmp_path, "atlas", max_steps=1, per_device_train_batch_size=8, atlas_baseline_every=1)
    )
    trainer = AtlasGRPOTrainer(
        model=_model(), reward_funcs=RecordingReward(), args=cfg, train_dataset=_dataset(), processing_class=TOK
    )
    trainer.train()
    log = next(h for h in trainer.state.log_history if "atlas/speedup" in h)
    assert log["atlas/speedup"] > 0 and log["atlas/speedup_disturbed"] in (0.0, 1.0)
    assert log["atlas/speedup_half_spread"] >= 1.0
    for phase in ("prefill", "propose", "forward", "verify", "plan"):
        assert 0.0 <= log[f"atlas/rollout_{phase}_s"] <= log["atlas/rollout_s"]
