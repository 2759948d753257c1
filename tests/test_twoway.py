"""Decision-focused estimators and their selection pieces, pinned on planted data and hand computations.

The planted tables have an interaction that only a prompt x candidate term can explain: on prompts
of one kind the dear candidate is much better, on the other kind both are equal; on top, every
prompt has a large random difficulty offset shared by both candidates (the part the decision
ignores) and per-sample label noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from catimage.estimators import EstimatorError, load_estimator, make_estimator
from catimage.estimators.selection import (
    calibration_slope,
    kfold,
    noise_shrinkage,
    size_grid,
    two_way,
)
from catimage.evaluation.figures import evaluate_predictions
from catimage.policy.routing import area_over_hull

COSTS = np.array([1.0, 3.0])
GAP = 0.25  # the dear candidate's advantage on "hard" prompts


def planted(n: int, seed: int, noise: float = 0.08, d: int = 8):
    """Pooled embeddings (unit rows) around 6 prompt-kind centres, the first 3 kinds hard; Y (n, 2)."""
    centres = np.random.default_rng(99).normal(size=(6, d))
    centres[:, 0] = [1.5, 1.5, 1.5, -1.5, -1.5, -1.5]  # hard kinds on one side of a hyperplane
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 6, n)
    X = centres[kind] + 0.4 * rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    hard = kind < 3
    offset = rng.normal(0, 0.12, n)  # prompt difficulty: larger than the interaction's spread
    truth = np.stack([0.5 + offset - 0.05 * hard, 0.5 + offset - 0.05 * hard + GAP * hard], axis=1)
    Y = np.clip(truth + rng.normal(0, noise, truth.shape), 0, 1)
    return X.astype(np.float32), Y, truth, hard


@pytest.fixture(scope="module")
def train():
    return planted(400, seed=0)


@pytest.fixture(scope="module")
def test_set():
    return planted(300, seed=1)


NEW = ("twoway-knn", "twoway-ridge", "ensemble", "auto")


@pytest.fixture(scope="module")
def fitted(train):
    X, Y, _, _ = train
    out = {}
    for name in NEW:
        params = {"members": ("twoway-knn", "twoway-ridge"), "folds": 3} if name in ("ensemble", "auto") else {}
        out[name] = make_estimator(name, **params).fit(X, Y, np.full(Y.shape, 2.0), costs=COSTS)
    return out


@pytest.mark.parametrize("name", NEW)
def test_learns_the_planted_interaction(fitted, test_set, name):
    X, _, truth, hard = test_set
    pred = fitted[name].predict(X)
    advantage = pred[:, 1] - pred[:, 0]
    # The dear candidate's predicted edge is GAP on hard prompts and ~0 elsewhere, whatever the offsets.
    assert advantage[hard].mean() - advantage[~hard].mean() == pytest.approx(GAP, abs=0.08)
    # Routing on it: most of the oracle's lead over the hull (the oracle routes on the noise-free truth).
    router = evaluate_predictions(pred, truth, COSTS, ["cheap", "dear"]).summary["area_over_hull"]
    oracle = evaluate_predictions(truth, truth, COSTS, ["cheap", "dear"]).summary["area_over_hull"]
    assert router > 0.7 * oracle > 0


@pytest.mark.parametrize("name", NEW)
def test_save_load_roundtrip_is_exact(fitted, test_set, name, tmp_path):
    est = fitted[name]
    est.save(tmp_path)
    doc = json.loads((tmp_path / "estimator.json").read_text())
    assert doc["kind"] == name
    loaded = load_estimator(tmp_path)
    np.testing.assert_array_equal(loaded.predict(test_set[0]), est.predict(test_set[0]))


def test_knn_neighbourhood_is_chosen_by_routing_and_generalises():
    """Noisy labels, smooth interaction: the chosen k must route held-out prompts at least as well as
    the smallest k of the grid, and the LOO scores must have been computed for the whole grid."""
    X, Y, _, _ = planted(600, seed=2, noise=0.2)
    Xt, _, truth, _ = planted(400, seed=3)
    est = make_estimator("twoway-knn").fit(X, Y, costs=COSTS)
    assert set(est.scores_) == {str(k) for k in size_grid(600, top_fraction=0.25)}
    assert est.objective_ == "routing area over hull"
    small = make_estimator("twoway-knn", k=5).fit(X, Y, costs=COSTS)
    chosen = area_over_hull(est.predict(Xt), truth, COSTS)
    assert est.k_ > 5 and chosen >= area_over_hull(small.predict(Xt), truth, COSTS)


def test_without_costs_selection_falls_back_to_interaction_mse(train):
    X, Y, _, _ = train
    est = make_estimator("twoway-ridge").fit(X, Y)
    assert est.objective_ == "interaction MSE"


def shaped(n: int, seed: int, shape: str, d: int = 8):
    """Unit-norm prompts whose dear candidate's edge is linear in the embedding (`linear`: 0.5 x0,
    what a ridge fits exactly and a neighbourhood average blurs) or an XOR of two directions (`xor`:
    0.25 sign(x0 x1), which no linear fit can express and a neighbourhood average can)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    edge = 0.5 * X[:, 0] if shape == "linear" else 0.25 * np.sign(X[:, 0] * X[:, 1])
    offset = rng.normal(0, 0.12, n)
    truth = np.stack([0.5 + offset, 0.5 + offset + edge], axis=1)
    return X.astype(np.float32), np.clip(truth + rng.normal(0, 0.08, truth.shape), 0, 1), truth


