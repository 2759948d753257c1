"""`TokenBatch`: per-token features of many prompts as one flat float16 array plus offsets (no
padding to the longest prompt, half the bytes of float32). Indexing a TokenBatch selects rows
without copying the data, so the train / test slices of every trial share one array; batches are
padded only when a model consumes them. This is what keeps the Transformer estimator on a
10,000-prompt table inside a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catimage.errors import CatimageError

_F16_TINY = np.float16(6e-8)  # the smallest float16 subnormal: keeps a real token row non-zero


@dataclass
class TokenBatch:
    """Ragged per-token features: prompt `rows[i]` owns data[offsets[r]:offsets[r+1]].

    Implements the little of the ndarray interface the estimators use: ``len``, ``shape``
    (n, longest, d), ``ndim``, indexing by slice / integer array (a view: no data copied), and
    ``padded(idx)`` to build a zero-padded float32 batch.
    """

    data: np.ndarray  # (total_tokens, d) float16
    offsets: np.ndarray  # (N + 1,) int64
    rows: np.ndarray  # (n,) int64

    ndim = 3

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dim: int | None = None) -> TokenBatch:
        """From one (T_i, d) array per prompt (T_i >= 1)."""
        if not arrays:
            if dim is None:
                raise CatimageError("TokenBatch.from_arrays needs dim when given no arrays")
            return cls(np.zeros((0, dim), np.float16), np.zeros(1, np.int64), np.zeros(0, np.int64))
        lengths = np.array([max(a.shape[0], 1) for a in arrays], dtype=np.int64)
        d = int(arrays[0].shape[-1])
        data = np.zeros((int(lengths.sum()), d), dtype=np.float16)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for i, a in enumerate(arrays):
            if a.shape[0]:
                data[offsets[i] : offsets[i] + a.shape[0]] = a
        zero = ~np.any(data != 0, axis=1)
        data[zero, 0] = _F16_TINY
        return cls(data, offsets, np.arange(len(arrays), dtype=np.int64))

    @classmethod
    def from_padded(cls, X: np.ndarray) -> TokenBatch:
        """From a zero-padded (n, T, d) array (the estimator contract's other token form)."""
        X = np.asarray(X)
        valid = np.any(X != 0, axis=-1)
        arrays = []
        for i in range(X.shape[0]):
            used = np.flatnonzero(valid[i])
            arrays.append(X[i, : (int(used[-1]) + 1 if used.size else 1)])
        return cls.from_arrays(arrays, dim=X.shape[-1])

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def lengths(self) -> np.ndarray:
        return self.offsets[self.rows + 1] - self.offsets[self.rows]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), int(self.lengths.max()) if len(self) else 0, int(self.data.shape[1]))

    def __getitem__(self, idx: Any) -> TokenBatch:
        rows = self.rows[idx]
        return TokenBatch(self.data, self.offsets, np.atleast_1d(rows).astype(np.int64))

    def padded(self, idx: Any = None, dtype: Any = np.float32) -> np.ndarray:
        """(b, longest in the batch, d) zero-padded copy of rows `idx` (default: all)."""
        rows = self.rows if idx is None else np.atleast_1d(self.rows[idx])
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        out = np.zeros((rows.size, int(lengths.max()) if rows.size else 1, self.data.shape[1]), dtype=dtype)
        for b, (s, e) in enumerate(zip(starts, ends)):
            out[b, : e - s] = self.data[s:e]
        return out

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes + self.rows.nbytes)
