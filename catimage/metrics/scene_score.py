"""scene_score: does the image draw what a scene-world prompt asks for? (0..1, no weights)

The prompt is parsed into the scene it asks for (`catimage.world.parse`) and the image is checked
against it by classical vision (`catimage.world.verify`): objects present with the asked colour and
shape, counts, sizes, positions, relations, background, and fidelity (no extra objects, clean colour,
crisp edges). The score is the weighted share of checks met, GenEval-style; the checks, weights and
thresholds are documented in `catimage.world.verify`. CPU-only numpy/scipy; a 32 x 32 image takes
about a millisecond.

Only scene-world prompts can be scored: any other prompt is a `MetricError` (use clip_score or
image_reward for open prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catimage.metrics.base import MetricError, MetricParams, Scorer, parse_params
from catimage.world.parse import WorldParseError
from catimage.world.verify import scene_score

if TYPE_CHECKING:
    from PIL import Image


class SceneScoreParams(MetricParams):
    """No params: the checks and their weights are fixed so that tables built anywhere compare."""


class SceneScoreScorer(Scorer):
    """Per-(prompt, image) scene_score; the prompt must be a scene-world prompt."""

    name = "scene_score"

    def __init__(self, device: str | None = None, batch_size: int = 64, **params: object) -> None:
        super().__init__(batch_size)
        parse_params(SceneScoreParams, self.name, dict(params))
        # `device` is accepted for a uniform constructor; the checks run in numpy on the CPU.

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        out = np.empty(len(images), dtype=np.float64)
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            try:
                out[i] = scene_score(prompt, image)
            except WorldParseError as err:
                raise MetricError(
                    f"scene_score scores scene-world prompts only: {err}. Use it on prompts from "
                    "catimage.world (e.g. 'a red circle to the left of two blue squares'), or pick "
                    "clip_score / image_reward for open prompts"
                ) from None
        return out
