"""An in-memory LRU of prompt embeddings for the router: a repeated prompt skips the embedder.

Wraps the bundle's embedder in place (`RouterModel.embedder`), so `RouterModel.predict` uses it
unchanged. Both outputs of one model pass (pooled and per-token) are kept, so a prompt embedded
for one estimator kind is cached for the other too. Not thread-safe by itself: the router calls it
from its single model thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from catimage.features.base import pad_token_arrays


class LruEmbeddingCache:
    """Duck-types the `Embedder` methods `RouterModel.predict` calls (`encode`, `encode_tokens`)."""

    def __init__(self, inner: Any, size: int) -> None:
        self.inner = inner
        self.size = int(size)
        self._store: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:  # spec, dim, token_dim, name, ... of the wrapped embedder
        return getattr(self.inner, name)

    def _lookup(self, prompts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if missing:
            pooled, tokens = self.inner.encode_with_tokens(missing)
            fresh = {p: (pooled[i], tokens[i]) for i, p in enumerate(missing)}
        out = []
        for p in prompts:
            item = fresh.get(p) or self._store[p]
            out.append(item)
            if self.size:
                self._store[p] = item
                self._store.move_to_end(p)
        while len(self._store) > self.size:
            self._store.popitem(last=False)
        return out

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        items = self._lookup(prompts)
        if not items:
            return np.zeros((0, self.inner.dim), np.float32)
        return np.stack([pooled for pooled, _ in items])

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        items = self._lookup(prompts)
        return pad_token_arrays([tokens for _, tokens in items], None if items else self.inner.token_dim)
