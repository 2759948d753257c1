"""What every generator shares: the `Generator` contract, per-image seeds, and recipe presets.

Torch-free on purpose: the build job computes seeds and the cost counter resolves presets without
loading a pipeline.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from catimage.errors import CatimageError
from catimage.generators.spec import DiffusersSpec, GeneratorSpec

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_STEPS = 50  # diffusers' own default for num_inference_steps
DEFAULT_SCHEDULER = "euler"

# The published recipes. A spec's explicit fields win over these; scheduler_kwargs are merged.
PRESETS: dict[str, dict[str, Any]] = {
    # stabilityai/sdxl-turbo model card: 1 step, guidance 0, 512x512; its scheduler config is
    # EulerAncestralDiscreteScheduler with trailing timesteps.
    "sdxl-turbo": {
        "steps": 1,
        "guidance_scale": 0.0,
        "height": 512,
        "width": 512,
        "scheduler": "euler_a",
        "scheduler_kwargs": {"timestep_spacing": "trailing"},
    },
    # ByteDance/SDXL-Lightning model card: the 4-step UNet on SDXL base, Euler with trailing
    # timesteps, guidance 0, 1024x1024 (the base UNet's native size).
    "sdxl-lightning": {
        "steps": 4,
        "guidance_scale": 0.0,
        "scheduler": "euler",
        "scheduler_kwargs": {"timestep_spacing": "trailing"},
    },
}


def generation_seed(prompt_id: str, seed_index: int) -> int:
    """The seed for image `seed_index` of prompt `prompt_id`, in [0, 2**31).

    A hash (not Python's salted `hash`) so that every process, machine and candidate derives the
    same seed: step variants of one model then start from the same noise and differ only in steps.
    """
    if seed_index < 0:
        raise CatimageError(f"seed_index must be >= 0, got {seed_index}")
    digest = hashlib.sha256(f"{prompt_id}\x1f{seed_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


@dataclass(frozen=True)
class DiffusersSettings:
    """A diffusers spec with its preset applied and defaults filled in.

    `guidance_scale` None means the pipeline's default (7.5 for SD, 5.0 for SDXL); `height`/`width`
    None mean the UNet's native size (sample_size x VAE scale factor).
    """

    steps: int
    scheduler: str
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None


def diffusers_settings(spec: DiffusersSpec) -> DiffusersSettings:
    """Apply `spec.preset`, then the spec's explicit fields, then the defaults."""
    preset = PRESETS.get(spec.preset, {})

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(spec, name)
        return value if value is not None else preset.get(name, default)

    return DiffusersSettings(
        steps=int(pick("steps", DEFAULT_STEPS)),
        scheduler=str(pick("scheduler", DEFAULT_SCHEDULER)),
        scheduler_kwargs={**preset.get("scheduler_kwargs", {}), **spec.scheduler_kwargs},
        guidance_scale=pick("guidance_scale"),
        height=pick("height"),
        width=pick("width"),
    )


def uses_cfg(guidance_scale: float | None, default: float) -> bool:
    """Classifier-free guidance (a second, unconditional UNet pass per step) runs when scale > 1."""
    return (default if guidance_scale is None else guidance_scale) > 1.0


class Generator(ABC):
    """Draws one image per (prompt, seed). Loads its model once, in the constructor."""

    spec: GeneratorSpec
    text_features: dict[str, Any] | None = None
    """The text encoder (an `Embedder.identity()`) whose per-token features `generate` takes as
    `prompt_tokens` instead of encoding the prompts itself; None: it encodes its own."""

    @abstractmethod
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One PIL image per prompt, drawn with the matching seed."""

    def warm_up(self) -> int:
        """Pay the costs of a first call (lazy loads, first allocations) before any caller waits on
        them; returns the denoising steps it drew. A hosted model is not called: each call costs."""
        return 0

    def close(self) -> None:
        """Release clients or device memory; the generator is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_batch(prompts: list[str], seeds: list[int]) -> None:
        if isinstance(prompts, str):
            raise CatimageError("prompts must be a list of strings, not one string")
        if len(prompts) != len(seeds):
            raise CatimageError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        bad = [s for s in seeds if not 0 <= int(s) < 2**63]
        if bad:
            raise CatimageError(f"seeds must be non-negative 64-bit integers, got {bad[:3]}")
