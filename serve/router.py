"""The Router deployment (FastAPI ingress): per request, decide a plan, carry it out, account, answer.

    decide   `_decide`: the request's policy (`route` | `cascade`) and lambda (serve/model_state.py),
             predictions on the model thread (routing: q_m per candidate; cascades: every plan's
             expected value and cost), the choice with exploration (catimage.policy.choice)
    carry    `_carry_out`: serve/policy_runner.py draws through the Drawer (serve/drawing.py, the one
             place generators are called), scores through the Scorer client, accepts or escalates,
             falls back down the ranking when no attempt drew, logs every attempt
    account  `_account`: the one place a cost is counted (metrics at once; the budget controller gets
             the request's whole realised cost, every draw and every scoring, when its plan ends,
             cancelled or not)

Routing is the one-attempt plan, so /v1/generate, /v1/images/generations and both policies take
this one path. The model is a `ModelState` swapped whole by `reconfigure` (hot swap); a request
reads it once. Endpoints stay thin: they parse, decide, carry out, and shape the answer.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime
# and Serve's class-based ingress rewrites the methods' signatures, so string annotations would
# leave FastAPI unable to resolve the request models (it then expects them as query parameters).
import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from catimage.errors import CatimageError
from catimage.policy.choice import RequestLimits
from catimage.policy.explore import ExplorationConfig
from catimage.tables.pool import load_pool
from catimage.tables.table import stable_prompt_id
from serve.answers import generate_response, images_body
from serve.auth import ApiKeys
from serve.drawing import AllFailed, Drawer, call_limits
from serve.errors import BodyLimit, http_error, validation_error
from serve.generator_deployment import deployment_name
from serve.ledger import CostLedger, sync
from serve.log_deployment import LogClient
from serve.model_state import Decision, ModelState, cascade_choice, explore_config, route_choice
from serve.openai_api import native_size, order_for_size, parse_model
from serve.plan_executor import SEED_MODULUS
from serve.policy_runner import Outcome, PolicyMetrics, PolicyRunner, RequestContext
from serve.schemas import (
    MAX_BODY_BYTES,
    AppArgs,
    CandidateStatus,
    GenerateRequest,
    GenerateResponse,
    ImagesRequest,
    PlanOut,
    PoolResponse,
    RouteDecision,
    RouteRequest,
    RouteResponse,
)
from serve.scorer_deployment import ScorerClient
from serve.serving_model import ServingModel, load_serving_model, swap_problems, user_config_model

log = logging.getLogger("catimage.serve")

WARMUP_PROMPTS = ["a photo of a cat", 'a neon sign that reads "OPEN" above a rainy street at night, photo']

fastapi_app = FastAPI(
    title="catimage router",
    version="1",
    description=(
        "Decides per prompt what to draw under a cost budget: routing (the candidate maximising predicted "
        "quality - lambda * cost) or, with a cascade bundle, a plan (draw, score, accept or escalate). "
        "POST /v1/images/generations speaks the OpenAI Images API (model 'auto' decides)."
    ),
)
fastapi_app.add_exception_handler(RequestValidationError, validation_error)
fastapi_app.add_exception_handler(HTTPException, http_error)
fastapi_app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


class RouterMetrics:
    """The router's Prometheus metrics (ray.serve.metrics), created once per replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = ("candidate",)
        self.requests = Counter("catimage_requests", "Images drawn, by candidate that drew.", tags)
        self.cost = Counter("catimage_cost", "Generation cost spent, in the pool's cost unit, by candidate.", tags)
        self.scoring_cost = Counter("catimage_scoring_cost", "Decision scoring cost spent, in the pool's cost unit.",
                                    ("metric",))
        self.fallbacks = Counter("catimage_fallbacks", "Generator calls that failed and fell back.", tags)
        self.quality = Histogram(
            "catimage_predicted_quality_scaled",
            "Predicted quality of the chosen candidate, min-max scaled to [0, 1] on the training split.",
            boundaries=[round(0.1 * i, 1) for i in range(1, 11)], tag_keys=tags,
        )
        self.latency = Histogram(
            "catimage_router_latency_ms", "Time to decide (embed + predict + rule).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("endpoint",),
        )
        self.in_flight = Gauge("catimage_in_flight", "Requests outstanding at each candidate (this router replica).", tags)
        self.swaps = Counter("catimage_model_swaps", "Hot swaps asked for, by outcome (done / refused).", ("outcome",))


