"""scene_decider: a learned, cheap estimate of scene_score for deciding online (0..1, shipped weights).

A cascade that draws with a cheap generator and redraws when the picture looks wrong needs a score
it may use at serving time; scene_score is the judge, so it must not also be the decider. This
metric is the decider of `catimage.world.decider`: a small CNN detector (trained only on rendered
training scenes with known labels, ~0.04 GFLOPs per image) reads the picture, the world's own rule
checks (`catimage.world.verify.check`) score that reading against the parsed prompt: the same
checks and weights, so the score is on scene_score's scale and thresholds chosen on scene_score
carry over. A tiny calibration head (fitted on generated pictures of training scenes) is shipped
as an option (`params: {calibrated: true}`). Agreement with scene_score on held-out scenes is in
catimage/data/world/decider/MODEL_CARD.md.

Only scene-world prompts can be scored: any other prompt is a `MetricError`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from catimage.metrics.base import MetricError, MetricParams, Scorer, parse_params
from catimage.world.parse import WorldParseError, parse

if TYPE_CHECKING:
    from PIL import Image

    from catimage.world.scene import SceneSpec


class SceneDeciderParams(MetricParams):
    """`path`: a decider folder (decider.safetensors + decider.json) instead of the shipped one;
    `calibrated`: true scores with the calibration head instead of the raw rule score on the
    detector's reading (lower RMSE, slightly worse ranking and pass/fail agreement)."""

    path: str | None = None
    calibrated: bool = False


@functools.lru_cache(maxsize=4096)
def _spec(prompt: str) -> SceneSpec:
    try:
        return parse(prompt)
    except WorldParseError as err:
        raise MetricError(
            f"scene_decider scores scene-world prompts only: {err}. Use it on prompts from catimage.world "
            "(e.g. 'a red circle to the left of two blue squares'), or pick clip_score / image_reward for "
            "open prompts"
        ) from None


class SceneDeciderScorer(Scorer):
    """Per-(prompt, image) decider score on the scene_score scale; CPU, batched through the CNN."""

    name = "scene_decider"

    def __init__(self, device: str | None = None, batch_size: int = 64, **params: object) -> None:
        super().__init__(batch_size)
        p = parse_params(SceneDeciderParams, self.name, dict(params))
        from catimage.world.decider import SceneDecider, shipped_dir

        try:
            self.decider = SceneDecider.load(p.path or shipped_dir())
        except FileNotFoundError as err:
            raise MetricError(str(err)) from None
        self.calibrated = p.calibrated
        # `device` is accepted for a uniform constructor; the CNN is ~0.04 GFLOPs, the checks numpy.

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        specs = [_spec(p) for p in prompts]
        return self.decider.score(specs, images, calibrated=self.calibrated)
