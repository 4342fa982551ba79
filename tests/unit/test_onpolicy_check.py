"""The end-to-end on-policy check: its statistics tell a changed sampler from an unchanged one, and it runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("scipy")

from atlas_rl.bench.onpolicy_check import compare, main, sample_stats  # noqa: E402
from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer  # noqa: E402
from atlas_rl.rollout import RolloutEngine  # noqa: E402

PROMPTS = [[5, 9, 14, 3], [7, 7, 20], [11, 2, 30, 4, 8], [6, 19]]


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok)).eval()
    return RolloutEngine(model, eos_token_ids=[])


def _at_temperature(engine, temperature: float, seed: int) -> dict:
    """sample_stats with the engine's sampling temperature changed (a sampler that is *not* the policy's)."""
    generate = engine.generate

    def hot(prompts, sp, num_generations=1):
        return generate(prompts, sp.__class__(**{**vars(sp), "temperature": temperature}), num_generations)

    engine.generate = hot
    try:
        return sample_stats(engine, PROMPTS, generations=16, max_new_tokens=12, seed=seed)
    finally:
        engine.generate = generate


def test_same_sampler_with_other_seeds_is_not_flagged(engine):
    # significance level 0.01 per p-value, fixed seeds: a deterministic outcome of a true null
    a = sample_stats(engine, PROMPTS, generations=16, max_new_tokens=12, seed=1)
    b = sample_stats(engine, PROMPTS, generations=16, max_new_tokens=12, seed=5000)
    assert len(a["mean_logprob"]) == len(a["length"]) == len(a["completions"]) == 64
    assert compare(a, b)["differ"] is False


def test_a_colder_sampler_is_flagged(engine):
    # T=0.6 concentrates on likelier tokens: the mean logprob of what it emits rises, which the check must see
    a = sample_stats(engine, PROMPTS, generations=16, max_new_tokens=12, seed=1)
    cold = _at_temperature(engine, 0.6, seed=5000)
    res = compare(cold, a)
    assert res["differ"] is True and res["mean_logprob_p_mann_whitney"] < 0.01


def test_check_runs_on_a_tiny_model_and_writes_its_summary(tmp_path):
    out = tmp_path / "onpolicy.json"
    argv = ["--tiny", "--rounds", "1", "--prompts", "2", "--generations", "2", "--max_new_tokens", "6"]
    summary = main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == summary
    assert set(summary) == {"significance_level", "k0", "default"}  # no static head ships for the tiny model
    assert summary["k0"]["samples"] == summary["default"]["samples"] == 4
    assert 0.0 <= summary["default"]["mean_logprob_p_ks"] <= 1.0 and "differ" in summary["default"]
    assert 0.0 <= summary["default"]["answer_line_p_fisher"] <= 1.0


def test_bad_options_are_a_usage_error():
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
