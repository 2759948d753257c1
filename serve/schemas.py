"""Typed arguments of the Serve application and the HTTP request/response models.

Everything a client can get wrong is checked here, so that FastAPI answers a bad request with a
4xx and a message before any model runs (the router never turns a client mistake into a 500).
Limits are documented in docs/serving.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 2000
"""Longest prompt accepted. Text encoders read at most a few hundred tokens (CLIP: 77), so a longer
prompt only costs embedding time; 2000 characters is ~10x what a user usefully writes."""

MAX_ROUTE_PROMPTS = 256
"""Most prompts one `/v1/route` call may carry (one batched prediction)."""

MAX_SEED = 2**32 - 1


def _check_prompt(text: str) -> str:
    if not text.strip():
        raise ValueError("prompt is empty; send the text to draw")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return text


def _check_finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return value


class _BudgetOrLambda(BaseModel):
    """Either a cost budget (mean cost per prompt, in the pool's cost unit) or a lambda, never both."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    budget: float | None = Field(
        default=None, ge=0, description="Average cost per prompt to stay within (the pool's cost unit)."
    )
    lambda_: float | None = Field(
        default=None, alias="lambda", ge=0, description="Price of one cost unit in quality units."
    )

    @field_validator("budget")
    @classmethod
    def _budget_finite(cls, v: float | None) -> float | None:
        return _check_finite(v, "budget")

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, v: float | None) -> float | None:
        return _check_finite(v, "lambda")

    @model_validator(mode="after")
    def _not_both(self) -> _BudgetOrLambda:
        if self.budget is not None and self.lambda_ is not None:
            raise ValueError("give either budget or lambda, not both")
        return self


class GenerateRequest(_BudgetOrLambda):
    """`POST /v1/generate`: route one prompt and draw it."""

    prompt: str = Field(description=f"Text to draw (1..{MAX_PROMPT_CHARS} characters).")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Sampling seed; default: the seed the build job used for this prompt's first sample.",
    )
    candidate: str | None = Field(default=None, description="Skip routing and use this candidate (still falls back).")
    return_: Literal["png_base64", "none"] = Field(
        default="png_base64", alias="return", description="png_base64: the image in the answer; none: only the decision."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _check_prompt(v)


class RouteRequest(_BudgetOrLambda):
    """`POST /v1/route`: decisions for a batch of prompts, no generation."""

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


class GenerateResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    candidate: str
    predicted_quality: dict[str, float]
    metric: str
    cost: float
    cost_unit: str
    lambda_: float = Field(alias="lambda", serialization_alias="lambda")
    seed: int
    image: str | None = Field(description="Base64 PNG, or null when return=none.")
    fallback: Fallback | None = None
    router_ms: float = Field(description="Time spent choosing (embedding + prediction + rule).")
    generate_ms: float


class RouteDecision(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    prompt: str
    candidate: str
    cost: float
    lambda_: float = Field(alias="lambda", serialization_alias="lambda")
    predicted_quality: dict[str, float]
    ranking: list[str]


class RouteResponse(BaseModel):
    decisions: list[RouteDecision]
    mean_cost: float
    cost_unit: str
    metric: str


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

    @model_validator(mode="after")
    def _not_both(self) -> AppArgs:
        if self.budget is not None and self.lambda_ is not None:
            raise ValueError("give the app a default budget or a default lambda, not both")
        return self
