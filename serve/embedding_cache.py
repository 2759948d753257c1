"""An in-memory LRU of prompt embeddings for the router: a repeated prompt skips the embedder.

Wraps the bundle's embedder in place (`RouterModel.embedder`), so `RouterModel.predict` uses it
unchanged. Both outputs of one model pass (pooled and per-token) are kept, so a prompt embedded
for one estimator kind is cached for the other too. The router embeds from its single model thread;
`features_of` reads from the event loop (a generator that takes these tokens gets them with the
draw), so the store is guarded by a lock, held only around the dictionary, never around the model.
"""

from __future__ import annotations

import threading
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
        self._lock = threading.Lock()
        self._identity = inner.identity()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:  # spec, dim, token_dim, name, ... of the wrapped embedder
        return getattr(self.inner, name)

    def _lookup(self, prompts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        prompts = list(prompts)
        with self._lock:
            known = {p: self._store[p] for p in prompts if p in self._store}
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            pooled, tokens = self.inner.encode_with_tokens(missing)
            known.update({p: (pooled[i], tokens[i]) for i, p in enumerate(missing)})
        out = [known[p] for p in prompts]
        if self.size:
            with self._lock:
                for p in prompts:
                    self._store[p] = known[p]
                    self._store.move_to_end(p)
                while len(self._store) > self.size:
                    self._store.popitem(last=False)
        return out

    def features_of(self, prompt: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """(the embedder's identity, the prompt's per-token features) if cached, else None; never
        runs the model (safe from any thread)."""
        with self._lock:
            item = self._store.get(prompt)
        return None if item is None else (self._identity, item[1])

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        items = self._lookup(prompts)
        if not items:
            return np.zeros((0, self.inner.dim), np.float32)
        return np.stack([pooled for pooled, _ in items])

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        items = self._lookup(prompts)
        return pad_token_arrays([tokens for _, tokens in items], None if items else self.inner.token_dim)
