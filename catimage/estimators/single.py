"""The single estimators (every kind but the ensembles), by name: what an ensemble combines.

Kept apart from the package's registry so that `ensemble` builds its members without importing the
registry that lists the ensembles themselves. The transformer (and torch) is imported only when
asked for, so commands that use the cheap estimators start fast.
"""

from __future__ import annotations

from catimage.estimators.base import EstimatorError, QualityEstimator
from catimage.estimators.knn import KNNEstimator
from catimage.estimators.linear import LinearEstimator
from catimage.estimators.twoway import TwoWayKNNEstimator, TwoWayRidgeEstimator

_CHEAP: dict[str, type[QualityEstimator]] = {
    "knn": KNNEstimator,
    "linear": LinearEstimator,
    "twoway-knn": TwoWayKNNEstimator,
    "twoway-ridge": TwoWayRidgeEstimator,
}
SINGLE_KINDS: tuple[str, ...] = ("knn", "linear", "transformer", "twoway-knn", "twoway-ridge")


def single_estimator_class(name: str) -> type[QualityEstimator]:
    """The class of single estimator `name`."""
    if name == "transformer":
        from catimage.estimators.transformer import TransformerEstimator

        return TransformerEstimator
    try:
        return _CHEAP[name]
    except KeyError:
        raise EstimatorError(f"unknown single estimator {name!r}; choose one of {list(SINGLE_KINDS)}") from None


def make_single_estimator(name: str, **params: object) -> QualityEstimator:
    """An unfitted single estimator of kind `name`."""
    cls = single_estimator_class(name)
    try:
        return cls(**params)
    except TypeError as err:
        valid = sorted(cls().get_params())
        raise EstimatorError(f"bad parameters for the {name} estimator ({err}); valid ones: {valid}") from None
