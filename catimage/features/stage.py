"""The feature stage: prompts -> what an estimator consumes, in one place.

`embed_features(embedder, prompts, input_kind)` gives pooled (n, d) float32 for pooled estimators
and a ragged float16 `TokenBatch` for token ones; `FeatureCache` keeps one table's features while
the embedder is unchanged, so `evaluate`'s trials embed once. Every caller (the fit pipeline,
evaluation, the router bundle, the Ray Train job) goes through these two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.features.base import Embedder
from catimage.features.cache import CachedEmbedder
from catimage.features.tfidf import TfidfEmbedder
from catimage.features.tokens import TokenBatch


def _is_tfidf(embedder: Embedder) -> bool:
    inner = embedder.inner if isinstance(embedder, CachedEmbedder) else embedder
    return isinstance(inner, TfidfEmbedder)


def embed_features(embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray | TokenBatch:
    """Pooled (n, d) float32 for pooled estimators, a ragged float16 `TokenBatch` for token ones."""
    prompts = list(prompts)
    if input_kind == "pooled":
        return embedder.encode(prompts)
    if input_kind == "tokens":
        if _is_tfidf(embedder):
            return TokenBatch.from_arrays([row[None, :] for row in embedder.encode(prompts)], dim=embedder.dim)
        tokens = embedder.encode_with_tokens(prompts)[1]
        return TokenBatch.from_arrays(tokens, dim=embedder.token_dim)
    raise CatimageError(f"unknown estimator input kind {input_kind!r}")


class FeatureCache:
    """Embeddings of one prompt list, kept while the embedder's identity is unchanged.

    `evaluate` re-fits on many splits of the same table: MiniLM features are computed once and
    every trial slices them (a TokenBatch slice copies no token data); a refitted TF-IDF (new
    identity) replaces the entry. Holds the most recent `size` entries.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = int(size)
        self._entries: dict[tuple[str, str, int], Any] = {}

    def get(self, embedder: Embedder, prompts: Sequence[str], input_kind: str) -> np.ndarray | TokenBatch:
        base = (embedder.cache_key(), hash(tuple(prompts)))
        key = (*base, input_kind)
        if key not in self._entries:
            while len(self._entries) >= 2 * self.size:
                self._entries.pop(next(iter(self._entries)))
            if input_kind == "tokens" and not _is_tfidf(embedder):
                # One pass (one cache read per prompt) gives both: the pooled vectors come free.
                pooled, tokens = embedder.encode_with_tokens(list(prompts))
                self._entries[(*base, "pooled")] = pooled
                self._entries[key] = TokenBatch.from_arrays(tokens, dim=embedder.token_dim)
            else:
                self._entries[key] = embed_features(embedder, prompts, input_kind)
        return self._entries[key]
