"""The `generator:` block of a pool candidate, validated without importing torch or diffusers.

Kept apart from the generator implementations so that reading a pool file stays cheap (the router
and the CLI load pools without needing a GPU stack).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

# Short scheduler names -> (diffusers class, extra `from_config` kwargs). A full diffusers class name
# ending in "Scheduler" is accepted too. Kept here (no torch) so that a typo fails when the pool loads.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


def scheduler_class_name(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, extra from_config kwargs) for a short name or a full class name."""
    key = name.strip()
    if key.lower() in SCHEDULERS:
        cls, extra = SCHEDULERS[key.lower()]
        return cls, dict(extra)
    if key.endswith("Scheduler") and key.isidentifier():
        return key, {}
    raise ValueError(
        f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)} or a diffusers class name "
        "such as 'EulerDiscreteScheduler'"
    )


class DiffusersSpec(BaseModel):
    """A diffusers text-to-image pipeline (StableDiffusion, StableDiffusionXL, or the scene world's).

    `preset` fills in the published recipes: `sdxl-turbo` (1 step, guidance 0, 512x512, the model's
    Euler-ancestral scheduler with trailing timesteps, as the model card says) and `sdxl-lightning`
    (4 steps, guidance 0, Euler with trailing timesteps; give the Lightning UNet in `unet`);
    explicit fields win over the preset (see catimage.generators.base.PRESETS).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["diffusers"] = "diffusers"
    model: str = Field(description="Hub id or local folder with a diffusers pipeline (from_pretrained).")
    pipeline: Literal["auto", "sd", "sdxl", "world"] = "auto"
    preset: Literal["none", "sdxl-turbo", "sdxl-lightning"] = "none"
    steps: PositiveInt | None = None
    scheduler: str | None = Field(
        default=None, description="euler (default), ddim, or any diffusers scheduler short name."
    )
    scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra scheduler.from_config kwargs, e.g. {timestep_spacing: trailing}.",
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
    unet: str | None = Field(
        default=None,
        description="Optional UNet override (e.g. Lightning's): a local folder, a local .safetensors "
        "file, or 'repo_id/file.safetensors' on the hub.",
    )
    variant: str | None = Field(default=None, description="Weights variant to load, e.g. fp16.")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None:
            scheduler_class_name(value)
        return value


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
    retry_backoff_s: float = Field(default=1.0, ge=0, description="First retry wait; doubles each retry.")
    seed_field: str | None = Field(
        default=None,
        description="JSON field that carries the seed (e.g. 'seed') when the API takes one; None: not sent.",
    )
    response_format: str | None = Field(
        default="b64_json", description="Sent as response_format; None for APIs that reject the field."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Extra JSON fields (quality, steps, ...).")


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