def _all_failed(err: AllFailed, retry_after_s: float) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=f"every candidate failed, no image was drawn ({err}); retry later or check the generator deployments",
        headers={"Retry-After": str(int(np.ceil(retry_after_s)))},
    )


def image_seeds(prompt_id: str, seed: int | None, start: int, count: int) -> list[int]:
    """Fresh seeds for attempts start..start+count-1 of a prompt: the build's seed indices (no seed
    given: attempt 0 draws what routing and the build draw first), or seed + index."""
    from catimage.generators import generation_seed

    if seed is None:
        return [int(generation_seed(prompt_id, start + j)) for j in range(count)]
    return [(int(seed) + start + j) % SEED_MODULUS for j in range(count)]


def _following(decision: Decision, candidate: str) -> Decision:
    """Routing's further images of one request: the candidate the first image drew, then the ranking."""
    from dataclasses import replace

    from catimage.policy.choice import Choice
    from catimage.policy.plans import Plan

    plan = Plan.route(candidate)
    c = decision.choice
    choice = Choice(plan, c.propensity, plan, c.expected_value, c.expected_cost, 1)
    return replace(decision, choice=choice, ranking=[candidate] + [r for r in decision.ranking if r != candidate])


class _Tab:
    """Realised cost of one plan run (what the budget controller gets as one observation)."""

    def __init__(self) -> None:
        self.total = 0.0


