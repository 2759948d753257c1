"""The Scorer deployment: one decision metric behind Ray Serve, and the client the router calls it with.

A cascade plan (catimage.policy.plans) scores every image it draws with its decision metric and
accepts or escalates on that score. The metric runs as its own Serve deployment, so that it scales
on its own hardware (a reward model on a GPU, the world's CNN decider on a fraction of a CPU) and
concurrent requests share one forward pass (`@serve.batch`).

Two rules make scoring safe for serving:

* One bad pair never fails its batch: when a batch raises (e.g. a prompt the metric cannot parse),
  each pair is scored alone and only the ones that still fail come back as an error, with a reason.
* The caller (`ScorerClient`) never lets a scorer fault fail a request: a timeout, a dead replica
  (retried once on another), an overloaded queue or an error all become `ScoreUnavailable`, which the
  plan executor turns into an *unscored* image (the request still returns an image) and counts.

Resources and batching come from the pool's metric spec (`metrics:` in the pool file:
`batch_size`, `num_cpus`, `num_gpus`); autoscaling and timeouts from `ScorerServeArgs`.
"""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve reads annotations at runtime.
import asyncio
import io
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import BackpressureConfig

from catimage.metrics.spec import MetricSpec
from catimage.tables.pool import Autoscaling

log = logging.getLogger("catimage.serve")

__all__ = [
    "ScoreUnavailable",
    "Scorer",
    "ScorerClient",
    "ScorerServeArgs",
    "scorer_deployment_name",
    "scorer_options",
]


def scorer_deployment_name(metric: str) -> str:
    """The Serve deployment that scores with `metric` (Serve forbids '#' in names)."""
    return "Scorer-" + metric.replace("#", "_")


class ScorerServeArgs(BaseModel):
    """How Serve runs a decision metric's deployment (its resources are the pool's metric spec)."""

    model_config = ConfigDict(extra="forbid")

    autoscaling: Autoscaling = Field(
        default_factory=lambda: Autoscaling(min_replicas=1, max_replicas=2, upscale_delay_s=5, downscale_delay_s=60),
        description="Serve autoscaling_config of the scorer deployment (as a generator's `serve.autoscaling`).",
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="Concurrent pairs per replica (they batch).")
    max_queued_requests: int = Field(default=-1, description="Queue limit at the caller (-1: none); overflow is unscored.")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="How long a batch waits to fill.")
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="The caller's limit per score; past it the image is returned unscored."
    )
    retries: int = Field(default=1, ge=0, description="Retries (on another replica) when a scorer replica died.")


def scorer_options(spec: MetricSpec, args: ScorerServeArgs | None = None) -> dict[str, Any]:
    """Serve deployment options for one decision metric: resources from its pool spec, the rest from `args`."""
    args = args or ScorerServeArgs()
    return {
        "name": scorer_deployment_name(spec.name),
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "max_ongoing_requests": max(args.max_ongoing_requests, spec.batch_size),
        "max_queued_requests": args.max_queued_requests,
        "backpressure_config": BackpressureConfig(retry_after_s=None),
        "autoscaling_config": args.autoscaling.model_dump(exclude_none=True),
    }


