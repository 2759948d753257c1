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

This module holds the Router and the application builder (`build_app`); the Generator deployment
is in serve/generator_deployment.py, the BudgetCoordinator in serve/budget_coordinator.py and the
HTTP error answers (exception handlers, body-size limit) in serve/errors.py. Those names stay
importable from here.

Run it with `serve run serve/config.yaml` (see docs/serving.md) or `build_app(AppArgs(...))`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime
# and Serve's class-based ingress rewrites the methods' signatures, so string annotations would
# leave FastAPI unable to resolve the request models (it then expects them as query parameters).
import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from catimage.errors import CatimageError, PoolError
from catimage.tables.pool import Candidate, load_pool
from serve.auth import ApiKeys
from serve.budget_coordinator import BudgetCoordinator
from serve.errors import (
    BodyLimit,
    http_error,
    public_reason,
    replica_died,
    validation_error,
)
from serve.generator_deployment import Generator, deployment_name
from serve.schemas import (
    MAX_BODY_BYTES,
    AppArgs,
    CandidateStatus,
    Fallback,
    GenerateRequest,
    GenerateResponse,
    ImagesRequest,
    PoolResponse,
    RouteDecision,
    RouteRequest,
    RouteResponse,
)

log = logging.getLogger("catimage.serve")

__all__ = ["AppArgs", "BudgetCoordinator", "Generator", "Router", "build_app", "deployment_name", "fastapi_app"]

GLOBAL_KEY = "*"
"""The budget controller's key for the whole deployment (keys without a budget of their own)."""

WARMUP_PROMPTS = ["a photo of a cat", 'a neon sign that reads "OPEN" above a rainy street at night, photo']


def _native_size(cand: Candidate) -> str | None:
    """WIDTHxHEIGHT a candidate draws at, when its generator block says (for the OpenAI `size`)."""
    gen = cand.generator
    if gen is None:
        return None
    if getattr(gen, "kind", None) == "http":
        return gen.size
    width, height = getattr(gen, "width", None), getattr(gen, "height", None)
    return f"{width}x{height}" if width and height else None


