"""Controllers decide per row and step which speculator drafts and how far."""

from atlas_rl.controller.base import Controller, Plan, PlanState
from atlas_rl.controller.fixed import BestOfController, FixedController

__all__ = ["BestOfController", "Controller", "FixedController", "Plan", "PlanState"]
