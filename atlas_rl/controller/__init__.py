"""Controllers decide per row and step which speculator drafts and how far.

* :class:`AutoController` (``auto.py``, the engine's default when it has speculators): maximises expected emitted
  tokens per second from a measured verification cost (``cost.py``: calibrated at engine start, cached, refined
  online), each speculator's drafting cost (``draft_cost.py``), and calibrated confidence (``calibration.py``,
  fed by ``tracker.py``, which reads the outcome of every proposed one-hot draft off the emitted tokens);
  ``planning.py`` holds the arithmetic.
* :class:`FixedController` / :class:`BestOfController` (``fixed.py``): fixed-k baselines for benchmarks.
"""

from atlas_rl.controller.auto import AutoController, AutoControllerConfig
from atlas_rl.controller.base import Controller, Plan, PlanState, RowOutcome
from atlas_rl.controller.cost import VerificationCost
from atlas_rl.controller.draft_cost import DraftCost
from atlas_rl.controller.fixed import BestOfController, FixedController

__all__ = [
    "AutoController",
    "AutoControllerConfig",
    "BestOfController",
    "Controller",
    "DraftCost",
    "FixedController",
    "Plan",
    "PlanState",
    "RowOutcome",
    "VerificationCost",
]
