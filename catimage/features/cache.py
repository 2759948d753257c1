"""`CachedEmbedder`: any embedder behind an on-disk cache keyed by (embedder identity,
sha256(prompt)), so repeated fits and evaluations skip the model."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catimage.features.base import Embedder
from catimage.features.tfidf import TfidfEmbedder


def default_cache_dir() -> Path:
    """$CATIMAGE_CACHE/embeddings, else ~/.cache/catimage/embeddings."""
    root = os.environ.get("CATIMAGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "catimage") / "embeddings"


class CachedEmbedder(Embedder):
    """An embedder with an on-disk cache: one ``.npy`` per (embedder identity, prompt, output kind).

    Layout: ``<cache_dir>/<embedder key>/<sha256(prompt)[:2]>/<sha256(prompt)>.{pooled,tokens}.npy``.
    Files are written to a temporary name and renamed into place, so concurrent readers (and
    writers computing the same value) never see a partial file. Misses of one call are encoded in
    one batch by the wrapped embedder.
    """

    def __init__(self, embedder: Embedder, cache_dir: str | Path | None = None) -> None:
        if isinstance(embedder, CachedEmbedder):
            embedder = embedder.inner
        self.inner = embedder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    name = "cached"  # type: ignore[assignment]

    @property
    def spec(self) -> dict[str, Any]:
        return self.inner.spec

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def token_dim(self) -> int:
        return self.inner.token_dim

    @property
    def is_fitted(self) -> bool:
        return self.inner.is_fitted

    def fit(self, prompts: Sequence[str]) -> CachedEmbedder:
        self.inner.fit(prompts)
        return self

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def cache_key(self) -> str:
        return self.inner.cache_key()

    def save(self, directory: str | Path) -> Path:
        return self.inner.save(directory)

    def _paths(self, key: str, prompt: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        base = self.cache_dir / key / digest[:2] / digest
        return base.with_suffix(".pooled.npy"), base.with_suffix(".tokens.npy")

    @staticmethod
    def _read(path: Path) -> np.ndarray | None:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # absent, or a corrupt file: recompute
            return None

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp.npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        key = self.inner.cache_key()
        pooled: list[np.ndarray | None] = [None] * len(prompts)
        tokens: list[np.ndarray | None] = [None] * len(prompts)
        missing: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            p_path, t_path = self._paths(key, prompt)
            p, t = self._read(p_path), self._read(t_path)
            if p is not None and t is not None:
                pooled[i], tokens[i] = p, t
            else:
                missing.setdefault(prompt, []).append(i)
        self.hits += len(prompts) - sum(len(v) for v in missing.values())
        self.misses += len(missing)
        if missing:
            todo = list(missing)
            new_pooled, new_tokens = self.inner.encode_with_tokens(todo)
            for prompt, p, t in zip(todo, new_pooled, new_tokens):
                p_path, t_path = self._paths(key, prompt)
                self._write(t_path, t)
                self._write(p_path, p)
                for i in missing[prompt]:
                    pooled[i], tokens[i] = p, t
        return np.stack(pooled).astype(np.float32), [np.asarray(t, dtype=np.float32) for t in tokens]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(self.inner, TfidfEmbedder):
            return self.encode(prompts)[:, None, :]
        return super().encode_tokens(prompts)
