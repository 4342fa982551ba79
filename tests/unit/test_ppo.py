"""AtlasPPOTrainer on a tiny Llama, on CPU: the behaviour-policy ratio, learning with both backends, the reference
model, checkpoint/resume and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.trainers import AtlasPPOConfig, AtlasPPOTrainer
from atlas_rl.trainers.ppo import TRL_METRICS

TOK = tiny_tokenizer()
LETTERS = set("abcdefghijklmnopqrstuvwxyz")


def _model(dtype=torch.float32, seed=0):
    return tiny_llama(vocab_size=len(TOK), hidden_size=64, dtype=dtype, seed=seed, **tiny_token_ids(TOK))


def _dataset(n=64):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)])


def letters(completions, **kwargs):
    """1 + the share of lower-case letters in the completion: learnable by a tiny random policy (about 10% of its
    259 tokens are letters at the start); the offset of 1 gives the value model something to learn."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 + sum(ch in LETTERS for ch in t) / max(len(t), 1) for t in texts]


def _config(tmp_path, backend="atlas", **kw):
    base = dict(
        output_dir=str(tmp_path / backend),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=8,
        num_mini_batches=2,
        response_length=8,
        temperature=1.0,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        generation_backend=backend,
        atlas_adaptive_train_min_s=0.1,
        kl_coef=0.01,
        disable_tqdm=True,
    )
    base.update(kw)
    return AtlasPPOConfig(**base)


