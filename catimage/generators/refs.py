"""Model references a pool may name besides hub ids and local folders.

* ``tiny:sd`` / ``tiny:sdxl``: random-weight pipelines built locally on first use (tests, dry runs);
  see `catimage.generators.tiny`.
* ``world:mini`` / ``world:small``: the scene world's trained generators, shipped inside the package
  (``catimage/data/world/<name>``); see `catimage.world`.

`resolve_model(ref)` turns any of them into a `from_pretrained` argument; other refs pass through.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from catimage.errors import CatimageError
from catimage.generators.tiny import TINY_PREFIX
from catimage.generators.tiny import resolve_model as resolve_tiny

WORLD_PREFIX = "world:"


def world_model_dir(name: str) -> Path:
    """The shipped folder of world generator `name` ('small' or 'large')."""
    folder = Path(str(resources.files("catimage") / "data" / "world" / name))
    if not (folder / "model_index.json").is_file():
        shipped = sorted(p.parent.name for p in folder.parent.glob("*/model_index.json"))
        raise CatimageError(
            f"no shipped world generator {name!r} (looked in {folder}); the package ships {shipped}. "
            "Train one with `python jobs/train_world.py --model NAME`"
        )
    return folder


def is_world(ref: str | None) -> bool:
    return isinstance(ref, str) and ref.startswith(WORLD_PREFIX)


def resolve_model(ref: str) -> str:
    """A `from_pretrained` argument for `ref`: tiny and world refs become local folders."""
    if ref.startswith(TINY_PREFIX):
        return resolve_tiny(ref)
    if is_world(ref):
        return str(world_model_dir(ref[len(WORLD_PREFIX) :]))
    return ref
