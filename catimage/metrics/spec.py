"""A quality metric as declared in a pool file's `metrics:` list (read by the build job)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, PositiveInt

MetricName = Literal["sharpness", "clip_score", "image_reward", "aesthetic", "scene_score", "scene_decider"]


class MetricSpec(BaseModel):
    """One scorer: its name (also the quality-table column), constructor params, and resources."""

    model_config = ConfigDict(extra="forbid")

    name: MetricName
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = 8
    concurrency: PositiveInt = 1
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    memory: ByteSize | None = Field(
        default=None, description="Host memory one scorer actor holds (e.g. 900MiB): what Ray reserves for it."
    )
    cost: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="What scoring one image costs, in the pool's cost_unit: a cascade pays it for every image it "
        "scores online, so a plan's cost counts it beside each generation.",
    )
