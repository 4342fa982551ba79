"""The drift's data: Python and C sources found on this machine, tokenized; prompts and fine-tuning batches."""

from __future__ import annotations

import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import DriftOptions

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


def snippet(ids: list[int], length: int, rng: random.Random) -> list[int] | None:
    """A random window of ``length`` tokens from the first half of ``ids`` (None when ``ids`` is too short)."""
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
            s = snippet(ids, length, rng)
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
        s = snippet(pool[rng.randrange(len(pool))], seq_len, rng)
        if s is not None:
            rows.append(s)
    return torch.tensor(rows, dtype=torch.long)
