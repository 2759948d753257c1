"""Carrying out one request's plan inside the Router: draw through the Drawer, score through the
Scorer deployment, accept or escalate (serve/plan_executor.py), fall back down the ranking when no
attempt drew, count every cost the moment it is paid, log every drawn attempt, export the metrics.

The Router decides (which plan, at which lambda, with which probability); `PolicyRunner.run`
executes and accounts; the endpoint shapes the answer. Routing is the one-attempt plan, so both
policies take this one path (and so does the OpenAI-compatible endpoint).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from catimage.policy.choice import Choice
from catimage.policy.explore import action_key
from catimage.tables.served_log import ServedRow
from serve.drawing import AllFailed, Drawer, Drawn
from serve.plan_executor import Attempt, NoImageDrawn, PlanExecutor, PlanRun, served_rows

log = logging.getLogger("catimage.serve")

__all__ = ["Outcome", "PolicyMetrics", "PolicyRunner", "RequestContext"]

AccountFn = Callable[[str, float, bool], None]
"""(candidate, amount, is_scoring): a cost was just paid."""


class AttemptFailed(Exception):
    """An attempt's candidate drew no image; `reason` says why (the plan executor records it)."""

    def __init__(self, tried: list[dict[str, str]]) -> None:
        self.tried = tried
        self.reason = "; ".join(t["reason"] for t in tried) or "no image"
        super().__init__(self.reason)


class PolicyMetrics:
    """Prometheus metrics of plans (ray.serve.metrics; create inside a replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.attempts_per_request = Histogram(
            "catimage_attempts_per_request", "Images drawn per request (escalations + 1).",
            boundaries=[1, 2, 3, 4, 6, 8], tag_keys=("policy",),
        )
        self.attempts = Counter(
            "catimage_attempts", "Attempts by candidate and outcome: accepted / rejected (scored below the "
            "threshold) / unscored / failed (no image). Acceptance rate = accepted / (accepted + rejected).",
            tag_keys=("candidate", "outcome"),
        )
        self.scorer_failures = Counter(
            "catimage_scorer_failures", "Images left unscored because the scorer failed, by kind.", tag_keys=("kind",)
        )
        self.explored = Counter("catimage_explored", "Requests whose plan was drawn by exploration.", tag_keys=("policy",))

    def record(self, policy: str, run: PlanRun, explored: bool) -> None:
        self.attempts_per_request.observe(run.drawn, tags={"policy": policy})
        for a in run.attempts:
            self.attempts.inc(1, tags={"candidate": a.candidate, "outcome": _outcome(a, run.plan.threshold)})
        if explored:
            self.explored.inc(1, tags={"policy": policy})


def _outcome(a: Attempt, threshold: float | None) -> str:
    if not a.drawn:
        return "failed"
    if a.score is None:
        return "unscored"
    return "accepted" if threshold is not None and a.accepted else "rejected" if threshold is not None else "scored"


@dataclass
class RequestContext:
    """How a request was decided (what its served-log rows say)."""

    policy: str
    choice: Choice
    lam: float
    model_version: str
    ranking: list[str]
    """Candidates to fall back through when no attempt drew (best first)."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Outcome:
    """What a request drew: the plan's attempts, and the fallback image when no attempt drew one."""

    run: PlanRun | None
    fallback: Drawn | None = None
    fallback_seed: int | None = None
    fallback_cost: float = 0.0
    failed_attempts: list[Attempt] = field(default_factory=list)
    request_id: str = ""
    """The served-log rows' request id (one per plan run)."""

    @property
    def attempts(self) -> list[Attempt]:
        return self.run.attempts if self.run is not None else self.failed_attempts

    @property
    def candidate(self) -> str:
        return self.fallback.candidate if self.fallback is not None else self.run.chosen.candidate

    @property
    def image(self) -> bytes | None:
        return self.fallback.png if self.fallback is not None else self.run.image

    @property
    def cost(self) -> float:
        """Realised cost of everything drawn and scored for this request."""
        return (self.run.cost if self.run is not None else 0.0) + (self.fallback_cost if self.fallback else 0.0)

    @property
    def seed(self) -> int:
        return self.fallback_seed if self.fallback is not None else self.run.chosen.seed


