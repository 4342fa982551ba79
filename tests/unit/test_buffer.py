"""Capture buffer: samples assembled from the engine's capture records equal the teacher-forced ones, carry their
policy version, finalize at the end of a call, and never exceed the memory bound."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BigramSpeculator, NoisyOracleSpeculator

from atlas_rl import SamplingParams
from atlas_rl.config import EngineConfig
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.offline import samples_from_sequences
from atlas_rl.training.samples import SequenceSample
from atlas_rl.verification.rejection import RejectionSampler

V = 64
PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]
FUSE = (1, -1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is as fast, and much faster on a shared, oversubscribed machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, dtype=torch.float32, seed=0)


def _engine(model, oracle: bool = True, **kw) -> RolloutEngine:
    """Greedy: a noisy oracle gives ragged multi-token acceptance; sampling: a bigram draft (cheap)."""
    spec = NoisyOracleSpeculator(model, noise=0.3) if oracle else BigramSpeculator(V, soft=True, scale=1.0)
    return RolloutEngine(model, speculators=[spec], controller=FixedController(3), **kw)


def _check_against_teacher_forced(model, batch, samples: list[SequenceSample], version: int) -> None:
    """Each sample equals the offline (teacher-forced) sample of the same sequence where both have data."""
    seqs = [p + c for p, c in zip(batch.prompt_ids, batch.completion_ids)]
    assert len(samples) == len(seqs)
    ref = samples_from_sequences(
        model, seqs, [len(p) for p in batch.prompt_ids], FUSE, top_k=8, batch_size=16, feat_dtype=torch.float32
    )
    for s, r, seq in zip(samples, ref, seqs):
        assert s.tokens.tolist() == seq and s.policy_version == version
        # every position but the last has features (the last token was never run through the target)
        assert s.has_feats.tolist() == [True] * (len(seq) - 1) + [False]
        assert torch.equal(s.label_mask, r.label_mask)  # last prompt position .. second to last token
        h = s.has_feats
        assert torch.allclose(s.feats[h].float(), r.feats[h], atol=2e-2, rtol=2e-3)
        m = s.label_mask
        assert torch.equal(s.label_ids[m][:, 0], r.label_ids[m][:, 0])
        assert torch.allclose(s.label_probs[m], r.label_probs[m], atol=1e-5)
        assert (s.label_ids[~m] == -1).all() and (s.label_probs[~m] == 0).all()


@pytest.mark.parametrize(
    "sampling,n_gen,max_rows",
    [
        (SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), 1, None),
        (SamplingParams(temperature=1.0, max_new_tokens=10, seed=3, ignore_eos=True), 3, None),
        (SamplingParams(temperature=1.0, max_new_tokens=10, seed=4, ignore_eos=True), 2, 4),  # waves of 2 groups
        # labels stay the T = 1 distribution when the verifier's logprobs are processed ones (not reused then)
        (SamplingParams(temperature=0.7, top_k=20, max_new_tokens=10, seed=5, ignore_eos=True), 2, None),
    ],
)
def test_samples_equal_teacher_forced_sequences(model, sampling, n_gen, max_rows):
    eng = _engine(model, oracle=sampling.greedy, config=EngineConfig(max_rows=max_rows))
    eng.update_weights(None, version=3)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=8, feat_dtype=torch.float32))
    buf.attach(eng)
    batch = eng.generate(PROMPTS, sampling, num_generations=n_gen)
    assert batch.stats.num_accepted_tokens > 0  # multi-position verification records were assembled
    buf.flush()
    by_row = sorted(buf.samples(), key=lambda s: (len(s.tokens), s.tokens.tolist()))
    order = sorted(range(len(batch)), key=lambda i: (len(batch.prompt_ids[i]) + len(batch.completion_ids[i]),
                                                     batch.prompt_ids[i] + batch.completion_ids[i]))  # fmt: skip
    batch.prompt_ids = [batch.prompt_ids[i] for i in order]
    batch.completion_ids = [batch.completion_ids[i] for i in order]
    _check_against_teacher_forced(model, batch, by_row, version=3)
    assert buf.num_open_rows == 0 and buf.newest_version == 3


def test_rows_end_at_their_stop_token(model):
    """Verification may accept drafts past a stop token; the sample ends where the engine ended the row."""
    base = RolloutEngine(model).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    stop = base.completion_ids[1][4]  # a token row 1 emits mid-completion
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop,))
    eng = _engine(model)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=8, feat_dtype=torch.float32))
    buf.attach(eng)
    batch = eng.generate(PROMPTS, sp)
    buf.flush()
    assert any(f == "stop" for f in batch.finish_reasons)
    seqs = sorted(s.tokens.tolist() for s in buf.samples())
    assert seqs == sorted(p + c for p, c in zip(batch.prompt_ids, batch.completion_ids))


def test_a_new_call_finalizes_the_previous_one_with_its_own_version(model):
    eng = _engine(model)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=4))
    buf.attach(eng)
    sp = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    eng.generate(PROMPTS, sp)
    assert len(buf) == 0 and buf.num_open_rows == len(PROMPTS)  # the call's rows wait for flush / the next call
    eng.update_weights(None)  # version 1
    eng.generate(PROMPTS[:2], sp)
    assert [s.policy_version for s in buf.samples()] == [0] * len(PROMPTS)
    assert buf.flush() == 2
    assert [s.policy_version for s in buf.samples()] == [0] * len(PROMPTS) + [1, 1]
    assert buf.labels_by_version() == {0: len(PROMPTS) * 8, 1: 2 * 8}  # last prompt position + 7 decode positions


@pytest.mark.parametrize("bound", ["max_positions", "max_bytes"])
def test_buffer_never_exceeds_its_bound(model, bound):
    limit = 120 if bound == "max_positions" else 60_000
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=8, **{bound: limit}))
    seen: list[int] = []

    def checked(rec) -> None:
        buf(rec)
        seen.append(buf.num_positions if bound == "max_positions" else buf.nbytes)

    eng = _engine(model, oracle=False)
    eng.add_capture_hook(checked)
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0, ignore_eos=True)
    for _ in range(3):
        eng.generate(PROMPTS, sp, num_generations=2)
        buf.flush()
        seen.append(buf.num_positions if bound == "max_positions" else buf.nbytes)
        eng.update_weights(None)
    assert len(seen) > 20 and max(seen) <= limit
    assert buf.num_samples_evicted > 0 and len(buf) > 0
    assert buf.samples()[-1].policy_version == 2  # the oldest went first: the newest call's data is kept


def test_open_rows_are_dropped_when_one_call_alone_exceeds_the_bound(model):
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=4, max_positions=30))
    eng = _engine(model)
    buf.attach(eng)
    eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), num_generations=2)
    assert buf.num_positions <= 30 and buf.num_rows_dropped > 0
    buf.flush()
    assert buf.num_positions <= 30 and len(buf) >= 1


def test_capture_hook_copies_are_usable_by_autograd(model):
    """The engine generates under inference_mode; the buffer's tensors must still work in a training graph."""
    eng = _engine(model)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=4))
    buf.attach(eng)
    eng.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    buf.flush()
    s = buf.samples()[0]
    w = torch.randn(s.feats.shape[-1], 2, requires_grad=True)
    (s.feats.float() @ w).sum().backward()
    assert w.grad is not None and not s.feats.is_inference()


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="fuse_layers"):
        CaptureBufferConfig(fuse_layers=())
    with pytest.raises(ValueError, match="max_positions"):
        CaptureBufferConfig(max_positions=0)
    with pytest.raises(ValueError, match="feat_dtype"):
        CaptureBufferConfig(feat_dtype=torch.long)
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=(7,)))
    eng = _engine(tiny_llama(vocab_size=V, seed=0))
    buf.attach(eng)
    with pytest.raises(ValueError, match="no hidden states for layers"):
        eng.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=2))


