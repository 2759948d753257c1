"""Online budget control: hold an average-cost budget B over live traffic by adjusting lambda.

Offline, a budget becomes a lambda once (`RouterModel.lambda_for_budget`, calibrated on held-out
prompts). When the live prompt mix drifts from the calibration mix, the same lambda routes a
different share of prompts to expensive candidates and the average cost drifts with it. The
controller closes the loop on the *realised* cost of every routed request:

    e_t      = (c_t - B) / B                                  (relative error of one request)
    lam_I   <- clip(lam_I + k_i * s * e_t,  lam_min, lam_cap)   (dual ascent on the budget constraint)
    lam      = clip(lam_I + k_p * s * (mean_W(c) / B - 1), lam_min, lam_cap)
    |lam - lam_previous| <= max_step * s                        (bounded step)

`s` is the natural scale of lambda for the pool (quality range / cost range, `lambda_scale`), so
the gains are unit-free. The integral term is dual (sub)gradient ascent on the Lagrangian of
"maximise mean quality subject to mean cost <= B": its fixed point is a lambda at which the
long-run mean routed cost equals B; a stream that alternates between two neighbouring lambdas is
the randomised router between them, which the deferral curve says is optimal at that cost. The
proportional term on the sliding window's mean reacts to a sudden shift faster than the integral
alone. The window (the last `window` realised costs) is also what the controller reports.

Feed-forward for requests in flight (`commit`). Realised costs arrive late: a cascade pays for
every attempt it draws, and with many requests in flight the controller hears of a dear plan long
after it chose more at the same lambda. A caller that knows each decision's EXPECTED cost (the
plan's `cost` at decision time) commits it at once: the integral steps on the expected error
then, the proportional term reads the window of realised costs together with the in-flight
expected ones, and when the realised cost arrives (`observe(costs, expected=...)`) the integral
steps on the difference only. Once every request is paid the integral holds exactly what
observing the realised costs alone gives; it just got there without the lag.

Pure Python + numpy (no Ray): the Serve app keeps one controller per key in a small coordinator
deployment shared by every router replica (serve/budget_coordinator.py); benchmarks/budget_drift.py
drives it in a simulation against the offline optimum.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catimage.errors import BudgetError

__all__ = ["BudgetController", "ControllerConfig", "lambda_scale"]


@dataclass(frozen=True)
class ControllerConfig:
    """Gains and bounds of the controller (unit-free: lambda is measured in units of `scale`)."""

    budget: float
    """B: the average cost per request to hold, in the pool's cost unit."""
    window: int = 200
    """Sliding window (requests) whose mean cost is reported and drives the proportional term."""
    ki: float = 0.02
    """Integral (dual-ascent) gain per request."""
    kp: float = 1.0
    """Proportional gain on the window's relative error."""
    max_step: float = 0.1
    """Largest change of lambda per observed request, in units of `scale`."""
    lam_cap_scales: float = 50.0
    """Upper bound of lambda, in units of `scale` (beyond the pool's edge slopes nothing changes)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise BudgetError(f"the controller's budget (average cost to hold) must be a positive number, got {self.budget}")
        if self.window < 1:
            raise BudgetError(f"the controller's window must be at least 1 request, got {self.window}")
        for name in ("ki", "kp", "max_step", "lam_cap_scales"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise BudgetError(f"controller {name} must be a non-negative number, got {value}")


def lambda_scale(pred: Any, costs: Any) -> float:
    """The natural size of lambda for a pool: spread of predicted quality / spread of costs.

    Lambdas far below it change few decisions, lambdas far above it route nearly everything to the
    cheapest candidate; so the controller's gains are expressed in units of this scale.
    """
    pred = np.asarray(pred, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    finite = pred[np.isfinite(pred)]
    q_spread = float(np.percentile(finite, 95) - np.percentile(finite, 5)) if finite.size else 0.0
    c_spread = float(costs.max() - costs.min()) if costs.size else 0.0
    if q_spread <= 0 or c_spread <= 0:
        return 1.0
    return q_spread / c_spread


@dataclass
class BudgetController:
    """One controlled budget (the whole deployment, or one API key)."""

    config: ControllerConfig
    lam_offline: float
    """Starting lambda: the offline calibration's lambda for the budget (feed-forward)."""
    scale: float
    """`lambda_scale` of the pool."""
    lam: float = field(init=False)
    _lam_i: float = field(init=False)
    _window: deque = field(init=False)
    _window_sum: float = field(init=False, default=0.0)
    observed: int = field(init=False, default=0)
    total_cost: float = field(init=False, default=0.0)
    in_flight: int = field(init=False, default=0)
    """Requests committed at their expected cost and not observed yet."""
    _in_flight_sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise BudgetError(f"lambda scale must be a positive number, got {self.scale}")
        if not (math.isfinite(self.lam_offline) and self.lam_offline >= 0):
            raise BudgetError(f"starting lambda must be a non-negative number, got {self.lam_offline}")
        self.lam = min(float(self.lam_offline), self.lam_cap)
        self._lam_i = self.lam
        self._window = deque(maxlen=self.config.window)

    @property
    def lam_cap(self) -> float:
        return max(self.config.lam_cap_scales * self.scale, float(self.lam_offline))

    def commit(self, expected: Iterable[float]) -> float:
        """Count requests just decided at their expected cost, before they are paid (feed-forward);
        each must later be observed with the same expected cost. Returns the lambda for the next."""
        for e in expected:
            e = float(e)
            if not math.isfinite(e) or e < 0:
                raise BudgetError(f"an expected cost must be a finite number >= 0, got {e}")
            self.in_flight += 1
            self._in_flight_sum += e
            self._step(e - self.config.budget)
        return self.lam

    def observe(self, costs: Iterable[float], expected: Iterable[float] | None = None) -> float:
        """Feed realised costs (in arrival order); returns the lambda to route the next request with.

        `expected`: the costs these requests were committed at (`commit`), aligned with `costs`; the
        integral then steps on realised - expected only. A cost the caller could not measure (NaN,
        negative) says nothing about the budget: it is skipped, and its commitment withdrawn.
        """
        costs = [float(c) for c in costs]
        committed = [None] * len(costs) if expected is None else [float(e) for e in expected]
        if len(committed) != len(costs):
            raise BudgetError(f"{len(costs)} realised costs but {len(committed)} expected ones: pass one per request")
        for c, e in zip(costs, committed, strict=True):
            if e is not None:
                self._withdraw(e)
            if not math.isfinite(c) or c < 0:
                if e is not None:
                    self._step(self.config.budget - e)  # undo the commitment's step
                continue
            if len(self._window) == self._window.maxlen:
                self._window_sum -= self._window[0]
            self._window.append(c)
            self._window_sum += c
            self.observed += 1
            self.total_cost += c
            self._step(c - (self.config.budget if e is None else e))
        return self.lam

    def shift(self, delta: float) -> float:
        """Move lambda (and the integral behind it) by `delta`, keeping the window and every count: for a
        model swap, `delta` = the new model's calibrated lambda - the old one's on the same prompts, so
        the correction this controller has learned for the live traffic carries over to the new model
        instead of being relearnt from its offline lambda. Returns the new lambda."""
        delta = float(delta)
        if not math.isfinite(delta):
            raise BudgetError(f"a lambda shift must be a finite number, got {delta}")
        self.lam_offline = max(self.lam_offline + delta, 0.0)
        self._lam_i = min(max(self._lam_i + delta, 0.0), self.lam_cap)
        self.lam = min(max(self.lam + delta, 0.0), self.lam_cap)
        return self.lam

    def _withdraw(self, e: float) -> None:
        if self.in_flight <= 0:
            raise BudgetError("an expected cost was passed for a request that was never committed")
        self.in_flight -= 1
        self._in_flight_sum = self._in_flight_sum - e if self.in_flight else 0.0

    def _step(self, surplus: float) -> None:
        """One request's update: the integral on `surplus` (cost above what was already counted for
        it), the proportional term on the window plus the in-flight commitments, a bounded step."""
        cfg, s, budget = self.config, self.scale, self.config.budget
        self._lam_i = min(max(self._lam_i + cfg.ki * s * surplus / budget, 0.0), self.lam_cap)
        n = len(self._window) + self.in_flight
        mean = (self._window_sum + self._in_flight_sum) / n if n else budget
        wanted = min(max(self._lam_i + cfg.kp * s * (mean / budget - 1.0), 0.0), self.lam_cap)
        step = cfg.max_step * s
        self.lam = min(max(wanted, self.lam - step), self.lam + step)

    @property
    def window_mean(self) -> float:
        """Mean realised cost of the last `window` requests (NaN before the first)."""
        return self._window_sum / len(self._window) if self._window else float("nan")

    def state(self) -> dict[str, Any]:
        """What /v1/pool and the Prometheus gauges show."""
        mean = self.window_mean
        return {
            "budget": self.config.budget,
            "lambda": self.lam,
            "lambda_offline": self.lam_offline,
            "window": self.config.window,
            "window_requests": len(self._window),
            "window_mean_cost": None if math.isnan(mean) else mean,
            "window_error": None if math.isnan(mean) else mean / self.config.budget - 1.0,
            "observed": self.observed,
            "in_flight": self.in_flight,
            "mean_cost_all": self.total_cost / self.observed if self.observed else None,
        }
