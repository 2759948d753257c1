"""Executing a cascade plan online: draw, score, accept or escalate, and account for every attempt.

A plan (catimage.policy.plans.Plan) is what the policy decided for one prompt: ordered attempts
(candidates, a fresh seed each) and a threshold on the decision metric. `PlanExecutor.run` carries it
out exactly as plans.py defines it, and returns every attempt (candidate, seed, decision score or
why there is none, cost, latency) and which one's image is returned. It is plain asyncio around two
functions, so it runs against Serve handles in the router and against planted functions in tests:

* `draw(candidate, prompt, seed) -> PNG bytes` (raises when no image could be drawn);
* `score(prompt, png) -> float` (raises when there is no score: `ScorerClient` raises
  `ScoreUnavailable` for a timeout, a dead or overloaded replica or a metric error).

`parallel = k` draws the attempts in waves of k at once (attempts 1..k, then k+1..2k, ...) for
latency; all of a wave's images are scored, and the stop rule is read after each wave:

* if any image drawn so far reaches the threshold, the best-scoring of them is returned and no
  further wave is drawn (with k = 1 that is "the first image that passes": the plan's own rule);
* after the last wave, the best-scoring image drawn is returned (exact ties: the earliest attempt);
  if no image got a score (scorer down), the last image drawn is returned, unscored.

So `parallel = 1` is `catimage.policy.plans.executed_attempts` exactly, and `parallel = k` may draw
(and pay for) up to k - 1 attempts that the sequential plan would not have drawn.

Faults never fail a request while an image exists: a scorer fault leaves that image unscored (it
never passes and loses the best-of choice to any scored image); a generator fault leaves that
attempt without an image (nothing is paid for it) and the plan goes on. Only when no attempt drew an
image does `run` raise `NoImageDrawn` (carrying the attempts), for the caller to fall back.

Cost of an attempt, as the budget controller counts it: the candidate's cost when an image was
drawn, plus the decision scorer's cost per image when scoring was asked (even if the scorer then
failed: it may have run). The one-attempt unscored plan (routing) costs the candidate alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catimage.policy.plans import Plan
from catimage.tables.served_log import ServedRow

__all__ = [
    "Attempt",
    "DrawFn",
    "NoImageDrawn",
    "PlanExecutor",
    "PlanRun",
    "ScoreFn",
    "attempt_seeds",
    "served_rows",
]

PaidFn = Callable[["Attempt", float, bool], None]
"""Called the moment an attempt costs something: (attempt, amount, is_scoring), for its drawing, then its scoring."""
DrawFn = Callable[[str, str, int], Awaitable[bytes | None]]
"""(candidate, prompt, seed) -> the image as PNG bytes; raises when no image could be drawn."""
ScoreFn = Callable[[str, Any], Awaitable[float]]
"""(prompt, image) -> the decision score; raises when there is none (the image stays unscored)."""

SEED_MODULUS = 2**31


@dataclass
class Attempt:
    """One attempt of a plan: what was drawn, its decision score (or why none), cost and time."""

    index: int
    candidate: str
    seed: int
    wave: int
    score: float | None = None
    score_error: str | None = None
    """Why there is no score although one was asked for (scorer timed out, died, failed)."""
    draw_error: str | None = None
    """Why no image was drawn (then the attempt cost nothing and is never returned)."""
    pool_cost: float = 0.0
    """The candidate's cost (pool unit) when an image was drawn, else 0."""
    decision_cost: float = 0.0
    """The decision scorer's cost per image when scoring was asked, else 0."""
    generate_ms: float = 0.0
    score_ms: float = 0.0
    accepted: bool = False
    """The decision score reached the plan's threshold."""
    returned: bool = False
    image: bytes | None = field(default=None, repr=False)

    @property
    def drawn(self) -> bool:
        return self.draw_error is None

    @property
    def cost(self) -> float:
        return self.pool_cost + self.decision_cost

    @property
    def latency_ms(self) -> float:
        return self.generate_ms + self.score_ms

    def to_dict(self) -> dict[str, Any]:
        """The attempt as an answer lists it (no image bytes)."""
        return {
            "candidate": self.candidate, "seed": self.seed, "decision_score": self.score,
            "scored": self.score is not None, "score_error": self.score_error, "draw_error": self.draw_error,
            "cost": self.cost, "accepted": self.accepted, "returned": self.returned, "wave": self.wave,
            "generate_ms": self.generate_ms, "score_ms": self.score_ms,
        }