@serve.deployment
@serve.ingress(fastapi_app)
class Router:
    """Loads the model once (and again on a hot swap); per request: decide, draw, score, account."""

    def __init__(
        self, args: dict[str, Any], generators: Mapping[str, DeploymentHandle], coordinator: DeploymentHandle | None = None,
        scorer: DeploymentHandle | None = None, logger: DeploymentHandle | None = None,
        decision_metric: str | None = None, score_cost: float = 0.0,
    ) -> None:
        self.args = AppArgs.model_validate(args)
        self.keys = ApiKeys.from_env(self.args.auth_token_env)
        pool = load_pool(self.args.pool)
        cands = {c.name: c for c in pool.candidates}
        self.slots_per_replica = {name: max(c.serve.max_batch_size, 1) for name, c in cands.items()}
        self.sizes = {name: native_size(c) for name, c in cands.items()}
        self.cost_unit = pool.cost_unit
        self.metrics = RouterMetrics()
        self.drawer = Drawer(generators, {n: c.serve.request_timeout_s for n, c in cands.items()},
                             self.args.replica_death_retries, self.args.load_aware.service_s_prior, self.metrics,
                             limits=call_limits(cands.values()), prompt_tokens=self._prompt_tokens)
        self.coordinator = coordinator
        self.ledger = CostLedger()
        self._feed_forward = bool(self.args.budget_controller is not None and self.args.budget_controller.feed_forward)
        self.decision_metric = decision_metric
        self.score_cost = float(score_cost)
        self.policy_metrics = PolicyMetrics()
        self.scorer = None if scorer is None else ScorerClient.from_args(
            scorer, decision_metric, self.args.scorer,
            on_failure=lambda kind: self.policy_metrics.scorer_failures.inc(1, tags={"kind": kind}))
        self.logger = None if logger is None else LogClient.from_args(logger, self.args.log)
        self.runner = PolicyRunner(self.drawer, self.scorer, self.logger, self.policy_metrics, decision_metric,
                                   always_score=self.args.score_routed and self.scorer is not None)
        self.rng = np.random.default_rng(self.args.exploration.seed)
        self.controller_budgets = self._controller_budgets()
        # One thread for the model: embedding + prediction run off the event loop (so requests keep
        # flowing to the generators) but never concurrently with each other (no CPU oversubscription).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-model")
        self._decide_batch.set_max_batch_size(self.args.decision_batch_size)
        self._status: tuple[float, Any] | None = None
        self.model_calls_started = 0
        self._background: asyncio.Task | None = None
        self.warmup_s: float | None = None
        self.swap: dict[str, Any] | None = None
        self._swap_lock = asyncio.Lock()
        model = load_serving_model(self.args.model_dir, self.args.embedder_overrides, self.args.embedding_cache_size,
                                   self.args.model_version)
        self.state = self._state_for(model)
        if self.args.warmup:
            self.warmup_s = self._warm_up(self.state)
        log.info("router ready: model %s, candidates %s, generators %s", model.version, model.candidates,
                 sorted(self.drawer.generators))

    def _controller_budgets(self) -> dict[str, float]:
        from serve.lambdas import GLOBAL_KEY

        budget = self.args.controller_budget()
        if budget is None:
            return {}
        return {GLOBAL_KEY: budget, **self.args.budget_controller.per_key_budgets}

    def _state_for(self, model: ServingModel) -> ModelState:
        """The model's lambdas (refused here, at start-up or swap, when a budget cannot be held)."""
        return ModelState.build(model, self.args.budget, self.args.lambda_, self.args.policy, self.controller_budgets)

    def _warm_up(self, state: ModelState) -> float:
        """Load the embedder and run every model once before Serve counts this replica as ready (or
        before a swapped-in model serves): the first request would otherwise pay for lazy loading
        (10 s with MiniLM). Runs on the model thread."""
        start = time.perf_counter()
        self._executor.submit(self._predict_many_now, state, WARMUP_PROMPTS, state.model.cascade is not None).result()
        self._executor.submit(self._predict_many_now, state, WARMUP_PROMPTS[:1], False).result()
        cache = getattr(state.model.router.embedder, "_store", None)
        if cache is not None:  # warm-up prompts must not count as cached real traffic
            cache.clear()
        took = time.perf_counter() - start
        log.info("router warm-up of %s took %.2f s", state.model.version, took)
        return took

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop the background loop and the model thread
        so that nothing keeps the process (and `serve run`'s Ctrl-C) waiting, then send the served-log
        rows still buffered (bounded by the graceful shutdown time; what cannot go is counted failed)."""
        background = getattr(self, "_background", None)
        if background is not None:
            background.cancel()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        logger = getattr(self, "logger", None)
        if logger is not None:
            await logger.close(timeout_s=max(0.5, min(2.0, self.args.graceful_shutdown_timeout_s)))

    # --- hot swap ---------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config names the model to serve (serve/serving_model.py): load it off the event
        loop, check it fits the app, warm it, restart the budget controllers from its offline lambdas,
        then swap it in. Requests keep flowing on the old model meanwhile; one that started on it ends
        on it. A model that does not fit is refused (logged, /v1/pool `swap`) and the old one serves on."""
        async with self._swap_lock:
            try:
                await self._swap(user_config)
            except Exception as err:  # a bad swap must not take the serving replica down
                log.exception("hot swap to %s refused", user_config)
                self._refuse(user_config, [str(err)])

    async def _swap(self, user_config: dict[str, Any]) -> None:
        named = user_config_model(user_config)
        current = self.state.model
        same_dir = named is not None and os.path.abspath(named[0]) == os.path.abspath(current.model_dir)
        if named is None or (same_dir and named[1] in (None, current.version)):
            return
        if same_dir:  # the model already served, under the name the config gives it: relabel, do not reload
            from dataclasses import replace

            self.state.model = replace(current, version=named[1])
            return
        model_dir, version = named
        model = await asyncio.to_thread(load_serving_model, model_dir, self.args.embedder_overrides,
                                        self.args.embedding_cache_size, version)
        problems = swap_problems(model, self.drawer.generators, self.cost_unit, self.decision_metric)
        if model.decision_metric is not None and self.scorer is None:
            problems.append("this app has no Scorer deployment (deploy it with a cascade bundle or decision_metric)")
        if problems:
            self._refuse(user_config, problems)
            return
        state = self._state_for(model)
        if self.args.warmup:
            await asyncio.get_running_loop().run_in_executor(None, self._warm_up, state)
        if self.coordinator is not None and self.controller_budgets:
            state.update_controlled(await self.coordinator.use_model.remote(model.model_dir, model.version))
        old, self.state = self.state.model.version, state
        self.swap = {"outcome": "done", "from": old, "to": model.version, "model_dir": model.model_dir, "at": time.time()}
        self.metrics.swaps.inc(1, tags={"outcome": "done"})
        log.info("hot swap: now serving %s (was %s)", model.version, old)

    def _refuse(self, user_config: Any, problems: list[str]) -> None:
        self.swap = {"outcome": "refused", "asked": dict(user_config or {}), "problems": problems,
                     "serving": self.state.model.version, "at": time.time()}
        self.metrics.swaps.inc(1, tags={"outcome": "refused"})
        log.error("hot swap refused, still serving %s: %s", self.state.model.version, "; ".join(problems))

    # --- auth -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> str | None:
        """The caller's key name (None when auth is off); 401 for a missing or unknown token."""
        if self.keys is None:
            return None
        name = self.keys.name_for(request.headers.get("authorization"))
        if name is None:
            raise HTTPException(
                status_code=401,
                detail="missing or unknown API key: send `Authorization: Bearer <token>` with a key this server was given",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return name

    def _prompt_tokens(self, prompt: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """What the serving model's embedder computed for `prompt` (identity, per-token features),
        from its embedding cache; None when not cached. For generators with the same text encoder."""
        features_of = getattr(self.state.model.router.embedder, "features_of", None)
        return None if features_of is None else features_of(prompt)

    # --- predictions on the model thread ------------------------------------------------------
    def _predict_many_now(self, state: ModelState, prompts: list[str], plans: bool) -> tuple[np.ndarray, Any]:
        """(routing predictions (n, M), (plan values, plan costs) or None); only ever on the model thread."""
        self.model_calls_started += 1
        pred = state.predict(prompts)
        return pred, (state.plan_values(prompts) if plans else None)

    async def _in_model_thread(self, state: ModelState, prompts: list[str], plans: bool) -> tuple[np.ndarray, Any]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict_many_now, state, prompts,
                                                                plans)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _decide_batch(self, items: list[tuple[ModelState, str, bool]]) -> list[tuple[np.ndarray, Any]]:
        """Concurrent single-prompt decisions share one model call per (model, kind) in the batch."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (state, _, plans) in enumerate(items):
            groups.setdefault((id(state), plans), []).append(i)
        for (_, plans), idx in groups.items():
            pred, values = await self._in_model_thread(items[idx[0]][0], [items[i][1] for i in idx], plans)
            for row, i in enumerate(idx):
                out[i] = (pred[row], None if values is None else (values[0][row], values[1][row]))
        return out

    async def _predict_chunks(self, state: ModelState, prompts: list[str], plans: bool) -> tuple[np.ndarray, Any]:
        """A batch in chunks of `route_chunk_size`, each its own turn on the model thread, so one
        large /v1/route call cannot hold every /v1/generate behind it."""
        chunk = self.args.route_chunk_size
        parts = [await self._in_model_thread(state, prompts[i : i + chunk], plans) for i in range(0, len(prompts), chunk)]
        pred = np.concatenate([p for p, _ in parts], axis=0)
        if not plans:
            return pred, None
        return pred, (np.concatenate([v[0] for _, v in parts]), np.concatenate([v[1] for _, v in parts]))

    # --- errors -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _client_values(self, what: str) -> Iterator[None]:
        """Checks of the request's own values (budget below the cheapest, lambda too large, a policy the
        model lacks): their CatimageError is the client's mistake, 422. Anything else is the server's: 500."""
        with self._internal(what):
            try:
                yield
            except CatimageError as err:
                raise HTTPException(status_code=422, detail=str(err)) from None

    @contextlib.contextmanager
    def _internal(self, what: str) -> Iterator[None]:
        """Anything raised here is the server's fault (the model, the embedder, ...): 500 with an
        error id and no internals (the log has them); never a 4xx, whatever its type."""
        try:
            yield
        except HTTPException:
            raise
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("internal error in %s (error id %s)", what, error_id)
            raise HTTPException(
                status_code=500,
                detail=f"internal error while {what} (error id {error_id}); the router's log has the details",
            ) from None

    # --- deciding ---------------------------------------------------------------------------
    def _penalty(self, state: ModelState) -> np.ndarray | None:
        """mu * expected wait per candidate, in quality units (None when load-aware routing is off)."""
        from catimage.policy.routing import expected_wait_s

        mu = self.args.load_aware.mu
        if mu <= 0:
            return None
        names = state.model.candidates
        routers = max(self._running_replicas(None), 1)
        slots = [
            self._running_replicas(deployment_name(n)) * self.slots_per_replica.get(n, 1) / routers
            if n in self.drawer.generators else 0
            for n in names
        ]
        wait = expected_wait_s([self.drawer.in_flight.get(n, 0) for n in names], slots,
                               [self.drawer.service_s.get(n, 1.0) for n in names], self.args.load_aware.cold_start_s)
        return mu * wait

    @staticmethod
    def _check_policy_fields(policy: str, req: Any) -> None:
        if policy == "route" and (req.min_quality is not None or req.max_attempts is not None or req.parallel > 1):
            raise CatimageError("min_quality, max_attempts and parallel apply to the cascade policy; drop them, or "
                                "ask for policy 'cascade'")

    def _explore(self, state: ModelState, pinned: str | None, budget: float | None) -> ExplorationConfig:
        if pinned is not None:
            return ExplorationConfig(epsilon=0.0)
        return explore_config(self.args.exploration, budget)

    async def _decide(self, state: ModelState, req: Any, budget: float | None, lam: float | None, key: str | None,
                      pinned: str | None, allowed: list[str] | None = None) -> tuple[Decision, float]:
        """The plan for one prompt under the request's policy, limits and lambda; and the time it took."""
        from catimage.policy.routing import utility_ranking

        start = time.perf_counter()
        with self._client_values("choosing a candidate"):
            policy = state.policy_for(req.policy)
            self._check_policy_fields(policy, req)
            lam_used, ctrl_key, in_force = state.resolve(policy, budget, lam, key, controlled=pinned is None)
        with self._internal("choosing a candidate"):
            pred, values = await self._decide_batch((state, req.prompt, policy == "cascade"))
            penalty = self._penalty(state) if pinned is None else None
        model = state.model
        costs = np.asarray(model.router.costs)
        with self._client_values("choosing a candidate"):
            config = self._explore(state, pinned, in_force)
            if policy == "cascade":
                limits = RequestLimits(req.max_attempts, req.min_quality, pinned)
                choice = cascade_choice(values[0], values[1], model.cascade.plans, lam_used, limits, config, self.rng,
                                        allowed)
            else:
                choice = route_choice(pred, costs, model.candidates, lam_used, config, self.rng, penalty, allowed, pinned)
        order = utility_ranking(pred[None, :], costs, lam_used, None if penalty is None else penalty[None, :])[0]
        ranking = [model.candidates[k] for k in order if allowed is None or model.candidates[k] in allowed]
        first = choice.plan.attempts[0]
        ranking = [first] + [c for c in ranking if c != first]
        predicted = {c: float(pred[k]) for k, c in enumerate(model.candidates)}
        router_ms = (time.perf_counter() - start) * 1000
        self.metrics.latency.observe(router_ms, tags={"endpoint": "generate"})
        return Decision(policy, choice, lam_used, predicted, ranking, ctrl_key, in_force), router_ms

    # --- carrying out and accounting ----------------------------------------------------------
    def _account(self, state: ModelState, decision: Decision, tab: _Tab, candidate: str, amount: float,
                 scoring: bool) -> None:
        """The one place a cost is counted: metrics now, the request's tab for the budget controller."""
        tab.total += amount
        if scoring:
            self.metrics.scoring_cost.inc(amount, tags={"metric": self.decision_metric or "none"})
            return
        self.metrics.requests.inc(1, tags={"candidate": candidate})
        self.metrics.cost.inc(amount, tags={"candidate": candidate})
        predicted = decision.predicted.get(candidate)
        if predicted is not None:
            scaled = float(state.model.router.scaler.transform([predicted])[0])
            self.metrics.quality.observe(scaled, tags={"candidate": candidate})

    async def _carry_out(self, state: ModelState, decision: Decision, prompt: str, seeds: list[int],
                         parallel: int) -> Outcome:
        """Run the plan; its whole realised cost feeds the controller as one observation, even when the
        request is cancelled halfway (the `finally`)."""
        tab = _Tab()
        ctx = RequestContext(decision.policy, decision.choice, decision.lam, state.model.version, decision.ranking)
        expected = decision.choice.expected_cost if self._feed_forward else None
        if decision.controlled_key is not None and expected is not None:
            self.ledger.commit(decision.controlled_key, expected)
        try:
            return await self.runner.run(
                ctx, prompt, stable_prompt_id(prompt), state.model.costs, self._score_cost(state), seeds, parallel,
                lambda c, amount, scoring: self._account(state, decision, tab, c, amount, scoring),
            )
        finally:
            if decision.controlled_key is not None and expected is not None:
                self.ledger.pay(decision.controlled_key, tab.total, expected)
            elif decision.controlled_key is not None and tab.total > 0:
                self.ledger.record(decision.controlled_key, tab.total)

    def _score_cost(self, state: ModelState) -> float:
        return state.model.score_cost if state.model.cascade is not None else self.score_cost

    def _check_candidate(self, state: ModelState, candidate: str | None) -> None:
        if candidate is not None and candidate not in state.model.costs:
            raise HTTPException(
                status_code=422, detail=f"unknown candidate {candidate!r}; choose one of {state.model.candidates}"
            )

    @fastapi_app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=False)
    async def generate(self, req: GenerateRequest, request: Request) -> GenerateResponse:
        """Decide a plan for one prompt (route or cascade), carry it out, answer with every attempt."""
        key = self._authorize(request)
        self._ensure_background()
        state = self.state
        self._check_candidate(state, req.candidate)
        decision, router_ms = await self._decide(state, req, req.budget, req.lambda_, key, req.candidate)
        seeds = image_seeds(stable_prompt_id(req.prompt), req.seed, 0, len(decision.choice.plan.attempts))
        try:
            outcome = await self._carry_out(state, decision, req.prompt, seeds, req.parallel)
        except AllFailed as err:
            raise _all_failed(err, self.args.retry_after_s) from None
        return generate_response(outcome, decision, metric=state.model.router.metric, cost_unit=state.model.cost_unit,
                                 router_ms=router_ms, want_image=req.return_ == "png_base64",
                                 decision_metric=self.decision_metric if outcome.run and outcome.run.scored else None,
                                 model_version=state.model.version)

    @fastapi_app.post("/v1/route", response_model=RouteResponse)
    async def route(self, req: RouteRequest, request: Request) -> RouteResponse:
        """Decisions only, for a batch of prompts (predicted in chunks; no generation, no load term, no
        exploration): routing's candidate, or the cascade's plan, per prompt."""
        key = self._authorize(request)
        state = self.state
        start = time.perf_counter()
        with self._client_values("routing"):
            policy = state.policy_for(req.policy)
            lam, _, _ = state.resolve(policy, req.budget, req.lambda_, key, controlled=True)
        with self._internal("routing"):
            pred, values = await self._predict_chunks(state, req.prompts, policy == "cascade")
            out = self._route_decisions(state, req.prompts, pred, values, lam)
        self.metrics.latency.observe((time.perf_counter() - start) * 1000, tags={"endpoint": "route"})
        return RouteResponse(
            decisions=out, mean_cost=sum(d.cost for d in out) / len(out), cost_unit=state.model.cost_unit,
            metric=state.model.router.metric, policy=policy, model_version=state.model.version,
        )

    def _route_decisions(self, state: ModelState, prompts: list[str], pred: np.ndarray, values: Any,
                         lam: float) -> list[RouteDecision]:
        from catimage.policy.routing import utility_ranking

        model = state.model
        order = utility_ranking(pred, model.router.costs, lam)
        greedy = ExplorationConfig(epsilon=0.0)
        out = []
        for i, prompt in enumerate(prompts):
            ranking = [model.candidates[k] for k in order[i]]
            predicted = {c: float(pred[i, k]) for k, c in enumerate(model.candidates)}
            if values is None:
                out.append(RouteDecision(prompt=prompt, candidate=ranking[0], cost=model.costs[ranking[0]],
                                         predicted_quality=predicted, ranking=ranking, **{"lambda": lam}))
                continue
            choice = cascade_choice(values[0][i], values[1][i], model.cascade.plans, lam, RequestLimits(), greedy,
                                    self.rng, None)
            plan = choice.plan
            out.append(RouteDecision(
                prompt=prompt, candidate=plan.attempts[0], cost=choice.expected_cost, predicted_quality=predicted,
                ranking=ranking, plan=PlanOut(attempts=list(plan.attempts), threshold=plan.threshold),
                expected_quality=choice.expected_value, **{"lambda": lam},
            ))
        return out

    # --- the OpenAI Images API --------------------------------------------------------------
    async def _images(self, state: ModelState, decision: Decision, prompt: str, n: int,
                      parallel: int) -> tuple[list[Outcome], list[dict[str, Any]]]:
        """Image 0 carries out the decided plan; the others follow it (routing: the candidate image 0
        drew; cascades: the same plan), each with fresh seeds and its own realised cost. Every image
        drawn is kept (and was accounted when drawn); the failed ones are listed."""
        k = len(decision.choice.plan.attempts)
        pid = stable_prompt_id(prompt)
        try:
            first = await self._carry_out(state, decision, prompt, image_seeds(pid, None, 0, k), parallel)
        except AllFailed as err:
            raise _all_failed(err, self.args.retry_after_s) from None
        follow = _following(decision, first.candidate) if decision.policy == "route" else decision
        rest = await asyncio.gather(
            *(self._carry_out(state, follow, prompt, image_seeds(pid, None, i * k, k), parallel) for i in range(1, n)),
            return_exceptions=True,
        )
        drawn, failed = [first], []
        for i, out in enumerate(rest, start=1):
            if isinstance(out, AllFailed):
                failed.append({"index": i, "reason": str(out)})
            elif isinstance(out, BaseException):
                raise out
            else:
                drawn.append(out)
        return drawn, failed

    @fastapi_app.post("/v1/images/generations")
    async def images_generations(self, req: ImagesRequest, request: Request) -> JSONResponse:
        """OpenAI-compatible: `model` 'auto' decides (budget from 'auto:budget=B' or X-Catimage-Budget);
        the policy fields come as extra body fields. The same path as /v1/generate."""
        key = self._authorize(request)
        self._ensure_background()
        state = self.state
        if req.response_format == "url":
            raise HTTPException(status_code=400, detail="response_format 'url' is not offered (no image store); use b64_json")
        pinned, budget, lam = parse_model(req.model, request.headers.get("x-catimage-budget"), state.model.candidates)
        allowed = order_for_size(list(state.model.candidates), req.size, self.sizes, pinned)  # refuse before any work
        allowed = None if req.size in (None, "auto") else allowed
        decision, router_ms = await self._decide(state, req, budget, lam, key, pinned, allowed)
        outcomes, failed = await self._images(state, decision, req.prompt, req.n, req.parallel)
        body = images_body(outcomes, failed, req.n, decision, state.model.cost_unit, router_ms, state.model.version)
        return JSONResponse(body, headers={"X-Catimage-Candidate": outcomes[0].candidate})

    # --- background: budget controller sync, replica counts ----------------------------------
    def _ensure_background(self) -> None:
        idle = self._background is None or self._background.done()
        if idle and (self.controller_budgets or self.args.load_aware.mu > 0):
            self._background = asyncio.get_running_loop().create_task(self._background_loop())

    async def _sync_budget(self) -> None:
        """Pay the pending costs to the coordinator; a failed sync keeps them for the next one."""
        lams = await sync(self.ledger, lambda pending: self.coordinator.sync.remote(pending))
        if lams is not None:
            self.state.update_controlled(lams)

    async def _background_loop(self) -> None:
        interval = self.args.budget_controller.sync_interval_s if self.args.budget_controller else self.args.status_cache_s
        while True:
            if self.controller_budgets and self.coordinator is not None:
                await self._sync_budget()
            if self.args.load_aware.mu > 0:
                try:
                    await self._serve_status()
                except Exception as err:  # noqa: BLE001 - keep routing with the last replica counts
                    log.warning("serve.status() failed (%s); keeping the last replica counts", err)
            await asyncio.sleep(interval)

    # --- status -----------------------------------------------------------------------------
    async def _serve_status(self) -> Any:
        now = time.monotonic()
        if self._status is None or now - self._status[0] > self.args.status_cache_s:
            self._status = (now, await asyncio.to_thread(serve.status))
        return self._status[1]

    def _running_replicas(self, deployment: str | None) -> int:
        """RUNNING replicas of a deployment (None: the router's own) from the cached serve.status()."""
        if self._status is None:
            return 1
        app_status = self._status[1].applications.get(serve.get_replica_context().app_name)
        name = deployment or serve.get_replica_context().deployment
        overview = app_status.deployments.get(name) if app_status is not None else None
        if overview is None:
            return 1
        states = {str(getattr(k, "value", k)): int(v) for k, v in overview.replica_states.items()}
        return states.get("RUNNING", 0)

    def _candidate_rows(self, state: ModelState, deployments: Mapping[str, Any]) -> list[CandidateStatus]:
        rows = []
        for name, cost in state.model.costs.items():
            dep = deployment_name(name) if name in self.drawer.generators else None
            overview = deployments.get(dep) if dep else None
            replicas = {str(getattr(k, "value", k)): int(v) for k, v in (overview.replica_states if overview else {}).items()}
            rows.append(CandidateStatus(
                name=name, cost=cost, deployment=dep, replicas=replicas,
                running_replicas=replicas.get("RUNNING", 0), in_flight=self.drawer.in_flight.get(name, 0),
                deployment_status=str(getattr(overview.status, "value", overview.status)) if overview else None,
            ))
        return rows

    async def _controller_state(self, state: ModelState) -> dict[str, dict[str, Any]] | None:
        if self.coordinator is None:
            return None
        try:
            return await self.coordinator.state.remote()
        except Exception as err:  # noqa: BLE001
            log.warning("budget coordinator unreachable (%s)", err)
            lams = {**state.route_lambdas.controlled}
            if state.cascade_lambdas is not None:
                lams.update({f"cascade:{k}": v for k, v in state.cascade_lambdas.controlled.items()})
            return {k: {"lambda": v, "stale": True} for k, v in lams.items()}

    @fastapi_app.get("/v1/pool", response_model=PoolResponse)
    async def pool(self, request: Request) -> PoolResponse:
        """Candidates, costs, live replica counts (serve.status()), in-flight counts, controller state,
        the model version served (hot swap), scorer failures and served-log counts."""
        self._authorize(request)
        state = self.state
        status = await self._serve_status()
        app_status = status.applications.get(serve.get_replica_context().app_name)
        return PoolResponse(
            cost_unit=state.model.cost_unit,
            metric=state.model.router.metric,
            candidates=self._candidate_rows(state, app_status.deployments if app_status is not None else {}),
            default_budget=self.args.budget,
            default_lambda=self.args.lambda_,
            application_status=str(getattr(app_status.status, "value", app_status.status)) if app_status else None,
            budget_controller=await self._controller_state(state),
            load_aware_mu=self.args.load_aware.mu,
            model_version=state.model.version,
            model_dir=state.model.model_dir,
            policies=state.policies,
            default_policy=state.default_policy,
            decision_metric=self.decision_metric,
            swap=self.swap,
            scorer=None if self.scorer is None else self.scorer.state(),
            served_log=None if self.logger is None else self.logger.state(),
            exploration=self.args.exploration.model_dump(),
        )

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "candidates": self.state.model.candidates, "generators": sorted(self.drawer.generators),
                "warmup_s": self.warmup_s, "model_calls_started": self.model_calls_started,
                "model_version": self.state.model.version}
