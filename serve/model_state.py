"""What a Router replica serves at one moment: the model (router or cascade bundle), the lambdas of
each policy, and the decisions made with them; swapped as a whole by a hot swap.

A request reads the replica's current `ModelState` once and keeps that object to its end, so a swap
(serve/router.py `reconfigure`) never mixes two models inside one request: the old state finishes
the requests that started on it, new requests get the new one.

Two policies, two lambdas. Routing's lambda prices one candidate's cost against its predicted
quality; a cascade's prices a PLAN's expected cost (every draw and every scoring) against its
expected judge value. The same budget maps to different lambdas under each, and realised costs per
request differ in kind (one image vs. a sequence), so each policy has its own `LambdaPolicy` and its
own online budget controllers: routed traffic feeds the keys `*` / `<api key>`, cascaded traffic
the keys `cascade:*` / `cascade:<api key>` (`controller_key`). Each holds its own traffic at the
budget, so the mix of both holds it too.

Pure decision code over numpy arrays (no Ray): tests call it in-process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.policy.choice import Choice, RequestLimits, choose_plan, choose_route
from catimage.policy.explore import ExplorationConfig
from catimage.policy.plans import Plan
from serve.lambdas import GLOBAL_KEY, LambdaPolicy
from serve.serving_model import ServingModel

__all__ = [
    "CASCADE_PREFIX",
    "Decision",
    "ModelState",
    "cascade_choice",
    "controller_key",
    "explore_config",
    "route_choice",
    "split_controlled",
]

CASCADE_PREFIX = "cascade:"
"""Controller keys of cascaded traffic: `cascade:*`, `cascade:<api key>`."""


def controller_key(policy: str, key: str) -> str:
    """The budget controller's key of `key` ('*' or an API key name) under `policy`."""
    return CASCADE_PREFIX + key if policy == "cascade" else key


