"""Typed arguments of the Serve application and the HTTP request/response models.

Everything a client can get wrong is checked here, so that FastAPI answers a bad request with a
4xx and a message before any model runs (the router never turns a client mistake into a 500).
Limits are documented in docs/serving.md.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.log_deployment import LogServeArgs
from serve.scorer_deployment import ScorerServeArgs

MAX_PROMPT_CHARS = 2000
"""Longest prompt accepted. Text encoders read at most a few hundred tokens (CLIP: 77), so a longer
prompt only costs embedding time; 2000 characters is ~10x what a user usefully writes."""

MAX_ROUTE_PROMPTS = 256
"""Most prompts one `/v1/route` call may carry (one batched prediction)."""

MAX_SEED = 2**32 - 1

MAX_CANDIDATE_CHARS = 128
"""Longest candidate name a request may carry (pool names are short; this only bounds the echo)."""

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body (bytes): 256 prompts x 2000 characters, even written as JSON \\u escapes,
fit in ~3 MB. Larger bodies get 413 before they are read."""

MAX_IMAGES_N = 4
"""Most images one `/v1/images/generations` call may ask for."""


def _check_text(text: str, what: str) -> str:
    """Text must be encodable as UTF-8: JSON can carry a lone surrogate (`"\\ud800"`) that no
    tokenizer, generator or JSON encoder downstream can handle."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} is not valid Unicode text: it holds a lone surrogate (U+{ord(text[err.start]):04X}) at "
            f"character {err.start}; send UTF-8 text (a JSON \\ud83d\\ude00 pair is fine, half of one is not)"
        ) from None
    return text


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""C0 controls except tab, newline and carriage return; DEL; C1 controls. No tokenizer reads them
as text, and a NUL ends strings in C code downstream (a hosted API, a log line)."""


def _check_controls(text: str, what: str) -> str:
    found = _CONTROL.search(text)
    if found:
        raise ValueError(
            f"{what} holds a control character (U+{ord(found.group()):04X}) at character {found.start()}; "
            "send printable text (tab, newline and carriage return are allowed)"
        )
    return text


def _check_prompt(text: str) -> str:
    _check_text(text, "prompt")
    _check_controls(text, "prompt")
    if not text.strip():
        raise ValueError("prompt is empty; send the text to draw")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return text


def _no_bool(value: Any, what: str) -> Any:
    """JSON true/false are not numbers: pydantic would read `true` as 1.0, a silent wrong budget."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, not {str(value).lower()}")  # noqa: TRY004 - pydantic wants ValueError
    return value


def _check_finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return value


class BudgetOrLambda(BaseModel):
    """Either a cost budget (mean cost per prompt, in the pool's cost unit) or a lambda, never both."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    budget: float | None = Field(
        default=None, ge=0, strict=True, description="Average cost per prompt to stay within (the pool's cost unit)."
    )
    lambda_: float | None = Field(
        default=None, alias="lambda", ge=0, strict=True, description="Price of one cost unit in quality units."
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "budget")

    @field_validator("lambda_", mode="before")
    @classmethod
    def _lambda_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "lambda")

    @field_validator("budget")
    @classmethod
    def _budget_finite(cls, v: float | None) -> float | None:
        return _check_finite(v, "budget")

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, v: float | None) -> float | None:
        return _check_finite(v, "lambda")

    @model_validator(mode="after")
    def _not_both(self) -> BudgetOrLambda:
        if self.budget is not None and self.lambda_ is not None:
            raise ValueError("give either budget or lambda, not both")
        return self


POLICIES = ("route", "cascade")
MAX_ATTEMPTS = 8
"""Most attempts one request may ask for (`max_attempts`): each attempt is a generation and a scoring."""


