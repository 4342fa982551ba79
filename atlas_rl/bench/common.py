"""What every bench scenario shares: loading the target with a clear error, the report header, number format."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
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


@dataclass
class BenchRun:
    """A bench in progress: where it writes, when it started, the target, and the report being filled."""

    out_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    eos: list[int]
    report: dict[str, Any]
    t0: float = field(default_factory=time.perf_counter)

    def write(self, stem: str, render: Callable[[dict], str] | None = None) -> None:
        """``<stem>.json`` (strict JSON; after every stage, so a cut run leaves its results) and, with ``render``,
        the final ``<stem>.md`` with the wall time."""
        from atlas_rl.jsonio import write_json

        if render is not None:
            self.report["wall_s"] = time.perf_counter() - self.t0
        write_json(self.out_dir / f"{stem}.json", self.report)
        if render is not None:
            (self.out_dir / f"{stem}.md").write_text(render(self.report))


def start_run(opts: Any, command: str, **fields: Any) -> BenchRun:
    """Load the target (clear error), create the output directory, and start the report with :func:`header`."""
    from atlas_rl.rollout.engine import RolloutEngine

    t0 = time.perf_counter()
    model, tokenizer = load_model(opts.model)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = list(RolloutEngine(model).eos_token_ids)
    return BenchRun(out_dir, model, tokenizer, eos, header(opts, model, command) | fields, t0)


def check_options(cls: type, module: str, doc: str | None, argv: list[str] | None, needs_scipy: bool = False) -> Any:
    """The options of a ``python -m atlas_rl.bench.<module>`` check parsed from ``argv`` (its usage error on bad
    input), with INFO logging on; ``needs_scipy``: exit saying how to get scipy (the ``dev`` extra) where it is
    missing."""
    import logging

    from atlas_rl.argparsing import ConfigParser

    if needs_scipy:
        try:
            import scipy  # noqa: F401
        except ImportError as e:  # a dev tool: scipy comes with the dev extra
            raise SystemExit(f"{module} needs scipy: pip install -e '.[dev]'") from e
    opts = ConfigParser([cls], prog=f"python -m atlas_rl.bench.{module}", description=doc).parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return opts