def split_controlled(lams: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Coordinator lambdas -> (routing's by key, the cascade's by key), prefixes removed."""
    route = {k: float(v) for k, v in lams.items() if not k.startswith(CASCADE_PREFIX)}
    cascade = {k[len(CASCADE_PREFIX):]: float(v) for k, v in lams.items() if k.startswith(CASCADE_PREFIX)}
    return route, cascade


@dataclass
class Decision:
    """What one request will draw, and how it was decided."""

    policy: str
    choice: Choice
    lam: float
    predicted: dict[str, float]
    ranking: list[str]
    """Candidates to fall back through when no attempt drew (best first at `lam`)."""
    controlled_key: str | None
    """The budget controller the realised cost feeds (None: own budget/lambda, or pinned)."""
    budget: float | None = None


def _lambda_policy(lambda_for_budget: Any, costs: np.ndarray, spread: float, budget: float | None,
                   lam: float | None) -> LambdaPolicy:
    from catimage.policy.routing import max_precise_lambda

    return LambdaPolicy(lambda_for_budget, max_precise_lambda(costs, 1e-6 * spread),
                        float(lambda_for_budget(float(costs.min()))), budget, lam)


@dataclass
class ModelState:
    """One served model with its policies' lambdas (see the module docstring)."""

    model: ServingModel
    route_lambdas: LambdaPolicy
    cascade_lambdas: LambdaPolicy | None
    default_policy: str
    controller_budgets: dict[str, float] = field(default_factory=dict)
    """Budget of each controller key ('*', API key names), shared by both policies."""

    @classmethod
    def build(cls, model: ServingModel, budget: float | None, lam: float | None, policy: str | None,
              controller_budgets: Mapping[str, float] | None) -> ModelState:
        """Lambda policies of `model` (checked against the default budget now, not on the first request)."""
        router = model.router
        spread = float(router.scaler.high - router.scaler.low)
        route = _lambda_policy(router.lambda_for_budget, np.asarray(router.costs), spread, budget, lam)
        cascade = None
        if model.cascade is not None:
            cascade = _lambda_policy(model.cascade.lambda_for_budget, np.asarray(model.cascade.costs), spread, budget, lam)
        if policy == "cascade" and cascade is None:
            raise CatimageError(f"policy 'cascade' needs a cascade bundle, and {model.model_dir} is a router bundle; "
                                "fit one with `catimage fit --policy cascade` and serve it, or set policy: route")
        default = policy or ("cascade" if cascade is not None else "route")
        state = cls(model, route, cascade, default, dict(controller_budgets or {}))
        if controller_budgets:
            state.start_controllers(controller_budgets)
        for lp in (route, cascade):
            if lp is not None and budget is not None:
                lp.for_budget(budget)
        return state

    def start_controllers(self, budgets: Mapping[str, float]) -> None:
        """Controllers of every policy the model offers start from its offline lambdas."""
        self.route_lambdas.start_controllers(budgets)
        if self.cascade_lambdas is not None:
            self.cascade_lambdas.start_controllers(budgets)

    def update_controlled(self, lams: Mapping[str, float]) -> None:
        """The coordinator's lambdas (keys of both policies) for the next requests."""
        route, cascade = split_controlled(lams)
        self.route_lambdas.controlled.update({k: v for k, v in route.items() if k in self.route_lambdas.controlled})
        if self.cascade_lambdas is not None:
            known = self.cascade_lambdas.controlled
            known.update({k: v for k, v in cascade.items() if k in known})

    @property
    def controlled(self) -> bool:
        return bool(self.route_lambdas.controlled)

    @property
    def policies(self) -> list[str]:
        return ["route", "cascade"] if self.model.cascade is not None else ["route"]

    def policy_for(self, asked: str | None) -> str:
        """The request's policy; 422-worthy CatimageError when it asks for one the model lacks."""
        policy = asked or self.default_policy
        if policy == "cascade" and self.model.cascade is None:
            raise CatimageError(
                f"policy 'cascade' needs a cascade bundle, and the served model ({self.model.version}) is a router "
                "bundle: ask for policy 'route', or serve a cascade bundle (`catimage fit --policy cascade`; "
                "model_dir, or a hot swap through the Router's user_config)"
            )
        return policy

    def lambdas(self, policy: str) -> LambdaPolicy:
        return self.cascade_lambdas if policy == "cascade" and self.cascade_lambdas is not None else self.route_lambdas

    def resolve(self, policy: str, budget: float | None, lam: float | None, key: str | None,
                controlled: bool) -> tuple[float, str | None, float | None]:
        """(lambda, controller key or None, the budget in force or None) of a request under `policy`."""
        lp = self.lambdas(policy)
        lam_used, ctrl = lp.resolve(budget, lam, key, controlled)
        if budget is None and lam is None:
            if lp.controlled:
                owner = key if key in lp.controlled else GLOBAL_KEY
                budget = self.controller_budgets.get(owner)
            elif lp.default_lambda is None:
                budget = lp.default_budget
        return lam_used, (None if ctrl is None else controller_key(policy, ctrl)), budget

    # --- deciding (runs on the model thread) ---------------------------------------------------
    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        return self.model.router.predict(list(prompts))

    def plan_values(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(expected judge value, expected cost), each (n, P) over the cascade's plans."""
        cascade = self.model.cascade
        return cascade.plan_values(cascade.predict_stats(list(prompts)))


def explore_config(args: Any, budget: float | None) -> ExplorationConfig:
    """The request's exploration: the app's epsilon / temperature, the cost cap from the budget in force."""
    cap = None
    if args.max_cost_factor is not None and budget is not None and math.isfinite(budget):
        cap = float(args.max_cost_factor) * float(budget)
    return ExplorationConfig(epsilon=float(args.epsilon), temperature=args.temperature, max_cost=cap)


def route_choice(pred: np.ndarray, costs: np.ndarray, candidates: Sequence[str], lam: float,
                 config: ExplorationConfig, rng: np.random.Generator, penalty: np.ndarray | None,
                 allowed: Sequence[str] | None, pinned: str | None) -> Choice:
    """Routing's one-attempt plan: the pinned candidate, else the (explored) argmax among `allowed`."""
    if pinned is not None:
        plan = Plan.route(pinned)
        k = list(candidates).index(pinned)
        return Choice(plan, 1.0, plan, float(pred[k]), float(costs[k]), 1)
    idx = np.arange(len(candidates)) if allowed is None else np.array([list(candidates).index(c) for c in allowed])
    names = [candidates[i] for i in idx]
    pen = None if penalty is None else np.asarray(penalty)[idx]
    return choose_route(pred[idx], costs[idx], names, lam, config, rng, pen)


def cascade_choice(value: np.ndarray, cost: np.ndarray, plans: Sequence[Plan], lam: float, limits: RequestLimits,
                   config: ExplorationConfig, rng: np.random.Generator, allowed: Sequence[str] | None) -> Choice:
    """A cascade plan within the request's limits, among the plans drawing only `allowed` candidates."""
    if allowed is not None:
        ok = set(allowed)
        idx = [i for i, p in enumerate(plans) if set(p.attempts) <= ok]
        if not idx:
            raise CatimageError(f"no plan of the cascade draws only {sorted(ok)}")
        value, cost, plans = value[idx], cost[idx], [plans[i] for i in idx]
    return choose_plan(value, cost, plans, lam, limits, config, rng)