@dataclass
class PlanRun:
    """Every attempt of one executed plan and which one's image is returned."""

    plan: Plan
    attempts: list[Attempt]
    returned: int
    """Index into `attempts` of the returned image."""
    scored: bool
    """Whether the decision metric was asked to score the images."""

    @property
    def chosen(self) -> Attempt:
        return self.attempts[self.returned]

    @property
    def image(self) -> bytes | None:
        return self.chosen.image

    @property
    def cost(self) -> float:
        """Realised cost of the whole plan (every attempt drawn, every scoring asked)."""
        return float(sum(a.cost for a in self.attempts))

    @property
    def drawn(self) -> int:
        return sum(a.drawn for a in self.attempts)


class NoImageDrawn(Exception):
    """Every attempt of the plan failed to draw; `attempts` says why, for the caller's fallback."""

    def __init__(self, plan: Plan, attempts: list[Attempt]) -> None:
        reasons = "; ".join(f"{a.candidate}: {a.draw_error}" for a in attempts)
        super().__init__(f"no attempt of plan {plan.label()!r} drew an image ({reasons})")
        self.plan = plan
        self.attempts = attempts


def attempt_seeds(prompt_id: str, n: int, seed: int | None = None) -> list[int]:
    """A fresh seed for each of `n` attempts: the build's seed indices 0..n-1 of this prompt (attempt
    0 is what routing draws), or, when the client fixed `seed`, seed, seed + 1, ... (mod 2**31)."""
    from catimage.generators import generation_seed

    if seed is not None:
        return [(int(seed) + j) % SEED_MODULUS for j in range(n)]
    return [int(generation_seed(prompt_id, j)) for j in range(n)]


