"""The scene world: a miniature text-to-image world where routing can be measured for real.

Prompts of graded complexity about flat shapes (`grammar`), ground-truth pictures (`render`), the
prompt's requirements read back (`parse`, for the verifier only: the router never sees it), and
the trained generators that draw them (`catimage.world.pipeline`).
"""

from catimage.world.grammar import describe, heldout_prompts, is_heldout, realize, sample_spec, sample_specs
from catimage.world.parse import WorldParseError, parse
from catimage.world.render import render, render_array
from catimage.world.scene import ObjectSpec, PlacedObject, Relation, Scene, SceneSpec

__all__ = [
    "ObjectSpec",
    "PlacedObject",
    "Relation",
    "Scene",
    "SceneSpec",
    "WorldParseError",
    "describe",
    "heldout_prompts",
    "is_heldout",
    "parse",
    "realize",
    "render",
    "render_array",
    "sample_spec",
    "sample_specs",
]