def _as_image(image: Any) -> Any:
    """A PIL image from PNG/WebP bytes, a PIL image or an (H, W, 3) uint8 array."""
    from PIL import Image

    if isinstance(image, bytes | bytearray | memoryview):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image
    import numpy as np

    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def _reason(err: BaseException) -> str:
    """One line saying why a pair could not be scored (no traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


@serve.deployment
class Scorer:
    """One decision metric (`catimage.metrics.make_scorer`), scoring (prompt, image) pairs in batches.

    `__call__(prompt, image)` returns `{"score": float}` or `{"score": None, "error": reason}`; it
    raises only for faults of the replica itself (which the caller counts and survives).
    """

    def __init__(
        self, spec: dict[str, Any], device: str | None = None, max_batch_size: int | None = None,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        from catimage.metrics import make_scorer

        self.spec = MetricSpec.model_validate(spec)
        self.metric = self.spec.name
        self._scorer = make_scorer(self.spec, device=device)
        self._score_batch.set_max_batch_size(int(max_batch_size or self.spec.batch_size))
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "errors": 0}
        log.info("scorer %s ready (max_batch_size=%d)", self.metric, max_batch_size or self.spec.batch_size)

    def _score_all(self, prompts: list[str], images: list[Any]) -> list[dict[str, Any]]:
        """Score a batch at once; if that raises, each pair alone, so one bad pair fails only itself."""
        try:
            values = self._scorer.score(prompts, [_as_image(im) for im in images])
            return [_result(v) for v in values]
        except Exception as err:  # noqa: BLE001 - isolate the pair(s) at fault below
            if len(prompts) == 1:
                self._stats["errors"] += 1
                return [{"score": None, "error": _reason(err)}]
        return [self._score_all([p], [im])[0] for p, im in zip(prompts, images, strict=True)]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _score_batch(self, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        self._stats["batches"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(items))
        prompts = [p for p, _ in items]
        images = [im for _, im in items]
        return await asyncio.to_thread(self._score_all, prompts, images)

    async def __call__(self, prompt: str, image: Any) -> dict[str, Any]:
        self._stats["requests"] += 1
        return await self._score_batch((prompt, image))

    def stats(self) -> dict[str, Any]:
        """Pairs and batches this replica scored (`.stats.remote()`)."""
        return {**self._stats, "metric": self.metric}


def _result(value: float) -> dict[str, Any]:
    value = float(value)
    if not math.isfinite(value):
        return {"score": None, "error": f"the metric returned {value}"}
    return {"score": value}


class ScoreUnavailable(Exception):
    """No decision score for this image (scorer timed out, died, was overloaded or failed): the
    image is returned unscored, never the request failed."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class ScorerClient:
    """The router's side of a Scorer deployment: one call per image, with a timeout, one retry on a
    dead replica, and failures counted by kind (`timeout`, `replica_died`, `overloaded`, `error`).

    Usable as the plan executor's `score` function: `await client(prompt, png) -> float`.
    """

    def __init__(self, handle: Any, metric: str, timeout_s: float = 10.0, retries: int = 1,
                 on_failure: Callable[[str], None] | None = None) -> None:
        """`on_failure(kind)`: called for every failure (e.g. to count it in Prometheus)."""
        self.handle = handle
        self.on_failure = on_failure
        self.metric = metric
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.failures: Counter[str] = Counter()

    @classmethod
    def from_args(cls, handle: Any, metric: str, args: ScorerServeArgs,
                  on_failure: Callable[[str], None] | None = None) -> "ScorerClient":
        return cls(handle, metric, args.request_timeout_s, args.retries, on_failure)

    async def __call__(self, prompt: str, image: Any) -> float:
        try:
            return await self._score(prompt, image)
        except ScoreUnavailable as err:
            self.failures[err.kind] += 1
            if self.on_failure is not None:
                self.on_failure(err.kind)
            raise

    async def _score(self, prompt: str, image: Any) -> float:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(self.retries + 1):
            response = self.handle.remote(prompt, image)
            try:
                out = await asyncio.wait_for(_resolve(response), timeout=self.timeout_s)
            except TimeoutError:
                response.cancel()
                raise ScoreUnavailable("timeout", f"no score within {self.timeout_s:g} s") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if attempt < self.retries:
                    log.warning("scorer %s replica died (%s); retrying", self.metric, type(err).__name__)
                    continue
                raise ScoreUnavailable("replica_died", "the scorer's replica died") from None
            except BackPressureError:
                raise ScoreUnavailable("overloaded", "the scorer's queue is full") from None
            except Exception as err:  # noqa: BLE001 - any other fault: unscored, counted, logged
                log.warning("scorer %s failed: %s", self.metric, err)
                raise ScoreUnavailable("error", _reason(err)) from None
            return _value(out)
        raise AssertionError("unreachable")  # the loop returns or raises

    def state(self) -> dict[str, Any]:
        """What the router reports about its scorer calls (for /v1/pool and tests)."""
        return {"metric": self.metric, "failures": dict(self.failures), "timeout_s": self.timeout_s}


def _value(out: Mapping[str, Any]) -> float:
    score = out.get("score") if isinstance(out, Mapping) else None
    if score is None:
        reason = out.get("error", "no score") if isinstance(out, Mapping) else f"unexpected answer {out!r}"
        raise ScoreUnavailable("error", str(reason))
    return float(score)


async def _resolve(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (what asyncio.wait_for cancels on timeout)."""
    return await response
