"""The embedder interface every prompt featuriser implements, and the helpers they share.

An `Embedder` turns prompts into a pooled vector (n, d) and per-token features (n, T, d); the kinds
live in `text` (minilm, clip), `tfidf` and `combined`; `registry` builds and loads them by name,
`cache` keeps their outputs on disk, and `stage` is the one call that turns prompts into what an
estimator consumes.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from catimage.errors import CatimageError

EMBEDDER_JSON = "embedder.json"
EMBEDDER_TENSORS = "embedder.safetensors"
# Keys of a spec that change how fast an embedder runs, not what it returns: not part of cache keys,
# and the only options a fitted embedder may be loaded with (`load_embedder(dir, **runtime)`).
# (`backend`: minilm through ONNX Runtime, equal to torch to ~1e-6; int8 `quantize` is not one: it
# changes what the embedder returns.)
RUNTIME_KEYS = frozenset({"device", "batch_size", "backend"})


def as_prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise CatimageError("pass a list of prompts, not a single string (wrap it: [prompt])")
    out = list(prompts)
    bad = [type(p).__name__ for p in out if not isinstance(p, str)]
    if bad:
        raise CatimageError(f"prompts must be strings; got {sorted(set(bad))}")
    return out


def pad_token_arrays(arrays: Sequence[np.ndarray], dim: int | None = None) -> np.ndarray:
    """Stack per-prompt (T_i, d) arrays into (n, max T_i, d) float32 with zero rows as padding.

    `dim` is only needed when `arrays` is empty (it is read from the arrays otherwise).
    """
    if arrays:
        dim = int(arrays[0].shape[-1])
    elif dim is None:
        raise CatimageError("pad_token_arrays needs dim when given no arrays")
    t_max = max((a.shape[0] for a in arrays), default=0)
    out = np.zeros((len(arrays), max(t_max, 1), dim), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _keep_token_rows_nonzero(a: np.ndarray) -> np.ndarray:
    """A real token whose features are exactly zero would read as padding; nudge it (never happens
    with trained encoders, but the contract must hold)."""
    zero = ~np.any(a != 0, axis=-1)
    if zero.any():
        a = a.copy()
        a[zero, 0] = np.float32(1e-12)
    return a


class Embedder(ABC):
    """Common interface; subclasses implement `_encode_batch` (pooled + per-prompt token arrays)."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able; ``make_embedder(**spec)`` rebuilds an equivalent (unfitted) embedder."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the pooled embedding."""

    @property
    def token_dim(self) -> int:
        """Width of the per-token features (CLIP's text width differs from its embed dim)."""
        return self.dim

    def fit(self, prompts: Sequence[str]) -> Embedder:
        """Learn from prompts (only tfidf learns); returns self."""
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(pooled (n, d) float32 L2-normalised, [ (T_i, token_dim) float32 per prompt ])."""

    def encode_with_tokens(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Both outputs from one model pass; token arrays are unpadded, one per prompt."""
        prompts = as_prompt_list(prompts)
        if not prompts:
            return np.zeros((0, self.dim), np.float32), []
        pooled, tokens = self._encode_batch(prompts)
        return pooled, [_keep_token_rows_nonzero(t) for t in tokens]

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Pooled, L2-normalised embeddings (n, d) float32."""
        return self.encode_with_tokens(prompts)[0]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """Per-token features (n, T, d) float32; all-zero rows are padding."""
        arrays = self.encode_with_tokens(prompts)[1]
        return pad_token_arrays(arrays, None if arrays else self.token_dim)

    def identity(self) -> dict[str, Any]:
        """What determines the outputs (the cache key): the spec minus runtime-only settings."""
        return {k: v for k, v in self.spec.items() if k not in RUNTIME_KEYS}

    def cache_key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def load_state(self, directory: Path, data: dict[str, Any], runtime: dict[str, Any] | None = None) -> Embedder:
        """Restore what `save` wrote beyond the spec (called by `load_embedder`); kinds that learn
        nothing have nothing to restore. `runtime`: the load's runtime options, for parts loaded here."""
        return self

    def save(self, directory: str | Path) -> Path:
        """Write ``embedder.json`` (the spec; tfidf adds its fitted state). Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / EMBEDDER_JSON).write_text(json.dumps({"spec": self.spec}, indent=2))
        return directory