class PolicyFields(BaseModel):
    """What a request may ask of the policy (docs/serving.md, "Policies").

    `policy`: `route` (one draw, decided before any image exists) or `cascade` (draw, score with the
    decision metric, accept or escalate; needs a cascade bundle); default: the app's `policy`.
    `min_quality`: accept no image below this decision score (the cascade's threshold, raised).
    `max_attempts`: at most this many draws. `parallel`: draw this many attempts at once and keep
    the best (lower latency, may pay for draws the sequential plan would not make).
    """

    model_config = ConfigDict(extra="forbid")

    policy: Literal["route", "cascade"] | None = Field(default=None, description="route | cascade; default: the app's.")
    min_quality: float | None = Field(
        default=None, strict=False, description="Cascade: accept no image whose decision score is below this."
    )
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS, strict=True,
                                     description=f"Cascade: at most this many draws (1..{MAX_ATTEMPTS}).")
    parallel: int = Field(default=1, ge=1, le=MAX_ATTEMPTS, strict=True,
                          description="Cascade: draw this many attempts at once and keep the best.")

    @field_validator("min_quality", mode="before")
    @classmethod
    def _min_quality_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "min_quality")

    @field_validator("min_quality")
    @classmethod
    def _min_quality_finite(cls, v: float | None) -> float | None:
        return _check_finite(v, "min_quality")

    @field_validator("max_attempts", "parallel", mode="before")
    @classmethod
    def _counts_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "max_attempts / parallel")


class GenerateRequest(BudgetOrLambda, PolicyFields):
    """`POST /v1/generate`: decide a plan for one prompt (route or cascade) and carry it out."""

    prompt: str = Field(description=f"Text to draw (1..{MAX_PROMPT_CHARS} characters).")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Sampling seed; default: the seed the build job used for this prompt's first sample.",
    )
    candidate: str | None = Field(
        default=None, max_length=MAX_CANDIDATE_CHARS, description="Skip routing and use this candidate (still falls back)."
    )
    return_: Literal["png_base64", "none"] = Field(
        default="png_base64", alias="return", description="png_base64: the image in the answer; none: only the decision."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _check_prompt(v)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "seed")

    @field_validator("candidate")
    @classmethod
    def _candidate(cls, v: str | None) -> str | None:
        return None if v is None else _check_text(v, "candidate")


class RouteRequest(BudgetOrLambda):
    """`POST /v1/route`: decisions for a batch of prompts, no generation (no exploration either)."""

    policy: Literal["route", "cascade"] | None = Field(
        default=None, description="route: the candidate per prompt; cascade: the plan per prompt. Default: the app's."
    )

    prompts: list[str] = Field(min_length=1, max_length=MAX_ROUTE_PROMPTS)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        for i, text in enumerate(v):
            try:
                _check_prompt(text)
            except ValueError as err:
                raise ValueError(f"prompts[{i}]: {err}") from None
        return v


class Fallback(BaseModel):
    """Why the answer comes from another candidate than the one first chosen."""

    from_: str = Field(alias="from", serialization_alias="from")
    reason: str
    tried: list[dict[str, str]] = Field(default_factory=list, description="Every failed attempt, in order.")

    model_config = ConfigDict(populate_by_name=True)


class PlanOut(BaseModel):
    """A plan on the wire: ordered attempts and the acceptance threshold (null: none)."""

    attempts: list[str]
    threshold: float | None


class AttemptOut(BaseModel):
    """One attempt of the plan as it was carried out."""

    candidate: str
    seed: int
    decision_score: float | None = Field(description="The decision metric's score; null when unscored.")
    scored: bool
    score_error: str | None = Field(default=None, description="Why there is no score although one was asked for.")
    draw_error: str | None = Field(default=None, description="Why no image was drawn (then it cost nothing).")
    cost: float = Field(description="Generation + scoring, in the pool's cost unit.")
    accepted: bool
    returned: bool
    wave: int
    generate_ms: float
    score_ms: float


class GenerateResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    candidate: str = Field(description="The candidate whose image is returned.")
    predicted_quality: dict[str, float]
    metric: str
    cost: float = Field(description="Realised cost of everything drawn and scored for this request.")
    cost_unit: str
    lambda_: float = Field(alias="lambda", serialization_alias="lambda")
    seed: int = Field(description="The returned image's seed.")
    image: str | None = Field(description="Base64 PNG, or null when return=none.")
    fallback: Fallback | None = None
    router_ms: float = Field(description="Time spent choosing (embedding + prediction + rule).")
    generate_ms: float
    policy: str = "route"
    plan: PlanOut | None = None
    attempts: list[AttemptOut] = Field(default_factory=list, description="Every attempt of the plan, in order.")
    returned: int = Field(default=0, description="Index into `attempts` of the returned image (a fallback draw is listed last).")
    decision_metric: str | None = None
    decision_score: float | None = Field(default=None, description="The returned image's decision score (null: unscored).")
    propensity: float = Field(default=1.0, description="Probability with which this plan was drawn (exploration).")
    explored: bool = False
    model_version: str | None = None
    request_id: str | None = Field(default=None, description="The served log's request_id of this request's rows.")


class RouteDecision(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    prompt: str
    candidate: str = Field(description="The candidate drawn first.")
    cost: float = Field(description="Route: the candidate's cost; cascade: the plan's expected cost.")
    lambda_: float = Field(alias="lambda", serialization_alias="lambda")
    predicted_quality: dict[str, float]
    ranking: list[str]
    plan: PlanOut | None = Field(default=None, description="Cascade: the plan this prompt would follow.")
    expected_quality: float | None = Field(default=None, description="Cascade: the plan's expected judge score.")


class RouteResponse(BaseModel):
    decisions: list[RouteDecision]
    mean_cost: float
    cost_unit: str
    metric: str
    policy: str = "route"
    model_version: str | None = None


class CandidateStatus(BaseModel):
    name: str
    cost: float
    deployment: str | None = Field(description="Serve deployment that draws it; null when the pool has no generator.")
    replicas: dict[str, int] = Field(description="Replica count by state, from serve.status().")
    running_replicas: int
    in_flight: int = Field(description="Requests this router replica has outstanding at this candidate.")
    deployment_status: str | None = None


class PoolResponse(BaseModel):
    cost_unit: str
    metric: str
    candidates: list[CandidateStatus]
    default_budget: float | None
    default_lambda: float | None
    application_status: str | None = None
    budget_controller: dict[str, dict[str, Any]] | None = Field(
        default=None, description="Per controlled key ('*' = the whole deployment): budget, lambda, window mean cost, ..."
    )
    load_aware_mu: float = Field(default=0.0, description="Price of one second of expected queueing (0 = off).")
    model_version: str | None = Field(default=None, description="The model this router replica serves (hot swap).")
    model_dir: str | None = None
    policies: list[str] = Field(default_factory=lambda: ["route"], description="Policies the served model offers.")
    default_policy: str = "route"
    decision_metric: str | None = None
    swap: dict[str, Any] | None = Field(default=None, description="The last hot swap asked for: done, or refused and why.")
    scorer: dict[str, Any] | None = Field(default=None, description="Scorer calls: failures by kind.")
    served_log: dict[str, Any] | None = Field(default=None, description="Served-log rows handed over, acknowledged, lost.")
    exploration: dict[str, Any] | None = None


class ImagesRequest(PolicyFields):
    """`POST /v1/images/generations`, the OpenAI Images API subset catimage serves.

    `model`: `auto` (the app's policy), `auto:budget=B` / `auto:lambda=L` (at that budget / lambda), or
    a candidate name (no choice; still falls back). The budget may also come in the
    `X-Catimage-Budget` header. `quality`, `style` and `user` are accepted and ignored. The policy
    fields of /v1/generate (`policy`, `min_quality`, `max_attempts`, `parallel`) are accepted as
    extra body fields (OpenAI SDK: `extra_body={...}`); each image is its own plan.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str = Field(default="auto", max_length=MAX_CANDIDATE_CHARS + 32)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_N, strict=True)
    size: str | None = Field(default=None, max_length=32, description="WIDTHxHEIGHT, 'auto' or absent.")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _check_prompt(v)

    @field_validator("n", mode="before")
    @classmethod
    def _n_not_bool(cls, v: Any) -> Any:
        return _no_bool(v, "n")

    @field_validator("model", "size", "quality", "style", "user")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return None if v is None else _check_text(v, "field")


class BudgetControllerArgs(BaseModel):
    """The online budget controller (catimage.policy.budget): holds the app's default budget over live traffic.

    Only requests that give neither `budget` nor `lambda` are controlled. `per_key_budgets` gives an
    API key (by its name, see `auth_token_env`) its own budget; other keys share the '*' controller.
    """

    model_config = ConfigDict(extra="forbid")

    budget: float | None = Field(default=None, gt=0, description="B, the average cost to hold; default: the app's `budget`.")
    window: int = Field(default=200, ge=1)
    ki: float = Field(default=0.02, ge=0)
    kp: float = Field(default=1.0, ge=0)
    max_step: float = Field(default=0.1, ge=0)
    sync_interval_s: float = Field(default=0.25, gt=0, description="How often each router replica syncs with the coordinator.")
    feed_forward: bool = Field(default=True, description="Commit each request's expected plan cost when it is decided "
                               "and correct by the realised cost when it ends (holds the budget with many requests "
                               "in flight); false: realised costs only.")
    per_key_budgets: dict[str, float] = Field(default_factory=dict)

    @field_validator("per_key_budgets")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not (math.isfinite(t) and t > 0)}
        if bad:
            raise ValueError(f"per-key budgets must be positive numbers, got {bad}")
        return v


class LoadAwareArgs(BaseModel):
    """Load-aware routing: utility = predicted quality - lambda * cost - mu * expected wait (seconds)."""

    model_config = ConfigDict(extra="forbid")

    mu: float = Field(default=0.0, ge=0, description="Quality units per second of expected queueing; 0 = off.")
    service_s_prior: float = Field(default=1.0, gt=0, description="Assumed seconds per draw before any was measured.")
    cold_start_s: float = Field(default=60.0, ge=0, description="Wait charged to a candidate with no running replica.")


class ExplorationArgs(BaseModel):
    """Exploration with known propensities (catimage.policy.explore; docs/serving.md "Exploration").

    A share `epsilon` of the requests the app decides (not pinned to a candidate) draws uniformly
    among the choices (candidates, or the request's Pareto plans) whose expected cost is at most
    `max_cost_factor` times the app's budget; the probability of what was drawn is logged.
    """

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(default=0.05, ge=0, le=1, description="Share of decided traffic that explores.")
    temperature: float | None = Field(default=None, gt=0, description="Softmax over utilities instead of the argmax.")
    max_cost_factor: float | None = Field(
        default=2.0, gt=0, description="Explore only choices expected to cost <= this x the budget (None: any).",
    )
    seed: int | None = Field(default=None, description="Seed of each router replica's draws (None: fresh).")


class AppArgs(BaseModel):
    """What `serve/config.yaml` (or `build_app`) passes to the application builder.

    HTTP host and port are not here: they are Serve's `http_options` in the config file.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model_dir: str = Field(description="Router bundle from `catimage fit` / `catimage train` (readable by the router).")
    pool: str = Field(description="Pool YAML: each candidate's generator block and serve resources.")
    budget: float | None = Field(default=None, ge=0, description="Default cost budget when a request gives none.")
    lambda_: float | None = Field(default=None, alias="lambda", ge=0, description="Default lambda (instead of a budget).")
    device: str | None = Field(default=None, description="Override every generator's device (cpu, cuda).")
    router_num_cpus: float = Field(default=0.5, ge=0, description="CPUs the router replica reserves (it embeds prompts).")
    router_num_replicas: int = Field(default=1, ge=1)
    router_max_ongoing_requests: int = Field(default=64, ge=1)
    status_cache_s: float = Field(default=1.0, ge=0, description="How long /v1/pool reuses one serve.status() answer.")
    autoscaling_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged into every generator's autoscaling_config (e.g. look_back_period_s for fast demos).",
    )
    auth_token_env: str | None = Field(
        default=None,
        description="Environment variable holding the API keys (`name:token,name2:token2` or one bare token); "
        "set: every /v1/* endpoint needs `Authorization: Bearer <token>`. Unset: no auth.",
    )
    budget_controller: BudgetControllerArgs | None = Field(
        default=None, description="Hold the default budget online (needs `budget` or a controller budget)."
    )
    load_aware: LoadAwareArgs = Field(default_factory=LoadAwareArgs)
    router_max_queued_requests: int = Field(
        default=256, ge=-1, description="Requests queued for the router beyond its ongoing ones; more get 503 + Retry-After (-1: no bound)."
    )
    generator_max_queued_requests: int = Field(
        default=64, ge=-1, description="The same per generator deployment; a full queue makes the router fall back."
    )
    retry_after_s: float = Field(default=5.0, ge=0, description="Retry-After of overload 503s.")
    replica_death_retries: int = Field(default=1, ge=0, description="Retries of the same candidate when its replica died.")
    warmup: bool = Field(default=True, description="Run the router's model once per input kind, and each in-process generator once (one denoising step), before reporting ready.")
    embedding_cache_size: int = Field(default=4096, ge=0, description="Prompts whose embeddings the router keeps (LRU).")
    route_chunk_size: int = Field(default=32, ge=1, description="/v1/route batches run this many prompts at a time.")
    decision_batch_size: int = Field(default=16, ge=1, description="Concurrent single-prompt decisions batched (@serve.batch).")
    embedder_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Runtime options the bundle's fitted embedder is loaded with (device, batch_size, backend), "
        "e.g. {backend: onnx} for minilm on CPU; nothing that changes what it computes.",
    )
    wait_for_resources: bool = Field(
        default=False, description="Deploy even when the cluster cannot place the app yet (nodes will join).",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=5.0, ge=0, description="How long a stopping replica lets in-flight requests finish (Serve's default: 20 s).",
    )
    policy: Literal["route", "cascade"] | None = Field(
        default=None, description="Requests' default policy; None: cascade when the model is a cascade bundle, else route.",
    )
    model_version: str | None = Field(default=None, description="The first model's version (default: dir name + hash).")
    decision_metric: str | None = Field(
        default=None,
        description="Metric of the Scorer deployment; default: the cascade bundle's, else the pool's decision_metric "
        "when score_routed is on, else none. One of the pool's `metrics:`.",
    )
    score_routed: bool = Field(
        default=False, description="Also score routed images (their cost includes scoring), so routed traffic is "
        "logged with an online score to learn from.",
    )
    scorer: ScorerServeArgs = Field(
        default_factory=ScorerServeArgs, description="The Scorer deployment: autoscaling, timeouts, retries.",
    )
    log: LogServeArgs | None = Field(
        default=None, description="The served log (uri, flush_rows, hash_prompts, ...); None: no log. serve/config.yaml "
        "turns it on.",
    )
    exploration: ExplorationArgs = Field(default_factory=ExplorationArgs)

    @field_validator("embedder_overrides")
    @classmethod
    def _runtime_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        from catimage.errors import CatimageError
        from serve.bundle import check_overrides

        try:
            check_overrides(v)
        except CatimageError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _not_both(self) -> AppArgs:
        if self.budget is not None and self.lambda_ is not None:
            raise ValueError("give the app a default budget or a default lambda, not both")
        if self.budget_controller is not None and self.budget_controller.budget is None and self.budget is None:
            raise ValueError("budget_controller needs a budget: set budget_controller.budget or the app's budget")
        if self.budget_controller is not None and self.controller_budget() == 0:
            raise ValueError(
                "budget_controller needs a budget > 0 (it corrects lambda by the relative error to its budget), and "
                "the app's budget is 0: drop budget_controller (a budget of 0 needs none), or give it a positive budget"
            )
        return self

    def controller_budget(self) -> float | None:
        if self.budget_controller is None:
            return None
        return self.budget_controller.budget if self.budget_controller.budget is not None else self.budget
