"""``atlas-rl export-speculator``: finds the head in a head dir, checkpoint or run dir, writes the vLLM layout in
the chosen dtype, and refuses old or damaged heads with one line naming the file (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atlas_rl.cli import main
from atlas_rl.models import tiny_llama
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.export import ExportError, export_head, resolve_head_dir

V = 64


@pytest.fixture(scope="module")
def head():
    model = tiny_llama(vocab_size=V, dtype=torch.float32, seed=0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=40, fuse_layers=(0, 1), intermediate_size=32)
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:40]
    torch.manual_seed(0)
    return DraftHead(cfg, draft_to_target=d2t).bind_target(model, init_lm_head=True)


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_export_from_run_dir_uses_newest_checkpoint_and_casts_weights(head, tmp_path):
    run = tmp_path / "run"
    for step, scale in ((5, 1.0), (20, 2.0), (10, 3.0)):
        h = DraftHead(head.config, draft_to_target=head.draft_to_target)
        h.load_state_dict(head.state_dict())
        with torch.no_grad():
            h.norm.weight.mul_(scale)  # tells the checkpoints apart
        h.lm_head_ready = True
        h.save_pretrained(run / f"checkpoint-{step}" / "atlas" / "atlas_adaptive_head", dtype=None, card={"s": step})
    out = export_head(run, tmp_path / "out", dtype="bfloat16")
    assert resolve_head_dir(run) == run / "checkpoint-20" / "atlas" / "atlas_adaptive_head"
    (tmp_path / "recipe_run").mkdir()
    (run).rename(tmp_path / "recipe_run" / "trainer")  # a recipe run dir: the trainer's output_dir is trainer/
    assert resolve_head_dir(tmp_path / "recipe_run").parent.parent.name == "checkpoint-20"
    t = _tensors(out / "model.safetensors")
    assert t["norm.weight"].dtype == torch.bfloat16 and t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert torch.equal(t["norm.weight"], (head.norm.weight * 2.0).to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["Eagle3LlamaForCausalLM"]
    card = json.loads((out / "atlas_card.json").read_text())
    assert card["s"] == 20 and card["exported_from"].endswith("checkpoint-20/atlas/atlas_adaptive_head")


def test_export_round_trips_the_head_exactly_at_float32(head, tmp_path):
    head.save_pretrained(tmp_path / "src", dtype=torch.float32)
    assert main(["export-speculator", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "float32"]) == 0
    back = DraftHead.from_pretrained(tmp_path / "dst")
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the default dtype is float16; a checkpoint folder and its atlas/ folder resolve to the same head
    ckpt = tmp_path / "checkpoint-3"
    head.save_pretrained(ckpt / "atlas" / "atlas_adaptive_head")
    assert resolve_head_dir(ckpt / "atlas") == resolve_head_dir(ckpt)
    assert main(["export-speculator", str(ckpt), str(tmp_path / "f16")]) == 0
    assert _tensors(tmp_path / "f16" / "model.safetensors")["fc.weight"].dtype == torch.float16


def test_export_refuses_v1_corrupt_and_missing_heads_naming_the_file(head, tmp_path, capsys):
    v1 = tmp_path / "checkpoint-7" / "atlas" / "atlas_adaptive_head.safetensors"
    v1.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(v1), metadata={"format": "atlas-rl/draft-head/v1"})
    assert main(["export-speculator", str(tmp_path), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(v1) in err and "atlas-rl/draft-head/v1" in err and len(err.strip().splitlines()) == 1

    bad = tmp_path / "bad"
    head.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    assert main(["export-speculator", str(bad), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "model.safetensors") in err and len(err.strip().splitlines()) == 1

    assert main(["export-speculator", str(tmp_path / "nothing"), str(tmp_path / "o3")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no draft head found"):
        resolve_head_dir(tmp_path / "empty")


def test_export_refuses_fuse_layers_and_values_vllm_cannot_take(head, tmp_path):
    model = tiny_llama(vocab_size=V, dtype=torch.float32, seed=0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=V, fuse_layers=(-1,), intermediate_size=32)
    DraftHead(cfg).bind_target(model, init_lm_head=True).save_pretrained(tmp_path / "h")
    with pytest.raises(ExportError, match=r"fuse_layers \[-1\].*eagle_aux_hidden_state_layer_ids"):
        export_head(tmp_path / "h", tmp_path / "o")
    big = DraftHead(head.config, draft_to_target=head.draft_to_target)
    big.load_state_dict(head.state_dict())
    big.lm_head_ready = True
    with torch.no_grad():
        big.norm.weight[0] = 1e6
    big.save_pretrained(tmp_path / "big", dtype=torch.float32)
    with pytest.raises(ExportError, match="norm.weight holds values beyond the torch.float16 range"):
        export_head(tmp_path / "big", tmp_path / "o")
    assert export_head(tmp_path / "big", tmp_path / "o_bf16", dtype="bfloat16").is_dir()
    with pytest.raises(ExportError, match="dtype 'int8'"):
        export_head(tmp_path / "big", tmp_path / "o", dtype="int8")


def test_export_of_a_grpo_run_takes_the_newest_checkpoints_adaptive_head(tmp_path, capsys):
    """A real checkpoint also holds the POLICY's config.json + model.safetensors: the head is found under atlas/."""
    from test_trainers import TOK, RecordingReward, _common, _dataset, _model

    from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer

    policy = _model()
    # a static head on layers vLLM can serve (0, 1): the adaptive head takes its fused layers
    vocab = policy.get_output_embeddings().weight.shape[0]
    cfg = DraftHeadConfig.from_target(policy, draft_vocab_size=vocab, fuse_layers=(0, 1), intermediate_size=32)
    DraftHead(cfg).bind_target(policy, init_lm_head=True).save_pretrained(tmp_path / "static")
    args = _common(tmp_path, "atlas", max_steps=2, save_strategy="steps", save_steps=1)
    args.update(atlas_static_head=str(tmp_path / "static"), atlas_speculators="static,adaptive")
    trainer = AtlasGRPOTrainer(
        model=policy,
        reward_funcs=RecordingReward(),
        args=AtlasGRPOConfig(**args),
        train_dataset=_dataset(),
        processing_class=TOK,
    )
    trainer.train()
    run = tmp_path / "atlas"
    assert main(["export-speculator", str(run), str(tmp_path / "served"), "--dtype", "float32"]) == 0
    assert str(tmp_path / "served") in capsys.readouterr().out
    saved = DraftHead.from_pretrained(run / "checkpoint-2" / "atlas" / "atlas_adaptive_head")
    served = DraftHead.from_pretrained(tmp_path / "served")
    for k, v in saved.state_dict().items():
        assert torch.equal(served.state_dict()[k], v), k
    card = json.loads((tmp_path / "served" / "atlas_card.json").read_text())
    assert card["exported_from"].endswith("checkpoint-2/atlas/atlas_adaptive_head")
    assert json.loads((tmp_path / "served" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [0, 1]
