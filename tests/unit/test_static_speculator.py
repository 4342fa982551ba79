"""Static speculator: the offline pipeline end to end on a tiny model (seconds), its pieces, the recipe's command
line, and the head shipped in the package (size, card, loading by target fingerprint)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators import SuffixSpeculator
from atlas_rl.speculators import defaults as defaults_mod
from atlas_rl.speculators.defaults import (
    default_speculators,
    load_static_speculator,
    shipped_static_heads,
    static_head_path,
)
from atlas_rl.speculators.draft_head import DraftHead, target_fingerprint
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.training import static as static_mod
from atlas_rl.training.samples import SequenceSample
from atlas_rl.training.static import (
    StaticSpeculatorConfig,
    build_draft_vocab,
    load_samples,
    save_samples,
    train_static_speculator,
    vocab_coverage,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "atlas_rl" / "data" / "speculators" / "smollm2-135m-instruct-eagle3"
SMOLLM2_FINGERPRINT = "llama-L30-H576-V49152"
MAX_SHIPPED_BYTES = 32 * 1024 * 1024


def _tiny_config(tmp_path: Path, **kw) -> StaticSpeculatorConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        gen_temperatures=(0.0, 1.0),
        gen_max_new_tokens=16,
        gen_max_rows=8,
        label_top_k=8,
        fuse_layers=(1, 2),
        draft_vocab_size=96,
        intermediate_size=32,
        epochs=2.0,
        batch_tokens=256,
        warmup_steps=2,
        log_every=2,
        eval_max_new_tokens=12,
    )
    base.update(kw)
    return StaticSpeculatorConfig(**base)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 120, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=128, hidden_size=64, num_layers=2, seed=0)


# ------------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_end_to_end_on_tiny_model_writes_checkpoint_and_card(tiny, tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path)
    res = train_static_speculator(tiny, _prompts(12, 0), _prompts(4, 1), cfg, command="pytest tiny", progress=False)
    assert (res.checkpoint / "config.json").is_file() and (res.checkpoint / "model.safetensors").is_file()
    card = json.loads((res.checkpoint / "atlas_card.json").read_text())
    assert card == DraftHead.read_card(res.checkpoint)
    assert card["command"] == "pytest tiny" and card["target_fingerprint"] == target_fingerprint(tiny)
    assert card["data"]["sequences"] == 24 and card["data"]["train_prompts"] == 12  # 12 prompts x 2 temperatures
    assert card["training"]["steps"] == card["training"]["planned_steps"] > 0
    assert card["training"]["first"]["step"] == 1 and card["training"]["last"]["step"] == card["training"]["steps"]
    assert set(card["held_out"]["T=0"]) == {"static", "none", "suffix"}
    assert set(card["held_out"]["T=1"]) == {"static", "suffix"}  # plain decoding runs at T=0 only by default
    assert card["held_out"]["T=0"]["none"]["mean_acceptance_length"] == 1.0
    for t in ("T=0", "T=1"):
        assert card["held_out"][t]["static"]["mean_acceptance_length"] >= 1.0
    assert card["held_out"]["greedy_identical_rows"] == "4/4"  # lossless
    assert 0.0 < card["draft_vocab"]["train_completion_coverage"] <= 1.0
    # the stored head loads back onto the target, fp16 weights, frozen rows re-taken from the target
    head = DraftHead.from_pretrained(res.checkpoint, target=tiny)
    assert head.config.fuse_layers == (1, 2) and head.config.draft_vocab_size == 96
    assert torch.equal(head.draft_to_target, res.head.draft_to_target)
    log = (res.checkpoint.parent / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == card["training"]["curve"]

    # a second run reuses the cached data: nothing is generated again
    def boom(*a, **k):
        raise AssertionError("data should come from the cache")

    monkeypatch.setattr(static_mod, "generate_samples", boom)
    again = train_static_speculator(
        tiny, _prompts(12, 0), _prompts(4, 1), _tiny_config(tmp_path, epochs=1.0, eval_baselines=()), progress=False
    )
    assert all(g["cached"] for g in again.card["data"]["generation"])
    assert set(again.card["held_out"]["T=0"]) == {"static"}


def test_generated_samples_match_engine_output_and_label_completions(tiny):
    prompts = _prompts(5, 3)
    samples, stats = static_mod.generate_samples(tiny, prompts, 0.0, 10, (1, 2), label_top_k=4, progress=False)
    base = RolloutEngine(tiny).generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    assert stats["completion_tokens"] == sum(len(c) for c in base.completion_ids)
    for p, c, s in zip(prompts, base.completion_ids, samples):
        assert s.tokens.tolist() == p + c  # prompt order kept although decoding ran sorted by length
        assert s.feats.shape == (len(p) + len(c), 2 * 64)
        assert s.label_mask.nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) + len(c) - 1))
        assert not bool(s.has_feats[-1])
        # greedy: the top label at each labelled position is the token emitted next
        top = s.label_ids[s.label_mask, 0].tolist()
        assert top == c


@pytest.mark.parametrize("bf16", [False, True])
def test_training_under_bf16_autocast_runs_its_matmuls_in_bf16_and_keeps_float32_weights(tiny, tmp_path, bf16):
    samples, _ = static_mod.generate_samples(tiny, _prompts(8, 5), 0.0, 12, (1, 2), label_top_k=4, progress=False)
    cfg = _tiny_config(tmp_path, bf16_autocast=bf16, epochs=6.0)
    head = static_mod._new_head(tiny, samples, cfg)
    seen: list[torch.dtype] = []
    hook = head.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    res = static_mod.train_head(head, samples, cfg, progress=False)
    hook.remove()
    assert res["bf16_autocast"] is bf16
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert res["curve"][-1]["loss"] < 0.8 * res["curve"][0]["loss"]  # it learns in either precision


def test_warm_start_copies_a_trained_head_keeps_shared_output_rows_and_continues_from_its_function(tiny, tmp_path):
    samples, _ = static_mod.generate_samples(tiny, _prompts(8, 5), 0.0, 12, (1, 2), label_top_k=4, progress=False)
    cfg = _tiny_config(tmp_path, epochs=3.0)
    first = static_mod._new_head(tiny, samples, cfg)
    res = static_mod.train_head(first, samples, cfg, progress=False)
    first.save_pretrained(tmp_path / "a", card={"command": "first run", "training": {"steps": res["steps"]}})
    saved = DraftHead.from_pretrained(tmp_path / "a", target=tiny).state_dict()
    # a larger vocabulary: the ranking's first 96 tokens are the saved head's, 16 more start from the target's rows
    warm_cfg = _tiny_config(tmp_path, draft_vocab_size=112, init_from=str(tmp_path / "a"), teacher_forced_fraction=0.0)
    head = static_mod._new_head(tiny, samples, warm_cfg)
    fresh_rows = head.lm_head.weight.detach().clone()
    info = static_mod.warm_start(head, warm_cfg.init_from, tiny)["warm_start"]
    assert info == {"from": str(tmp_path / "a"), "command": "first run", "steps": res["steps"], "output_rows_kept": 96}
    state = head.state_dict()
    for key, value in saved.items():
        if key not in ("lm_head.weight", "draft_to_target"):
            assert torch.equal(state[key], value), key
    assert torch.equal(state["lm_head.weight"][:96], saved["lm_head.weight"])
    assert torch.equal(state["lm_head.weight"][96:], fresh_rows[96:])
    # continuing (preconditioned fuse layer) starts from the same function: with a vanishing step nothing moves
    before = {k: v.clone() for k, v in state.items()}
    static_mod.train_head(head, samples, replace(warm_cfg, lr=1e-12, epochs=0.2), progress=False)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6, msg=key)
    # another architecture is named, not half-loaded
    other = static_mod._new_head(tiny, samples, _tiny_config(tmp_path, intermediate_size=48))
    with pytest.raises(ValueError, match=r"init_from=.*architecture.*mlp"):
        static_mod.warm_start(other, str(tmp_path / "a"), tiny)


def test_samples_round_trip_through_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (5, 9):
        samples.append(
            SequenceSample(
                tokens=torch.randint(0, 50, (n,), generator=g),
                feats=torch.randn(n, 6, generator=g).half(),
                has_feats=torch.arange(n) < n - 1,
                label_ids=torch.randint(-1, 50, (n, 3), generator=g),
                label_probs=torch.rand(n, 3, generator=g),
                label_mask=torch.arange(n) >= 2,
                policy_version=n,
            )
        )
    save_samples(tmp_path / "s.safetensors", samples, meta={"a": 1})
    back, meta = load_samples(tmp_path / "s.safetensors")
    assert meta == {"a": 1} and len(back) == 2
    for a, b in zip(samples, back):
        for name in ("tokens", "feats", "has_feats", "label_ids", "label_probs", "label_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.policy_version == b.policy_version
    with pytest.raises(ValueError, match="at least one"):
        save_samples(tmp_path / "e.safetensors", [])


def test_draft_vocab_ranks_by_expected_frequency_and_reports_coverage():
    # prompt [1, 2], completion [5, 5, 5, 7]; labels put mass on 9 at every completion position
    tokens = torch.tensor([1, 2, 5, 5, 5, 7])
    mask = torch.tensor([False, True, True, True, True, False])
    ids = torch.full((6, 2), -1)
    probs = torch.zeros(6, 2)
    ids[mask] = torch.tensor([9, 5])
    probs[mask] = torch.tensor([0.6, 0.3])
    s = SequenceSample(tokens, torch.zeros(6, 1), torch.ones(6, dtype=torch.bool), ids, probs, mask)
    d2t = build_draft_vocab([s], 16, 5)
    # scores: 5 -> 3 + 4*0.3 = 4.2, 9 -> 2.4, 7 -> 1; then prompt tokens 1, 2 (ties broken by prompt counts)
    assert d2t.tolist() == [5, 9, 7, 1, 2]
    assert vocab_coverage(d2t, [[5, 7, 3], [9]]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="exceeds"):
        build_draft_vocab([s], 16, 17)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"gen_temperatures": ()}, "gen_temperatures"),
        ({"gen_temperatures": (-1.0,)}, "gen_temperatures"),
        ({"eval_k": 0}, "eval_k"),
        ({"ttt_decay": 0.0}, "ttt_decay"),
        ({"epochs": 0}, "epochs"),
        ({"eval_baselines": ("ngram",)}, "eval_baselines"),
        ({"draft_vocab_size": 0}, "draft_vocab_size"),
        ({"max_train_minutes": 0}, "max_train_minutes"),
        ({"checkpoint_name": "head.safetensors"}, "checkpoint_name"),
        ({"fuse_layers": ()}, "fuse_layers"),
        ({"init_from": "/nonexistent/head"}, "init_from"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        StaticSpeculatorConfig(**kw)


# ------------------------------------------------------------------------------------------------------- recipe
def _recipe():
    spec = importlib.util.spec_from_file_location(
        "train_static_speculator", REPO / "recipes/train_static_speculator.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_config_first_line_is_the_command_and_overrides_parse():
    path = REPO / "recipes/configs/static_speculator.yaml"
    first = path.read_text().splitlines()[0]
    assert (
        first
        == "# .venv/bin/python recipes/train_static_speculator.py --config recipes/configs/static_speculator.yaml"
    )
    recipe, cfg, command = _recipe().parse_args(
        ["--config", str(path), "epochs=1", "fuse_layers=[3, 15, 28]", "ship_to=null"]
    )
    assert isinstance(cfg, StaticSpeculatorConfig)
    assert cfg.epochs == 1 and cfg.fuse_layers == (3, 15, 28) and recipe.ship_to is None and not recipe.data_only
    assert "epochs=1" in command and command.startswith(".venv/bin/python recipes/train_static_speculator.py")
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--config", str(path), "no_such_key=1"])


# ------------------------------------------------------------------------------------------------------- shipped
def _smollm2_shaped_target():
    """A random model with SmolLM2-135M's fingerprint (30 layers, hidden 576, vocab 49152), kept small elsewhere."""
    return tiny_llama(
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=32,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )


def test_shipped_static_head_is_small_and_its_card_is_complete():
    assert SHIPPED in shipped_static_heads()
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= MAX_SHIPPED_BYTES
    card = DraftHead.read_card(SHIPPED)
    assert card == json.loads((SHIPPED / "atlas_card.json").read_text())
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["Eagle3LlamaForCausalLM"] and config["eagle_aux_hidden_state_layer_ids"]
    assert card["target_fingerprint"] == SMOLLM2_FINGERPRINT
    assert card["command"].startswith(".venv/bin/python recipes/train_static_speculator.py --config ")
    data = card["data"]
    assert data["train_prompts"] >= 500 and data["completion_tokens"] > 0 and data["held_out_prompts"] > 0
    assert card["training"]["steps"] > 0 and card["training"]["last"]["loss"] < card["training"]["first"]["loss"]
    for t in ("T=0", "T=1"):
        assert card["held_out"][t]["static"]["mean_acceptance_length"] > 1.0
    assert card["held_out"]["k"] == 4
    assert 0.5 < card["draft_vocab"]["held_out_completion_coverage"] <= 1.0


def test_shipped_head_loads_for_a_target_with_its_fingerprint_only():
    model = _smollm2_shaped_target()
    assert static_head_path(model) == SHIPPED
    spec = load_static_speculator(model)
    assert isinstance(spec, DraftHeadSpeculator) and spec.name == "static"
    assert spec.head.lm_head_ready and spec.head.config.target_name == SMOLLM2_FINGERPRINT
    assert spec.head.fc.weight.dtype == torch.float32  # the target's dtype
    specs = default_speculators(model)
    assert [s.name for s in specs] == ["static", SuffixSpeculator().name]
    # it drafts through the engine (greedy output unchanged: lossless) on this random stand-in
    prompts = [[1, 2, 3, 4], [5, 6]]
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    base = RolloutEngine(model).generate(prompts, sp)
    out = RolloutEngine(model, speculators=[spec], controller=FixedController(3)).generate(prompts, sp)
    assert out.completion_ids == base.completion_ids and out.stats.num_draft_tokens > 0


def test_no_shipped_head_for_other_targets(tiny, caplog):
    caplog.set_level("DEBUG", logger=defaults_mod.__name__)
    assert static_head_path(tiny) is None
    assert load_static_speculator(tiny) is None
    assert "no shipped static draft head" in caplog.text
    assert [type(s) for s in default_speculators(tiny)] == [SuffixSpeculator]


def test_card_acceptance_is_accepted_over_observed_tokens():
    from atlas_rl.speculators.defaults import card_acceptance

    card = {"held_out": {"T=1": {"static": {"accepted_per_pos": [0.5, 0.25, 0.125]}}}}
    assert card_acceptance(card) == pytest.approx(0.875 / 1.75)  # every observed token accepted half the time
    assert card_acceptance({}) is None and card_acceptance({"held_out": {"T=0": {}}}) is None
