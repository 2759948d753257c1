"""The Serve application: a FastAPI router deployment in front of one generator deployment per candidate.

    client --HTTP--> Router (embeds, predicts, applies argmax_m q_m - lambda c_m)
                        |--DeploymentHandle--> Generator-<candidate A>  (autoscaled, own resources)
                        |--DeploymentHandle--> Generator-<candidate B>
                        ...

Choosing the candidate happens in the Router, not in Serve's request router (which only picks a
replica inside one deployment). Each generator deployment takes its resources, batching and
autoscaling from its candidate's `serve:` block in the pool file, so a cheap model scales on cheap
hardware and an expensive one on GPUs. When a generator fails or runs past its
`request_timeout_s`, the router falls back to the next candidate of the decision's ranking and says
so in the answer; only when every candidate fails does it answer 503.

Run it with `serve run serve/config.yaml` (see docs/serving.md) or `build_app(AppArgs(...))`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime
# and Serve's class-based ingress rewrites the methods' signatures, so string annotations would
# leave FastAPI unable to resolve the request models (it then expects them as query parameters).
import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from catimage.errors import CatimageError, PoolError
from catimage.pool import Candidate, load_pool
from serve.schemas import (
    AppArgs,
    CandidateStatus,
    Fallback,
    GenerateRequest,
    GenerateResponse,
    PoolResponse,
    RouteDecision,
    RouteRequest,
    RouteResponse,
)

log = logging.getLogger("catimage.serve")

__all__ = ["AppArgs", "Generator", "Router", "build_app", "deployment_name", "fastapi_app"]


def deployment_name(candidate: str) -> str:
    """The Serve deployment that draws `candidate` (Serve forbids '#' in names)."""
    return "Generator-" + candidate.replace("#", "_")


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _short_error(err: BaseException) -> str:
    """One line for the client: Ray wraps replica errors in a long traceback; keep its last line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}"[:300]


async def _resolve(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (what asyncio.wait_for cancels on timeout)."""
    return await response


# ---------------------------------------------------------------------------------------------
# Generator deployment
# ---------------------------------------------------------------------------------------------


@serve.deployment
class Generator:
    """One candidate's text-to-image model. Returns PNG bytes, or None when the caller wants none.

    Calls are serialised per replica (a diffusers pipeline keeps per-call scheduler state), so
    concurrency comes from replicas; with `max_batch_size > 1` concurrent requests are drawn as one
    batch through `@serve.batch`.
    """

    def __init__(
        self, candidate: str, spec: dict[str, Any], device: str | None = None,
        max_batch_size: int = 1, batch_wait_timeout_s: float = 0.01,
    ) -> None:
        from catimage.generators import make_generator
        from catimage.generators.spec import parse_generator_spec

        self.candidate = candidate
        self._generator = make_generator(parse_generator_spec(spec), device=device)
        self._lock = asyncio.Lock()
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._batched = max_batch_size > 1
        if self._batched:
            self._draw_batch.set_max_batch_size(max_batch_size)
            self._draw_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("generator %s ready (max_batch_size=%d)", candidate, max_batch_size)

    def _draw(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        self._stats["batches"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(prompts))
        images = self._generator.generate(prompts, seeds)
        if len(images) != len(prompts):
            raise RuntimeError(f"generator {self.candidate} returned {len(images)} images for {len(prompts)} prompts")
        return images

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _draw_batch(self, items: list[tuple[str, int]]) -> list[Any]:
        prompts = [p for p, _ in items]
        seeds = [s for _, s in items]
        return await asyncio.to_thread(self._draw, prompts, seeds)

    def stats(self) -> dict[str, int]:
        """Requests and generate() calls this replica served (through a handle: `.stats.remote()`)."""
        return dict(self._stats)

    async def __call__(self, prompt: str, seed: int, want_image: bool = True) -> bytes | None:
        self._stats["requests"] += 1
        if self._batched:
            image = await self._draw_batch((prompt, seed))
        else:
            async with self._lock:
                image = (await asyncio.to_thread(self._draw, [prompt], [seed]))[0]
        if not want_image:
            return None
        return await asyncio.to_thread(_png_bytes, image)


# ---------------------------------------------------------------------------------------------
# Router deployment (FastAPI ingress)
# ---------------------------------------------------------------------------------------------

fastapi_app = FastAPI(
    title="catimage router",
    version="1",
    description=(
        "Routes each prompt to the cheapest text-to-image candidate that is predicted to draw it well: "
        "argmax_m predicted_quality_m(prompt) - lambda * cost_m, with lambda set from a cost budget."
    ),
)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One readable sentence per problem; malformed JSON is a 400, a well-formed but invalid body a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(status_code=400, content={"detail": "the request body is not valid JSON", "errors": _jsonable(errors)})
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see /docs for the fields this endpoint takes)"
        parts.append(f"{where}: {msg}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(parts), "errors": _jsonable(errors)})


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors without the echoed input (a 2000-character prompt does not need to come back)."""
    return [{"type": str(e.get("type")), "loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg"))} for e in errors]