class PlanExecutor:
    """Runs plans against a draw and a score function (see the module docstring for the rule).

    `costs`: each candidate's cost in the pool's unit; `score_cost`: the decision scorer's cost per
    image in the same unit; `always_score`: score even the one-attempt routing plan (so that routed
    traffic is logged with an online score and can be learned from; its cost then includes scoring).
    `on_paid(attempt, amount, is_scoring)`: called the moment an image exists and the moment its scoring is
    asked, so the caller's accounting (the budget controller) sees every cost even when the request
    is cancelled halfway through its plan.
    """

    def __init__(
        self, draw: DrawFn, score: ScoreFn | None, costs: Mapping[str, float], score_cost: float = 0.0,
        always_score: bool = False, on_paid: PaidFn | None = None,
    ) -> None:
        if score_cost < 0:
            raise ValueError(f"the decision scorer's cost must be >= 0, got {score_cost}")
        self.draw = draw
        self.score = score
        self.costs = {k: float(v) for k, v in costs.items()}
        self.score_cost = float(score_cost)
        self.always_score = bool(always_score)
        self.on_paid = on_paid

    async def run(self, plan: Plan, prompt: str, seeds: Sequence[int], parallel: int = 1) -> PlanRun:
        """Draw, score, accept or escalate; returns every attempt. Raises NoImageDrawn when none drew."""
        self._check(plan, seeds, parallel)
        scored = self.score is not None and (plan.scored or self.always_score)
        attempts = [Attempt(j, c, int(seeds[j]), j // parallel) for j, c in enumerate(plan.attempts)]
        done: list[Attempt] = []
        for start in range(0, len(attempts), parallel):
            wave = attempts[start : start + parallel]
            await asyncio.gather(*(self._attempt(a, prompt, scored) for a in wave))
            done.extend(wave)
            last = start + parallel >= len(attempts)
            pick = _pick(done, plan.threshold, final=last)
            if pick is not None:
                pick.returned = True
                return PlanRun(plan, done, done.index(pick), scored)
        raise NoImageDrawn(plan, done)

    def _check(self, plan: Plan, seeds: Sequence[int], parallel: int) -> None:
        unknown = [a for a in plan.attempts if a not in self.costs]
        if unknown:
            raise ValueError(f"plan {plan.label()!r} names candidate(s) {unknown} without a cost; known: {sorted(self.costs)}")
        if len(seeds) < len(plan.attempts):
            raise ValueError(f"plan {plan.label()!r} has {len(plan.attempts)} attempts but {len(seeds)} seed(s) were given")
        if len(set(seeds[: len(plan.attempts)])) < len(plan.attempts):
            raise ValueError("every attempt needs a fresh seed; the seeds given repeat")
        if int(parallel) < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")

    async def _attempt(self, a: Attempt, prompt: str, scored: bool) -> None:
        """Draw one image and, if asked, score it; faults are written into the attempt, never raised."""
        start = time.perf_counter()
        try:
            image = await self.draw(a.candidate, prompt, a.seed)
        except Exception as err:  # noqa: BLE001 - a failed draw is an attempt without an image
            a.draw_error = _reason(err)
            a.generate_ms = (time.perf_counter() - start) * 1000
            return
        a.generate_ms = (time.perf_counter() - start) * 1000
        a.image = image
        a.pool_cost = self.costs[a.candidate]
        self._paid(a, a.pool_cost, False)
        if not scored or self.score is None:
            return
        a.decision_cost = self.score_cost
        self._paid(a, a.decision_cost, True)
        start = time.perf_counter()
        try:
            a.score = float(await self.score(prompt, image))
        except Exception as err:  # noqa: BLE001 - a scorer fault leaves the image unscored
            a.score_error = _reason(err)
        a.score_ms = (time.perf_counter() - start) * 1000
        if a.score is not None and a.score != a.score:  # NaN: as unscored
            a.score, a.score_error = None, "the scorer returned NaN"


    def _paid(self, a: Attempt, amount: float, scoring: bool) -> None:
        if self.on_paid is not None and amount > 0:
            self.on_paid(a, amount, scoring)


def _pick(done: list[Attempt], threshold: float | None, final: bool) -> Attempt | None:
    """The attempt to return after a wave, or None to draw the next wave (see the module docstring)."""
    scored = [a for a in done if a.score is not None]
    for a in scored:
        a.accepted = threshold is not None and a.score >= threshold
    passing = [a for a in scored if a.accepted]
    if passing:
        return _best(passing)
    if not final:
        return None
    if scored:
        return _best(scored)
    drawn = [a for a in done if a.drawn]
    return drawn[-1] if drawn else None


def _best(attempts: list[Attempt]) -> Attempt:
    """Highest score; exact ties to the earliest attempt."""
    return max(attempts, key=lambda a: (a.score, -a.index))


def _reason(err: BaseException) -> str:
    text = getattr(err, "reason", None) or str(err)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def served_rows(
    run: PlanRun, prompt: str, prompt_id: str, request_id: str, metric: str | None, **served: Any,
) -> list[ServedRow]:
    """The drawn attempts of `run` as served-log rows (quality-table rows): one per image drawn.

    `metric`: the decision metric's column (None: no online score column). `served`: the
    ServedRow fields of how the request was served (policy, plan, propensity, lam, model_version).
    Attempts that drew no image are not rows: they hold no (prompt, candidate, seed) sample.
    """
    return [
        ServedRow(
            prompt_id=prompt_id, prompt=prompt, candidate=a.candidate, seed=a.seed, pool_cost=a.pool_cost,
            request_id=request_id, scores={metric: a.score} if metric is not None and run.scored else {},
            attempt=a.index, returned=a.returned, latency_ms=a.latency_ms, decision_cost=a.decision_cost, **served,
        )
        for a in run.attempts
        if a.drawn
    ]
