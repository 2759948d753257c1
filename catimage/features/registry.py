"""Embedders by name: `make_embedder(name, **params)` and `load_embedder(directory)`.

Every kind is imported directly (no lazy strings): `combined` builds its text part through
`catimage.features.single`, never through this module, so nothing here imports back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catimage.features.base import Embedder
from catimage.features.combined import CombinedEmbedder
from catimage.features.single import SINGLE_EMBEDDERS, build_embedder, restore_embedder

EMBEDDERS: dict[str, type[Embedder]] = {**SINGLE_EMBEDDERS, CombinedEmbedder.name: CombinedEmbedder}


def make_embedder(name: str, **params: Any) -> Embedder:
    """Build an embedder by kind; ``make_embedder(**emb.spec)`` rebuilds ``emb`` (unfitted for tfidf)."""
    return build_embedder(EMBEDDERS, name, **params)


def load_embedder(directory: str | Path, **runtime: Any) -> Embedder:
    """Reverse `Embedder.save`; `runtime` sets runtime options only (`RUNTIME_KEYS`: device, batch_size,
    backend), e.g. ``device='cuda'``; anything else is refused (it would change what was fitted)."""
    return restore_embedder(EMBEDDERS, directory, **runtime)
