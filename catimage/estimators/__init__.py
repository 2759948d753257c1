"""Quality estimators: prompt embedding -> expected [0, 1]-scaled quality of each candidate.

``make_estimator(name, **params)`` builds one of the paper's ``knn`` / ``transformer`` (per-token
embeddings; check ``est.input_kind``), the ``linear`` ridge baseline, the decision-focused
``twoway-knn`` / ``twoway-ridge`` (candidate means + shrunk interactions, hyper-parameters by the
routing objective), or ``ensemble`` / ``auto`` (chosen by inner cross-validation); ``load_estimator(dir)`` reads one
written by ``est.save(dir)``. The transformer module (and torch) is imported only when asked for, so
commands that use the cheap estimators start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catimage.estimators.base import (
    ESTIMATOR_JSON,
    ESTIMATOR_TENSORS,
    FORMAT_VERSION,
    EstimatorError,
    QualityEstimator,
    masked_mse,
)
from catimage.estimators.ensemble import AutoEstimator, EnsembleEstimator
from catimage.estimators.single import SINGLE_KINDS, single_estimator_class

ESTIMATOR_KINDS: tuple[str, ...] = (*SINGLE_KINDS, "ensemble", "auto")


__all__ = [
    "ESTIMATOR_KINDS",
    "EstimatorError",
    "QualityEstimator",
    "estimator_class",
    "load_estimator",
    "make_estimator",
    "masked_mse",
]


def estimator_class(name: str) -> type[QualityEstimator]:
    if name == "ensemble":
        return EnsembleEstimator
    if name == "auto":
        return AutoEstimator
    if name not in SINGLE_KINDS:
        raise EstimatorError(f"unknown estimator {name!r}; choose one of {list(ESTIMATOR_KINDS)}")
    return single_estimator_class(name)


def make_estimator(name: str, **params: Any) -> QualityEstimator:
    """An unfitted estimator of kind `name` with hyperparameters `params`."""
    cls = estimator_class(name)
    try:
        return cls(**params)
    except TypeError as err:
        valid = sorted(cls().get_params())
        raise EstimatorError(f"bad parameters for the {name} estimator ({err}); valid ones: {valid}") from None


def load_estimator(directory: str | Path) -> QualityEstimator:
    """Read an estimator written by ``est.save(directory)`` (JSON + safetensors; no pickle)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    meta_path, tensor_path = directory / ESTIMATOR_JSON, directory / ESTIMATOR_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise EstimatorError(
            f"{directory} lacks {ESTIMATOR_JSON} / {ESTIMATOR_TENSORS}; pass a directory written by estimator.save"
        )
    try:
        doc = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EstimatorError(f"{meta_path} is not valid JSON: {err}") from None
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise EstimatorError(
            f"{meta_path} has format_version {version!r}; this catimage reads {FORMAT_VERSION}: refit the estimator"
        )
    cls = estimator_class(doc.get("kind", "?"))
    return cls._from_saved(doc, load_file(str(tensor_path)))
