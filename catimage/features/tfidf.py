"""``tfidf``: scikit-learn TF-IDF, optionally reduced by TruncatedSVD to ``dim``. It learns from
``fit(prompts)`` and saves its fitted state as JSON + safetensors (no pickle). Its "tokens" are the
pooled vector as a single token: (n, 1, d).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.features.base import EMBEDDER_JSON, EMBEDDER_TENSORS, Embedder, as_prompt_list, l2_normalize

log = logging.getLogger(__name__)


class TfidfEmbedder(Embedder):
    """TF-IDF over words (scikit-learn) with optional TruncatedSVD to ``dim`` (0/None = no SVD).

    The SVD width is capped below the vocabulary size and the number of fitted prompts; `dim` after
    fitting is the width actually produced.
    """

    name = "tfidf"

    def __init__(
        self,
        dim: int | None = 256,
        ngram_range: tuple[int, int] | list[int] = (1, 2),
        min_df: int = 1,
        max_features: int | None = 50000,
        sublinear_tf: bool = True,
        random_state: int = 0,
    ) -> None:
        self.requested_dim = dim
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.min_df = int(min_df)
        self.max_features = max_features
        self.sublinear_tf = bool(sublinear_tf)
        self.random_state = int(random_state)
        self._vectorizer: Any = None
        self._components: np.ndarray | None = None  # (k, V) SVD rows, or None

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.requested_dim,
            "ngram_range": list(self.ngram_range),
            "min_df": self.min_df,
            "max_features": self.max_features,
            "sublinear_tf": self.sublinear_tf,
            "random_state": self.random_state,
        }

    @property
    def is_fitted(self) -> bool:
        return self._vectorizer is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CatimageError(
                "the tfidf embedder is not fitted: call fit(train_prompts) or load_embedder(dir) first"
            )

    @property
    def dim(self) -> int:
        self._require_fitted()
        if self._components is not None:
            return int(self._components.shape[0])
        return len(self._vectorizer.vocabulary_)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        self._require_fitted()
        digest = hashlib.sha256()
        digest.update(json.dumps(sorted((t, int(i)) for t, i in self._vectorizer.vocabulary_.items())).encode())
        digest.update(np.ascontiguousarray(self._vectorizer.idf_, dtype=np.float64).tobytes())
        if self._components is not None:
            digest.update(np.ascontiguousarray(self._components).tobytes())
        ident["state"] = digest.hexdigest()
        return ident

    def _new_vectorizer(self) -> Any:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            ngram_range=self.ngram_range,
            min_df=self.min_df,
            max_features=self.max_features,
            sublinear_tf=self.sublinear_tf,
            dtype=np.float32,
        )

    def fit(self, prompts: Sequence[str]) -> TfidfEmbedder:
        from sklearn.decomposition import TruncatedSVD

        prompts = as_prompt_list(prompts)
        if len(prompts) < 2:
            raise CatimageError(f"tfidf needs at least 2 prompts to fit; got {len(prompts)}")
        vectorizer = self._new_vectorizer()
        try:
            matrix = vectorizer.fit_transform(prompts)
        except ValueError as err:  # e.g. empty vocabulary
            raise CatimageError(f"tfidf cannot fit these prompts: {err}") from None
        self._components = None
        if self.requested_dim:
            k = min(int(self.requested_dim), matrix.shape[1] - 1, matrix.shape[0] - 1)
            if k < int(self.requested_dim):
                log.info("tfidf: SVD width capped at %d (vocabulary %d, prompts %d)", k, *matrix.shape[::-1])
            if k >= 1:
                svd = TruncatedSVD(n_components=k, random_state=self.random_state).fit(matrix)
                self._components = svd.components_.astype(np.float32)
        self._vectorizer = vectorizer
        return self

    def _encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        self._require_fitted()
        matrix = self._vectorizer.transform(prompts)
        dense = (matrix @ self._components.T) if self._components is not None else matrix.toarray()
        pooled = l2_normalize(np.asarray(dense, dtype=np.float32))
        return pooled, [row[None, :] for row in pooled]

    def encode_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """(n, 1, d): the pooled vector as one token (TF-IDF has no per-token features)."""
        return self.encode(prompts)[:, None, :]

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._require_fitted()
        directory = super().save(directory)
        vec = self._vectorizer
        state = {"vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()}, "has_svd": self._components is not None}
        (directory / EMBEDDER_JSON).write_text(json.dumps({"spec": self.spec, "state": state}))
        tensors = {"idf": np.ascontiguousarray(vec.idf_, dtype=np.float64)}
        if self._components is not None:
            tensors["svd_components"] = np.ascontiguousarray(self._components)
        save_file(tensors, str(directory / EMBEDDER_TENSORS))
        return directory

    def load_state(self, directory: Path, data: dict[str, Any], runtime: dict[str, Any] | None = None) -> TfidfEmbedder:
        """Rebuild the fitted vectorizer (and SVD) from what `save` wrote."""
        from safetensors.numpy import load_file

        tensor_path = directory / EMBEDDER_TENSORS
        if "state" not in data or not tensor_path.is_file():
            raise CatimageError(f"{directory} holds an unfitted tfidf embedder (no state / {EMBEDDER_TENSORS})")
        state, tensors = data["state"], load_file(str(tensor_path))
        vec = self._new_vectorizer()
        # A fixed vocabulary plus the idf_ setter is scikit-learn's supported way to rebuild a fitted
        # vectorizer without pickle.
        vec.set_params(vocabulary={str(t): int(i) for t, i in state["vocabulary"].items()})
        vec.idf_ = tensors["idf"]
        self._vectorizer = vec
        self._components = tensors["svd_components"] if state.get("has_svd") else None
        return self
