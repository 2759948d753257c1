"""The shared rated sets the routing benchmarks read (from ../shared/data; never copied in).

One table of where each set lives, which pool file carries its (assumed) costs and which metric it
is scored on, and one loader, so that every benchmark reads a set the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from catimage.tables.table import QualityMatrix, load_pool_matrix

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SETS = {
    "genai-bench": ("genai-bench-527/genai_image.json", "configs/genai_bench_pool.yaml", "quality"),
    "agiqa-3k": ("agiqa-3k/data.csv", "configs/agiqa3k_pool.yaml", "mos_quality"),
}


def load_set(name: str, data: Path = SHARED_DATA) -> tuple[Any, QualityMatrix, np.ndarray, str]:
    """(pool, matrix, costs, metric) of the named set, read from `data`."""
    rel, pool_file, metric = SETS[name]
    pool, matrix, costs = load_pool_matrix(data / rel, ROOT / pool_file, metric=metric)
    return pool, matrix, costs, metric