@serve.deployment
@serve.ingress(fastapi_app)
class Router:
    """Loads the router bundle once; per request: embed, predict, choose, call the generator."""

    def __init__(self, args: dict[str, Any], generators: Mapping[str, DeploymentHandle]) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        from catimage.router_model import RouterModel

        self.args = AppArgs.model_validate(args)
        self.model = RouterModel.load(self.args.model_dir)
        pool = load_pool(self.args.pool)
        self.timeouts = {name: pool.get(name).serve.request_timeout_s for name in self.model.candidates}
        self.generators = dict(generators)
        self.costs = {c: float(v) for c, v in zip(self.model.candidates, self.model.costs)}
        self.in_flight = {c: 0 for c in self.model.candidates}
        # One thread for the model: embedding + prediction run off the event loop (so requests keep
        # flowing to the generators) but never concurrently with each other (no CPU oversubscription).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-model")
        self._lambda_cache: dict[float, float] = {}
        self._status: tuple[float, Any] | None = None
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
        log.info("router ready: candidates %s, generators %s", self.model.candidates, sorted(self.generators))

    # --- routing ----------------------------------------------------------------------------
    def _lambda_for(self, budget: float) -> float:
        """lambda for a budget, cached (calibration sorts the whole calibration set); bounded so that
        clients sending many distinct budgets cannot grow it without limit."""
        if budget not in self._lambda_cache:
            if len(self._lambda_cache) >= 1024:
                self._lambda_cache.pop(next(iter(self._lambda_cache)))
            self._lambda_cache[budget] = float(self.model.lambda_for_budget(budget))
        return self._lambda_cache[budget]

    def _resolve_lambda(self, budget: float | None, lam: float | None) -> float:
        if lam is not None:
            return float(lam)
        if budget is not None:
            return self._lambda_for(budget)
        if self.args.lambda_ is not None:
            return float(self.args.lambda_)
        if self.args.budget is not None:
            return self._lambda_for(self.args.budget)
        return 0.0

    async def _decide(self, prompts: list[str], budget: float | None, lam: float | None, endpoint: str) -> list[Any]:
        start = time.perf_counter()

        def work() -> list[Any]:
            return self.model.decide(prompts, lam=self._resolve_lambda(budget, lam))

        try:
            decisions = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except CatimageError as err:  # BudgetError: below the cheapest candidate, not a number, ...
            raise HTTPException(status_code=422, detail=str(err)) from None
        self.m_latency.observe((time.perf_counter() - start) * 1000, tags={"endpoint": endpoint})
        return decisions

    # --- generation -------------------------------------------------------------------------
    async def _call_generator(self, candidate: str, prompt: str, seed: int, want_image: bool) -> bytes | None:
        handle = self.generators[candidate]
        response = handle.remote(prompt, seed, want_image)
        self.in_flight[candidate] += 1
        self.m_in_flight.set(self.in_flight[candidate], tags={"candidate": candidate})
        try:
            return await asyncio.wait_for(_resolve(response), timeout=self.timeouts[candidate])
        except asyncio.TimeoutError:
            response.cancel()
            raise
        finally:
            self.in_flight[candidate] -= 1
            self.m_in_flight.set(self.in_flight[candidate], tags={"candidate": candidate})

    @fastapi_app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=False)
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Route one prompt, draw it with the chosen candidate (falling back down the ranking on failure)."""
        from catimage.generators import generation_seed
        from catimage.table import stable_prompt_id

        if req.candidate is not None and req.candidate not in self.costs:
            raise HTTPException(
                status_code=422, detail=f"unknown candidate {req.candidate!r}; choose one of {self.model.candidates}"
            )
        start = time.perf_counter()
        decision = (await self._decide([req.prompt], req.budget, req.lambda_, "generate"))[0]
        router_ms = (time.perf_counter() - start) * 1000
        order = list(decision.ranking)
        if req.candidate is not None:
            order = [req.candidate] + [c for c in order if c != req.candidate]
        seed = req.seed if req.seed is not None else int(generation_seed(stable_prompt_id(req.prompt), 0))
        want_image = req.return_ == "png_base64"
        tried: list[dict[str, str]] = []
        gen_start = time.perf_counter()
        for candidate in order:
            if candidate not in self.generators:
                tried.append({"candidate": candidate, "reason": "no generator configured for it in the pool"})
                continue
            try:
                png = await self._call_generator(candidate, req.prompt, seed, want_image)
            except asyncio.TimeoutError:
                reason = f"timed out after {self.timeouts[candidate]:g} s (request_timeout_s)"
            except Exception as err:  # noqa: BLE001 - any generator failure is a reason to fall back
                reason = _short_error(err)
            else:
                self.m_requests.inc(1, tags={"candidate": candidate})
                self.m_cost.inc(self.costs[candidate], tags={"candidate": candidate})
                scaled = float(self.model.scaler.transform([decision.predicted[candidate]])[0])
                self.m_quality.observe(scaled, tags={"candidate": candidate})
                fallback = None
                if tried:
                    fallback = Fallback(**{"from": tried[0]["candidate"], "reason": tried[0]["reason"], "tried": tried})
                return GenerateResponse(
                    candidate=candidate,
                    predicted_quality=decision.predicted,
                    metric=self.model.metric,
                    cost=self.costs[candidate],
                    cost_unit=self.model.cost_unit,
                    **{"lambda": decision.lam},
                    seed=seed,
                    image=base64.b64encode(png).decode("ascii") if png is not None else None,
                    fallback=fallback,
                    router_ms=router_ms,
                    generate_ms=(time.perf_counter() - gen_start) * 1000,
                )
            log.warning("generator %s failed (%s); falling back", candidate, reason)
            self.m_fallbacks.inc(1, tags={"candidate": candidate})
            tried.append({"candidate": candidate, "reason": reason})
        summary = "; ".join(f"{t['candidate']}: {t['reason']}" for t in tried)
        raise HTTPException(
            status_code=503,
            detail=f"every candidate failed, no image was drawn ({summary}); retry later or check the generator deployments",
        )

    @fastapi_app.post("/v1/route", response_model=RouteResponse)
    async def route(self, req: RouteRequest) -> RouteResponse:
        """Decisions only, for a batch of prompts (one batched prediction)."""
        decisions = await self._decide(req.prompts, req.budget, req.lambda_, "route")
        out = [
            RouteDecision(
                prompt=d.prompt, candidate=d.candidate, cost=d.cost, predicted_quality=d.predicted,
                ranking=d.ranking, **{"lambda": d.lam},
            )
            for d in decisions
        ]
        return RouteResponse(
            decisions=out,
            mean_cost=sum(d.cost for d in decisions) / len(decisions),
            cost_unit=self.model.cost_unit,
            metric=self.model.metric,
        )

    # --- status -----------------------------------------------------------------------------
    async def _serve_status(self) -> Any:
        now = time.monotonic()
        if self._status is None or now - self._status[0] > self.args.status_cache_s:
            self._status = (now, await asyncio.to_thread(serve.status))
        return self._status[1]

    @fastapi_app.get("/v1/pool", response_model=PoolResponse)
    async def pool(self) -> PoolResponse:
        """Candidates, costs, live replica counts (serve.status()) and this router's in-flight counts."""
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
        return PoolResponse(
            cost_unit=self.model.cost_unit,
            metric=self.model.metric,
            candidates=rows,
            default_budget=self.args.budget,
            default_lambda=self.args.lambda_,
            application_status=str(getattr(app_status.status, "value", app_status.status)) if app_status else None,
        )

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "candidates": self.model.candidates, "generators": sorted(self.generators)}


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


def generator_options(cand: Candidate, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Serve deployment options for one candidate, from its pool `serve:` block."""
    s = cand.serve
    auto = s.autoscaling.model_dump(exclude_none=True)
    auto.update(overrides or {})
    return {
        "name": deployment_name(cand.name),
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "autoscaling_config": auto,
    }


def build_app(args: AppArgs | Mapping[str, Any]) -> serve.Application:
    """The application `serve run serve/config.yaml` deploys: one Router + one Generator per candidate.

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
        handles[name] = Generator.options(**generator_options(cand, args.autoscaling_overrides)).bind(
            name, cand.generator.model_dump(mode="json"), args.device,
            cand.serve.max_batch_size, cand.serve.batch_wait_timeout_s,
        )
    router = Router.options(
        ray_actor_options={"num_cpus": args.router_num_cpus},
        num_replicas=args.router_num_replicas,
        max_ongoing_requests=args.router_max_ongoing_requests,
    )
    return router.bind(args.model_dump(by_alias=True), handles)
