"""Image generators: `make_generator(spec)` -> `Generator.generate(prompts, seeds)`.

Importing this package is cheap (no torch): the implementations load on demand, so the router and
the CLI can read pools and compute seeds without a GPU stack.
"""

from __future__ import annotations

from typing import Any

from catimage.errors import CatimageError
from catimage.generators.base import PRESETS, DiffusersSettings, Generator, diffusers_settings, generation_seed
from catimage.generators.refs import is_world, resolve_model, world_model_dir
from catimage.generators.spec import DiffusersSpec, GeneratorSpec, HttpSpec, parse_generator_spec
from catimage.generators.tiny import is_tiny

__all__ = [
    "PRESETS",
    "DiffusersSettings",
    "DiffusersSpec",
    "Generator",
    "GeneratorSpec",
    "HttpSpec",
    "diffusers_settings",
    "generation_seed",
    "is_tiny",
    "is_world",
    "make_generator",
    "resolve_model",
    "world_model_dir",
]


def make_generator(spec: GeneratorSpec | dict[str, Any], device: str | None = None) -> Generator:
    """Build the generator a pool candidate describes; `device` (if given) wins over `spec.device`.

    Loads the model now, once: keep the returned object (one per Ray actor / Serve replica).
    """
    if isinstance(spec, dict):
        try:
            spec = parse_generator_spec(spec)
        except ValueError as err:
            raise CatimageError(f"invalid generator block: {err}") from None
    if isinstance(spec, DiffusersSpec):
        from catimage.generators.diffusers_gen import DiffusersGenerator

        return DiffusersGenerator(spec, device=device)
    if isinstance(spec, HttpSpec):
        from catimage.generators.http_gen import HttpGenerator

        return HttpGenerator(spec)
    raise CatimageError(f"no generator for {type(spec).__name__}; the candidate needs a `generator:` block")
