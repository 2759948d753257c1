"""The Serve application: a FastAPI router deployment in front of one generator deployment per candidate.

    client --HTTP--> Router (embeds, predicts, applies argmax_m q_m - lambda c_m [- mu wait_m])
                        |--DeploymentHandle--> Generator-<candidate A>  (autoscaled, own resources)
                        |--DeploymentHandle--> Generator-<candidate B>
                        |--DeploymentHandle--> BudgetCoordinator        (only with budget_controller)
                        ...

Choosing the candidate happens in the Router, not in Serve's request router (which only picks a
replica inside one deployment). Each generator deployment takes its resources, batching and
autoscaling from its candidate's `serve:` block in the pool file, so a cheap model scales on cheap
hardware and an expensive one on GPUs. When a generator fails, its replica dies, its queue is full
or it runs past its `request_timeout_s`, the router retries (a dead replica) or falls back to the
next candidate of the decision's ranking and says so in the answer; only when every candidate fails
does it answer 503 (with Retry-After).

This module holds the application builder (`build_app`) and what it checks before deploying
(the model's candidates in the pool, budgets against the model's costs, embedder overrides, the
cluster's resources). The Router is in serve/router.py, the Generator deployment in
serve/generator_deployment.py, the BudgetCoordinator in serve/budget_coordinator.py and the HTTP
error answers in serve/errors.py; those names stay importable from here.

Run it with `serve run serve/config.yaml` (see docs/serving.md) or `build_app(AppArgs(...))`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from catimage.errors import BudgetError, CatimageError, PoolError
from catimage.tables.pool import Candidate, Pool, load_pool
from serve.budget_coordinator import BudgetCoordinator
from serve.bundle import check_overrides
from serve.generator_deployment import Generator, deployment_name
from serve.lambdas import GLOBAL_KEY
from serve.resources import check_cluster, deployment_demand
from serve.router import Router, fastapi_app
from serve.schemas import AppArgs

log = logging.getLogger("catimage.serve")

__all__ = ["AppArgs", "BudgetCoordinator", "Generator", "Router", "build_app", "deployment_name", "fastapi_app"]


def _model_meta(model_dir: str) -> dict[str, Any]:
    """A router bundle's router.json (candidates, costs, cost unit), read without loading any weights."""
    meta = Path(model_dir) / "router.json"
    if not meta.is_file():
        raise CatimageError(
            f"{model_dir} is not a catimage model directory (no router.json); create one with "
            "`catimage fit` or `catimage train`, and give its path as model_dir"
        )
    return json.loads(meta.read_text())


def check_budgets(args: AppArgs, costs: Mapping[str, float], cost_unit: str) -> None:
    """Every budget the app is given must be reachable (>= the cheapest candidate's cost), and the
    controller's must also be > 0 (it holds a relative error to its budget): refused at start-up."""
    cheapest = min(costs.values())
    where = min(costs, key=costs.get)
    given = {"budget": args.budget}
    if args.budget_controller is not None:
        given["budget_controller.budget"] = args.budget_controller.budget
        given.update({f"budget_controller.per_key_budgets.{k}": b for k, b in args.budget_controller.per_key_budgets.items()})
    for name, budget in given.items():
        if budget is not None and budget < cheapest:
            raise BudgetError(
                f"{name} {budget:g} is below the cheapest candidate's cost ({where}: {cheapest:g} {cost_unit}): "
                f"no routing can hold it; set it to at least {cheapest:g}"
            )
    controlled = args.controller_budget()
    if controlled is not None and controlled <= 0:
        raise BudgetError(
            f"budget_controller needs a budget > 0 (it corrects lambda by the relative error to its budget); "
            f"the budget is {controlled:g} {cost_unit}. With a free candidate ({where} costs 0), a budget of 0 "
            "needs no controller: drop budget_controller, or give it a positive budget"
        )