def _trainer(cfg, model=None, **kw):
    kw.setdefault("reward_funcs", letters)
    trainer = AtlasPPOTrainer(
        model=model if model is not None else _model(), args=cfg, train_dataset=_dataset(), processing_class=TOK, **kw
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _logs(trainer):
    return [h for h in trainer.state.log_history if "objective/scores" in h]


@pytest.mark.parametrize("backend", ["atlas", "transformers"])
def test_first_minibatch_ratio_is_one_and_trl_metrics_are_logged(tmp_path, backend):
    trainer = _trainer(_config(tmp_path, backend, temperature=0.7))  # T != 1: a missing 1/T would show
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 2
    for h in logs:
        assert h["policy/first_ratio_max_dev"] <= 1e-4  # fp32: the unchanged policy's ratio is 1
        for key in TRL_METRICS + ("atlas/rollout_s", "atlas/rollout_tokens_per_s", "reward", "loss", "step_time"):
            assert math.isfinite(h[key]), key
        assert h["val/ratio"] != 1.0  # later minibatches see a moved policy: the check above can fail
    if backend == "atlas":
        assert "atlas/mean_acceptance_length" in logs[-1] and "atlas/speculator_train_loss" in logs[-1]
        assert trainer.atlas_backend.policy_version == 2


def test_first_minibatch_ratio_is_one_in_float64_with_engine_logprobs(tmp_path):
    """The engine's rollout logprobs are the behaviour policy's: against the trainer's own forward the first ratio
    is 1 to float64 precision (a stale or mis-aligned logprob would be off by far more)."""
    trainer = _trainer(_config(tmp_path, "atlas", max_steps=1, temperature=0.7), model=_model(torch.float64))
    trainer.train()
    assert _logs(trainer)[0]["policy/first_ratio_max_dev"] <= 1e-9


def _learning_run(tmp_path, backend):
    trainer = _trainer(_config(tmp_path, backend, max_steps=30))
    trainer.train()
    logs = _logs(trainer)
    return [h["objective/scores"] for h in logs], [h["loss/value_avg"] for h in logs]


@pytest.mark.parametrize("backend", ["atlas", "transformers"])
def test_reward_rises_and_value_loss_falls_over_thirty_updates(tmp_path, backend):
    """Deterministic (fixed seeds). Reward = 1 + share of letters: starts near 1.1; PPO must lift the mean of the
    last 5 updates by > 0.15 over the first 5 (the runs measured reach +0.3 to +0.8), and the value model must
    learn the offset: its loss falls by more than 5x from the first update to the median of the last 10."""
    scores, vloss = _learning_run(tmp_path, backend)
    assert len(scores) == 30
    assert sum(scores[-5:]) / 5 - sum(scores[:5]) / 5 > 0.15, scores
    last = sorted(vloss[-10:])
    assert vloss[0] > 5 * (last[4] + last[5]) / 2, vloss


def test_reference_is_a_frozen_copy_and_absent_without_kl(tmp_path):
    model = _model()
    trainer = _trainer(_config(tmp_path, "transformers", max_steps=2), model=model)
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # frozen
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the policy moved
    kls = [h["objective/kl"] for h in _logs(trainer)]
    assert kls[0] == 0.0 and kls[1] != 0.0  # the reference equals the initial policy, then the policy moves away
    no_kl = _trainer(_config(tmp_path, "transformers", max_steps=1, kl_coef=0.0))
    assert no_kl.ref_model is None
    no_kl.train()
    assert _logs(no_kl)[0]["objective/kl"] == 0.0


def _resume_pair(tmp_path, backend):
    kw = dict(max_steps=3, save_strategy="steps", save_steps=2, kl_target=1.0, kl_horizon=100)
    straight = _trainer(_config(tmp_path / "a", backend, **kw))
    straight.train()
    ckpt = tmp_path / "a" / backend / "checkpoint-2"
    resumed = _trainer(_config(tmp_path / "b", backend, **kw))
    first = {}
    orig = resumed.generator.generate

    def spy(policy, prompts):  # the weights the first resumed rollout runs with
        first.setdefault("policy", {k: v.clone() for k, v in policy.state_dict().items()})
        first.setdefault("value", {k: v.clone() for k, v in resumed.value_model.state_dict().items()})
        return orig(policy, prompts)

    resumed.generator.generate = spy
    if resumed.atlas_backend is not None:
        backend = resumed.atlas_backend
        orig_before = backend._before_rollout

        def spy_before():  # the adaptive head the first resumed rollout drafts with, before it retrains
            if backend.adaptive_head is not None:
                first.setdefault("head", {k: v.clone() for k, v in backend.adaptive_head.state_dict().items()})
            orig_before()

        backend._before_rollout = spy_before
    resumed.train(resume_from_checkpoint=str(ckpt))
    return straight, resumed, ckpt, first


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """3 updates straight vs. 2 + resume from checkpoint-2 + 1 (transformers backend, seeded generate): identical
    policy and value weights at the end, and the adaptive KL coefficient restored."""
    straight, resumed, ckpt, _ = _resume_pair(tmp_path, "transformers")
    for name in ("model.safetensors", "value_model/model.safetensors", "ppo_state.json", "optimizer.pt"):
        assert (ckpt / name).exists(), name
    assert resumed.state.global_step == 3
    assert resumed.kl_ctl.value == straight.kl_ctl.value != 1.0
    for a, b in ((straight.policy, resumed.policy), (straight.value_model, resumed.value_model)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k


def test_resume_restores_policy_value_and_speculator_state_with_atlas(tmp_path):
    """With the atlas backend the first resumed rollout runs the checkpoint's policy and value weights bit for bit,
    and the speculator state (rollout counter, policy version, adaptive head) comes back. (Completions after a
    resume are distributed identically but not sample-identical: the controller's measured statistics, which steer
    how drafts consume randomness, start afresh.)"""
    from safetensors.torch import load_file

    from atlas_rl.speculators.draft_head import DraftHead

    straight, resumed, ckpt, first = _resume_pair(tmp_path, "atlas")
    saved_policy = load_file(str(ckpt / "model.safetensors"))
    saved_value = load_file(str(ckpt / "value_model" / "model.safetensors"))
    assert all(torch.equal(first["policy"][k], v) for k, v in saved_policy.items())
    assert all(torch.equal(first["value"][k], v) for k, v in saved_value.items())
    backend = resumed.atlas_backend
    assert backend.num_calls == 3 and backend.policy_version == 3
    head = DraftHead.from_pretrained(ckpt / "atlas" / "atlas_adaptive_head")
    for k, v in head.state_dict().items():
        if k != "lm_head.weight":  # re-copied from the policy before every rollout
            assert torch.equal(first["head"][k], v), k


def test_reward_functions_get_dataset_columns_and_weights(tmp_path):
    seen = {}

    def echo(prompts, completions, completion_ids, trainer_state, answer, **kw):
        seen["answer"] = list(answer)
        seen["n"] = len(completion_ids)
        return [2.0] * len(prompts)

    ds = Dataset.from_list([{"prompt": f"Q{i}: ", "answer": str(i)} for i in range(16)])
    cfg = _config(tmp_path, "transformers", max_steps=1, reward_weights=[0.5, 0.0])
    trainer = AtlasPPOTrainer(
        model=_model(), reward_funcs=[echo, letters], args=cfg, train_dataset=ds, processing_class=TOK
    )
    trainer.train()
    assert seen["n"] == 16 and len(seen["answer"]) == 16
    assert _logs(trainer)[0]["objective/scores"] == pytest.approx(1.0)  # 0.5 * 2 + 0 * letters


def test_bad_configs_and_inputs_fail_clearly(tmp_path):
    cases = [
        (dict(generation_backend="vllm"), "not available for PPO"),
        (dict(generation_backend="foo"), "generation_backend"),
        (dict(temperature=0.0), "temperature"),
        (dict(cliprange=0.0), "cliprange"),
        (dict(gamma=1.5), "gamma"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_coef=0.0, kl_target=6.0), "initial kl_coef"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(stop_token="</s>"), "stop_token"),
        (dict(missing_eos_penalty=-1.0), "missing_eos_penalty"),
        (dict(num_ppo_epochs=0), "num_ppo_epochs"),
        (dict(atlas_speculators="medusa"), "atlas_speculators"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _config(tmp_path, **kw)
    cfg = _config(tmp_path, "transformers")
    with pytest.raises(ValueError, match="reward_funcs"):
        _trainer(cfg, reward_funcs=None)
    with pytest.raises(ValueError, match="AtlasPPOConfig"):
        from transformers import TrainingArguments

        AtlasPPOTrainer(
            model=_model(),
            reward_funcs=letters,
            args=TrainingArguments(output_dir=str(tmp_path)),
            train_dataset=_dataset(),
        )
    with pytest.raises(ValueError, match="'prompt' column"):
        AtlasPPOTrainer(
            model=_model(),
            reward_funcs=letters,
            args=cfg,
            train_dataset=Dataset.from_list([{"q": "x"}]),
            processing_class=TOK,
        )
    with pytest.raises(ValueError, match="one PPO update needs 16"):
        AtlasPPOTrainer(
            model=_model(), reward_funcs=letters, args=cfg, train_dataset=_dataset(8), processing_class=TOK
        ).train()
    bad = _trainer(cfg, reward_funcs=lambda completions, **kw: [1.0])
    with pytest.raises(ValueError, match="one number per completion"):
        bad.train()


def test_recipe_config_gives_its_command_and_a_tiny_run_reports_ppo_metrics(tmp_path):
    """recipes/ppo.py + its YAML (first line: the launch command) run on the tiny model through the shared runner
    (the path of `atlas-rl demo --algo ppo`); the report lists PPO's TRL metrics per step."""
    import json
    from pathlib import Path

    import yaml

    from atlas_rl.trainers.runner import TaskRunConfig, recipe_main

    root = Path(__file__).resolve().parents[2]
    cmd = "recipes/ppo.py --config recipes/configs/ppo.yaml"
    assert cmd in (root / "recipes" / "ppo.py").read_text()
    first = (root / "recipes" / "configs" / "ppo.yaml").read_text().splitlines()[0]
    assert first.startswith("# accelerate launch") and cmd in first
    TaskRunConfig(**yaml.safe_load((root / "recipes" / "configs" / "ppo.yaml").read_text()))
    run_dir = tmp_path / "run"
    argv = ["--config", str(root / "recipes" / "configs" / "ppo.yaml")]
    for kv in ("tiny=true", "steps=2", "prompts=4", "max_new_tokens=6", f"run_dir={run_dir}"):
        argv += ["--set", kv]
    recipe_main("ppo", "test", argv)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["headline"]["steps"] == 2
    assert len(report["series"]["loss/value_avg"]) == 2 and "objective/kl" in report["series"]
    md = (run_dir / "report.md").read_text()
    assert "policy/clipfrac_avg" in md and "loss/value_avg" in md


def test_ppo_ab_table_reports_ratios_of_two_runs(tmp_path):
    import json

    from atlas_rl.bench.ppo_ab import main

    for name, backend, roll, step in (("a", "atlas", 2.0, 10.0), ("b", "transformers", 3.0, 11.0)):
        d = tmp_path / name
        d.mkdir()
        recs = [
            {"step": i, "objective/scores": 0.1 * i, "objective/kl": 0.5, "atlas/rollout_s": roll, "step_time": step}
            for i in (1, 2)
        ]
        recs.append({"step": 2, "train_runtime": 5.0})  # not a PPO step
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        (d / "run.json").write_text(json.dumps({"generation_backend": backend}))
    out = tmp_path / "ab.md"
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "transformers/atlas = **1.5×**" in text and "transformers/atlas = **1.1×**" in text
    assert text.startswith("| step |") and text.count("\n| ") == 2  # header, then 2 steps (the separator starts "|-")


def test_sequence_classifier_as_value_model_and_reward_model(tmp_path):
    """An AutoModelForSequenceClassification-style model serves as value model (saved with save_pretrained, loaded
    on resume) and as a reward model (its head's output on the last completion token)."""
    from transformers import LlamaForSequenceClassification

    def classifier(seed):
        torch.manual_seed(seed)
        cfg = _model().config
        cfg.num_labels = 1
        return LlamaForSequenceClassification(cfg)

    rm = classifier(1)
    cfg = _config(tmp_path, "transformers", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = _trainer(cfg, value_model=classifier(2), reward_funcs=[rm])
    trainer.train()
    h = _logs(trainer)[0]
    assert h["rewards/LlamaForSequenceClassification/mean"] == h["objective/scores"] != 0.0
    ckpt = tmp_path / "transformers" / "checkpoint-1"
    assert (ckpt / "value_model" / "config.json").exists()
    resumed = _trainer(cfg, value_model=classifier(3), reward_funcs=[rm])
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (k, va), vb in zip(trainer.value_model.state_dict().items(), resumed.value_model.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("backend", ["atlas", "transformers"])
def test_without_stop_token_every_completion_has_response_length(tmp_path, backend):
    seen = []

    def record(completions, completion_ids, **kw):
        seen.extend(completion_ids)
        return [1.0] * len(completion_ids)

    cfg = _config(tmp_path, backend, max_steps=1, stop_token=None, missing_eos_penalty=1.0, response_length=12)
    trainer = _trainer(cfg, reward_funcs=record)
    trainer.train()
    assert len(seen) == 16 and all(len(c) == 12 for c in seen)
    assert _logs(trainer)[0]["objective/scores"] == 1.0  # no stop token configured: no missing-EOS penalty


def test_trainer_capture_feeds_the_adaptive_head_from_the_first_epoch(tmp_path):
    """atlas_capture="trainer" (what vLLM rollouts use): the adaptive head's samples come from the first PPO epoch's
    policy forward, one per rollout row, tagged with the version that generated it; the engine hook stays off."""
    trainer = _trainer(_config(tmp_path, atlas_capture="trainer", max_steps=3, num_ppo_epochs=2))
    trainer.train()
    b = trainer.atlas_backend
    rows = trainer.args.rollout_batch_size
    versions = sorted(s.policy_version for s in b.buffer.samples())
    assert b.capture_mode == "trainer"
    assert versions == [0] * rows + [1] * rows + [2] * rows  # every row of an update once, despite 2 epochs
    assert all(s.num_labels > 0 and s.has_feats.any() for s in b.buffer.samples())
    assert b.adaptive_trainer.num_steps > 0
