"""The router bundle as a Router replica serves it: the fitted model, its fitted embedder loaded with
the app's runtime options only, wrapped in the embedding LRU.

`embedder_overrides` never rebuild the embedder from its spec (a fitted tfidf or combined embedder
would come back unfitted); they are runtime options (`catimage.features.base.RUNTIME_KEYS`) applied
when the fitted embedder is loaded. Anything else would change what the model was fitted on, so it is
refused when the app starts (`check_overrides`), not on the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError
from catimage.features.base import RUNTIME_KEYS


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse options that are not runtime options, with what to do instead."""
    bad = sorted(set(overrides) - RUNTIME_KEYS)
    if bad:
        raise CatimageError(
            f"embedder_overrides {bad} would change what the fitted embedder computes; only runtime options "
            f"{sorted(RUNTIME_KEYS)} can be set when serving (e.g. {{backend: onnx}} or {{device: cuda}}). "
            "To serve another embedder, fit a model with it (`catimage fit --embedder ...`)"
        )


def load_router_model(model_dir: str | Path, overrides: Mapping[str, Any], cache_size: int) -> Any:
    """RouterModel with its fitted embedder loaded under `overrides` and cached (LRU of `cache_size`)."""
    from catimage.features.registry import load_embedder
    from catimage.model.router_model import RouterModel
    from serve.embedding_cache import LruEmbeddingCache

    check_overrides(overrides)
    model = RouterModel.load(model_dir)
    if overrides:
        model.embedder = load_embedder(Path(model_dir) / "embedder", **dict(overrides))
    if cache_size:
        model.embedder = LruEmbeddingCache(model.embedder, cache_size)
    return model
