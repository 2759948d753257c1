"""Whether a retrained model replaces the one being served: promote only on a confident win.

The retrain job (jobs/retrain.py) fits a candidate on logged traffic and estimates, by off-policy
evaluation on HELD-OUT logged requests (catimage.evaluation.offpolicy.compare_policies), what the
candidate and the serving model would each have earned there: quality (the decision metric), cost,
and utility = quality - lam * cost at the serving lambda, all on the same bootstrap resamples. The
rule here reads only those figures:

* enough evidence: at least `min_requests` held-out requests, and an effective sample size of the
  candidate's importance weights of at least `min_effective_share` of them (weights concentrated on
  a few requests make every interval a guess);
* a confident win: the lower end of the interval of the utility gain (candidate - serving) above
  `min_gain`;
* no budget blow-up: when a budget is given, the candidate's estimated cost (its upper end) at most
  `budget * (1 + cost_tolerance)`; the online controller would hold the budget anyway, but a model
  that only wins by spending more is not what a retrain should ship.

Anything else refuses, with every reason listed. Pure: no files, no Ray; `write_promotion` puts the
decision as JSON next to the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError

__all__ = [
    "PROMOTION_FILE",
    "Figure",
    "PromotionDecision",
    "PromotionEvidence",
    "PromotionRule",
    "decide_promotion",
    "write_promotion",
]

PROMOTION_FILE = "promotion.json"


@dataclass(frozen=True)
class Figure:
    """An estimate and its interval (None when it could not be computed)."""

    value: float
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class PromotionEvidence:
    """What off-policy evaluation says about candidate vs serving on held-out logged requests."""

    n_requests: int
    lam: float
    estimator: str
    confidence: float
    candidate: dict[str, Figure]  # quality, cost, utility
    serving: dict[str, Figure]
    gain: dict[str, Figure]  # candidate - serving, paired
    effective_sample_size: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_requests": self.n_requests, "lambda": self.lam, "estimator": self.estimator,
            "confidence": self.confidence, "effective_sample_size": self.effective_sample_size,
            "candidate": {k: f.to_dict() for k, f in self.candidate.items()},
            "serving": {k: f.to_dict() for k, f in self.serving.items()},
            "gain": {k: f.to_dict() for k, f in self.gain.items()},
        }


@dataclass(frozen=True)
class PromotionRule:
    """Thresholds of the decision (see the module docstring)."""

    min_requests: int = 200
    min_effective_share: float = 0.05
    min_gain: float = 0.0
    budget: float | None = None
    cost_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.min_requests < 1:
            raise CatimageError(f"min_requests must be >= 1, got {self.min_requests}")
        if not 0 <= self.min_effective_share <= 1:
            raise CatimageError(f"min_effective_share must be in [0, 1], got {self.min_effective_share}")
        if not math.isfinite(self.min_gain):
            raise CatimageError(f"min_gain must be a finite number, got {self.min_gain}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise CatimageError(f"the budget must be a positive number, got {self.budget}")
        if not (math.isfinite(self.cost_tolerance) and self.cost_tolerance >= 0):
            raise CatimageError(f"cost_tolerance must be >= 0, got {self.cost_tolerance}")


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reasons: list[str]
    evidence: PromotionEvidence
    rule: PromotionRule
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": "promote" if self.promote else "refuse",
            "reasons": self.reasons,
            "rule": asdict(self.rule),
            "evidence": self.evidence.to_dict(),
            **self.extra,
        }


def decide_promotion(evidence: PromotionEvidence, rule: PromotionRule = PromotionRule()) -> PromotionDecision:
    """Promote iff every condition of `rule` holds; the reasons say which held and which failed."""
    failed: list[str] = []
    passed: list[str] = []
    (passed if evidence.n_requests >= rule.min_requests else failed).append(
        f"{evidence.n_requests} held-out requests (need >= {rule.min_requests})")
    share = evidence.effective_sample_size / max(evidence.n_requests, 1)
    (passed if share >= rule.min_effective_share else failed).append(
        f"effective sample size {evidence.effective_sample_size:.1f} = {share:.1%} of the requests "
        f"(need >= {rule.min_effective_share:.0%})")
    gain = evidence.gain["utility"]
    if gain.low is None:
        failed.append("the utility gain has no interval (too few requests or no finite resample)")
    else:
        (passed if gain.low > rule.min_gain else failed).append(
            f"utility gain {gain.value:+.4g} [{gain.low:+.4g}, {gain.high:+.4g}] at lambda {evidence.lam:.4g}, "
            f"{evidence.confidence:.0%} interval; its lower end must exceed {rule.min_gain:+.4g}")
    if rule.budget is not None:
        cost = evidence.candidate["cost"]
        top = cost.high if cost.high is not None else cost.value
        limit = rule.budget * (1 + rule.cost_tolerance)
        (passed if top <= limit else failed).append(
            f"candidate cost {cost.value:.4g} (upper end {top:.4g}) vs budget {rule.budget:.4g} (+{rule.cost_tolerance:.0%})")
    reasons = [f"failed: {r}" for r in failed] + [f"ok: {r}" for r in passed]
    return PromotionDecision(not failed, reasons, evidence, rule)


def write_promotion(decision: PromotionDecision, model_dir: str | Path, **extra: Any) -> Path:
    """Write the decision and its figures as `promotion.json` in the candidate's model folder."""
    path = Path(model_dir) / PROMOTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**decision.to_dict(), **extra}, indent=2, sort_keys=False))
    return path
