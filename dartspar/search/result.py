"""What every search method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cost.model import CostBreakdown
from ..plan import Plan

__all__ = ["SearchResult"]


@dataclass
class SearchResult:
    """A method's best plan and how it got there.

    Attributes:
        method: "darts", "dp", "mcmc", "random", "bruteforce" or "device_blind".
        plan: the best plan found, with ``plan.predicted`` filled by the cost model.
        cost: ``CostModel.evaluate(plan)``.
        history: one dict per step/iteration (method-specific keys; always "step" and
            "best_step_time_s"), for plots and W&B.
        wall_time_s: search wall time.
        evaluations: number of exact discrete cost evaluations spent.
        info: method-specific extras (relaxed vs decoded cost and gap for darts, candidate
            counts for dp, acceptance rate for mcmc, ...).
    """

    method: str
    plan: Plan
    cost: CostBreakdown
    history: list = field(default_factory=list)
    wall_time_s: float = 0.0
    evaluations: int = 0
    info: dict = field(default_factory=dict)