def generator_options(
    cand: Candidate, overrides: Mapping[str, Any] | None = None, max_queued_requests: int = -1,
    retry_after_s: float | None = None, graceful_shutdown_timeout_s: float = 5.0,
) -> dict[str, Any]:
    """Serve deployment options for one candidate, from its pool `serve:` block."""
    s = cand.serve
    auto = s.autoscaling.model_dump(exclude_none=True)
    auto.update(overrides or {})
    return {
        "name": deployment_name(cand.name),
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "backpressure_config": BackpressureConfig(retry_after_s=retry_after_s),
        "autoscaling_config": auto,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(0.5, graceful_shutdown_timeout_s),
    }


def router_options(args: AppArgs) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": args.router_num_cpus},
        "num_replicas": args.router_num_replicas,
        "max_ongoing_requests": args.router_max_ongoing_requests,
        "max_queued_requests": args.router_max_queued_requests,
        "backpressure_config": BackpressureConfig(retry_after_s=args.retry_after_s),
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(0.5, args.graceful_shutdown_timeout_s),
    }


def _checked_pool(args: AppArgs, candidates: list[str]) -> Pool:
    pool = load_pool(args.pool)
    missing = [c for c in candidates if c not in pool.names]
    if missing:
        raise PoolError(
            f"the model at {args.model_dir} routes to {missing}, which the pool {args.pool} does not declare "
            f"(it declares {pool.names}); serve with the pool file the model was trained on"
        )
    return pool


def _generators(args: AppArgs, pool: Pool, candidates: list[str]) -> dict[str, tuple[dict[str, Any], Candidate]]:
    """Deployment options of each candidate that has a generator block."""
    out = {}
    for name in candidates:
        cand = pool.get(name)
        if cand.generator is None:
            log.warning("candidate %s has no generator block: it will be predicted but never drawn", name)
            continue
        out[name] = (generator_options(cand, args.autoscaling_overrides, args.generator_max_queued_requests,
                                       args.retry_after_s, args.graceful_shutdown_timeout_s), cand)
    return out


def build_app(args: AppArgs | Mapping[str, Any]) -> serve.Application:
    """The application `serve run serve/config.yaml` deploys: one Router + one Generator per candidate
    (+ a BudgetCoordinator when `budget_controller` is set).

    Candidates are the model's; each must be declared in the pool. A candidate without a `generator:`
    block gets no deployment: the router still predicts it but falls back past it. Before anything is
    deployed: budgets are checked against the model's costs, embedder overrides against the runtime
    options, and the app's starting demand against the cluster (`wait_for_resources` to skip).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args))
    meta = _model_meta(args.model_dir)
    candidates = list(meta["candidates"])
    check_overrides(args.embedder_overrides)
    check_budgets(args, dict(zip(candidates, map(float, meta["costs"]))), meta.get("cost_unit", ""))
    pool = _checked_pool(args, candidates)
    pool.require_unit(meta.get("cost_unit", pool.cost_unit), f"the model at {args.model_dir}")
    generators = _generators(args, pool, candidates)
    router = router_options(args)
    demands = [deployment_demand(opts["name"], opts) for opts, _ in generators.values()]
    demands.append(deployment_demand("Router", router))
    check_cluster(demands, args.wait_for_resources)
    handles = {
        name: Generator.options(**opts).bind(name, cand.generator.model_dump(mode="json"), args.device,
                                             cand.serve.max_batch_size, cand.serve.batch_wait_timeout_s)
        for name, (opts, cand) in generators.items()
    }
    coordinator = None
    budget = args.controller_budget()
    if budget is not None:
        ctrl = args.budget_controller
        config = {"window": ctrl.window, "ki": ctrl.ki, "kp": ctrl.kp, "max_step": ctrl.max_step}
        coordinator = BudgetCoordinator.bind(args.model_dir, {GLOBAL_KEY: budget, **ctrl.per_key_budgets}, config)
    return Router.options(**router).bind(args.model_dump(by_alias=True), handles, coordinator)
