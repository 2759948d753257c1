"""The Serve application: a FastAPI router deployment in front of one generator deployment per candidate.

    client --HTTP--> Router (decides a plan: route = one candidate, cascade = draw / score / escalate)
                        |--DeploymentHandle--> Generator-<candidate A>  (autoscaled, own resources)
                        |--DeploymentHandle--> Generator-<candidate B>
                        |--DeploymentHandle--> Scorer-<decision metric> (cascade bundles; batched, autoscaled)
                        |--DeploymentHandle--> ServedLog                (with `log:`; every attempt a row)
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

import logging
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from catimage.errors import BudgetError, PoolError
from catimage.tables.pool import Candidate, Pool, load_pool
from serve.budget_coordinator import BudgetCoordinator
from serve.bundle import check_overrides
from serve.generator_deployment import Generator, deployment_name
from serve.lambdas import GLOBAL_KEY
from serve.log_deployment import ServedLog, log_options
from serve.resources import check_cluster, deployment_demand
from serve.router import Router, fastapi_app
from serve.schemas import AppArgs
from serve.scorer_deployment import Scorer, scorer_options
from serve.serving_model import bundle_meta, model_version

log = logging.getLogger("catimage.serve")

__all__ = [
    "AppArgs",
    "BudgetCoordinator",
    "Generator",
    "Router",
    "build_app",
    "compose",
    "deployment_name",
    "fastapi_app",
]


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


def decision_metric(args: AppArgs, meta: dict[str, Any], pool: Pool) -> str | None:
    """The metric of the app's Scorer deployment: given, else the cascade bundle's, else (when routed
    images are scored) the pool's decision_metric; None: no scorer."""
    if args.decision_metric is not None:
        name = args.decision_metric
    elif meta.get("cascade") is not None:
        name = meta["cascade"]["decision_metric"]
    elif args.score_routed:
        name = pool.decision_metric
        if name is None:
            raise PoolError(f"score_routed needs a decision metric: set decision_metric in the app's args or in {args.pool}")
    else:
        return None
    if meta.get("cascade") is not None and meta["cascade"]["decision_metric"] != name:
        raise PoolError(f"the cascade at {args.model_dir} decides with {meta['cascade']['decision_metric']!r}, the app "
                        f"was given decision_metric {name!r}; drop decision_metric or serve a cascade fitted on it")
    if pool.metric(name) is None:
        raise PoolError(f"the decision metric {name!r} is not in the `metrics:` of {args.pool}; add it there (its "
                        "resources and its `cost:` per image are what the Scorer deployment runs with)")
    return name


def _score_cost(meta: dict[str, Any], pool: Pool, metric: str | None) -> float:
    """What scoring one image costs (pool unit): the cascade bundle's, else the pool's metric cost."""
    if metric is None:
        return 0.0
    if meta.get("cascade") is not None:
        return float(meta["cascade"]["score_cost"])
    return float(pool.metric(metric).cost or 0.0)


def _coordinator(args: AppArgs, version: str, code_version: str | None) -> Any:
    budget = args.controller_budget()
    if budget is None:
        return None
    ctrl = args.budget_controller
    config = {"window": ctrl.window, "ki": ctrl.ki, "kp": ctrl.kp, "max_step": ctrl.max_step}
    return _versioned(BudgetCoordinator, code_version).bind(args.model_dir, {GLOBAL_KEY: budget, **ctrl.per_key_budgets}, config, version)


def _versioned(deployment: Any, code_version: str | None) -> Any:
    """`deployment` with a fixed code version (see `compose`)."""
    return deployment if code_version is None else deployment.options(version=code_version, _internal=True)


def compose(args: AppArgs, generators: Mapping[str, Any], pool: Pool, meta: dict[str, Any],
            demands: list[Any] | None = None, user_config: Mapping[str, Any] | None = None,
            code_version: str | None = None) -> serve.Application:
    """The Router bound to `generators` (bound deployments by candidate) and to the scorer, served-log
    and coordinator deployments `args` asks for. `build_app` passes the pool's generators; tests pass
    planted ones. `demands` (the generators') is checked against the cluster with the rest.

    `user_config`: the Router's (the model to serve: serve/serving_model.py). A config deploy
    (`serve deploy`, a RayService) versions the code by the app's config, so changing only the
    Router's user_config there is a lightweight update: Serve calls `reconfigure` on the running
    replicas. An app built in Python and started with `serve.run` gets a random code version per
    call (every replica restarts); `code_version` fixes it, so that a second `serve.run` differing
    only in `user_config` is the same lightweight update (the hot-swap test does this)."""
    metric = decision_metric(args, meta, pool)
    demands = list(demands or [])
    scorer = logger = None
    if metric is not None:
        opts = scorer_options(pool.metric(metric), args.scorer)
        demands.append(deployment_demand(opts["name"], opts))
        scorer = _versioned(Scorer.options(**opts), code_version).bind(pool.metric(metric).model_dump(mode="json"), args.device,
                                             None, args.scorer.batch_wait_timeout_s)
    if args.log is not None and args.log.enabled:
        log_args = args.log.absolute()
        log_args.writer_config([metric] if metric else [])  # refuse a bad log config at start-up
        opts = log_options(log_args)
        demands.append(deployment_demand(opts["name"], opts))
        logger = _versioned(ServedLog.options(**opts), code_version).bind(log_args.model_dump(), [metric] if metric else [])
    router = router_options(args)
    demands.append(deployment_demand("Router", router))
    check_cluster(demands, args.wait_for_resources)
    version = model_version(args.model_dir, args.model_version)
    if user_config is not None:
        router["user_config"] = dict(user_config)
    return _versioned(Router.options(**router), code_version).bind(
        args.model_dump(by_alias=True), dict(generators), _coordinator(args, version, code_version), scorer=scorer,
        logger=logger,
        decision_metric=metric, score_cost=_score_cost(meta, pool, metric),
    )


def build_app(args: AppArgs | Mapping[str, Any]) -> serve.Application:
    """The application `serve run serve/config.yaml` deploys: one Router + one Generator per candidate
    (+ a Scorer for a cascade bundle's decision metric, a ServedLog with `log:`, a BudgetCoordinator
    with `budget_controller`).

    Candidates are the model's; each must be declared in the pool. A candidate without a `generator:`
    block gets no deployment: the router still predicts it but falls back past it. Before anything is
    deployed: budgets are checked against the model's costs, embedder overrides against the runtime
    options, the decision metric against the pool, and the app's starting demand against the cluster
    (`wait_for_resources` to skip).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args))
    meta = bundle_meta(args.model_dir)
    candidates = list(meta["candidates"])
    check_overrides(args.embedder_overrides)
    check_budgets(args, dict(zip(candidates, map(float, meta["costs"]))), meta.get("cost_unit", ""))
    pool = _checked_pool(args, candidates)
    pool.require_unit(meta.get("cost_unit", pool.cost_unit), f"the model at {args.model_dir}")
    generators = _generators(args, pool, candidates)
    demands = [deployment_demand(opts["name"], opts) for opts, _ in generators.values()]
    handles = {
        name: Generator.options(**opts).bind(name, cand.generator.model_dump(mode="json"), args.device,
                                             cand.serve.max_batch_size, cand.serve.batch_wait_timeout_s, args.warmup)
        for name, (opts, cand) in generators.items()
    }
    return compose(args, handles, pool, meta, demands)