class _NoRawLogprobs(RejectionSampler):
    """A verifier that hands out no log-softmax: the buffer computes its labels from the logits."""

    @property
    def last_raw_logprobs(self):
        return None

    @last_raw_logprobs.setter
    def last_raw_logprobs(self, value) -> None:
        pass


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_labels_from_the_verifiers_logprobs_equal_labels_from_the_logits(model, temperature):
    """The step labels taken from the verifier's log-softmax (compiled top-k) equal the logits path's top-k and
    logsumexp: same ids in the same order, probabilities within float32 rounding."""
    sampling = SamplingParams(temperature=temperature, max_new_tokens=12, seed=7, ignore_eos=True)
    out = []
    for verifier in (None, _NoRawLogprobs()):
        eng = _engine(model, oracle=sampling.greedy, verifier=verifier)
        buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=FUSE, top_k=8, feat_dtype=torch.float32))
        buf.attach(eng)
        eng.generate(PROMPTS, sampling, num_generations=2)
        buf.flush()
        out.append(buf.samples())
    assert len(out[0]) == len(out[1]) > 0
    for a, b in zip(*out):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.label_mask, b.label_mask)
        assert torch.equal(a.label_ids, b.label_ids)
        assert torch.allclose(a.label_probs, b.label_probs, rtol=1e-5, atol=1e-7)
