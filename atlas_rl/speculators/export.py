"""Export a draft head in the directory layout stock vLLM serves (``speculative_config={"method": "eagle3",
"model": DIR}``): ``atlas-rl export-speculator RUN_OR_CKPT DIR``.

The source may be
- a head directory (``config.json`` + ``model.safetensors``, what :meth:`DraftHead.save_pretrained` writes);
- a trainer checkpoint (``checkpoint-N/``; the Atlas trainers keep the adaptive head in
  ``checkpoint-N/atlas/atlas_adaptive_head/``) or its ``atlas/`` folder;
- a run directory (the trainer's ``output_dir``, or a recipe's run dir with it in ``trainer/``): the newest
  ``checkpoint-N`` is used.

The head is loaded (which validates it: format, names, shapes) and written again with
:meth:`DraftHead.save_pretrained` in the chosen dtype, its card (``atlas_card.json``) kept. An old (v1,
single-file) head or an unreadable file raises :class:`ExportError` naming the file: nothing is converted
silently.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from atlas_rl.speculators.draft_head_io import INDEX_FILE

if TYPE_CHECKING:
    from atlas_rl.speculators.draft_head import DraftHead

logger = logging.getLogger(__name__)

HEAD_FILES = ("config.json", "model.safetensors")
# where the Atlas trainers keep the serving adaptive head inside a checkpoint (trainers/backend.py, SERVING_DIR)
ADAPTIVE_DIRS = ("atlas_adaptive_head", "adaptive_head")
ADAPTIVE_SUBDIR = Path("atlas") / ADAPTIVE_DIRS[0]
V1_FORMAT = "atlas-rl/draft-head/v1"
HEAD_FORMAT = "atlas-rl/draft-head/v2"
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ExportError(ValueError):
    """A source that holds no exportable head, or a head file that cannot be read (the message names it)."""


def is_head_dir(path: Path) -> bool:
    """True when ``path`` holds a draft head: ``config.json`` (an EAGLE-3 architecture or our head format) and
    ``model.safetensors`` (or its shards' index). A trainer checkpoint holds the same files for the POLICY: not a
    head."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    if not ((path / "model.safetensors").is_file() or (path / INDEX_FILE).is_file()):
        return False
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # a damaged head directory: loading it reports what is wrong, naming the file
    if not isinstance(cfg, dict):
        return True
    atlas = cfg.get("atlas") if isinstance(cfg.get("atlas"), dict) else {}
    archs = cfg.get("architectures") or []
    return atlas.get("format") == HEAD_FORMAT or any("Eagle3" in str(a) for a in archs)


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (header only), or None when it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception as e:  # not a safetensors file, truncated header, ...
        raise ExportError(f"{path}: unreadable or corrupt safetensors file ({_one_line(e)})") from e


def _v1_files(path: Path) -> list[Path]:
    """Single-file v1 heads at ``path`` (the file itself, or ``*.safetensors`` in it or in its ``atlas/``)."""
    if path.is_file():
        return [path] if path.suffix == ".safetensors" and _safetensors_format(path) == V1_FORMAT else []
    found: list[Path] = []
    for folder in (path, path / "atlas"):
        if folder.is_dir():
            found += [p for p in sorted(folder.glob("*.safetensors")) if _safetensors_format(p) == V1_FORMAT]
    return found


def _v1_error(path: Path) -> ExportError:
    return ExportError(
        f"{path}: a single-file draft head in the old format {V1_FORMAT!r} (the hybrid head before issue 14); "
        "vLLM cannot serve it and it is not converted: retrain the head (heads are saved as directories now)"
    )


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder of ``run_dir`` with the largest N, or None."""
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_head_dir(source: str | Path) -> Path:
    """The head directory that ``source`` (a head dir, checkpoint, its ``atlas/`` folder or run dir) names."""
    src = Path(source)
    if not src.exists():
        raise ExportError(f"{src} does not exist: pass a head directory, a checkpoint-N folder or a run directory")
    if src.is_file() and src.name in HEAD_FILES and is_head_dir(src.parent):
        return src.parent  # DIR/model.safetensors or DIR/config.json
    for cand in (src, *(src / n for n in ADAPTIVE_DIRS), *(src / "atlas" / n for n in ADAPTIVE_DIRS)):
        if is_head_dir(cand):
            return cand
    v1 = _v1_files(src)
    if v1:
        raise _v1_error(v1[0])
    ckpt = None
    for folder in (src, src / "trainer"):  # a recipe / `atlas-rl demo` run dir keeps the trainer's in trainer/
        if ckpt is None and folder.is_dir():
            ckpt = newest_checkpoint(folder)
    if ckpt is not None:
        logger.info("newest checkpoint of %s: %s", src, ckpt.name)
        return resolve_head_dir(ckpt)
    raise ExportError(
        f"{src}: no draft head found; expected a head directory ({' + '.join(HEAD_FILES)}), a checkpoint with "
        f"{ADAPTIVE_SUBDIR}/, or a run directory with checkpoint-N folders"
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def load_head(head_dir: Path) -> DraftHead:
    """``DraftHead.from_pretrained(head_dir)`` (fp32, no target), every failure as an :class:`ExportError`."""
    from atlas_rl.speculators.draft_head import DraftHead

    try:
        return DraftHead.from_pretrained(head_dir, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as e:  # the head's own checks name the file and the mismatch
        raise ExportError(" ".join(str(e).split())) from e
    except Exception as e:  # anything else a damaged directory can raise
        raise ExportError(f"{head_dir}: cannot be loaded as a draft head ({_one_line(e)})") from e


def check_servable(head: DraftHead, head_dir: Path) -> None:
    """Raise :class:`ExportError` when stock vLLM could not run ``head`` as trained: its fused layers become
    ``eagle_aux_hidden_state_layer_ids``, which vLLM reads as decoder-layer outputs ``0 <= l < num_layers`` (a
    negative index has no meaning there; index ``num_layers`` is the last layer BEFORE the final norm in vLLM but
    after it in Hugging Face's ``hidden_states``)."""
    c = head.config
    m = re.search(r"-L(\d+)-", c.target_name or "")
    num_layers = int(m.group(1)) if m else None
    bad = [x for x in c.fuse_layers if x < 0 or (num_layers is not None and x >= num_layers)]
    if bad:
        raise ExportError(
            f"{head_dir / 'config.json'}: fuse_layers {list(c.fuse_layers)} include {bad}, which vLLM's "
            f"eagle_aux_hidden_state_layer_ids cannot express (0 <= l < {num_layers or 'num_layers'}); "
            "train the head on non-negative target layers, e.g. (2, 15, 27)"
        )


def _check_range(head: DraftHead, head_dir: Path, dtype: torch.dtype) -> None:
    """Refuse a cast that would turn weights into inf (float16 tops out at 65504)."""
    limit = torch.finfo(dtype).max
    for name, t in head.state_dict().items():
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > limit:
            raise ExportError(
                f"{head_dir}: tensor {name} holds values beyond the {dtype} range (|x| > {limit:g}); "
                "export with --dtype bfloat16 or float32"
            )


def export_head(source: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """Write the head ``source`` names into ``out_dir`` (vLLM's EAGLE-3 layout, weights in ``dtype``); returns
    ``out_dir``. The card (``atlas_card.json``) is carried over, with ``exported_from`` added."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    head_dir = resolve_head_dir(source)
    out = Path(out_dir)
    if out.resolve() == head_dir.resolve():
        raise ExportError(f"{out} is the source head itself: choose another output directory")
    head = load_head(head_dir)
    check_servable(head, head_dir)
    _check_range(head, head_dir, DTYPES[dtype])
    card = _read_card(head_dir)
    card["exported_from"] = str(head_dir.resolve())
    out.mkdir(parents=True, exist_ok=True)
    head.save_pretrained(out, dtype=DTYPES[dtype], card=card)
    logger.info("exported %s -> %s (%s)", head_dir, out, dtype)
    return out


def _read_card(head_dir: Path) -> dict:
    from atlas_rl.speculators.draft_head_io import CARD_FILE

    path = head_dir / CARD_FILE
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable or corrupt ({_one_line(e)})") from e
    return card if isinstance(card, dict) else {"card": card}
