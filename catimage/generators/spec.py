"""The `generator:` block of a pool candidate, validated without importing torch or diffusers.

Kept apart from the generator implementations so that reading a pool file stays cheap (the router
and the CLI load pools without needing a GPU stack).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class DiffusersSpec(BaseModel):
    """A diffusers text-to-image pipeline (StableDiffusion or StableDiffusionXL).

    `preset` fills in the published recipes: `sdxl-turbo` (1 step, guidance 0, euler_ancestral... as
    the model card says) and `sdxl-lightning` (4 steps, guidance 0, trailing Euler); explicit fields
    win over the preset.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["diffusers"] = "diffusers"
    model: str = Field(description="Hub id or local folder with a diffusers pipeline (from_pretrained).")
    pipeline: Literal["auto", "sd", "sdxl"] = "auto"
    preset: Literal["none", "sdxl-turbo", "sdxl-lightning"] = "none"
    steps: PositiveInt | None = None
    scheduler: str | None = Field(
        default=None, description="euler (default), ddim, or any diffusers scheduler short name."
    )
    guidance_scale: float | None = Field(default=None, ge=0)
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = Field(default=None, description="cuda, cpu, ...; default: cuda if available.")
    cache_interval: PositiveInt | None = Field(
        default=None, description="DeepCache: recompute deep UNet features every N steps."
    )
    cache_branch_id: int = Field(default=0, ge=0)
    unet: str | None = Field(default=None, description="Optional UNet override (e.g. Lightning's).")


class HttpSpec(BaseModel):
    """A hosted model behind an OpenAI-style images endpoint (`POST {url}` -> b64_json)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["http"]
    url: str
    model: str
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key.")
    size: str = "1024x1024"
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=2, ge=0)


GeneratorSpec = DiffusersSpec | HttpSpec


def parse_generator_spec(block: dict) -> GeneratorSpec:
    """Validate a `generator:` block; `kind` defaults to diffusers, the common case."""
    if not isinstance(block, dict):
        raise TypeError(f"a generator block must be a mapping, got {type(block).__name__}")
    kind = block.get("kind", "diffusers")
    if kind == "diffusers":
        return DiffusersSpec.model_validate(block)
    if kind == "http":
        return HttpSpec.model_validate(block)
    raise ValueError(f"unknown generator kind {kind!r}: use 'diffusers' or 'http'")
