"""The answers of /v1/generate and /v1/images/generations, shaped from what a request drew.

One request's plan (serve/policy_runner.py `Outcome`) becomes: the returned image, every attempt
(candidate, seed, decision score or why unscored, cost), which attempt was returned, the realised
cost of everything drawn and scored, and how the plan was chosen (policy, lambda, propensity).
Pure (no Ray).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

from serve.model_state import Decision
from serve.policy_runner import Outcome
from serve.schemas import AttemptOut, GenerateResponse, PlanOut

__all__ = ["attempts_out", "generate_response", "images_body", "plan_out"]


def plan_out(decision: Decision) -> PlanOut:
    plan = decision.choice.plan
    return PlanOut(attempts=list(plan.attempts), threshold=plan.threshold)


def attempts_out(outcome: Outcome) -> list[AttemptOut]:
    """Every attempt of the plan; a fallback draw (no attempt drew) is listed last, unscored."""
    out = [AttemptOut(**a.to_dict()) for a in outcome.attempts]
    if outcome.fallback is not None:
        out.append(AttemptOut(
            candidate=outcome.fallback.candidate, seed=int(outcome.seed), decision_score=None, scored=False,
            cost=outcome.fallback_cost, accepted=False, returned=True, wave=len(out), score_ms=0.0,
            generate_ms=outcome.fallback.generate_ms,
        ))
    return out


def _returned_score(outcome: Outcome) -> float | None:
    return None if outcome.run is None or outcome.fallback is not None else outcome.run.chosen.score


def _generate_ms(outcome: Outcome) -> float:
    if outcome.fallback is not None:
        return float(outcome.fallback.generate_ms)
    return float(sum(a.generate_ms for a in outcome.attempts))


def _fallback(outcome: Outcome) -> Any:
    return outcome.fallback.fallback() if outcome.fallback is not None else None


def generate_response(outcome: Outcome, decision: Decision, *, metric: str, cost_unit: str, router_ms: float,
                      want_image: bool, decision_metric: str | None, model_version: str) -> GenerateResponse:
    image = outcome.image if want_image else None
    return GenerateResponse(
        candidate=outcome.candidate, predicted_quality=decision.predicted, metric=metric, cost=outcome.cost,
        cost_unit=cost_unit, **{"lambda": decision.lam}, seed=int(outcome.seed),
        image=base64.b64encode(image).decode("ascii") if image is not None else None,
        fallback=_fallback(outcome), router_ms=router_ms, generate_ms=_generate_ms(outcome), policy=decision.policy,
        plan=plan_out(decision), attempts=attempts_out(outcome),
        returned=outcome.run.returned if outcome.fallback is None and outcome.run is not None else len(outcome.attempts),
        decision_metric=decision_metric, decision_score=_returned_score(outcome),
        propensity=decision.choice.propensity, explored=decision.choice.explored, model_version=model_version,
        request_id=outcome.request_id or None,
    )


def images_body(outcomes: Sequence[Outcome], failed: Sequence[dict[str, Any]], n: int, decision: Decision,
                cost_unit: str, router_ms: float, model_version: str) -> dict[str, Any]:
    """The OpenAI Images answer: every image drawn (in order), the failures said in `catimage.failed`."""
    first = outcomes[0]
    fallback = _fallback(first)
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(o.image).decode("ascii"), "revised_prompt": None} for o in outcomes],
        "catimage": {
            "candidate": first.candidate,
            "candidates": [o.candidate for o in outcomes],
            "cost": float(sum(o.cost for o in outcomes)),
            "cost_unit": cost_unit,
            "lambda": decision.lam,
            "policy": decision.policy,
            "plan": plan_out(decision).model_dump(),
            "propensity": decision.choice.propensity,
            "explored": decision.choice.explored,
            "predicted_quality": dict(decision.predicted),
            "fallback": fallback.model_dump(by_alias=True) if fallback is not None else None,
            "router_ms": router_ms,
            "requested": n,
            "failed": list(failed),
            "attempts": [[a.model_dump() for a in attempts_out(o)] for o in outcomes],
            "decision_scores": [_returned_score(o) for o in outcomes],
            "model_version": model_version,
            "request_ids": [o.request_id for o in outcomes],
        },
    }