async def _resolve(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (what asyncio.wait_for cancels on timeout)."""
    return await response


# ---------------------------------------------------------------------------------------------
# Router deployment (FastAPI ingress)
# ---------------------------------------------------------------------------------------------

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
class Drawn:
    """One successful draw and how it came about."""

    candidate: str
    png: bytes | None
    tried: list[dict[str, str]] = field(default_factory=list)
    generate_ms: float = 0.0

    def fallback(self) -> Fallback | None:
        if not self.tried:
            return None
        return Fallback(**{"from": self.tried[0]["candidate"], "reason": self.tried[0]["reason"], "tried": self.tried})


@dataclass
class Choice:
    """A routing decision for one prompt: predictions, lambda, ranking (best first)."""

    predicted: dict[str, float]
    lam: float
    ranking: list[str]
    controlled_key: str | None = None


@serve.deployment
@serve.ingress(fastapi_app)
class Router:
    """Loads the router bundle once; per request: embed, predict, choose, call the generator."""

    def __init__(
        self, args: dict[str, Any], generators: Mapping[str, DeploymentHandle], coordinator: DeploymentHandle | None = None,
    ) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        from catimage.features.registry import make_embedder
        from catimage.model.router_model import RouterModel
        from catimage.policy.routing import max_precise_lambda
        from serve.embedding_cache import LruEmbeddingCache

        self.args = AppArgs.model_validate(args)
        self.model = RouterModel.load(self.args.model_dir)
        if self.args.embedder_overrides:
            spec = {**self.model.embedder.spec, **self.args.embedder_overrides}
            if spec.get("name") == "tfidf":
                raise CatimageError("embedder_overrides cannot change a fitted tfidf embedder; drop them")
            self.model.embedder = make_embedder(**spec)
        if self.args.embedding_cache_size:
            self.model.embedder = LruEmbeddingCache(self.model.embedder, self.args.embedding_cache_size)
        self.keys = ApiKeys.from_env(self.args.auth_token_env)
        pool = load_pool(self.args.pool)
        cands = {name: pool.get(name) for name in self.model.candidates}
        self.timeouts = {name: c.serve.request_timeout_s for name, c in cands.items()}
        self.slots_per_replica = {name: max(c.serve.max_batch_size, 1) for name, c in cands.items()}
        self.sizes = {name: _native_size(c) for name, c in cands.items()}
        self.generators = dict(generators)
        self.coordinator = coordinator
        self.costs = {c: float(v) for c, v in zip(self.model.candidates, self.model.costs)}
        self.in_flight = {c: 0 for c in self.model.candidates}
        self.service_s = {c: self.args.load_aware.service_s_prior for c in self.model.candidates}
        # Lambda beyond which the rule cannot resolve a millionth of the metric's training range in
        # float64, and the lambda that already routes every calibration prompt to the cheapest.
        spread = float(self.model.scaler.high - self.model.scaler.low)
        self.lam_precise_max = max_precise_lambda(self.model.costs, 1e-6 * spread)
        self.lam_saturated = float(self.model.lambda_for_budget(float(self.model.costs.min())))
        # One thread for the model: embedding + prediction run off the event loop (so requests keep
        # flowing to the generators) but never concurrently with each other (no CPU oversubscription).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-model")
        self._decide_batch.set_max_batch_size(self.args.decision_batch_size)
        self._lambda_cache: dict[float, float] = {}
        self._status: tuple[float, Any] | None = None
        self._ctrl_lam: dict[str, float] = {}
        self._ctrl_pending: dict[str, list[float]] = {}
        self._ctrl_state: dict[str, dict[str, Any]] = {}
        self._background: asyncio.Task | None = None
        budget = self.args.controller_budget()
        if budget is not None:
            per_key = self.args.budget_controller.per_key_budgets
            self._ctrl_lam = {GLOBAL_KEY: self._lambda_for(budget)}
            self._ctrl_lam.update({k: self._lambda_for(t) for k, t in per_key.items()})
        if self.args.budget is not None:
            self._lambda_for(self.args.budget)  # fail at start-up, not on the first request
        tags = ("candidate",)
        self.m_requests = Counter("catimage_requests", "Generate requests answered, by candidate that drew.", tags)
        self.m_cost = Counter("catimage_cost", "Cost spent, in the pool's cost unit, by candidate.", tags)
        self.m_fallbacks = Counter("catimage_fallbacks", "Generator calls that failed and fell back.", tags)
        self.m_quality = Histogram(
            "catimage_predicted_quality_scaled",
            "Predicted quality of the chosen candidate, min-max scaled to [0, 1] on the training split.",
            boundaries=[round(0.1 * i, 1) for i in range(1, 11)],
            tag_keys=tags,
        )
        self.m_latency = Histogram(
            "catimage_router_latency_ms", "Time to choose a candidate (embed + predict + rule).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("endpoint",),
        )
        self.m_in_flight = Gauge("catimage_in_flight", "Requests outstanding at each candidate (this router replica).", tags)
        self.warmup_s: float | None = None
        if self.args.warmup:
            self._warm_up()
        log.info("router ready: candidates %s, generators %s", self.model.candidates, sorted(self.generators))

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

    # --- lambda -----------------------------------------------------------------------------
    def _lambda_for(self, budget: float) -> float:
        """lambda for a budget, cached (calibration sorts the whole calibration set); bounded so that
        clients sending many distinct budgets cannot grow it without limit."""
        if budget not in self._lambda_cache:
            if len(self._lambda_cache) >= 1024:
                self._lambda_cache.pop(next(iter(self._lambda_cache)))
            self._lambda_cache[budget] = float(self.model.lambda_for_budget(budget))
        return self._lambda_cache[budget]

    def _check_lambda(self, lam: float) -> float:
        if lam > self.lam_precise_max:
            raise HTTPException(
                status_code=422,
                detail=(
                    f"lambda {lam:g} is too large: above {self.lam_precise_max:.3g} the rule cannot tell candidates' "
                    f"predicted quality apart in floating point; any lambda above {self.lam_saturated:.3g} already "
                    "routes every prompt to the cheapest candidate"
                ),
            )
        return lam

    def _resolve_lambda(self, budget: float | None, lam: float | None, key: str | None) -> tuple[float, str | None]:
        """(lambda, controller key or None): request lambda > request budget > controller > defaults."""
        if lam is not None:
            return self._check_lambda(float(lam)), None
        if budget is not None:
            return self._lambda_for(budget), None
        if self._ctrl_lam:
            ctrl_key = key if key in self._ctrl_lam else GLOBAL_KEY
            return self._ctrl_lam[ctrl_key], ctrl_key
        if self.args.lambda_ is not None:
            return self._check_lambda(float(self.args.lambda_)), None
        if self.args.budget is not None:
            return self._lambda_for(self.args.budget), None
        return 0.0, None

    # --- the model thread -------------------------------------------------------------------
    def _predict(self, prompts: list[str]) -> np.ndarray:
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
    def _guard(self, what: str) -> Iterator[None]:
        """Client mistakes -> 422; anything else -> 500 with an error id and no internals (the log has them)."""
        try:
            yield
        except HTTPException:
            raise
        except CatimageError as err:  # BudgetError: below the cheapest candidate, not a number, ...
            raise HTTPException(status_code=422, detail=str(err)) from None
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
            self._running_replicas(deployment_name(n)) * self.slots_per_replica[n] / routers if n in self.generators else 0
            for n in names
        ]
        wait = expected_wait_s([self.in_flight[n] for n in names], slots, [self.service_s[n] for n in names],
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
                          load_aware: bool) -> tuple[Choice, float]:
        start = time.perf_counter()
        with self._guard("choosing a candidate"):
            lam_used, ctrl_key = self._resolve_lambda(budget, lam, key)
            pred = await self._decide_batch(prompt)
            choice = self._choices(pred[None, :], lam_used, self._penalty() if load_aware else None, ctrl_key)[0]
        router_ms = (time.perf_counter() - start) * 1000
        self.m_latency.observe(router_ms, tags={"endpoint": "generate"})
        return choice, router_ms

    # --- generation -------------------------------------------------------------------------
    async def _call_generator(self, candidate: str, prompt: str, seed: int, want_image: bool) -> bytes | None:
        handle = self.generators[candidate]
        response = handle.remote(prompt, seed, want_image)
        alone = self.in_flight[candidate] == 0  # no queue ahead (as far as this router knows)
        self.in_flight[candidate] += 1
        self.m_in_flight.set(self.in_flight[candidate], tags={"candidate": candidate})
        start = time.perf_counter()
        try:
            png = await asyncio.wait_for(_resolve(response), timeout=self.timeouts[candidate])
        except asyncio.TimeoutError:
            response.cancel()
            raise
        finally:
            self.in_flight[candidate] -= 1
            self.m_in_flight.set(self.in_flight[candidate], tags={"candidate": candidate})
        if alone:  # service time, not queueing: the load term multiplies it by the queue itself
            took = time.perf_counter() - start
            self.service_s[candidate] = 0.8 * self.service_s[candidate] + 0.2 * took
        return png

    async def _draw(self, prompt: str, order: list[str], seed: int, want_image: bool) -> Drawn:
        """Try candidates in `order` (a dead replica is retried first); 503 when all fail."""
        tried: list[dict[str, str]] = []
        start = time.perf_counter()
        for candidate in order:
            if candidate not in self.generators:
                tried.append({"candidate": candidate, "reason": "no generator configured for it in the pool"})
                continue
            for attempt in range(self.args.replica_death_retries + 1):
                try:
                    png = await self._call_generator(candidate, prompt, seed, want_image)
                except asyncio.TimeoutError:
                    reason = f"timed out after {self.timeouts[candidate]:g} s (request_timeout_s)"
                except Exception as err:  # noqa: BLE001 - any generator failure is a reason to fall back
                    reason = public_reason(err)
                    log.warning("generator %s failed: %s", candidate, err)
                    if replica_died(err) and attempt < self.args.replica_death_retries:
                        tried.append({"candidate": candidate, "reason": reason + "; retried"})
                        continue
                else:
                    self.m_requests.inc(1, tags={"candidate": candidate})
                    self.m_cost.inc(self.costs[candidate], tags={"candidate": candidate})
                    return Drawn(candidate, png, tried, (time.perf_counter() - start) * 1000)
                break
            self.m_fallbacks.inc(1, tags={"candidate": candidate})
            tried.append({"candidate": candidate, "reason": reason})
        summary = "; ".join(f"{t['candidate']}: {t['reason']}" for t in tried)
        raise HTTPException(
            status_code=503,
            detail=f"every candidate failed, no image was drawn ({summary}); retry later or check the generator deployments",
            headers={"Retry-After": str(int(np.ceil(self.args.retry_after_s)))},
        )

    def _record(self, choice: Choice, drawn: Drawn) -> None:
        """Metrics, and the realised cost for the budget controller."""
        scaled = float(self.model.scaler.transform([choice.predicted[drawn.candidate]])[0])
        self.m_quality.observe(scaled, tags={"candidate": drawn.candidate})
        if choice.controlled_key is not None:
            self._ctrl_pending.setdefault(choice.controlled_key, []).append(self.costs[drawn.candidate])

    def _check_candidate(self, candidate: str | None) -> None:
        if candidate is not None and candidate not in self.costs:
            raise HTTPException(
                status_code=422, detail=f"unknown candidate {candidate!r}; choose one of {self.model.candidates}"
            )

    @fastapi_app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=False)
    async def generate(self, req: GenerateRequest, request: Request) -> GenerateResponse:
        """Route one prompt, draw it with the chosen candidate (falling back down the ranking on failure)."""
        from catimage.generators import generation_seed
        from catimage.tables.table import stable_prompt_id

        key = self._authorize(request)
        self._ensure_background()
        self._check_candidate(req.candidate)
        choice, router_ms = await self._choose_one(req.prompt, req.budget, req.lambda_, key, req.candidate is None)
        order = list(choice.ranking)
        if req.candidate is not None:
            order = [req.candidate] + [c for c in order if c != req.candidate]
        seed = req.seed if req.seed is not None else int(generation_seed(stable_prompt_id(req.prompt), 0))
        drawn = await self._draw(req.prompt, order, seed, req.return_ == "png_base64")
        self._record(choice, drawn)
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
        with self._guard("routing"):
            lam, ctrl_key = self._resolve_lambda(req.budget, req.lambda_, key)
            pred = await self._predict_many(req.prompts)
            choices = self._choices(pred, lam, None, ctrl_key)
        self.m_latency.observe((time.perf_counter() - start) * 1000, tags={"endpoint": "route"})
        out = [
            RouteDecision(
                prompt=p, candidate=c.ranking[0], cost=self.costs[c.ranking[0]], predicted_quality=c.predicted,
                ranking=c.ranking, **{"lambda": c.lam},
            )
            for p, c in zip(req.prompts, choices)
        ]
        return RouteResponse(
            decisions=out,
            mean_cost=sum(d.cost for d in out) / len(out),
            cost_unit=self.model.cost_unit,
            metric=self.model.metric,
        )

    # --- the OpenAI Images API --------------------------------------------------------------
    def _parse_model(self, model: str, header_budget: str | None) -> tuple[str | None, float | None, float | None]:
        """(pinned candidate or None, budget, lambda) from `model` and the X-Catimage-Budget header."""
        from serve.schemas import BudgetOrLambda

        budget = lam = None
        name, _, suffix = model.partition(":")
        if name != "auto":
            if model not in self.costs:
                raise HTTPException(
                    status_code=404,
                    detail=f"model {model!r} does not exist here; use 'auto' (route), 'auto:budget=B', "
                    f"'auto:lambda=L' or one of {self.model.candidates}",
                )
            return model, None, None
        if suffix:
            what, eq, value = suffix.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = None
            if not eq or what not in ("budget", "lambda") or number is None:
                raise HTTPException(status_code=422, detail=f"model {model!r}: write auto, auto:budget=B or auto:lambda=L")
            budget, lam = (number, None) if what == "budget" else (None, number)
        if header_budget is not None:
            try:
                number = float(header_budget)
            except ValueError:
                raise HTTPException(status_code=422, detail="X-Catimage-Budget must be a number") from None
            if budget is not None or lam is not None:
                raise HTTPException(status_code=422, detail="give the budget once: in the model suffix or in X-Catimage-Budget")
            budget = number
        try:  # the same checks as /v1/generate's budget and lambda (finite, >= 0)
            checked = BudgetOrLambda.model_validate({"budget": budget, "lambda": lam})
        except ValueError as err:
            raise HTTPException(status_code=422, detail=f"model {model!r}: {err}") from None
        return None, checked.budget, checked.lambda_

    @fastapi_app.post("/v1/images/generations")
    async def images_generations(self, req: ImagesRequest, request: Request) -> JSONResponse:
        """OpenAI-compatible: `model` 'auto' routes (budget from 'auto:budget=B' or X-Catimage-Budget)."""
        key = self._authorize(request)
        self._ensure_background()
        if req.response_format == "url":
            raise HTTPException(status_code=400, detail="response_format 'url' is not offered (no image store); use b64_json")
        pinned, budget, lam = self._parse_model(req.model, request.headers.get("x-catimage-budget"))
        choice, router_ms = await self._choose_one(req.prompt, budget, lam, key, pinned is None)
        order = list(choice.ranking)
        if pinned is not None:
            order = [pinned] + [c for c in order if c != pinned]
        if req.size not in (None, "auto"):
            fits = [c for c in order if self.sizes.get(c) == req.size]
            if not fits:
                sizes = sorted({s for s in self.sizes.values() if s})
                raise HTTPException(status_code=400, detail=f"size {req.size!r} is not offered; this pool draws {sizes}")
            order = fits
        from catimage.generators import generation_seed
        from catimage.tables.table import stable_prompt_id

        base = int(generation_seed(stable_prompt_id(req.prompt), 0))
        # The first image decides the candidate (and its fallbacks); the others follow it.
        first = await self._draw(req.prompt, order, base, True)
        rest = await asyncio.gather(
            *(self._draw(req.prompt, [first.candidate] + [c for c in order if c != first.candidate], base + i, True)
              for i in range(1, req.n))
        )
        for drawn in (first, *rest):
            self._record(choice, drawn)
        body = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(d.png).decode("ascii"), "revised_prompt": None} for d in (first, *rest)],
            "catimage": {
                "candidate": first.candidate,
                "candidates": [d.candidate for d in (first, *rest)],
                "cost": sum(self.costs[d.candidate] for d in (first, *rest)),
                "cost_unit": self.model.cost_unit,
                "lambda": choice.lam,
                "predicted_quality": choice.predicted,
                "fallback": first.fallback().model_dump(by_alias=True) if first.tried else None,
                "router_ms": router_ms,
            },
        }
        return JSONResponse(body, headers={"X-Catimage-Candidate": first.candidate})

    # --- background: budget controller sync, replica counts ----------------------------------
    def _ensure_background(self) -> None:
        if self._background is None or self._background.done():
            if self._ctrl_lam or self.args.load_aware.mu > 0:
                self._background = asyncio.get_running_loop().create_task(self._background_loop())

    async def _background_loop(self) -> None:
        interval = self.args.budget_controller.sync_interval_s if self.args.budget_controller else self.args.status_cache_s
        while True:
            try:
                if self._ctrl_lam and self.coordinator is not None:
                    pending, self._ctrl_pending = self._ctrl_pending, {}
                    self._ctrl_lam.update(await self.coordinator.sync.remote(pending))
                if self.args.load_aware.mu > 0:
                    await self._serve_status()
            except Exception as err:  # noqa: BLE001 - keep routing with the last lambda
                log.warning("background sync failed (%s); keeping the last lambda", err)
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

    @fastapi_app.get("/v1/pool", response_model=PoolResponse)
    async def pool(self, request: Request) -> PoolResponse:
        """Candidates, costs, live replica counts (serve.status()), in-flight counts, controller state."""
        self._authorize(request)
        status = await self._serve_status()
        app_name = serve.get_replica_context().app_name
        app_status = status.applications.get(app_name)
        deployments = app_status.deployments if app_status is not None else {}
        rows = []
        for name in self.model.candidates:
            dep = deployment_name(name) if name in self.generators else None
            overview = deployments.get(dep) if dep else None
            replicas = {str(getattr(k, "value", k)): int(v) for k, v in (overview.replica_states if overview else {}).items()}
            rows.append(
                CandidateStatus(
                    name=name,
                    cost=self.costs[name],
                    deployment=dep,
                    replicas=replicas,
                    running_replicas=replicas.get("RUNNING", 0),
                    in_flight=self.in_flight[name],
                    deployment_status=str(getattr(overview.status, "value", overview.status)) if overview else None,
                )
            )
        controller = None
        if self.coordinator is not None:
            try:
                controller = await self.coordinator.state.remote()
            except Exception as err:  # noqa: BLE001
                log.warning("budget coordinator unreachable (%s)", err)
                controller = {k: {"lambda": v, "stale": True} for k, v in self._ctrl_lam.items()}
        return PoolResponse(
            cost_unit=self.model.cost_unit,
            metric=self.model.metric,
            candidates=rows,
            default_budget=self.args.budget,
            default_lambda=self.args.lambda_,
            application_status=str(getattr(app_status.status, "value", app_status.status)) if app_status else None,
            budget_controller=controller,
            load_aware_mu=self.args.load_aware.mu,
        )

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "candidates": self.model.candidates, "generators": sorted(self.generators),
                "warmup_s": self.warmup_s}


# ---------------------------------------------------------------------------------------------
# Application builder
# ---------------------------------------------------------------------------------------------


def _model_candidates(model_dir: str) -> list[str]:
    """Candidate names of a router bundle, read from its router.json without loading any weights."""
    meta = Path(model_dir) / "router.json"
    if not meta.is_file():
        raise CatimageError(
            f"{model_dir} is not a catimage model directory (no router.json); create one with "
            "`catimage fit` or `catimage train`, and give its path as model_dir"
        )
    return list(json.loads(meta.read_text())["candidates"])


def generator_options(
    cand: Candidate, overrides: Mapping[str, Any] | None = None, max_queued_requests: int = -1, retry_after_s: float | None = None,
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
    }


def build_app(args: AppArgs | Mapping[str, Any]) -> serve.Application:
    """The application `serve run serve/config.yaml` deploys: one Router + one Generator per candidate
    (+ a BudgetCoordinator when `budget_controller` is set).

    Candidates are the model's; each must be declared in the pool. A candidate without a `generator:`
    block gets no deployment: the router still predicts it but falls back past it.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args))
    pool = load_pool(args.pool)
    candidates = _model_candidates(args.model_dir)
    missing = [c for c in candidates if c not in pool.names]
    if missing:
        raise PoolError(
            f"the model at {args.model_dir} routes to {missing}, which the pool {args.pool} does not declare; "
            "serve with the pool file the model was trained on"
        )
    handles = {}
    for name in candidates:
        cand = pool.get(name)
        if cand.generator is None:
            log.warning("candidate %s has no generator block: it will be predicted but never drawn", name)
            continue
        options = generator_options(cand, args.autoscaling_overrides, args.generator_max_queued_requests, args.retry_after_s)
        handles[name] = Generator.options(**options).bind(
            name, cand.generator.model_dump(mode="json"), args.device,
            cand.serve.max_batch_size, cand.serve.batch_wait_timeout_s,
        )
    coordinator = None
    budget = args.controller_budget()
    if budget is not None:
        ctrl = args.budget_controller
        budgets = {GLOBAL_KEY: budget, **ctrl.per_key_budgets}
        config = {"window": ctrl.window, "ki": ctrl.ki, "kp": ctrl.kp, "max_step": ctrl.max_step}
        coordinator = BudgetCoordinator.bind(args.model_dir, budgets, config)
    router = Router.options(
        ray_actor_options={"num_cpus": args.router_num_cpus},
        num_replicas=args.router_num_replicas,
        max_ongoing_requests=args.router_max_ongoing_requests,
        max_queued_requests=args.router_max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=args.retry_after_s),
    )
    return router.bind(args.model_dump(by_alias=True), handles, coordinator)
