"""The Router deployment (FastAPI ingress): per request, embed, predict, choose, draw, account.

    choose   `_choose_one` / `_choices`: lambda (serve/lambdas.py), predictions on the model thread,
             argmax_m q_m - lambda c_m [- mu wait_m] as a ranking
    draw     `self.drawer.draw` (serve/drawing.py): the one place generators are called
    account  `_account`: the one place a drawn image's cost is counted (metrics, and the budget
             controller's ledger, serve/ledger.py), called the moment the image exists

Endpoints stay thin: they parse, call those three, and shape the answer.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime
# and Serve's class-based ingress rewrites the methods' signatures, so string annotations would
# leave FastAPI unable to resolve the request models (it then expects them as query parameters).
import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from catimage.errors import CatimageError
from catimage.tables.pool import load_pool
from serve.auth import ApiKeys
from serve.bundle import load_router_model
from serve.drawing import AllFailed, Drawer, Drawn
from serve.errors import BodyLimit, http_error, validation_error
from serve.generator_deployment import deployment_name
from serve.lambdas import GLOBAL_KEY, LambdaPolicy
from serve.ledger import CostLedger, sync
from serve.openai_api import images_body, native_size, order_for_size, parse_model
from serve.schemas import (
    MAX_BODY_BYTES,
    AppArgs,
    CandidateStatus,
    GenerateRequest,
    GenerateResponse,
    ImagesRequest,
    PoolResponse,
    RouteDecision,
    RouteRequest,
    RouteResponse,
)

log = logging.getLogger("catimage.serve")

WARMUP_PROMPTS = ["a photo of a cat", 'a neon sign that reads "OPEN" above a rainy street at night, photo']

fastapi_app = FastAPI(
    title="catimage router",
    version="1",
    description=(
        "Routes each prompt to the cheapest text-to-image candidate that is predicted to draw it well: "
        "argmax_m predicted_quality_m(prompt) - lambda * cost_m, with lambda set from a cost budget. "
        "POST /v1/images/generations speaks the OpenAI Images API (model 'auto' routes)."
    ),
)
fastapi_app.add_exception_handler(RequestValidationError, validation_error)
fastapi_app.add_exception_handler(HTTPException, http_error)
fastapi_app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


@dataclass
class Choice:
    """A routing decision for one prompt: predictions, lambda, ranking (best first), and the
    controller key its realised cost feeds (None: a request with its own budget/lambda, or pinned)."""

    predicted: dict[str, float]
    lam: float
    ranking: list[str]
    controlled_key: str | None = None


class RouterMetrics:
    """The router's Prometheus metrics (ray.serve.metrics), created once per replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = ("candidate",)
        self.requests = Counter("catimage_requests", "Images drawn, by candidate that drew.", tags)
        self.cost = Counter("catimage_cost", "Cost spent, in the pool's cost unit, by candidate.", tags)
        self.fallbacks = Counter("catimage_fallbacks", "Generator calls that failed and fell back.", tags)
        self.quality = Histogram(
            "catimage_predicted_quality_scaled",
            "Predicted quality of the chosen candidate, min-max scaled to [0, 1] on the training split.",
            boundaries=[round(0.1 * i, 1) for i in range(1, 11)], tag_keys=tags,
        )
        self.latency = Histogram(
            "catimage_router_latency_ms", "Time to choose a candidate (embed + predict + rule).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("endpoint",),
        )
        self.in_flight = Gauge("catimage_in_flight", "Requests outstanding at each candidate (this router replica).", tags)


def _all_failed(err: AllFailed, retry_after_s: float) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=f"every candidate failed, no image was drawn ({err}); retry later or check the generator deployments",
        headers={"Retry-After": str(int(np.ceil(retry_after_s)))},
    )


