"""What every bench scenario shares: loading the target with a clear error, the report header, number format."""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded default)"


class BenchInputError(ValueError):
    """Bad input detected before a bench starts (e.g. a model that cannot be loaded); the message says why."""


def load_model(name: str | None) -> tuple[torch.nn.Module, Any]:
    """``load_target(name)``; a missing or unloadable model is a :class:`BenchInputError` naming it."""
    from atlas_rl.models import load_target

    try:
        return load_target(name)
    except (OSError, ValueError, TypeError) as e:  # FileNotFoundError is an OSError
        raise BenchInputError(f"cannot load model {name!r}: {' '.join(str(e).split())}") from e


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def header(opts: Any, model: torch.nn.Module, command: str) -> dict[str, Any]:
    """The fields every bench report starts with: what ran, where, and with which options."""
    return {
        "model": getattr(opts, "model", None) or EMBEDDED_NAME,
        "device": device_label(),
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "command": command,
        "options": asdict(opts) if is_dataclass(opts) else dict(vars(opts)),
    }


def fmt(x: Any, nd: int = 2) -> str:
    """A number for a markdown table; ``—`` for None, NaN and inf."""
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"
