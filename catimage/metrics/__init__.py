"""Quality metrics: `make_scorer(spec) -> Scorer`, one class per metric.

    scorer = make_scorer(MetricSpec(name="clip_score", params={"tiny": True}))
    values = scorer.score(prompts, images)   # (n,) float64, column `scorer.name`

Each metric module is imported only when its scorer is made, so `sharpness` never imports torch
models and `image_reward` (slow to import) is loaded only where it is used.

``params: {tiny: true}`` (or ``{model: tiny}``) on any model metric swaps in the shared tiny
random-weight assets from `catimage.metrics.tiny` (built on first use, no downloads); any other
params given beside it (e.g. ``precision``) still apply.
"""

from __future__ import annotations

import importlib
from typing import Any

from catimage.metrics.base import MetricError, Scorer
from catimage.metrics.spec import MetricName, MetricSpec

__all__ = ["METRICS", "MetricError", "MetricSpec", "Scorer", "make_scorer"]

# name -> (module, class); the name is also the quality-table column.
METRICS: dict[str, tuple[str, str]] = {
    "sharpness": ("catimage.metrics.sharpness", "SharpnessScorer"),
    "clip_score": ("catimage.metrics.clip_score", "ClipScoreScorer"),
    "image_reward": ("catimage.metrics.image_reward", "ImageRewardScorer"),
    "aesthetic": ("catimage.metrics.aesthetic", "AestheticScorer"),
    "scene_score": ("catimage.metrics.scene_score", "SceneScoreScorer"),
    "scene_decider": ("catimage.metrics.scene_decider", "SceneDeciderScorer"),
}


def _is_tiny(params: dict[str, Any]) -> bool:
    return params.get("tiny") is True or params.get("model") == "tiny"


def resolve_params(name: MetricName, params: dict[str, Any]) -> dict[str, Any]:
    """Expand the ``tiny`` shorthand into concrete local-asset params; otherwise return params as given."""
    params = dict(params)
    if not _is_tiny(params):
        if "tiny" in params and params["tiny"] is not False:
            raise MetricError(f"{name}: params.tiny must be true or false, got {params['tiny']!r}")
        params.pop("tiny", None)
        return params
    params.pop("tiny", None)
    if params.get("model") == "tiny":
        params.pop("model")
    if name in ("sharpness", "scene_score", "scene_decider"):  # no weights, or small shipped ones: nothing to build
        return params
    from catimage.metrics.tiny import tiny_metric_params

    return {**tiny_metric_params()[name], **params}


def make_scorer(spec: MetricSpec | str, device: str | None = None, **params: Any) -> Scorer:
    """Build the scorer a spec (or a bare metric name) describes, loading its model once.

    Keyword `params` are merged over `spec.params`; ``batch_size`` may be given either way and
    overrides `spec.batch_size`. `device`: None picks cuda when available, else cpu.
    """
    if isinstance(spec, str):
        if spec not in METRICS:
            raise MetricError(f"unknown metric {spec!r}; choose one of {sorted(METRICS)}")
        batch = params.pop("batch_size", None)
        spec = MetricSpec(name=spec, params={}, **({"batch_size": batch} if batch is not None else {}))
    merged = {**spec.params, **params}
    batch_size = int(merged.pop("batch_size", spec.batch_size))
    module, cls = METRICS[spec.name]
    scorer_cls = getattr(importlib.import_module(module), cls)
    return scorer_cls(device=device, batch_size=batch_size, **resolve_params(spec.name, merged))
