"""Clean exits and failure handling of the atlas trainers: background retraining never outlives ``train()``, the
process exit code is the real one, a failed retraining keeps the last good head, checkpoints are consistent."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from datasets import Dataset
from test_trainers import _common

from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer
from atlas_rl.trainers.backend import CheckpointStateError

TOK = tiny_tokenizer()

# One GRPO step on a tiny model whose adaptive head retrains in the background for up to 30 s after the rollout:
# the process ends while that retraining runs (normal end, a raising reward, or Ctrl-C in the reward).
SCRIPT = """
import sys
from datasets import Dataset
from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer

mode, out = sys.argv[1], sys.argv[2]
tok = tiny_tokenizer()
model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok))
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(8)])

def reward(completions, **kwargs):
    if mode == "raise":
        raise ValueError("the reward function exploded on purpose")
    if mode == "interrupt":
        raise KeyboardInterrupt
    return [float(len(c[0]["content"])) for c in completions]

args = AtlasGRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", max_steps=1,
                       per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                       logging_steps=1, save_strategy="no", atlas_adaptive_train_min_s=30.0)
AtlasGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok).train()
print("train() returned")
"""


def _run_script(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_process_exits_zero_when_training_ends_during_background_retraining(tmp_path):
    proc = _run_script(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train() returned" in proc.stdout and "terminate called" not in proc.stderr


def test_process_exits_one_with_the_reward_error_when_the_reward_raises(tmp_path):
    proc = _run_script(tmp_path, "raise")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: the reward function exploded on purpose" in proc.stderr
    assert "terminate called" not in proc.stderr


def test_keyboard_interrupt_exits_as_an_interrupt(tmp_path):
    proc = _run_script(tmp_path, "interrupt")
    assert proc.returncode in (130, -2), (proc.returncode, proc.stderr[-3000:])  # SIGINT's status, not 134
    assert "KeyboardInterrupt" in proc.stderr and "terminate called" not in proc.stderr


# ------------------------------------------------------------------------------------------------ in process
def _model():
    return tiny_llama(vocab_size=len(TOK), hidden_size=64, seed=0, **tiny_token_ids(TOK))


def _dataset(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)])


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def _trainer(tmp_path, model=None, **kw):
    base = _common(tmp_path, "atlas", **{"output_dir": str(tmp_path / "out"), **kw})  # the trainer tests' settings
    return AtlasGRPOTrainer(
        model=model if model is not None else _model(),
        reward_funcs=_length_reward,
        args=AtlasGRPOConfig(**base),
        train_dataset=_dataset(),
        processing_class=TOK,
    )


def _atlas_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "atlas-online-trainer"]


def test_train_leaves_no_background_retraining_and_restores_the_model_layers(tmp_path):
    model = _model()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    trainer = _trainer(tmp_path, model=model, atlas_adaptive_train_min_s=5.0, max_steps=1)
    trainer.train()
    assert not _atlas_threads() and trainer.atlas_backend.adaptive_trainer._thread is None
    # the engine's CPU kernel routing is gone: every nn.Linear runs nn.Linear.forward again
    assert all("forward" not in vars(m) and not hasattr(m, "_atlas_cpu_linear") for m in linears)


def _failing_loss(*args, **kwargs):
    raise RuntimeError("draft head loss blew up on purpose")


def test_failed_retraining_is_counted_logged_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("atlas_rl.training.online.ttt_loss", _failing_loss)
    trainer = _trainer(tmp_path, max_steps=3)
    head = trainer.atlas_backend
    with caplog.at_level(logging.WARNING, logger="atlas_rl.trainers.backend"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "atlas/speculator_train_failures" in h]
    assert [h["atlas/speculator_train_failures"] for h in logs] == [0.0, 1.0, 2.0]
    assert head.train_failures == 3  # the last one, after the last rollout, surfaced at close()
    first = [r for r in caplog.records if "retraining failed;" in r.getMessage()]
    assert len(first) == 1 and first[0].exc_info is not None
    assert any("failed 3 time(s)" in r.getMessage() for r in caplog.records)
    # the adaptive head still drafts with its last good (here: initial) weights, and its copy was reset to them
    serving = dict(head.adaptive_head.named_parameters())
    for name, p in head.adaptive_trainer.train_head.named_parameters():
        assert torch.equal(p, serving[name]), name


def test_failure_after_the_last_rollout_surfaces_at_close(tmp_path, monkeypatch, caplog):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    backend = trainer.atlas_backend
    monkeypatch.setattr("atlas_rl.training.online.ttt_loss", _failing_loss)
    backend._closed = False
    backend.adaptive_trainer.start(max_steps=1)
    backend.adaptive_trainer._thread.join()  # it failed in the background; nobody has looked yet
    with caplog.at_level(logging.WARNING, logger="atlas_rl.trainers.backend"):
        backend.close()
    assert backend.train_failures == 1
    assert any("draft head loss blew up" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_retraining_stops_after_repeated_failures(tmp_path, monkeypatch):
    monkeypatch.setattr("atlas_rl.training.online.ttt_loss", _failing_loss)
    trainer = _trainer(tmp_path, max_steps=5, atlas_adaptive_background=False)
    trainer.train()
    backend = trainer.atlas_backend
    assert backend.train_failures == 3 and backend._train_disabled  # then no retraining is even attempted


def test_summary_keeps_the_last_value_of_counters(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, logging_steps=10)  # one log entry averaging both steps
    trainer.train()
    logged = [h for h in trainer.state.log_history if "atlas/policy_version" in h]
    assert logged and logged[-1]["atlas/policy_version"] == 1.0  # the mean of (0, 1) would read 0.5


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_state_is_complete_and_resume_refuses_missing_or_corrupt_state(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    atlas_dir = tmp_path / "out" / "checkpoint-1" / "atlas"
    state = json.loads((atlas_dir / "atlas_state.json").read_text())
    assert state["policy_version"] == 1
    assert not [p.name for p in atlas_dir.iterdir() if p.name.endswith(".tmp")]  # written via temp + rename
    backend = trainer.atlas_backend
    (atlas_dir / "atlas_state.json").write_text(json.dumps(state)[:20])  # truncated
    with pytest.raises(CheckpointStateError, match="atlas_state.json is corrupt or truncated"):
        backend.load(atlas_dir)
    (atlas_dir / "atlas_state.json").unlink()
    with pytest.raises(CheckpointStateError, match="atlas_state.json is missing"):
        backend.load(atlas_dir)
    resumed = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="restart policy_version at 0"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))


def test_atlas_state_is_written_before_the_trainer_marks_the_checkpoint_done(tmp_path, monkeypatch):
    from transformers import TrainerState

    trainer = _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    atlas_first = []
    original = TrainerState.save_to_json

    def spy(state, path):
        atlas_first.append(os.path.exists(os.path.join(os.path.dirname(path), "atlas", "atlas_state.json")))
        return original(state, path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    trainer.train()
    assert atlas_first == [True]


def test_a_default_run_raises_no_future_warnings(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=1).train()
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []
