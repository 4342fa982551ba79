"""The static speculator: a draft head trained once, offline, on the target's own answers to broad prompts and on
teacher-forced corpora.

Pipeline (:func:`train_static_speculator`; the recipe ``recipes/train_static_speculator.py`` adds model loading,
the prompt set and chat templating around it), one module per stage:

1. **Self-distillation data** (:mod:`~atlas_rl.training.static_data`). The target answers every training prompt
   through the real engine without speculation, once per temperature of ``gen_temperatures`` (e.g. a greedy answer
   and a T=1 sample); a capture buffer turns the forwards it runs anyway into samples (features + top-K soft
   labels). Cached in ``<output_dir>/data/``, keyed by every setting they depend on. Then ``corpus_tokens``
   labelled tokens of teacher-forced corpora (:mod:`~atlas_rl.training.static_corpus`: code, docs and chats built
   from files on this machine; one target forward per batch, no generation), cached in resumable shards.
2. **Draft vocabulary** (:mod:`~atlas_rl.training.static_vocab`). The ``draft_vocab_size`` target tokens with the
   largest expected frequency in the target's own answers (``vocab_from_answers``; else in all the data). With
   ``init_from`` the head then starts from a trained head's weights (:func:`warm_start`), e.g. to continue training.
3. **Training-time test** (:mod:`~atlas_rl.training.static_train`). AdamW on the unrolled soft cross-entropy,
   length-bucketed batches, warmup then cosine decay; ``epochs`` over the data or until ``max_train_minutes``.
4. **Held-out evaluation through the real engine** (:mod:`~atlas_rl.training.static_eval`). Mean acceptance
   length with ``FixedController(eval_k)`` for the head and the baselines, greedy token-identity with plain
   decoding, draft-vocabulary coverage of the held-out completions.
5. **Checkpoint** (:mod:`~atlas_rl.training.static_card`). A head directory in the layout vLLM's EAGLE-3 drafter
   loads (config.json + fp16 model.safetensors) with the JSON card (atlas_card.json) in it.

Why these data choices: ``docs/decisions/static_head_data.md``. The names below are re-exported from the stage
modules so ``from atlas_rl.training.static import ...`` keeps working.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atlas_rl.speculators.adaptive import copy_output_rows
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.training.samples import SequenceSample
from atlas_rl.training.static_card import (
    build_card,
    completion_tokens,
    coverage_section,
    data_section,
    save_static_checkpoint,
)
from atlas_rl.training.static_config import BASELINES, StaticSpeculatorConfig, StaticSpeculatorResult
from atlas_rl.training.static_corpus import cached_corpus_samples
from atlas_rl.training.static_data import (
    SAMPLES_FORMAT,
    cached_samples,
    chat_prompt_ids,
    generate_samples,
    load_samples,
    save_samples,
)
from atlas_rl.training.static_eval import evaluate_acceptance
from atlas_rl.training.static_train import feature_scale, train_head
from atlas_rl.training.static_vocab import build_draft_vocab, vocab_coverage

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "SAMPLES_FORMAT",
    "StaticSpeculatorConfig",
    "StaticSpeculatorResult",
    "build_draft_vocab",
    "cached_samples",
    "chat_prompt_ids",
    "evaluate_acceptance",
    "feature_scale",
    "generate_samples",
    "load_samples",
    "save_samples",
    "save_static_checkpoint",
    "train_head",
    "train_static_speculator",
    "vocab_coverage",
]


def train_static_speculator(
    model: torch.nn.Module,
    train_prompts: Sequence[Sequence[int]],
    held_out_prompts: Sequence[Sequence[int]],
    config: StaticSpeculatorConfig | None = None,
    data_info: dict[str, Any] | None = None,
    command: str = "",
    progress: bool = True,
    tokenizer: Any = None,
) -> StaticSpeculatorResult:
    """Run the whole pipeline (module docstring) and write ``<output_dir>/<checkpoint_name>`` + its JSON card.

    Args:
        model: the target (fp32 HF causal LM of a family the engine supports).
        train_prompts / held_out_prompts: token ids of the (chat-templated) prompts.
        config: :class:`StaticSpeculatorConfig`.
        data_info: free-form description of the prompts for the card (prompt set, split, ...).
        command: the command that reproduces this run, for the card.
        tokenizer: the target's tokenizer; needed when ``config.corpus_tokens > 0`` (chunking, chat template).
    """
    cfg = config or StaticSpeculatorConfig()
    if not train_prompts:
        raise ValueError("train_static_speculator needs training prompts")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    samples, gen_stats = _generate_data(model, train_prompts, cfg, progress, tokenizer)
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    n_answers = sum(int(st.get("responses", 0)) for st in gen_stats if st.get("source") != "corpus")
    head = _new_head(model, samples[:n_answers] if cfg.vocab_from_answers and n_answers else samples, cfg)
    warm = warm_start(head, cfg.init_from, model) if cfg.init_from else {}
    timings["vocab_s"] = round(time.perf_counter() - t0, 1)
    train = {**_train_logged(head, samples, cfg, out_dir / "train_log.jsonl", progress), **warm}
    timings["train_s"] = train["wall_s"]
    t0 = time.perf_counter()
    ev = _evaluate(model, head, held_out_prompts, cfg, progress)
    timings["eval_s"] = round(time.perf_counter() - t0, 1)
    held_completions = _held_out_completions(ev)
    timings["total_s"] = round(time.perf_counter() - t_all, 1)
    card = build_card(
        model,
        head,
        cfg,
        data=data_section(samples, cfg, (len(train_prompts), len(held_out_prompts)), gen_stats, data_info),
        training=train,
        held_out=ev,
        coverage=coverage_section(head.draft_to_target, completion_tokens(samples), held_completions),
        timings=timings,
        command=command,
    )
    path = save_static_checkpoint(head, card, out_dir / cfg.checkpoint_name)
    size = sum(f.stat().st_size for f in path.iterdir())
    logger.info("wrote %s (%.2f MB: config.json, model.safetensors, atlas_card.json)", path, size / 1e6)
    return StaticSpeculatorResult(head=head, card=card, checkpoint=path)


def _generate_data(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: StaticSpeculatorConfig,
    progress: bool,
    tokenizer: Any = None,
) -> tuple[list[SequenceSample], list[dict[str, Any]]]:
    """Stage 1: samples of every generation temperature, from the cache when there, then ``cfg.corpus_tokens``
    teacher-forced corpus tokens (:mod:`~atlas_rl.training.static_corpus`); ``(samples, stats per run)``, the
    corpus run's stats marked ``{"source": "corpus", ...}``.

    ``generate_samples`` is looked up here at call time, so a caller (a test) can substitute it on this module.
    """
    samples: list[SequenceSample] = []
    gen_stats = []
    for temp in cfg.gen_temperatures:
        s, st = cached_samples(
            model, prompts, cfg, temp, cfg.data_cache_dir, progress=progress, generate=generate_samples
        )
        samples.extend(s)
        gen_stats.append(st)
    if cfg.corpus_tokens > 0:
        if tokenizer is None:
            raise ValueError("corpus_tokens > 0 needs the target's tokenizer: train_static_speculator(tokenizer=...)")
        s, st = cached_corpus_samples(model, tokenizer, cfg, progress=progress)
        samples.extend(s)
        gen_stats.append({"source": "corpus", **st})
    positions = sum(len(s) for s in samples)
    labels = sum(s.num_labels for s in samples)
    logger.info("training data: %d sequences, %d positions, %d labelled", len(samples), positions, labels)
    return samples, gen_stats


def _new_head(model: torch.nn.Module, samples: Sequence[SequenceSample], cfg: StaticSpeculatorConfig) -> DraftHead:
    """Stage 2: the draft vocabulary (ranked over ``samples``) and a fresh head on it, bound to the target (output
    rows start as the target's)."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    size = min(cfg.draft_vocab_size, vocab)
    d2t = build_draft_vocab(samples, vocab, size)
    torch.manual_seed(cfg.seed)
    hcfg = DraftHeadConfig.from_target(
        model,
        draft_vocab_size=size,
        fuse_layers=cfg.fuse_layers,
        intermediate_size=cfg.intermediate_size,
        train_lm_head=cfg.train_lm_head,
        num_hidden_layers=cfg.num_hidden_layers,
    )
    dev = next(model.parameters()).device
    head = DraftHead(hcfg, draft_to_target=d2t).to(dev).bind_target(model, init_lm_head=True)
    if cfg.init_norm_from_target:
        _init_norm_from_target(head, model)
    return head


def warm_start(head: DraftHead, directory: str, model: torch.nn.Module) -> dict[str, Any]:
    """Start ``head`` (fresh, bound to ``model``) from the trained head in ``directory``: every weight but the output
    rows copied as is, the output rows of draft tokens both vocabularies hold copied, the rest left as they are (the
    target's). Returns ``{"warm_start": {...}}`` for the card (where from, that head's command and steps).

    Raises ``ValueError`` naming ``directory`` when its head is not the configured architecture or target.
    """
    src = DraftHead.from_pretrained(directory, target=model).to(head.fc.weight.device)
    mine, theirs = head.state_dict(), src.state_dict()
    rows_keys = ("lm_head.weight", "draft_to_target")
    bad = sorted(k for k in set(mine) | set(theirs) if k not in rows_keys and _shape(mine, k) != _shape(theirs, k))
    if bad:
        detail = ", ".join(f"{k} {_shape(theirs, k)} vs {_shape(mine, k)}" for k in bad[:4])
        raise ValueError(
            f"init_from={directory!r}: its head does not have the configured architecture ({detail}); set "
            "fuse_layers / intermediate_size / num_hidden_layers as in its config.json"
        )
    with torch.no_grad():
        for key, tensor in mine.items():
            if key not in rows_keys:
                tensor.copy_(theirs[key])  # state_dict tensors share the parameters' storage
        kept = copy_output_rows(head, src)
    card = DraftHead.read_card(directory)  # {} when the head has none
    steps = card.get("training", {}).get("steps")
    logger.info("warm start from %s: %d of %d output rows kept", directory, kept, head.config.draft_vocab_size)
    info = {"from": str(directory), "command": card.get("command"), "steps": steps, "output_rows_kept": kept}
    return {"warm_start": info}


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def _train_logged(
    head: DraftHead, samples: Sequence[SequenceSample], cfg: StaticSpeculatorConfig, log_path: Path, progress: bool
) -> dict[str, Any]:
    """Stage 3: :func:`train_head`, every curve point also appended to ``log_path`` (JSON lines) as it comes."""
    with open(log_path, "w") as log_file:

        def on_log(point: dict[str, float]) -> None:
            log_file.write(json.dumps(point) + "\n")
            log_file.flush()

        return train_head(head, samples, cfg, progress=progress, on_log=on_log)


def _evaluate(
    model: torch.nn.Module,
    head: DraftHead,
    prompts: Sequence[Sequence[int]],
    cfg: StaticSpeculatorConfig,
    progress: bool,
) -> dict[str, Any]:
    """Stage 4: :func:`evaluate_acceptance` with the config's evaluation settings."""
    return evaluate_acceptance(
        model,
        head,
        prompts,
        k=cfg.eval_k,
        temperatures=cfg.eval_temperatures,
        max_new_tokens=cfg.eval_max_new_tokens,
        baselines=cfg.eval_baselines,
        none_temperatures=cfg.eval_none_temperatures,
        seed=cfg.eval_seed,
        progress=progress,
    )


def _held_out_completions(ev: dict[str, Any]) -> list[list[int]]:
    """Pop the completions out of ``ev``: the target's held-out completions (plain decoding when it ran, else the
    lossless head runs), for the draft vocabulary's held-out coverage."""
    held: list[list[int]] = []
    for runs in ev.pop("completions").values():
        held.extend(runs.get("none") or runs.get("static") or [])
    return held


def _init_norm_from_target(head: DraftHead, model: torch.nn.Module) -> None:
    """Copy the target's final RMSNorm weight into the head's final norm (both feed the same output rows)."""
    norm = getattr(model.get_decoder(), "norm", None)
    w = getattr(norm, "weight", None)
    if w is None or tuple(w.shape) != tuple(head.norm.weight.shape):
        logger.debug("target has no final norm of the head's width; keeping the head's norm at ones")
        return
    with torch.no_grad():
        head.norm.weight.copy_(w.to(head.norm.weight.dtype))
