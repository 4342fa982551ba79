"""``atlas-rl bench --scenario drift``: speculators while the policy drifts, version after version.

A sequence of ``num_versions`` policies (v0 = the unmodified target) is made by fine-tuning the target
progressively on a shifted domain, from corpora already on this machine: Python sources (the interpreter's
site-packages) drifting to C sources (``/usr/include`` headers and ``*.c`` files under ``/usr/share``). Stage v
(v = 1 .. V-1) continues the previous weights for ``finetune_steps`` AdamW steps whose batches hold a share
``v / (V-1)`` of C windows (the rest Python), so the last policy has been trained on C only.

At every version, in this order:

1. **bench** — the same workload (continuations of held-out C snippets, identical prompts and seeds at every
   version), interleaved, for five configurations: ``none`` (no speculation; the ratio baseline), ``static``,
   ``suffix``, ``adaptive`` (each alone at fixed k: ``FixedController(k)``) and ``static+adaptive+suffix``
   (``BestOfController(k)``: every speculator drafts k tokens, the draft with the largest expected accepted
   length is verified). Reported: mean acceptance length τ and tokens/s.
2. **RL rollout** — the version's training rollouts (fresh held-out C prompts every version, ``num_generations``
   samples each) with the production configuration (static+adaptive+suffix), the capture hook feeding the
   adaptive head's :class:`~atlas_rl.training.buffer.CaptureBuffer`: the data the head learns from is what the
   engine captured, no extra target forward.
3. **adaptive retraining** — :class:`~atlas_rl.training.online.OnlineSpeculatorTrainer` trains for a wall-time
   budget of ``adaptive_share`` (10%) of that RL rollout's wall time, then publishes; the head serves the next
   version (it always lags one policy version behind, as in RL). Its wall time as a share of the rollout is
   reported.
4. **policy update** — the next fine-tuning stage; the frozen output rows of both heads are re-copied from the
   updated target (the heads read the target's own rows; their trained weights do not change).

The static head: ``static_head`` (a path), else the head shipped for the target
(:func:`atlas_rl.speculators.defaults.load_static_speculator`), else (``static_fallback="quick"``) a quickly
trained one — self-distilled from the v0 target's answers to the broad prompt set (the static head's domain),
cached in ``$ATLAS_RL_CACHE/drift/`` — or none (``"skip"``: the static column is left out, and noted).

``model="tiny"`` runs the whole pipeline on a tiny random Llama with a byte-level tokenizer (first pretrained
briefly on the Python corpus, so v0 is a "Python model"): a smoke test of the scenario in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import random
import re
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from atlas_rl.config import EngineConfig
from atlas_rl.controller import BestOfController, FixedController
from atlas_rl.jsonio import write_json
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.speculators.adaptive import AdaptiveHeadConfig, build_adaptive_head, rank_vocab_from_samples
from atlas_rl.speculators.adaptive import refresh_frozen_rows as _refresh_rows
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig, target_fingerprint
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.speculators.suffix import SuffixSpeculator
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.online import OnlineSpeculatorTrainer, OnlineTrainerConfig
from atlas_rl.types import SamplingParams

from .harness import ConfigSummary, RunResult
from .workloads import Workload, chat_ids

logger = logging.getLogger(__name__)

__all__ = ["DriftOptions", "render_policy_drift_markdown", "run_policy_drift"]

CONFIGS = ("none", "static", "suffix", "adaptive", "static+adaptive+suffix")
TINY_VOCAB = 256


@dataclass
class DriftOptions:
    """What ``atlas-rl bench --scenario drift`` runs (groups: policies, workloads, static head, adaptive head)."""

    # ---- run
    model: str | None = field(
        default=None, metadata={"help": "Target path/id; None = embedded SmolLM2-135M; 'tiny' = tiny smoke model."}
    )
    out_dir: str = field(default="bench_out", metadata={"help": "Where policy_drift.json / policy_drift.md go."})
    threads: int = field(
        default=1,
        metadata={"help": "torch intra-op threads (1: on a shared 2-core CPU a second thread stalls in spin-waits)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds the corpora split, fine-tuning batches and sampling."})
    # ---- policies
    num_versions: int = field(default=5, metadata={"help": "Policy versions, v0 (the target) included (>= 4)."})
    finetune_steps: int = field(default=24, metadata={"help": "AdamW steps per fine-tuning stage (version)."})
    finetune_batch: int = field(default=2, metadata={"help": "Sequences per fine-tuning step."})
    finetune_seq_len: int = field(default=128, metadata={"help": "Tokens per fine-tuning sequence."})
    finetune_lr: float = field(default=5e-5, metadata={"help": "Fine-tuning learning rate (AdamW, fp32)."})
    corpus_files: int = field(default=300, metadata={"help": "Source files read per language (sampled)."})
    # ---- workloads
    bench_prompts: int = field(
        default=8, metadata={"help": "C snippets of the benchmark workload (same each version)."}
    )
    rollout_prompts: int = field(default=8, metadata={"help": "Fresh C snippets of each version's RL rollout."})
    rollout_generations: int = field(default=4, metadata={"help": "Samples per prompt of the RL rollout."})
    prompt_tokens: int = field(default=48, metadata={"help": "Tokens per C snippet prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Completion tokens per sequence."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (RL rollouts: 1.0)."})
    k: int = field(default=4, metadata={"help": "Draft length of every speculating configuration."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of the benchmark per version."})
    # ---- static head
    static_head: str | None = field(default=None, metadata={"help": "Path of a static head checkpoint."})
    static_fallback: str = field(
        default="quick",
        metadata={"help": "Without a given or shipped static head: 'quick' (train one, cached) or 'skip'."},
    )
    quick_static_prompts: int = field(default=48, metadata={"help": "Broad prompts answered for the quick static."})
    quick_static_steps: int = field(default=150, metadata={"help": "Training steps of the quick static head."})
    # ---- adaptive head
    adaptive_vocab: int = field(default=2048, metadata={"help": "Draft vocabulary of the adaptive head."})
    adaptive_intermediate: int = field(default=512, metadata={"help": "MLP width of the adaptive head."})
    adaptive_vocab_from_data: bool = field(
        default=True,
        metadata={"help": "Re-rank the adaptive head's vocabulary from the captured data at every retraining."},
    )
    adaptive_share: float = field(
        default=0.10, metadata={"help": "Retraining wall-time budget as a share of the version's RL rollout."}
    )
    adaptive_lr: float = field(default=5e-4, metadata={"help": "Adaptive head learning rate (warm-started)."})
    adaptive_batch: int = field(default=4, metadata={"help": "Sequences per adaptive training step."})
    adaptive_seq_len: int = field(default=64, metadata={"help": "Positions per adaptive training sequence."})
    adaptive_ttt_steps: int = field(default=2, metadata={"help": "Training-time-test steps of the adaptive head."})

    def __post_init__(self) -> None:
        if self.num_versions < 2:
            raise ValueError(
                f"num_versions must be >= 2 (v0 and at least one fine-tuned policy), got {self.num_versions}"
            )
        for name in (
            "threads",
            "finetune_batch",
            "finetune_seq_len",
            "corpus_files",
            "bench_prompts",
            "rollout_prompts",
            "rollout_generations",
            "prompt_tokens",
            "max_new_tokens",
            "k",
            "repeats",
            "adaptive_vocab",
            "adaptive_intermediate",
            "adaptive_batch",
            "adaptive_ttt_steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.finetune_steps < 0 or self.quick_static_steps < 0 or self.quick_static_prompts < 1:
            raise ValueError("finetune_steps and quick_static_steps must be >= 0, quick_static_prompts >= 1")
        if self.static_fallback not in ("quick", "skip"):
            raise ValueError(f"static_fallback must be 'quick' or 'skip', got {self.static_fallback!r}")
        if not (0.0 < self.adaptive_share <= 1.0):
            raise ValueError(f"adaptive_share must lie in (0, 1], got {self.adaptive_share}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")

    @classmethod
    def quick(cls, **overrides: Any) -> DriftOptions:
        """Tiny settings: the pipeline end to end in a few minutes (4 versions, few prompts, short outputs)."""
        kw: dict[str, Any] = dict(
            num_versions=4,
            finetune_steps=3,
            finetune_batch=1,
            finetune_seq_len=64,
            corpus_files=40,
            bench_prompts=2,
            rollout_prompts=2,
            rollout_generations=2,
            prompt_tokens=32,
            max_new_tokens=24,
            quick_static_prompts=8,
            quick_static_steps=30,
        )
        kw.update(overrides)
        return cls(**kw)


# ------------------------------------------------------------------------------------------------ corpora
class ByteTokenizer:
    """UTF-8 bytes as token ids (the tiny smoke model's tokenizer); id 255 (never in UTF-8 text) is EOS."""

    eos_token_id = TINY_VOCAB - 1

    def encode(self, text: str) -> list[int]:
        return [b for b in text.encode("utf-8") if b != self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < self.eos_token_id).decode("utf-8", errors="replace")


_LEADING_COMMENTS = {
    "c": re.compile(r"\A(?:\s+|/\*.*?\*/|//[^\n]*\n)+", re.S),
    "python": re.compile(r"\A(?:\s+|#[^\n]*\n|(?:\"\"\"|''').*?(?:\"\"\"|'''))+", re.S),
}


def source_files(language: str, count: int, seed: int) -> list[Path]:
    """``count`` source files of ``language`` ("python" or "c") found on this machine, sampled deterministically."""
    if language == "python":
        roots, patterns = [Path(sysconfig.get_paths()["purelib"])], ("*.py",)
    elif language == "c":
        roots, patterns = [Path("/usr/include"), Path("/usr/share"), Path("/usr/src")], ("*.h", "*.c")
    else:
        raise ValueError(f"language must be 'python' or 'c', got {language!r}")
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            for pat in patterns:
                found.extend(p for p in root.rglob(pat) if p.is_file())
    found = sorted(set(found))
    if not found:
        raise FileNotFoundError(
            f"no {language} sources found under {[str(r) for r in roots]}: the drift scenario needs local corpora "
            "(install python3 and libc6-dev headers)"
        )
    random.Random(f"atlas-drift:{language}:{seed}").shuffle(found)
    return found[: count * 3]  # some are dropped as too short


def read_sources(language: str, count: int, seed: int, max_chars: int = 6000) -> list[str]:
    """Texts of up to ``count`` source files (leading license/comment blocks removed, at least 800 characters)."""
    out: list[str] = []
    for p in source_files(language, count, seed):
        try:
            text = p.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        text = _LEADING_COMMENTS[language].sub("", text)[:max_chars]
        if len(text) >= 800:
            out.append(text)
        if len(out) >= count:
            break
    return out


@dataclass
class Corpora:
    """Tokenized corpora: fine-tuning pools per language, held-out C files for prompts and the held-out loss."""

    train: dict[str, list[list[int]]]
    heldout_c: list[list[int]]
    base_prompts: list[list[int]]  # the static head's domain (broad chat prompts; Python snippets for "tiny")


def _snippet(ids: list[int], length: int, rng: random.Random) -> list[int] | None:
    if len(ids) < length + 8:
        return None
    start = rng.randrange(0, max(1, len(ids) // 2 - length))
    return ids[start : start + length]


def build_corpora(encode: Callable[[str], list[int]], opts: DriftOptions, base_prompts: list[list[int]]) -> Corpora:
    py = [encode(t) for t in read_sources("python", opts.corpus_files, opts.seed)]
    c = [encode(t) for t in read_sources("c", opts.corpus_files, opts.seed)]
    cut = max(1, len(c) // 3)  # a third of the C files are held out: prompts of the workloads, held-out loss
    return Corpora(train={"python": py, "c": c[cut:]}, heldout_c=c[:cut], base_prompts=base_prompts)


def c_prompts(corpora: Corpora, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` C snippets of ``length`` tokens from held-out files (deterministic for a seed)."""
    rng = random.Random(seed)
    files = list(corpora.heldout_c)
    rng.shuffle(files)
    out: list[list[int]] = []
    while len(out) < n:
        for ids in files:
            s = _snippet(ids, length, rng)
            if s is not None:
                out.append(s)
            if len(out) >= n:
                break
        if not out:
            raise ValueError(f"no held-out C file holds {length + 8} tokens: lower prompt_tokens")
    return out


def finetune_batch(corpora: Corpora, c_share: float, batch: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    """``[batch, seq_len]`` windows: C with probability ``c_share``, else Python."""
    rows = []
    while len(rows) < batch:
        pool = corpora.train["c" if rng.random() < c_share else "python"]
        s = _snippet(pool[rng.randrange(len(pool))], seq_len, rng)
        if s is not None:
            rows.append(s)
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ model side
def _lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def finetune(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]
) -> dict[str, float]:
    """AdamW steps on ``batches`` (fp32, next-token loss); returns mean loss and seconds."""
    t0 = time.perf_counter()
    model.train()
    losses = []
    for x in tqdm(batches, desc="fine-tune", leave=False, disable=len(batches) < 4):
        loss = _lm_loss(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": sum(losses) / len(losses) if losses else math.nan, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.eval()
    return float(_lm_loss(model, batch))


def _load(opts: DriftOptions) -> tuple[torch.nn.Module, Callable[[str], list[int]], list[int], list[list[int]]]:
    """The target, an ``encode`` function, the EOS ids, and the base prompts (the static head's domain)."""
    if opts.model == "tiny":
        from atlas_rl.models import tiny_llama

        tok = ByteTokenizer()
        model = tiny_llama(vocab_size=TINY_VOCAB, hidden_size=64, num_layers=2, max_position_embeddings=1024, seed=0)
        return model, tok.encode, [tok.eos_token_id], []
    from atlas_rl.data.broad_prompts import broad_prompts
    from atlas_rl.models import load_target

    model, tokenizer = load_target(opts.model)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    items = broad_prompts(seed=opts.seed)
    random.Random(opts.seed).shuffle(items)
    prompts = []
    for it in items[: opts.quick_static_prompts]:
        msgs = ([{"role": "system", "content": it["system"]}] if "system" in it else []) + [
            {"role": "user", "content": it["prompt"]}
        ]
        prompts.append(chat_ids(tokenizer, msgs))
    eos = list(RolloutEngine(model).eos_token_ids)
    return model, encode, eos, prompts


def _pretrain_tiny(model: torch.nn.Module, corpora: Corpora, steps: int, seed: int) -> float:
    """Make the tiny model a "Python model" (v0) before the drift starts; returns its final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    out = finetune(model, opt, [finetune_batch(corpora, 0.0, 8, 128, rng) for _ in range(steps)])
    return out["loss"]


def _quick_static(
    model: torch.nn.Module, prompts: list[list[int]], eos: list[int], opts: DriftOptions, tiny: bool
) -> tuple[DraftHead, str]:
    """A static head self-distilled from the v0 target's greedy answers to ``prompts``; cached for real models."""
    from atlas_rl.models import cache_dir

    H = int(model.config.hidden_size)
    L = int(model.config.num_hidden_layers)
    fuse = (1, L) if tiny else (2, L // 2, L - 3)  # EAGLE-3's low/mid/high layers
    V = int(model.get_output_embeddings().weight.shape[0])
    cfg_kw = dict(draft_vocab_size=min(8192, V), fuse_layers=fuse, intermediate_size=4 * H if tiny else 1536)
    settings = dict(
        cfg_kw, prompts=len(prompts), steps=opts.quick_static_steps, seed=opts.seed, fp=target_fingerprint(model)
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / "drift" / f"quick_static-{key}.safetensors"
    if not tiny and path.is_file():
        logger.info("quick static head from the cache: %s", path)
        return DraftHead.load(path, target=model), f"quick-trained static head (cached {path})"
    t0 = time.perf_counter()
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=fuse, top_k=16, max_positions=None))
    eng = RolloutEngine(model, eos_token_ids=eos, config=EngineConfig(num_speculative_tokens=0, controller="fixed"))
    buf.attach(eng)
    eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=96 if not tiny else 64))
    buf.flush()
    samples = buf.samples()
    d2t = rank_vocab_from_samples(samples, V, cfg_kw["draft_vocab_size"])
    head = DraftHead(DraftHeadConfig.from_target(model, **cfg_kw), draft_to_target=d2t).bind_target(
        model, init_lm_head=True
    )
    trainer = OnlineSpeculatorTrainer(
        head, buf, OnlineTrainerConfig(lr=1e-3, batch_size=4, max_seq_len=128, ttt_steps=3, seed=opts.seed)
    )
    m = trainer.step(max_steps=opts.quick_static_steps, progress=True)
    trainer.publish()
    note = (
        f"quick-trained static head ({len(samples)} answers of the v0 target, {m['steps']} steps, "
        f"{time.perf_counter() - t0:.0f} s; final loss {m['loss']:.2f}) — a stand-in for the shipped head"
    )
    if not tiny:
        head.save(path, card={"note": note, "settings": settings})
    return head, note


def _static_head(
    model: torch.nn.Module, prompts: list[list[int]], eos: list[int], opts: DriftOptions, tiny: bool
) -> tuple[DraftHead | None, str]:
    if opts.static_head:
        return DraftHead.load(opts.static_head, target=model), f"static head {opts.static_head}"
    if not tiny:
        try:
            from atlas_rl.speculators.defaults import load_static_speculator

            spec = load_static_speculator(model)
        except ImportError:  # pragma: no cover - the defaults module ships with the package
            spec = None
        if spec is not None:
            return spec.head, "shipped static head (atlas_rl.speculators.defaults)"
    if opts.static_fallback == "skip":
        return None, "no static head given or shipped: the static column is skipped (static_fallback='skip')"
    return _quick_static(model, prompts, eos, opts, tiny)


# ------------------------------------------------------------------------------------------------ the scenario
def _engine_factory(
    model: torch.nn.Module,
    eos: list[int],
    version: int,
    speculators: Callable[[], list],
    controller: Callable[[], Any] | None,
    k: int,
) -> Callable[[], RolloutEngine]:
    def make() -> RolloutEngine:
        specs = speculators()
        eng = RolloutEngine(
            model,
            speculators=specs,
            eos_token_ids=eos,
            controller=controller() if controller is not None else FixedController(0),
            config=EngineConfig(num_speculative_tokens=k if specs else 0, controller="fixed"),
        )
        if version > 0:
            eng.update_weights(None, version=version)
        return eng

    return make


def _configs(
    model: torch.nn.Module,
    eos: list[int],
    version: int,
    static: DraftHead | None,
    adaptive: DraftHead,
    k: int,
    seed: int,
) -> dict[str, Callable[[], RolloutEngine]]:
    def st() -> DraftHeadSpeculator:
        return DraftHeadSpeculator(static, name="static", seed=seed)

    def ad() -> DraftHeadSpeculator:
        return DraftHeadSpeculator(adaptive, name="adaptive", seed=seed + 1)

    out: dict[str, Callable[[], RolloutEngine]] = {"none": _engine_factory(model, eos, version, list, None, 0)}
    if static is not None:
        out["static"] = _engine_factory(model, eos, version, lambda: [st()], lambda: FixedController(k), k)
    out["suffix"] = _engine_factory(model, eos, version, lambda: [SuffixSpeculator()], lambda: FixedController(k), k)
    out["adaptive"] = _engine_factory(model, eos, version, lambda: [ad()], lambda: FixedController(k), k)
    combo = (lambda: [st(), ad(), SuffixSpeculator()]) if static is not None else (lambda: [ad(), SuffixSpeculator()])
    out["static+adaptive+suffix"] = _engine_factory(model, eos, version, combo, lambda: BestOfController(k), k)
    return out


def _interleaved(
    w: Workload, configs: dict[str, Callable[[], RolloutEngine]], repeats: int
) -> dict[str, ConfigSummary]:
    """Repetition 1 of every configuration, then repetition 2, ... (machine noise hits all alike); a fresh engine
    per run, so that no speculator state carries over between configurations."""
    out = {name: ConfigSummary(name, w.name) for name in configs}
    for rep in range(repeats):
        for name, make in configs.items():
            eng = make()
            t0 = time.perf_counter()
            batch = eng.generate(w.prompt_ids, w.sampling, num_generations=w.num_generations)
            secs = time.perf_counter() - t0
            out[name].runs.append(RunResult(name, w.name, batch.num_completion_tokens, secs, batch.stats))
            logger.info(
                "%s rep %d: %d tokens in %.1f s = %.1f tok/s, tau %.2f",
                name,
                rep,
                batch.num_completion_tokens,
                secs,
                batch.num_completion_tokens / secs,
                batch.stats.mean_acceptance_length,
            )
    return out


def _summaries(results: dict[str, ConfigSummary]) -> dict[str, dict[str, Any]]:
    base = results["none"].tokens_per_s
    out = {}
    for name, s in results.items():
        stats = [r.stats for r in s.runs if r.stats is not None]
        shares: dict[str, float] = {}  # which speculator's drafts were verified (share of drafts)
        drafts = sum(st.num_drafts for st in stats)
        for st in stats:
            for sp, ss in st.per_speculator.items():
                shares[sp] = shares.get(sp, 0.0) + (ss.num_drafts / drafts if drafts else math.nan)
        out[name] = {
            "tau": s.mean_acceptance_length,
            "tokens_per_s": s.tokens_per_s,
            "ratio_vs_none": s.tokens_per_s / base if base else math.nan,
            "seconds": sum(r.seconds for r in s.runs),
            "completion_tokens": sum(r.completion_tokens for r in s.runs),
            "draft_share": shares,
        }
    return out


def run_policy_drift(opts: DriftOptions, command: str = "atlas-rl bench --scenario drift") -> dict:
    """Run the drift scenario (module docstring); writes ``policy_drift.json`` and ``policy_drift.md``."""
    t_start = time.perf_counter()
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return _run(opts, command, out_dir, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(opts: DriftOptions, command: str, out_dir: Path, t_start: float) -> dict:
    tiny = opts.model == "tiny"
    model, encode, eos, base_prompts = _load(opts)
    for p in model.parameters():
        p.requires_grad_(True)
    corpora = build_corpora(encode, opts, base_prompts)
    report: dict[str, Any] = {
        "scenario": "policy drift (Python -> C fine-tuning)",
        "model": "tiny random Llama, byte tokenizer" if tiny else (opts.model or "SmolLM2-135M-Instruct (embedded)"),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": command,
        "options": asdict(opts),
        "corpora": {
            "python_files": len(corpora.train["python"]),
            "c_train_files": len(corpora.train["c"]),
            "c_heldout_files": len(corpora.heldout_c),
        },
        "versions": [],
    }
    if tiny:
        report["tiny_pretrain_loss"] = _pretrain_tiny(model, corpora, 30, opts.seed)
        snippets = (
            _snippet(ids, opts.prompt_tokens, random.Random(i)) for i, ids in enumerate(corpora.train["python"])
        )
        corpora.base_prompts = [s for s in snippets if s is not None][: opts.quick_static_prompts]
    static, static_note = _static_head(model, corpora.base_prompts, eos, opts, tiny)
    report["static_head"] = static_note
    logger.info("%s", static_note)
    adaptive = build_adaptive_head(
        model,
        static,
        AdaptiveHeadConfig(
            draft_vocab_size=min(
                opts.adaptive_vocab, static.config.draft_vocab_size if static else opts.adaptive_vocab
            ),
            intermediate_size=opts.adaptive_intermediate if not tiny else 64,
        ),
        seed=opts.seed,
    )
    from atlas_rl.speculators.adaptive import head_cost_macs

    report["head_cost_macs"] = {
        "static": head_cost_macs(static.config) if static is not None else None,
        "adaptive": head_cost_macs(adaptive.config),
    }
    buffer = CaptureBuffer(
        CaptureBufferConfig(fuse_layers=adaptive.config.fuse_layers, top_k=16, max_positions=200_000)
    )
    trainer = OnlineSpeculatorTrainer(
        adaptive,
        buffer,
        OnlineTrainerConfig(
            lr=opts.adaptive_lr,
            batch_size=opts.adaptive_batch,
            max_seq_len=max(opts.adaptive_seq_len, opts.adaptive_ttt_steps + 2),
            ttt_steps=opts.adaptive_ttt_steps,
            newest_min_labels=opts.rollout_prompts * opts.rollout_generations * opts.max_new_tokens // 2,
            seed=opts.seed,
        ),
    )
    prior = static.draft_to_target if static is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.finetune_lr, weight_decay=0.0)
    bench_prompts = c_prompts(corpora, opts.bench_prompts, opts.prompt_tokens, opts.seed)
    held_batch = torch.tensor(c_prompts(corpora, 4, min(128, 2 * opts.prompt_tokens), opts.seed + 7))
    sp = SamplingParams(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    workload = Workload(
        name="drift",
        description=f"{len(bench_prompts)} held-out C snippets x 1, T={opts.temperature}, {opts.max_new_tokens} new",
        prompt_ids=bench_prompts,
        num_generations=1,
        sampling=sp,
    )
    warm = SamplingParams(temperature=opts.temperature, max_new_tokens=4, seed=opts.seed)
    for make in _configs(model, eos, 0, static, adaptive, opts.k, opts.seed).values():
        make().generate(bench_prompts[:1], warm)  # first-call costs (allocations, kernels) stay out of the timings
    V = opts.num_versions
    for v in range(V):
        row: dict[str, Any] = {"version": v, "c_share": 0.0 if v == 0 else v / (V - 1)}
        if v > 0:  # ---- policy update: the next fine-tuning stage
            rng = random.Random(f"{opts.seed}:{v}")
            batches = [
                finetune_batch(corpora, row["c_share"], opts.finetune_batch, opts.finetune_seq_len, rng)
                for _ in range(opts.finetune_steps)
            ]
            ft = finetune(model, optimizer, batches)
            row["finetune_loss"], row["finetune_s"] = ft["loss"], ft["seconds"]
            with torch.no_grad():
                if static is not None:
                    _refresh_rows(static, model)
                trainer.refresh_frozen_rows(model)
        row["heldout_c_loss"] = heldout_loss(model, held_batch)
        # ---- bench: the same workload, every configuration, interleaved
        configs = _configs(model, eos, v, static, adaptive, opts.k, opts.seed)
        row["configs"] = _summaries(_interleaved(workload, configs, opts.repeats))
        # ---- the version's RL rollout (production configuration), captured for the adaptive head
        rp = c_prompts(corpora, opts.rollout_prompts, opts.prompt_tokens, opts.seed + 1000 + v)
        eng = configs["static+adaptive+suffix"]()
        handle = buffer.attach(eng)
        t0 = time.perf_counter()
        rb = eng.generate(
            rp,
            SamplingParams(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed + 1 + v),
            num_generations=opts.rollout_generations,
        )
        rollout_s = time.perf_counter() - t0
        handle.remove()
        buffer.flush()
        row["rollout"] = {
            "seconds": rollout_s,
            "tokens": rb.num_completion_tokens,
            "tau": rb.stats.mean_acceptance_length,
            "capture_hook_s": buffer.hook_s,
        }
        # ---- adaptive retraining: a wall-time budget of adaptive_share of the rollout, then publish
        t0 = time.perf_counter()
        if opts.adaptive_vocab_from_data:
            d2t = rank_vocab_from_samples(
                buffer.samples(min_version=v),
                adaptive.config.target_vocab_size,
                adaptive.config.draft_vocab_size,
                prior,
            )
            coverage_before = _coverage(adaptive.draft_to_target, rb.completion_ids)
            trainer.set_draft_vocab(model, d2t)
            row["adaptive_vocab_coverage"] = {"before": coverage_before, "after": _coverage(d2t, rb.completion_ids)}
        budget = opts.adaptive_share * rollout_s - (time.perf_counter() - t0)
        m = trainer.step(time_budget_s=max(0.0, budget))
        trainer.publish()
        train_s = time.perf_counter() - t0
        row["adaptive_train"] = {
            "seconds": train_s,
            "share_of_rollout": train_s / rollout_s,
            "steps": m["call_steps"],
            "loss": m["call_loss"],
            "top1": m["call_top1"],
            "skipped": m["call_skipped"],
            "staleness": m["staleness"],
            "buffer_positions": buffer.num_positions,
        }
        if static is not None:
            row["static_vocab_coverage"] = _coverage(static.draft_to_target, rb.completion_ids)
        report["versions"].append(row)
        c = row["configs"]
        logger.info(
            "version %d: tau none/static/suffix/adaptive/all = %s; adaptive retrain %.1f s (%.0f%% of rollout)",
            v,
            " / ".join(f"{c[n]['tau']:.2f}" if n in c else "-" for n in CONFIGS),
            train_s,
            100 * train_s / rollout_s,
        )
        write_json(out_dir / "policy_drift.json", report)
    report["summary"] = _summary(report)
    report["wall_s"] = time.perf_counter() - t_start
    write_json(out_dir / "policy_drift.json", report)
    (out_dir / "policy_drift.md").write_text(render_policy_drift_markdown(report))
    return report


def _coverage(d2t: torch.Tensor, completions: list[list[int]]) -> float:
    """Share of completion tokens inside a draft vocabulary (a head can never propose the others)."""
    allowed = set(d2t.tolist())
    toks = [t for c in completions for t in c]
    return sum(t in allowed for t in toks) / len(toks) if toks else math.nan


def _summary(report: dict) -> dict[str, Any]:
    last = report["versions"][-1]["configs"]
    shares = [r["adaptive_train"]["share_of_rollout"] for r in report["versions"]]
    out: dict[str, Any] = {
        "last_version": report["versions"][-1]["version"],
        "adaptive_tau_last": last["adaptive"]["tau"],
        "max_train_share": max(shares),
        "mean_train_share": sum(shares) / len(shares),
    }
    if "static" in last:
        out["static_tau_last"] = last["static"]["tau"]
        out["adaptive_over_static_tau_last"] = last["adaptive"]["tau"] / last["static"]["tau"]
    return out


def _f(x: Any, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def render_policy_drift_markdown(report: dict) -> str:
    o = report["options"]
    lines = [
        f"# atlas-rl bench drift — {report['model']} on {report['device']}",
        "",
        f"{o['num_versions']} policy versions: v0 = the target, then {o['finetune_steps']} fine-tuning steps per "
        f"version (batch {o['finetune_batch']} x {o['finetune_seq_len']} tokens, lr {o['finetune_lr']}) on Python "
        f"-> C sources (C share v/{o['num_versions'] - 1}). Benchmark: {o['bench_prompts']} held-out C snippets, "
        f"T={o['temperature']}, {o['max_new_tokens']} new tokens, k={o['k']}, identical at every version. RL rollout "
        f"per version: {o['rollout_prompts']} fresh C snippets x {o['rollout_generations']} (static+adaptive+suffix, "
        "captured). Adaptive retraining budget: "
        f"{100 * o['adaptive_share']:.0f}% of that rollout; the head serves the next version.",
        "",
        f"Static head: {report['static_head']}.",
        "",
        "τ = mean acceptance length (tokens per target forward of a sequence); tok/s = completion tokens / wall "
        "time of generate().",
        "",
    ]
    names = [n for n in CONFIGS if n in report["versions"][0]["configs"]]
    head = "| version | C share | held-out C loss | " + " | ".join(f"{n} τ / tok/s" for n in names)
    head += " | adaptive train s | RL rollout s | train share |"
    lines += [head, "|" + "---|" * (len(names) + 6)]
    for r in report["versions"]:
        cells = [f"{_f(r['configs'][n]['tau'])} / {_f(r['configs'][n]['tokens_per_s'], 1)}" for n in names]
        a = r["adaptive_train"]
        lines.append(
            f"| v{r['version']} | {r['c_share']:.2f} | {_f(r['heldout_c_loss'])} | "
            + " | ".join(cells)
            + f" | {_f(a['seconds'], 1)} | {_f(r['rollout']['seconds'], 1)} | {100 * a['share_of_rollout']:.1f}% |"
        )
    lines += [
        "",
        "| version | adaptive steps | train loss | train top-1 | vocab coverage of the rollout: static / adaptive "
        "(before -> after re-ranking) | draft share in static+adaptive+suffix |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["versions"]:
        a = r["adaptive_train"]
        cov = r.get("adaptive_vocab_coverage", {})
        shares = r["configs"]["static+adaptive+suffix"]["draft_share"]
        lines.append(
            f"| v{r['version']} | {a['steps']} | {_f(a['loss'])} | {_f(a['top1'])} | "
            f"{_f(r.get('static_vocab_coverage'))} / {_f(cov.get('before'))} -> {_f(cov.get('after'))} | "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items()))
            + " |"
        )
    s = report.get("summary", {})
    lines += [""]
    if "adaptive_over_static_tau_last" in s:
        lines.append(
            f"At the last version (v{s['last_version']}) the adaptive head's τ is "
            f"{_f(s['adaptive_over_static_tau_last'])}x the static head's ({_f(s['adaptive_tau_last'])} vs "
            f"{_f(s['static_tau_last'])}); target >= 1.3x."
        )
    if s:
        lines.append(
            f"Adaptive retraining took at most {100 * s['max_train_share']:.1f}% (mean "
            f"{100 * s['mean_train_share']:.1f}%) of the version's RL rollout time; target <= 10%."
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)
