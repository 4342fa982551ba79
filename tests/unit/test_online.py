"""Online speculator trainer: learning from the engine's own captured data, the NaN guard, bit-exact checkpoints,
newest-version preference, and background training with atomic publishing."""

from __future__ import annotations

import time

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.adaptive import AdaptiveHeadConfig, build_adaptive_head
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.losses import ttt_loss
from atlas_rl.training.online import OnlineSpeculatorTrainer, OnlineTrainerConfig
from atlas_rl.training.samples import SequenceSample, collate

V = 64
FUSE = (-1,)
GREEDY = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is as fast, and much faster on a shared, oversubscribed machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def phrase_model(vocab_size: int = V, num_phrases: int = 12, steps: int = 80, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama briefly trained on text made of a dozen fixed random "phrases" in random order.

    A randomly initialised tiny model continues chaotically (its next token depends on the whole context in no
    learnable way: a bigram table predicts 5-25% of its greedy tokens); trained on phrases it continues them, as a
    real LM continues the patterns of its data, so what a draft head can learn about it is learnable quickly.
    """
    g = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(1, vocab_size - 1, (int(torch.randint(6, 15, (1,), generator=g)),), generator=g)
               for _ in range(num_phrases)]  # fmt: skip
    m = tiny_llama(vocab_size=vocab_size, seed=seed)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = []
        for _ in range(16):
            seq: list[int] = []
            while len(seq) < 64:
                seq += phrases[int(torch.randint(0, num_phrases, (1,), generator=g))].tolist()
            rows.append(seq[:64])
        x = torch.tensor(rows)
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V - 1, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def target():
    return phrase_model()


def _head(model, seed: int = 0):
    return build_adaptive_head(
        model, config=AdaptiveHeadConfig(draft_vocab_size=V, intermediate_size=64, fuse_layers=FUSE), seed=seed
    )


def _engine(model, head) -> RolloutEngine:
    return RolloutEngine(
        model, speculators=[DraftHeadSpeculator(head, name="adaptive")], controller=FixedController(4)
    )


def _captured(model, head, prompts, sampling=GREEDY, version: int = 0, buf: CaptureBuffer | None = None):
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=16)) if buf is None else buf
    eng = _engine(model, head)
    if version:
        eng.update_weights(None, version=version)
    handle = buf.attach(eng)
    eng.generate(prompts, sampling)
    buf.flush()
    handle.remove()
    return buf


@pytest.fixture(scope="module")
def captured(target):
    """Training data (128 prompts) and held-out data (16 other prompts), captured from real generate calls.

    With 64 training prompts the head's held-out tau plateaus near 2.0 whatever the lr or step count (1.99-2.01 on
    the AMD host, just above on the Xeon: the phrase model itself differs in its last bits between hosts); twice the
    data lifts it to ~2.2 on both: the head is data-limited here, not step-limited.
    """
    head = _head(target)
    return _captured(target, head, random_prompts(128, 0)), _captured(target, head, random_prompts(16, 99))


def _heldout_loss(head, buf: CaptureBuffer) -> float:
    with torch.no_grad():
        return ttt_loss(head, collate(buf.samples(), head.target_to_draft))[1]["loss"]


def _weights(head) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_on_captured_data_lowers_heldout_loss_and_raises_acceptance(target, captured):
    train, held = captured
    head = _head(target)
    base = RolloutEngine(target).generate(random_prompts(16, 99), GREEDY)
    before = _engine(target, head).generate(random_prompts(16, 99), GREEDY)
    loss0 = _heldout_loss(head, held)
    trainer = OnlineSpeculatorTrainer(head, train, OnlineTrainerConfig(lr=3e-3, batch_size=8, max_seq_len=64))
    m = trainer.step(max_steps=120)
    assert m["call_steps"] == 120 and m["steps"] == 120 and m["skipped"] == 0 and m["samples_seen"] == 960
    assert _heldout_loss(head, held) == loss0  # nothing reaches the serving head before publish()
    assert trainer.publish() == 120
    loss1 = _heldout_loss(head, held)
    after = _engine(target, head).generate(random_prompts(16, 99), GREEDY)
    assert after.completion_ids == base.completion_ids  # lossless, whatever the head
    tau0, tau1 = before.stats.mean_acceptance_length, after.stats.mean_acceptance_length
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    assert tau0 < 1.2 and tau1 > 2.0 and tau1 > 1.7 * tau0, (tau0, tau1)
    assert m["staleness"] == 0 and m["trained_version"] == 0 and m["top1"] > 0.5


def test_nan_guard_keeps_the_previous_weights(target, captured):
    train, _ = captured
    head = _head(target)
    trainer = OnlineSpeculatorTrainer(head, train, OnlineTrainerConfig(batch_size=4, max_seq_len=64))
    trainer.step(max_steps=2)
    good = _weights(trainer.train_head)
    opt_steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    # a buffer holding only poisoned samples: NaN features, then inf label probabilities
    s = train.samples()[0]
    for poison in ("feats", "label_probs"):
        bad = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE))
        t = getattr(s, poison).clone()
        t[len(t) // 2] = float("nan") if poison == "feats" else float("inf")
        kw = {f: getattr(s, f) for f in ("tokens", "feats", "has_feats", "label_ids", "label_probs", "label_mask")}
        kw[poison] = t
        bad.add(SequenceSample(**kw, policy_version=1))
        trainer.buffer = bad
        m = trainer.step(max_steps=3)
        assert m["call_steps"] == 0 and m["call_skipped"] == 3
        assert _same(_weights(trainer.train_head), good)
        assert [s["step"] for s in trainer.optimizer.state.values()] == opt_steps  # no optimizer step either
    assert trainer.num_skipped == 6 and trainer.metrics()["skipped"] == 6
    trainer.buffer = train
    assert trainer.step(max_steps=1)["call_steps"] == 1  # training resumes on good data
    assert all(torch.isfinite(p).all() for p in trainer.train_head.parameters())


def test_checkpoint_round_trip_is_bit_exact(target, captured, tmp_path):
    train, _ = captured
    cfg = OnlineTrainerConfig(batch_size=4, max_seq_len=48, seed=5)
    a = OnlineSpeculatorTrainer(_head(target), train, cfg)
    a.step(max_steps=3)
    path = tmp_path / "trainer.safetensors"
    a.save(path)
    sd = a.state_dict()
    b = OnlineSpeculatorTrainer(_head(target, seed=1), train, cfg)  # different initial weights: all overwritten
    b.load(path)
    c = OnlineSpeculatorTrainer(_head(target, seed=2), train, cfg)
    c.load_state_dict(sd)
    for t in (b, c):
        assert _same(_weights(t.train_head), _weights(a.train_head)) and t.metrics() == a.metrics()
    ma = a.step(max_steps=3)
    for t in (b, c):
        mt = t.step(max_steps=3)
        assert _same(_weights(t.train_head), _weights(a.train_head))  # same minibatches, same updates
        assert mt["loss"] == ma["loss"] and mt["samples_seen"] == ma["samples_seen"]
        for (_, pa), (_, pt) in zip(a._params, t._params):
            sa, st = a.optimizer.state[pa], t.optimizer.state[pt]
            assert sa.keys() == st.keys() and all(torch.equal(sa[k], st[k]) for k in sa)
    with pytest.raises(ValueError, match="not an online-trainer checkpoint"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        b.load(tmp_path / "other.safetensors")
    other = OnlineSpeculatorTrainer(
        build_adaptive_head(
            target, config=AdaptiveHeadConfig(draft_vocab_size=V, intermediate_size=32, fuse_layers=FUSE)
        ),
        train,
        cfg,
    )
    with pytest.raises(ValueError, match="trainer.safetensors.*shape"):
        other.load(path)


def test_newest_policy_version_is_preferred(target):
    head = _head(target)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=8))
    _captured(target, head, random_prompts(12, 1), version=0, buf=buf)
    _captured(target, head, random_prompts(4, 2), version=1, buf=buf)
    labels = buf.labels_by_version()
    assert set(labels) == {0, 1}
    # no publish guard: its held-out share (a hash of each sample's tokens) would leave some labels out of the pool
    # these counts describe, and which samples those are depends on the host's rounding of the greedy completions
    only_new = OnlineSpeculatorTrainer(
        head, buf, OnlineTrainerConfig(batch_size=8, newest_min_labels=labels[1], publish_guard=False)
    )
    for _ in range(5):
        batch, version = only_new._pick()
        assert version == 1 and all(s.policy_version == 1 for s in batch)
    mixed = OnlineSpeculatorTrainer(
        head,
        buf,
        OnlineTrainerConfig(batch_size=8, newest_min_labels=labels[1] + 1, recency_decay=0.5, publish_guard=False),
    )
    picked = [s.policy_version for _ in range(50) for s in mixed._pick()[0]]
    share_new = picked.count(1) / len(picked)
    expect = labels[1] / (labels[1] + 0.5 * labels[0])  # sampled by labels, older versions down-weighted
    assert abs(share_new - expect) < 0.1, (share_new, expect)
    m = mixed.step(max_steps=1)
    assert m["trained_version"] == 1 and m["staleness"] == 0
    _captured(target, head, random_prompts(4, 3), version=3, buf=buf)
    assert mixed.metrics()["staleness"] == 2  # the newest data is two policy versions ahead of training


def test_background_training_runs_while_generating_and_publish_is_atomic(target, captured):
    train, _ = captured
    cfg = OnlineTrainerConfig(batch_size=4, max_seq_len=48, seed=3)
    head = _head(target)
    serving_before = _weights(head)
    trainer = OnlineSpeculatorTrainer(head, train, cfg)
    trainer.start(max_steps=60)
    assert trainer.running
    eng = _engine(target, head)
    steps_at_start = trainer.num_steps
    eng.generate(random_prompts(8, 7), GREEDY)  # the caller works while the trainer trains
    steps_during = trainer.num_steps - steps_at_start
    assert _same(_weights(head), serving_before)  # the engine drafted from a head nobody touched
    published = []
    while trainer.running:
        published.append((trainer.publish(), _weights(head)))
        time.sleep(0.05)
    m = trainer.wait()
    assert m is not None and m["call_steps"] == 60 and not trainer.running
    assert steps_during > 0 and published
    # every published state is exactly the state after a whole number of optimizer steps: replay it
    replay = OnlineSpeculatorTrainer(_head(target), train, cfg)
    done = 0
    for n, w in published[:3]:
        replay.step(max_steps=n - done)
        done = n
        assert _same(_weights(replay.train_head), w)
    with pytest.raises(RuntimeError, match="already running"):
        trainer.start(max_steps=10)
        trainer.start(max_steps=1)
    trainer.wait()


def test_time_budget_is_respected(target, captured):
    train, _ = captured
    trainer = OnlineSpeculatorTrainer(_head(target), train, OnlineTrainerConfig(batch_size=4, max_seq_len=48))
    t0 = time.perf_counter()
    m = trainer.step(time_budget_s=1.0)
    trainer.publish()  # the guard's time is part of the budget
    wall = time.perf_counter() - t0
    assert m["call_steps"] >= 1 and wall < 1.5 and m["call_s"] <= wall


def test_config_errors_say_what_to_change(target):
    with pytest.raises(ValueError, match="lr"):
        OnlineTrainerConfig(lr=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        OnlineTrainerConfig(max_seq_len=3, ttt_steps=3)
    with pytest.raises(ValueError, match="holdout_every"):
        OnlineTrainerConfig(holdout_every=1)
    head = _head(target)
    with pytest.raises(ValueError, match="fuse_layers=head.config.fuse_layers"):
        OnlineSpeculatorTrainer(head, CaptureBuffer(CaptureBufferConfig(fuse_layers=(1,))))
    with pytest.raises(ValueError, match="time_budget_s"):
        OnlineSpeculatorTrainer(head, CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE))).step()
    empty = OnlineSpeculatorTrainer(head, CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE)))
    assert empty.step(max_steps=5)["call_steps"] == 0  # nothing captured yet: nothing to do


def test_nan_guard_warns_once_for_many_skipped_steps(target, captured, caplog):
    train, _ = captured
    trainer = OnlineSpeculatorTrainer(_head(target), train, OnlineTrainerConfig(batch_size=4, max_seq_len=64))
    s = train.samples()[0]
    bad = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE))
    feats = s.feats.clone()
    feats[len(feats) // 2] = float("nan")
    kw = {f: getattr(s, f) for f in ("tokens", "has_feats", "label_ids", "label_probs", "label_mask")}
    bad.add(SequenceSample(**kw, feats=feats, policy_version=0))
    trainer.buffer = bad
    with caplog.at_level("WARNING", logger="atlas_rl.training.online"):
        trainer.step(max_steps=5)
        trainer.step(max_steps=5)
    warnings = [r for r in caplog.records if "non-finite" in r.getMessage() and r.levelname == "WARNING"]
    assert trainer.num_skipped == 10 and len(warnings) == 1


def test_cancel_stops_a_background_run_after_its_current_step(target, captured):
    train, _ = captured
    trainer = OnlineSpeculatorTrainer(_head(target), train, OnlineTrainerConfig(batch_size=4, max_seq_len=48))
    trainer.start(time_budget_s=60.0)
    assert not trainer._thread.daemon  # interpreter shutdown joins it instead of killing it mid-kernel
    while trainer.num_steps == 0:
        time.sleep(0.01)
    t0 = time.perf_counter()
    m = trainer.cancel()
    assert time.perf_counter() - t0 < 5.0 and not trainer.running
    assert m is not None and m["call_steps"] >= 1 and m["call_s"] < 30.0
    assert trainer.cancel() is None  # nothing runs any more
    assert trainer.step(max_steps=1)["call_steps"] == 1  # a later run is not cancelled


def test_discard_unpublished_returns_to_the_serving_weights(target, captured):
    train, _ = captured
    head = _head(target)
    serving = _weights(head)
    trainer = OnlineSpeculatorTrainer(head, train, OnlineTrainerConfig(batch_size=4, max_seq_len=48))
    trainer.step(max_steps=3)
    assert not _same(_weights(trainer.train_head), serving)
    trainer.discard_unpublished()
    assert _same(_weights(trainer.train_head), serving) and not trainer.optimizer.state
    assert trainer.step(max_steps=1)["call_steps"] == 1


def test_publish_guard_keeps_serving_weights_that_a_worse_update_would_replace(target, captured):
    """About one captured sample in holdout_every is never trained on; publish() replays the draft chain of both
    heads on those and refuses weights whose estimated acceptance length is lower (the serving head keeps drafting),
    and publishes the ones that are better."""
    train, _ = captured
    head = _head(target)
    trainer = OnlineSpeculatorTrainer(head, train, OnlineTrainerConfig(lr=3e-3, batch_size=8, max_seq_len=64))
    held = [s for s in train.samples() if trainer._held_out(s)]
    assert 0 < len(held) < len(train.samples()) // 3
    trainer.step(max_steps=60)
    assert trainer.publish() == 60 and trainer.last_guard["published"] == 1.0
    assert trainer.last_guard["candidate"] > trainer.last_guard["serving"]
    good = _weights(head)
    trainer.step(max_steps=1)
    with torch.no_grad():
        for _, p in trainer._params:
            p.add_(torch.randn_like(p) * 2.0)  # a collapsed update
    assert trainer.publish() == 60  # refused: the serving weights stay those of step 60
    assert _same(_weights(head), good) and trainer.num_rejected == 1 and trainer.metrics()["rejected_publishes"] == 1
    assert trainer.last_guard["candidate"] < trainer.last_guard["serving"] and trainer.last_guard["published"] == 0.0
    off = OnlineSpeculatorTrainer(_head(target), train, OnlineTrainerConfig(publish_guard=False))
    assert not any(off._held_out(s) for s in train.samples())  # without the guard every sample is trained on
