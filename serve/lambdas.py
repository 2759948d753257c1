"""Which lambda a request is routed at: its own lambda, its own budget, the controller's, the app's.

Pure (no Ray): the Router holds one `LambdaPolicy`; the coordinator's answers update `controlled`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fastapi import HTTPException

GLOBAL_KEY = "*"
"""The budget controller's key for the whole deployment (keys without a budget of their own)."""


class LambdaPolicy:
    """lambda for a request, with a bounded cache of budget -> lambda (calibration sorts the whole
    calibration set) and the float64 precision bound checked for client lambdas."""

    def __init__(
        self, lambda_for_budget: Callable[[float], float], lam_precise_max: float, lam_saturated: float,
        default_budget: float | None = None, default_lambda: float | None = None, cache_size: int = 1024,
    ) -> None:
        self._for_budget = lambda_for_budget
        self.lam_precise_max = lam_precise_max
        self.lam_saturated = lam_saturated
        self.default_budget = default_budget
        self.default_lambda = default_lambda
        self.controlled: dict[str, float] = {}
        self._cache: dict[float, float] = {}
        self._cache_size = cache_size

    def start_controllers(self, budgets: Mapping[str, float]) -> None:
        """Controllers start from the offline lambda of their budget (the coordinator does likewise)."""
        self.controlled = {key: self.for_budget(b) for key, b in budgets.items()}

    def for_budget(self, budget: float) -> float:
        if budget not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[budget] = float(self._for_budget(budget))
        return self._cache[budget]

    def check(self, lam: float) -> float:
        if lam > self.lam_precise_max:
            raise HTTPException(
                status_code=422,
                detail=(
                    f"lambda {lam:g} is too large: above {self.lam_precise_max:.3g} the rule cannot tell candidates' "
                    f"predicted quality apart in floating point; any lambda above {self.lam_saturated:.3g} already "
                    "routes every prompt to the cheapest candidate"
                ),
            )
        return lam

    def resolve(self, budget: float | None, lam: float | None, key: str | None, controlled: bool) -> tuple[float, str | None]:
        """(lambda, controller key or None): request lambda > request budget > controller > defaults.

        `controlled` False (a request pinned to a candidate) still gets the controller's lambda for
        its fallback ranking, but no controller key: its cost is not the router's to hold.
        """
        if lam is not None:
            return self.check(float(lam)), None
        if budget is not None:
            return self.for_budget(budget), None
        if self.controlled:
            ctrl_key = key if key in self.controlled else GLOBAL_KEY
            return self.controlled[ctrl_key], (ctrl_key if controlled else None)
        if self.default_lambda is not None:
            return self.check(float(self.default_lambda)), None
        if self.default_budget is not None:
            return self.for_budget(self.default_budget), None
        return 0.0, None
