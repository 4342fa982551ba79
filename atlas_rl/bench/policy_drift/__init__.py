"""``atlas-rl bench --scenario policy-drift`` (alias ``drift``): speculators while the policy is fine-tuned away
from its start, version after version (:mod:`.scenario` says how). One module per stage: :mod:`.options`,
:mod:`.corpora` (data), :mod:`.policy` (fine-tuning), :mod:`.heads` (static and adaptive heads), :mod:`.scenario`
(the run), :mod:`.report` (markdown)."""

from .options import CONFIGS, QUICK, DriftOptions
from .report import render_policy_drift_markdown
from .scenario import run_policy_drift

__all__ = ["CONFIGS", "QUICK", "DriftOptions", "render_policy_drift_markdown", "run_policy_drift"]
