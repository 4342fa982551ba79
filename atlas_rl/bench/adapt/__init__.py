"""``atlas-rl bench --scenario adapt``: the adaptive head where adaptation is the point (issue 18).

Workload shift: traffic moves to a project-specific format the static head never saw (:mod:`.traffic`); window
after window the adaptive head learns from the captured traffic within its retraining budget, and every
configuration is benched on the same held-out requests (:mod:`.scenario`, report in :mod:`.report`)."""

from .options import QUICK, AdaptOptions
from .report import render_adapt_markdown
from .scenario import run_adapt

__all__ = ["QUICK", "AdaptOptions", "render_adapt_markdown", "run_adapt"]