@pytest.mark.parametrize(("shape", "right", "wrong"), [("linear", "twoway-ridge", "twoway-knn"),
                                                        ("xor", "twoway-knn", "twoway-ridge")])
def test_auto_picks_the_member_the_planted_shape_calls_for(shape, right, wrong):
    """Which member should win is known from how the data were made, not from the CV scores."""
    X, Y, _ = shaped(400, 0, shape)
    Xt, _, truth = shaped(400, 1, shape)
    est = make_estimator("auto", members=("twoway-knn", "twoway-ridge"), folds=3).fit(X, Y, costs=COSTS)
    assert est.choice_.get(right, 0) > est.choice_.get(wrong, 0), est.explanation_
    assert est.explanation_.startswith("auto picked") and "inner 3-fold CV" in est.explanation_
    assert right in est.explanation_.split(":")[0]
    other = make_estimator(wrong).fit(X, Y, costs=COSTS)
    assert area_over_hull(est.predict(Xt), truth, COSTS) > area_over_hull(other.predict(Xt), truth, COSTS)


def test_ensemble_rejects_token_members():
    with pytest.raises(EstimatorError, match="pooled"):
        make_estimator("ensemble", members=("knn", "transformer")).fit(
            np.eye(6, dtype=np.float32), np.full((6, 2), 0.5))


# --- selection pieces, by hand ------------------------------------------------------------------


def test_two_way_recovers_an_additive_decomposition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=5), rng.normal(size=3)
    r = rng.normal(size=(5, 3))
    r -= r.mean(axis=1, keepdims=True)
    r -= r.mean(axis=0, keepdims=True)  # double-centred: identifiable
    tw = two_way(a[:, None] + b[None, :] + r, np.ones((5, 3)))
    np.testing.assert_allclose(tw.resid, r, atol=1e-10)
    np.testing.assert_allclose(tw.means - tw.means.mean(), b - b.mean(), atol=1e-10)


def test_two_way_single_label_row_has_no_interaction():
    Y = np.array([[0.2, 0.4], [0.6, np.nan], [0.1, 0.5]])
    tw = two_way(Y, np.ones_like(Y))
    assert tw.resid[1, 0] == pytest.approx(0.0) and np.isnan(tw.resid[1, 1])


def test_noise_shrinkage_by_hand():
    # One candidate; residuals +-0.3; every cell has 3 samples of variance 0.09 -> sigma2 = 0.09.
    resid = np.array([[0.3], [-0.3]] * 5)
    counts = np.full((10, 1), 3.0)
    var = np.full((10, 1), 0.09)
    shrunk, weights, info = noise_shrinkage(resid, counts, var)
    tau2 = 0.09 - 0.09 / 3  # mean r^2 minus the mean noise of a 3-sample mean
    assert info["tau2"][0] == pytest.approx(tau2) and info["sigma2"][0] == pytest.approx(0.09)
    np.testing.assert_allclose(shrunk, resid * tau2 / (tau2 + 0.03))
    np.testing.assert_allclose(weights, 1.0)  # equal precision: normalised to 1
    # Without variances (one sample per cell) nothing is shrunk and counts are the weights.
    same, w, _ = noise_shrinkage(resid, counts, None)
    np.testing.assert_array_equal(same, resid)
    np.testing.assert_array_equal(w, counts)


def test_calibration_slope_by_hand():
    target = np.array([[1.0], [2.0], [np.nan]])
    pred = np.array([[2.0], [4.0], [9.0]])
    # sum(t p) / sum(p^2) over labelled rows = (2 + 8) / (4 + 16) = 0.5
    assert calibration_slope(target, pred, np.ones((3, 1)))[0] == pytest.approx(0.5)
    assert calibration_slope(target, -pred, np.ones((3, 1)))[0] == 0.0  # clipped: never invert


def test_routing_score_matches_the_evaluation_area():
    rng = np.random.default_rng(4)
    pred, true = rng.random((50, 4)), rng.random((50, 4))
    costs = np.array([0.5, 1.0, 2.0, 4.0])
    ref = evaluate_predictions(pred, true, costs, list("abcd")).summary["area_over_hull"]
    assert area_over_hull(pred, true, costs) == pytest.approx(ref, abs=1e-12)


def test_grids_scale_with_the_table_and_folds_balance():
    assert max(size_grid(400, top_fraction=0.25)) == 100
    assert max(size_grid(9000, top_fraction=0.25)) == 2250
    assert min(size_grid(9000)) == 5
    folds = kfold(10, 3, seed=0)
    assert sorted(np.bincount(folds)) == [3, 3, 4]
