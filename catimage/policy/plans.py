"""A plan: what a policy tells serving to do for one prompt (ordered attempts and a stop rule).

Semantics (serving executes exactly this; the offline evaluation simulates exactly this):

* ``attempts = (a_1, ..., a_K)``: candidate names, drawn in this order, each attempt with a FRESH
  seed (never a seed already drawn for this prompt, whichever candidate drew it: builds share a
  seed index's starting noise across candidates, so a reused seed would not be a new draw).
* ``threshold``: the decision metric's acceptance threshold, in the decision metric's own units.
  After drawing attempt j, its image is scored with the decision metric. If the score is
  ``>= threshold`` the image is ACCEPTED and returned; no further attempt is drawn. Otherwise
  the next attempt is drawn. If attempt K (the last) also scores below the threshold, the image
  with the highest decision score among ALL K drawn images is returned (exact ties: the earliest
  attempt). A NaN score (scorer failure) never passes and never wins the best-of choice unless
  every score is NaN, in which case the last image drawn is returned, marked unscored.
* ``threshold = None``: no early acceptance. With one attempt this is ROUTING as it is today: the
  image is drawn and returned unscored. With K > 1 attempts it is best-of-K: all K are drawn and
  scored and the highest-scoring image is returned.
* Cost as executed: the sum over the attempts actually drawn of (the candidate's cost + the
  decision scorer's cost per image), except that the one-attempt plan without a threshold scores
  nothing and costs the candidate's cost alone. A one-attempt plan WITH a threshold is scored for
  nothing (it returns its one image whatever the score); `enumerate_plans` never makes one.

`Plan.route(name)` is the one-attempt plan; `to_dict` / `from_dict` are the wire form
(``{"attempts": [...], "threshold": 0.8 | null}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from catimage.errors import CatimageError

__all__ = ["Plan", "executed_attempts", "plan_cost"]


@dataclass(frozen=True)
class Plan:
    """Ordered attempts (candidate names, a fresh seed each) and the acceptance threshold (or None)."""

    attempts: tuple[str, ...]
    threshold: float | None = None

    def __post_init__(self) -> None:
        attempts = tuple(self.attempts)
        if not attempts:
            raise CatimageError("a plan needs at least one attempt (a candidate name)")
        if not all(isinstance(a, str) and a for a in attempts):
            raise CatimageError(f"plan attempts must be candidate names, got {list(attempts)}")
        object.__setattr__(self, "attempts", attempts)
        if self.threshold is not None:
            try:
                value = float(self.threshold)
            except (TypeError, ValueError):
                raise CatimageError(f"a plan's threshold must be a number or null, got {self.threshold!r}") from None
            if not math.isfinite(value):
                raise CatimageError(f"a plan's threshold must be finite (or null for none), got {value}")
            object.__setattr__(self, "threshold", value)

    @classmethod
    def route(cls, candidate: str) -> Plan:
        """Routing as it is today: one draw, returned unscored."""
        return cls((candidate,), None)

    @property
    def is_route(self) -> bool:
        """True for the one-attempt, unscored plan (no decision scorer runs)."""
        return len(self.attempts) == 1 and self.threshold is None

    @property
    def scored(self) -> bool:
        """Whether serving runs the decision scorer on the images this plan draws."""
        return not self.is_route

    def to_dict(self) -> dict[str, Any]:
        return {"attempts": list(self.attempts), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping) or "attempts" not in data:
            raise CatimageError(f"a plan is {{'attempts': [names], 'threshold': number | null}}, got {data!r}")
        attempts = data["attempts"]
        if isinstance(attempts, str) or not isinstance(attempts, Sequence):
            raise CatimageError(f"a plan's attempts must be a list of candidate names, got {attempts!r}")
        return cls(tuple(attempts), data.get("threshold"))

    def label(self) -> str:
        """Short human-readable form, e.g. ``small-4 > small-4 > small-16-g3 @0.8``."""
        head = " > ".join(self.attempts)
        if self.threshold is None:
            return head if self.is_route else f"best of {head}"
        return f"{head} @{self.threshold:g}"


def plan_cost(plan: Plan, costs: Mapping[str, float], score_cost: float, drawn: int | None = None) -> float:
    """Cost of `plan` when its first `drawn` attempts (default: all) were drawn, as serving counts it."""
    k = len(plan.attempts) if drawn is None else int(drawn)
    if not 1 <= k <= len(plan.attempts):
        raise CatimageError(f"a plan of {len(plan.attempts)} attempt(s) cannot have drawn {k}")
    missing = [a for a in plan.attempts[:k] if a not in costs]
    if missing:
        raise CatimageError(f"no cost for candidate(s) {missing}; the pool offers {sorted(costs)}")
    per_image = 0.0 if plan.is_route else float(score_cost)
    return float(sum(float(costs[a]) + per_image for a in plan.attempts[:k]))


def executed_attempts(plan: Plan, scores: Sequence[float]) -> tuple[int, int]:
    """(attempts drawn, index of the returned attempt) given the decision scores of the draws, in
    order (`scores` may be longer than what is drawn; only the first len(attempts) are read).

    The reference implementation of the stop rule: serving and the offline simulation agree with it.
    """
    k_max = len(plan.attempts)
    if plan.is_route:
        return 1, 0
    best, seen = k_max - 1, False
    for j in range(k_max):
        if j >= len(scores):
            raise CatimageError(f"attempt {j + 1} was drawn but no score was given for it")
        s = float(scores[j])
        if math.isnan(s):
            continue
        if plan.threshold is not None and s >= plan.threshold:
            return j + 1, j
        if not seen or s > float(scores[best]):
            best, seen = j, True
    return k_max, best  # every score NaN: the last image drawn, unscored