@serve.deployment
@serve.ingress(fastapi_app)
class Router:
    """Loads the router bundle once; per request: embed, predict, choose, call the generator."""

    def __init__(
        self, args: dict[str, Any], generators: Mapping[str, DeploymentHandle], coordinator: DeploymentHandle | None = None,
    ) -> None:
        from catimage.policy.routing import max_precise_lambda

        self.args = AppArgs.model_validate(args)
        self.model = load_router_model(self.args.model_dir, self.args.embedder_overrides, self.args.embedding_cache_size)
        self.keys = ApiKeys.from_env(self.args.auth_token_env)
        pool = load_pool(self.args.pool)
        cands = {name: pool.get(name) for name in self.model.candidates}
        self.slots_per_replica = {name: max(c.serve.max_batch_size, 1) for name, c in cands.items()}
        self.sizes = {name: native_size(c) for name, c in cands.items()}
        self.costs = {c: float(v) for c, v in zip(self.model.candidates, self.model.costs)}
        self.metrics = RouterMetrics()
        self.drawer = Drawer(generators, {n: c.serve.request_timeout_s for n, c in cands.items()},
                             self.args.replica_death_retries, self.args.load_aware.service_s_prior, self.metrics)
        self.coordinator = coordinator
        self.ledger = CostLedger()
        # Lambda beyond which the rule cannot resolve a millionth of the metric's training range in
        # float64, and the lambda that already routes every calibration prompt to the cheapest.
        spread = float(self.model.scaler.high - self.model.scaler.low)
        self.lambdas = LambdaPolicy(
            self.model.lambda_for_budget, max_precise_lambda(self.model.costs, 1e-6 * spread),
            float(self.model.lambda_for_budget(float(self.model.costs.min()))), self.args.budget, self.args.lambda_,
        )
        budget = self.args.controller_budget()
        if budget is not None:
            self.lambdas.start_controllers({GLOBAL_KEY: budget, **self.args.budget_controller.per_key_budgets})
        if self.args.budget is not None:
            self.lambdas.for_budget(self.args.budget)  # fail at start-up, not on the first request
        # One thread for the model: embedding + prediction run off the event loop (so requests keep
        # flowing to the generators) but never concurrently with each other (no CPU oversubscription).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-model")
        self._decide_batch.set_max_batch_size(self.args.decision_batch_size)
        self._status: tuple[float, Any] | None = None
        self.model_calls_started = 0
        self._background: asyncio.Task | None = None
        self.warmup_s: float | None = None
        if self.args.warmup:
            self._warm_up()
        log.info("router ready: candidates %s, generators %s", self.model.candidates, sorted(self.drawer.generators))

    def _warm_up(self) -> None:
        """Load the embedder and run every model once before Serve counts this replica as ready: the
        first request after start-up would otherwise pay for lazy loading (10 s with MiniLM)."""
        start = time.perf_counter()
        self._executor.submit(self._predict, WARMUP_PROMPTS).result()
        self._executor.submit(self._predict, WARMUP_PROMPTS[:1]).result()
        cache = getattr(self.model.embedder, "_store", None)
        if cache is not None:  # warm-up prompts must not count as cached real traffic
            cache.clear()
        self.warmup_s = time.perf_counter() - start
        log.info("router warm-up took %.2f s", self.warmup_s)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop the background loop and the model thread
        so that nothing keeps the process (and `serve run`'s Ctrl-C) waiting."""
        background = getattr(self, "_background", None)
        if background is not None:
            background.cancel()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

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

    # --- choosing ---------------------------------------------------------------------------
    def _predict(self, prompts: list[str]) -> np.ndarray:
        self.model_calls_started += 1  # only ever on the model thread
        return self.model.predict(prompts)

    async def _in_model_thread(self, prompts: list[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, prompts)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _decide_batch(self, prompts: list[str]) -> list[np.ndarray]:
        """Concurrent single-prompt decisions share one model call (one forward pass for all)."""
        return list(await self._in_model_thread(prompts))

    async def _predict_many(self, prompts: list[str]) -> np.ndarray:
        """A batch in chunks of `route_chunk_size`, each its own turn on the model thread, so one
        large /v1/route call cannot hold every /v1/generate behind it."""
        chunk = self.args.route_chunk_size
        parts = [await self._in_model_thread(prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)]
        return np.concatenate(parts, axis=0)

    @contextlib.contextmanager
    def _client_values(self, what: str) -> Iterator[None]:
        """Checks of the request's own values (budget below the cheapest, lambda too large): their
        CatimageError is the client's mistake, 422. Anything else here is still the server's: 500."""
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

    def _penalty(self) -> np.ndarray | None:
        """mu * expected wait per candidate, in quality units (None when load-aware routing is off)."""
        from catimage.policy.routing import expected_wait_s

        mu = self.args.load_aware.mu
        if mu <= 0:
            return None
        names = self.model.candidates
        routers = max(self._running_replicas(None), 1)
        slots = [
            self._running_replicas(deployment_name(n)) * self.slots_per_replica[n] / routers if n in self.drawer.generators else 0
            for n in names
        ]
        wait = expected_wait_s([self.drawer.in_flight[n] for n in names], slots, [self.drawer.service_s[n] for n in names],
                               self.args.load_aware.cold_start_s)
        return mu * wait

    def _choices(self, pred: np.ndarray, lam: float, penalty: np.ndarray | None, ctrl_key: str | None) -> list[Choice]:
        from catimage.policy.routing import utility_ranking

        order = utility_ranking(pred, self.model.costs, lam, penalty)
        names = self.model.candidates
        return [
            Choice({c: float(pred[i, k]) for k, c in enumerate(names)}, lam, [names[k] for k in order[i]], ctrl_key)
            for i in range(pred.shape[0])
        ]

    async def _choose_one(self, prompt: str, budget: float | None, lam: float | None, key: str | None,
                          pinned: str | None) -> tuple[Choice, float]:
        """The decision for one prompt; a pinned candidate goes first and feeds no controller."""
        start = time.perf_counter()
        with self._client_values("choosing a candidate"):
            lam_used, ctrl_key = self.lambdas.resolve(budget, lam, key, controlled=pinned is None)
        with self._internal("choosing a candidate"):
            pred = await self._decide_batch(prompt)
            choice = self._choices(pred[None, :], lam_used, self._penalty() if pinned is None else None, ctrl_key)[0]
        if pinned is not None:
            choice.ranking = [pinned] + [c for c in choice.ranking if c != pinned]
        router_ms = (time.perf_counter() - start) * 1000
        self.metrics.latency.observe(router_ms, tags={"endpoint": "generate"})
        return choice, router_ms

    # --- drawing and accounting -------------------------------------------------------------
    def _account(self, choice: Choice, candidate: str) -> None:
        """The one place a drawn image's cost is counted: metrics, and the controller's ledger."""
        cost = self.costs[candidate]
        self.metrics.requests.inc(1, tags={"candidate": candidate})
        self.metrics.cost.inc(cost, tags={"candidate": candidate})
        scaled = float(self.model.scaler.transform([choice.predicted[candidate]])[0])
        self.metrics.quality.observe(scaled, tags={"candidate": candidate})
        if choice.controlled_key is not None:
            self.ledger.record(choice.controlled_key, cost)

    async def _draw(self, prompt: str, choice: Choice, order: list[str], seed: int, want_image: bool) -> Drawn:
        return await self.drawer.draw(prompt, order, seed, want_image, lambda cand: self._account(choice, cand))

    def _check_candidate(self, candidate: str | None) -> None:
        if candidate is not None and candidate not in self.costs:
            raise HTTPException(
                status_code=422, detail=f"unknown candidate {candidate!r}; choose one of {self.model.candidates}"
            )

    @staticmethod
    def _default_seed(prompt: str) -> int:
        from catimage.generators import generation_seed
        from catimage.tables.table import stable_prompt_id

        return int(generation_seed(stable_prompt_id(prompt), 0))

    @fastapi_app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=False)
    async def generate(self, req: GenerateRequest, request: Request) -> GenerateResponse:
        """Route one prompt, draw it with the chosen candidate (falling back down the ranking on failure)."""
        key = self._authorize(request)
        self._ensure_background()
        self._check_candidate(req.candidate)
        choice, router_ms = await self._choose_one(req.prompt, req.budget, req.lambda_, key, req.candidate)
        seed = req.seed if req.seed is not None else self._default_seed(req.prompt)
        try:
            drawn = await self._draw(req.prompt, choice, choice.ranking, seed, req.return_ == "png_base64")
        except AllFailed as err:
            raise _all_failed(err, self.args.retry_after_s) from None
        return GenerateResponse(
            candidate=drawn.candidate,
            predicted_quality=choice.predicted,
            metric=self.model.metric,
            cost=self.costs[drawn.candidate],
            cost_unit=self.model.cost_unit,
            **{"lambda": choice.lam},
            seed=seed,
            image=base64.b64encode(drawn.png).decode("ascii") if drawn.png is not None else None,
            fallback=drawn.fallback(),
            router_ms=router_ms,
            generate_ms=drawn.generate_ms,
        )

    @fastapi_app.post("/v1/route", response_model=RouteResponse)
    async def route(self, req: RouteRequest, request: Request) -> RouteResponse:
        """Decisions only, for a batch of prompts (predicted in chunks; no generation, no load term)."""
        key = self._authorize(request)
        start = time.perf_counter()
        with self._client_values("routing"):
            lam, ctrl_key = self.lambdas.resolve(req.budget, req.lambda_, key, controlled=True)
        with self._internal("routing"):
            pred = await self._predict_many(req.prompts)
            choices = self._choices(pred, lam, None, ctrl_key)
        self.metrics.latency.observe((time.perf_counter() - start) * 1000, tags={"endpoint": "route"})
        out = [
            RouteDecision(
                prompt=p, candidate=c.ranking[0], cost=self.costs[c.ranking[0]], predicted_quality=c.predicted,
                ranking=c.ranking, **{"lambda": c.lam},
            )
            for p, c in zip(req.prompts, choices)
        ]
        return RouteResponse(
            decisions=out, mean_cost=sum(d.cost for d in out) / len(out), cost_unit=self.model.cost_unit,
            metric=self.model.metric,
        )

    # --- the OpenAI Images API --------------------------------------------------------------
    async def _draw_n(self, prompt: str, choice: Choice, order: list[str], base_seed: int,
                      n: int) -> tuple[list[Drawn], list[dict[str, Any]]]:
        """The first image decides the candidate (and its fallbacks); the others follow it. Every
        image drawn is kept (and was accounted when drawn); the failed ones are listed."""
        try:
            first = await self._draw(prompt, choice, order, base_seed, True)
        except AllFailed as err:
            raise _all_failed(err, self.args.retry_after_s) from None
        follow = [first.candidate] + [c for c in order if c != first.candidate]
        rest = await asyncio.gather(
            *(self._draw(prompt, choice, follow, base_seed + i, True) for i in range(1, n)), return_exceptions=True
        )
        drawn, failed = [first], []
        for i, out in enumerate(rest, start=1):
            if isinstance(out, AllFailed):
                failed.append({"index": i, "seed": base_seed + i, "reason": str(out)})
            elif isinstance(out, BaseException):
                raise out
            else:
                drawn.append(out)
        return drawn, failed

    @fastapi_app.post("/v1/images/generations")
    async def images_generations(self, req: ImagesRequest, request: Request) -> JSONResponse:
        """OpenAI-compatible: `model` 'auto' routes (budget from 'auto:budget=B' or X-Catimage-Budget)."""
        key = self._authorize(request)
        self._ensure_background()
        if req.response_format == "url":
            raise HTTPException(status_code=400, detail="response_format 'url' is not offered (no image store); use b64_json")
        pinned, budget, lam = parse_model(req.model, request.headers.get("x-catimage-budget"), self.model.candidates)
        order_for_size(list(self.model.candidates), req.size, self.sizes, pinned)  # refuse before any work
        choice, router_ms = await self._choose_one(req.prompt, budget, lam, key, pinned)
        order = order_for_size(choice.ranking, req.size, self.sizes, pinned)
        drawn, failed = await self._draw_n(req.prompt, choice, order, self._default_seed(req.prompt), req.n)
        body = images_body(drawn, failed, req.n, self.costs, self.model.cost_unit, choice.lam, choice.predicted, router_ms)
        return JSONResponse(body, headers={"X-Catimage-Candidate": drawn[0].candidate})

    # --- background: budget controller sync, replica counts ----------------------------------
    def _ensure_background(self) -> None:
        idle = self._background is None or self._background.done()
        if idle and (self.lambdas.controlled or self.args.load_aware.mu > 0):
            self._background = asyncio.get_running_loop().create_task(self._background_loop())

    async def _sync_budget(self) -> None:
        """Pay the pending costs to the coordinator; a failed sync keeps them for the next one."""
        lams = await sync(self.ledger, lambda pending: self.coordinator.sync.remote(pending))
        if lams is not None:
            self.lambdas.controlled.update(lams)

    async def _background_loop(self) -> None:
        interval = self.args.budget_controller.sync_interval_s if self.args.budget_controller else self.args.status_cache_s
        while True:
            if self.lambdas.controlled and self.coordinator is not None:
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

    def _candidate_rows(self, deployments: Mapping[str, Any]) -> list[CandidateStatus]:
        rows = []
        for name in self.model.candidates:
            dep = deployment_name(name) if name in self.drawer.generators else None
            overview = deployments.get(dep) if dep else None
            replicas = {str(getattr(k, "value", k)): int(v) for k, v in (overview.replica_states if overview else {}).items()}
            rows.append(CandidateStatus(
                name=name, cost=self.costs[name], deployment=dep, replicas=replicas,
                running_replicas=replicas.get("RUNNING", 0), in_flight=self.drawer.in_flight[name],
                deployment_status=str(getattr(overview.status, "value", overview.status)) if overview else None,
            ))
        return rows

    async def _controller_state(self) -> dict[str, dict[str, Any]] | None:
        if self.coordinator is None:
            return None
        try:
            return await self.coordinator.state.remote()
        except Exception as err:  # noqa: BLE001
            log.warning("budget coordinator unreachable (%s)", err)
            return {k: {"lambda": v, "stale": True} for k, v in self.lambdas.controlled.items()}

    @fastapi_app.get("/v1/pool", response_model=PoolResponse)
    async def pool(self, request: Request) -> PoolResponse:
        """Candidates, costs, live replica counts (serve.status()), in-flight counts, controller state."""
        self._authorize(request)
        status = await self._serve_status()
        app_status = status.applications.get(serve.get_replica_context().app_name)
        return PoolResponse(
            cost_unit=self.model.cost_unit,
            metric=self.model.metric,
            candidates=self._candidate_rows(app_status.deployments if app_status is not None else {}),
            default_budget=self.args.budget,
            default_lambda=self.args.lambda_,
            application_status=str(getattr(app_status.status, "value", app_status.status)) if app_status else None,
            budget_controller=await self._controller_state(),
            load_aware_mu=self.args.load_aware.mu,
        )

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "candidates": self.model.candidates, "generators": sorted(self.drawer.generators),
                "warmup_s": self.warmup_s, "model_calls_started": self.model_calls_started}
