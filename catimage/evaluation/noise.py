"""Label noise: how much of the oracle's lead over the hull is seed noise (split-half reliability)."""

from __future__ import annotations

from typing import Any

import numpy as np

from catimage.estimators.selection import two_way
from catimage.policy.routing import area_over_hull
from catimage.tables.table import QualityMatrix


def label_noise(matrix: QualityMatrix, costs: np.ndarray) -> dict[str, Any]:
    """How much of the oracle's lead over the hull is label noise (split-half reliability).

    Needs per-sample rows (`matrix.half`: each cell's samples split into two halves). The oracle
    that routes on a cell mean and is scored on the same mean profits from that mean's noise; one
    that routes on half A and is scored on the independent half B cannot. Reports, on prompts whose
    every cell has >= 2 samples: the oracle's area over the hull on the full means (optimistic), the
    split-half oracle's (routes on one half, scored on the other, both ways averaged: conservative,
    since it routes on noisier half-means), the share of the full oracle's lead that the split-half
    one loses, and the split-half correlation of the prompt x candidate interactions with its
    Spearman-Brown value for full means (how reliable the very signal a router learns is).
    """
    if matrix.half is None:
        return {"available": False, "reason": "one sample per cell: label noise cannot be separated from signal"}
    a, b = matrix.half
    rows = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if rows.sum() < 10:
        return {"available": False, "reason": f"only {int(rows.sum())} prompt(s) have >= 2 samples in every cell"}
    a, b, full = a[rows], b[rows], matrix.mean[rows]
    full_oracle = area_over_hull(full, full, costs)
    split = 0.5 * (area_over_hull(a, b, costs) + area_over_hull(b, a, costs))
    ones = np.ones_like(a)
    ra, rb = two_way(a, ones).resid.ravel(), two_way(b, ones).resid.ravel()
    r = float(np.corrcoef(ra, rb)[0, 1])
    return {
        "available": True,
        "n_prompts": int(rows.sum()),
        "oracle_area_full_means": full_oracle,
        "oracle_area_split_half": split,
        "noise_share_of_oracle_lead": (1 - split / full_oracle) if full_oracle > 1e-12 else None,
        "interaction_split_half_corr": r,
        "interaction_reliability_full_means": 2 * r / (1 + r) if r > -1 else None,
    }