class PolicyRunner:
    """Executes plans for the Router: the drawer, the scorer client (or None), the log client (or None)."""

    def __init__(self, drawer: Drawer, scorer: Any | None, logger: Any | None, metrics: PolicyMetrics,
                 decision_metric: str | None, always_score: bool = False) -> None:
        self.drawer = drawer
        self.scorer = scorer
        self.logger = logger
        self.metrics = metrics
        self.decision_metric = decision_metric
        self.always_score = always_score
        self.running = 0
        """Plans being carried out now; at 0 the log client sends what it buffered (nothing waits for a batch)."""

    async def _draw_one(self, candidate: str, prompt: str, seed: int) -> bytes:
        """One attempt: only its candidate (a dead replica is retried); AttemptFailed says why."""
        try:
            drawn = await self.drawer.draw(prompt, [candidate], seed, True, lambda _c: None)
        except AllFailed as err:
            raise AttemptFailed(err.tried) from None
        return drawn.png

    async def run(self, ctx: RequestContext, prompt: str, prompt_id: str, costs: dict[str, float],
                  score_cost: float, seeds: Sequence[int], parallel: int, account: AccountFn) -> Outcome:
        """Execute `ctx.choice.plan`; when no attempt drew, draw once down `ctx.ranking` (AllFailed
        when that fails too). Every cost goes to `account` the moment it is paid."""
        self.running += 1
        try:
            return await self._run(ctx, prompt, prompt_id, costs, score_cost, seeds, parallel, account)
        finally:
            self.running -= 1
            if self.running == 0 and self.logger is not None:
                self.logger.flush()

    async def _run(self, ctx: RequestContext, prompt: str, prompt_id: str, costs: dict[str, float],
                   score_cost: float, seeds: Sequence[int], parallel: int, account: AccountFn) -> Outcome:
        executor = PlanExecutor(self._draw_one, self.scorer, costs, score_cost, self.always_score,
                                on_paid=lambda a, amount, scoring: account(a.candidate, amount, scoring))
        try:
            outcome = Outcome(await executor.run(ctx.choice.plan, prompt, seeds, parallel))
        except NoImageDrawn as err:
            outcome = await self._fall_back(ctx, prompt, err.attempts, seeds[0], costs, account)
        outcome.request_id = ctx.request_id
        self._after(ctx, prompt, prompt_id, outcome)
        return outcome

    async def _fall_back(self, ctx: RequestContext, prompt: str, failed: list[Attempt], seed: int,
                         costs: dict[str, float], account: AccountFn) -> Outcome:
        """No attempt drew: one unscored draw down the ranking, past the candidates that failed."""
        tried = {a.candidate for a in failed}
        order = [c for c in ctx.ranking if c not in tried] or list(ctx.ranking)
        before = [{"candidate": a.candidate, "reason": a.draw_error or "no image"} for a in failed]
        try:
            drawn = await self.drawer.draw(prompt, order, seed, True, lambda c: account(c, costs[c], False))
        except AllFailed as err:
            raise AllFailed(before + err.tried) from None
        drawn.tried = before + drawn.tried
        return Outcome(None, drawn, seed, costs[drawn.candidate], failed)

    def _after(self, ctx: RequestContext, prompt: str, prompt_id: str, outcome: Outcome) -> None:
        """Metrics and served-log rows (never raises: serving does not fail because of either)."""
        try:
            if outcome.run is not None:
                self.metrics.record(ctx.policy, outcome.run, ctx.choice.explored)
            if self.logger is not None:
                self.logger.submit(self.rows(ctx, prompt, prompt_id, outcome))
        except Exception:
            log.exception("could not record metrics / log rows of request %s", ctx.request_id)

    def rows(self, ctx: RequestContext, prompt: str, prompt_id: str, outcome: Outcome) -> list[ServedRow]:
        served = {"policy": ctx.policy, "plan": action_key(ctx.choice.plan), "propensity": ctx.choice.propensity,
                  "lam": ctx.lam, "model_version": ctx.model_version}
        if outcome.run is not None:
            return served_rows(outcome.run, prompt, prompt_id, ctx.request_id, self.decision_metric, **served)
        d = outcome.fallback
        return [ServedRow(prompt_id=prompt_id, prompt=prompt, candidate=d.candidate, seed=int(outcome.fallback_seed),
                          pool_cost=outcome.fallback_cost, request_id=ctx.request_id, attempt=len(outcome.failed_attempts),
                          returned=True, latency_ms=d.generate_ms, **served)]
