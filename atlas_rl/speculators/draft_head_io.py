"""Draft-head checkpoints in the directory layout vLLM's EAGLE-3 drafter loads as is.

``DIR/config.json`` (a ``LlamaConfig``-like body, ``architectures: ["Eagle3LlamaForCausalLM"]``, ``vocab_size`` = the
target's, ``draft_vocab_size``, ``eagle_aux_hidden_state_layer_ids`` = the fused target layers, plus an ``atlas``
section with what only we read), ``DIR/model.safetensors`` (vLLM's tensor names: ``fc``, ``midlayer.*`` for the
first layer, ``layers.{i}.*`` for the others, ``norm``, ``lm_head``, ``d2t`` offsets with
``target_id = draft_id + d2t[draft_id]``, ``t2d`` bool over the target vocabulary; no ``embed_tokens``: the
target's embedding is shared) and ``DIR/atlas_card.json`` (how the head was made; optional). Load it in vLLM with
``speculative_config={"method": "eagle3", "model": DIR, "num_speculative_tokens": k}``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig, target_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "atlas-rl/draft-head/v2"
OLD_FORMAT = "atlas-rl/draft-head/v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: Hugging Face's index, which vLLM's loader reads
MAX_SHARD_BYTES = 16 * 1024 * 1024  # shards stay small enough for a git repository without LFS
CARD_FILE = "atlas_card.json"

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "from_pretrained",
    "read_card",
    "save_pretrained",
    "vllm_tensors",
    "weight_files",
]


def _to_vllm_name(name: str) -> str:
    return "midlayer." + name[len("layers.0.") :] if name.startswith("layers.0.") else name


def _from_vllm_name(name: str) -> str:
    return "layers.0." + name[len("midlayer.") :] if name.startswith("midlayer.") else name


def vllm_config(head: DraftHead, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of ``head``: what vLLM's ``Eagle3LlamaForCausalLM`` reads, plus our ``atlas`` section."""
    c = head.config
    return {
        "architectures": ["Eagle3LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.target_vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": list(c.fuse_layers),
        "atlas": {
            "format": FORMAT,
            "fuse_layers": list(c.fuse_layers),
            "train_lm_head": c.train_lm_head,
            "target_name": c.target_name,
        },
    }


def _state_tensors(head: DraftHead, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in head.state_dict().items():
        if k == "draft_to_target":
            continue
        v = v.detach()
        out[_to_vllm_name(k)] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
    d2t = head.draft_to_target.detach().long().cpu()
    out["d2t"] = (d2t - torch.arange(d2t.numel())).contiguous()
    t2d = torch.zeros(head.config.target_vocab_size, dtype=torch.bool)
    t2d[d2t] = True
    out["t2d"] = t2d
    return out


def vllm_tensors(head: DraftHead, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The head's tensors under the names vLLM's ``Eagle3LlamaForCausalLM.load_weights`` reads (``midlayer.*``,
    ``d2t`` offsets, ``t2d``): what :func:`save_pretrained` writes, for pushing into a running vLLM."""
    return _state_tensors(head, dtype)


def save_pretrained(
    head: DraftHead,
    directory: str | Path,
    dtype: torch.dtype | None = torch.float16,
    card: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``config.json``, the weights (and ``atlas_card.json`` when ``card``) into ``directory``.

    Weights up to ``max_shard_bytes`` go into ``model.safetensors``; larger heads into
    ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` (the Hugging Face layout vLLM
    loads). Files are written to temporary names and renamed, so a crash never leaves a half-written file behind;
    weight files of an earlier save that the new one does not use are removed after it.
    """
    if not head.lm_head_ready:
        raise ValueError("the head's output rows are not initialised: bind_target(model, init_lm_head=True) first")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dtype_out = dtype or head.fc.weight.dtype
    old = set(weight_files(d))
    new = _save_weights(d, _state_tensors(head, dtype), max_shard_bytes)
    _atomic(d / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(vllm_config(head, dtype_out), indent=2) + "\n"))
    if card is not None:
        _atomic(d / CARD_FILE, lambda p: Path(p).write_text(json.dumps(card, indent=1, sort_keys=False) + "\n"))
    for stale in old - set(new) - ({d / INDEX_FILE} if len(new) > 1 else set()):
        stale.unlink(missing_ok=True)
    if len(new) == 1:
        (d / INDEX_FILE).unlink(missing_ok=True)
    return d


def _save_weights(d: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """Write ``tensors`` as one file or as shards + index (see :func:`save_pretrained`); the weight files."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        _atomic(d / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
        return [d / WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        _atomic(d / name, lambda p, part=part: save_file(part, p, metadata={"format": FORMAT}))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, part in zip(names, shards) for k in part}}
    _atomic(d / INDEX_FILE, lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))
    return [d / n for n in names]


def weight_files(d: Path) -> list[Path]:
    """The weight files of head directory ``d``: the shards its index names, else ``model.safetensors``; [] when
    it has neither (an unreadable index raises ``ValueError`` naming it)."""
    index = d / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable safetensors index: {e!r}") from e
        return [d / n for n in names]
    return [d / WEIGHTS_FILE] if (d / WEIGHTS_FILE).is_file() else []


def _atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a head is package data others read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_directory(d: Path) -> None:
    """A clear error for what is not a head directory (a missing path, a v1 file, no config)."""
    if d.is_file():
        fmt = _file_format(d)
        if fmt == OLD_FORMAT:
            raise ValueError(
                f"{d} is an {OLD_FORMAT} checkpoint (the pre-EAGLE-3 layout: fc over embedding + feature); this "
                "version loads only EAGLE-3 head directories (config.json + model.safetensors). It cannot be "
                "converted exactly: retrain it (recipes/train_static_speculator.py, or the trainer's adaptive head)"
            )
        raise ValueError(f"{d} is a file, not a draft-head directory (config.json + model.safetensors)")
    if not d.is_dir():
        raise FileNotFoundError(f"draft head directory not found: {d}")
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d / CONFIG_FILE} is missing: {d} is not a draft-head directory")
    files = weight_files(d)
    if not files:
        raise FileNotFoundError(f"{d / WEIGHTS_FILE} (or {INDEX_FILE}) is missing: {d} is not a draft-head directory")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {d / INDEX_FILE} names it")


def _file_format(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # not a safetensors file at all
        return None


def _config_from_json(path: Path) -> DraftHeadConfig:
    try:
        raw = json.loads(path.read_text())
        atlas = raw.get("atlas", {})
        fuse = atlas.get("fuse_layers") or raw.get("eagle_aux_hidden_state_layer_ids") or [2, 15, 27]
        rope = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return DraftHeadConfig(
            hidden_size=raw["hidden_size"],
            target_vocab_size=raw["vocab_size"],
            draft_vocab_size=raw.get("draft_vocab_size") or raw["vocab_size"],
            fuse_layers=tuple(fuse),
            num_hidden_layers=raw.get("num_hidden_layers", 1),
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope),
            max_position_embeddings=raw.get("max_position_embeddings", 8192),
            train_lm_head=bool(atlas.get("train_lm_head", True)),
            target_name=atlas.get("target_name", ""),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid EAGLE-3 draft-head config: {e!r}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _draft_to_target(path: Path, tensors: dict[str, torch.Tensor], config: DraftHeadConfig) -> torch.Tensor:
    d2t = tensors.pop("d2t", None)
    tensors.pop("t2d", None)
    if d2t is None:
        if config.draft_vocab_size != config.target_vocab_size:
            raise ValueError(f"{path}: no 'd2t' tensor, but draft_vocab_size != vocab_size")
        return torch.arange(config.draft_vocab_size)
    if tuple(d2t.shape) != (config.draft_vocab_size,):
        raise ValueError(f"{path}: tensor 'd2t' has shape {tuple(d2t.shape)}, expected ({config.draft_vocab_size},)")
    ids = d2t.long() + torch.arange(config.draft_vocab_size)
    if int(ids.min()) < 0 or int(ids.max()) >= config.target_vocab_size or ids.unique().numel() != ids.numel():
        raise ValueError(f"{path}: tensor 'd2t' maps to invalid or duplicate target ids")
    return ids


def from_pretrained(
    directory: str | Path, target: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> DraftHead:
    """Load a head directory; with ``target`` given, check it is the target the head was trained for and bind it.

    Raises ``ValueError`` naming the file for a v1 checkpoint, a corrupt file, a missing/unexpected tensor, a
    shape mismatch, non-finite values or a target mismatch — never returns a silently random head.
    """
    d = Path(directory)
    _check_directory(d)
    config = _config_from_json(d / CONFIG_FILE)
    files = weight_files(d)
    wpath = files[0] if len(files) == 1 else d / INDEX_FILE  # named in errors about the weights
    tensors = {_from_vllm_name(k): v for f in files for k, v in _read_tensors(f).items()}
    tensors.pop("embed_tokens.weight", None)  # a stock checkpoint may carry the target's embedding: we share it
    head = DraftHead(config, draft_to_target=_draft_to_target(wpath, tensors, config))
    expected = {k: v for k, v in head.state_dict().items() if k != "draft_to_target"}
    _check_tensors(wpath, tensors, expected)
    head.load_state_dict({**tensors, "draft_to_target": head.draft_to_target}, strict=True)
    head.lm_head_ready = True
    head.to(dtype)
    if target is not None:
        fp = target_fingerprint(target)
        if config.target_name and config.target_name != fp:
            raise ValueError(f"{d} was trained for target {config.target_name!r}; this model is {fp!r}")
        head.bind_target(target)
    return head


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds exactly the ``expected`` tensors, with their shapes, and finite values."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint tensors do not match the head: missing {[_to_vllm_name(m) for m in missing]}, "
            f"unexpected {[_to_vllm_name(u) for u in unexpected]}"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{path}: tensor {_to_vllm_name(k)!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {_to_vllm_name(k)!r} holds NaN or inf values")


def read_card(directory: str | Path) -> dict[str, Any]:
    """The head's card (``{}`` when it has none)."""
    p = Path(directory) / CARD_FILE
    return json.loads(p.read_text()) if p.is_file() else {}
