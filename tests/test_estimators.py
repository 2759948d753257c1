"""Estimators: planted signals are recovered, NaN labels are ignored, save/load is exact, bad input fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone

from catimage.errors import CatimageError
from catimage.estimators import EstimatorError, load_estimator, make_estimator, masked_mse
from catimage.estimators.transformer import (
    TransformerEstimator,
    build_module,
    evaluate_loss,
    loss_weights,
    make_loader,
    masked_bce_loss,
    train_epoch,
)

# Small and quick: the transformer trains a few dozen epochs on ~150 prompts.
FAST_TRANSFORMER = {"width": 32, "heads": 2, "layers": 2, "max_epochs": 40, "patience": 10, "lr": 3e-3, "batch_size": 32}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread (no OpenMP contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(n: int = 200, T: int = 6, d: int = 12, seed: int = 0, nan_frac: float = 0.1):
    """Synthetic prompts whose candidate qualities depend on one hidden direction u.

    Token features are Gaussian with variable length (zero rows = padding); the pooled embedding is
    the normalised token mean. Candidate j's true quality is sigmoid(a_j * s + b_j) with s the token
    mean projected on u, so candidates disagree about which prompts are hard (a has mixed signs).
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, n)
    tokens = rng.normal(size=(n, T, d)).astype(np.float32)
    for i, length in enumerate(lengths):
        tokens[i, length:] = 0
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    mean_tok = tokens.sum(axis=1) / lengths[:, None]
    s = (mean_tok @ u) * np.sqrt(lengths)
    a, b = np.array([2.0, -1.5, 1.0]), np.array([0.0, 0.3, -0.2])
    truth = 1 / (1 + np.exp(-(s[:, None] * a + b)))
    counts = rng.integers(1, 4, truth.shape)
    Y = np.clip(truth + rng.normal(scale=0.08, size=truth.shape) / np.sqrt(counts), 0, 1)
    Y[rng.random(Y.shape) < nan_frac] = np.nan
    pooled = (mean_tok / np.linalg.norm(mean_tok, axis=1, keepdims=True)).astype(np.float32)
    return {"tokens": tokens, "pooled": pooled, "truth": truth, "Y": Y, "counts": counts}


@pytest.fixture(scope="module")
def data():
    return planted()


def _inputs(est, data):
    return data["tokens"] if est.input_kind == "tokens" else data["pooled"]


def _make(name: str, **extra):
    params = dict(FAST_TRANSFORMER) if name == "transformer" else {}
    params.update(extra)
    return make_estimator(name, **params)


@pytest.fixture(scope="module")
def fitted(data):
    """Each estimator fitted once on train (150) with validation (25); test = the last 25."""
    tr, va = slice(0, 150), slice(150, 175)
    out = {}
    for name in ("knn", "linear", "transformer"):
        est = _make(name)
        X = _inputs(est, data)
        est.fit(X[tr], data["Y"][tr], data["counts"][tr], X[va], data["Y"][va], data["counts"][va])
        out[name] = est
    return out


@pytest.mark.parametrize("name,min_corr", [("knn", 0.7), ("linear", 0.9), ("transformer", 0.85)])
def test_recovers_planted_signal(fitted, data, name, min_corr):
    est = fitted[name]
    te = slice(175, 200)
    pred = est.predict(_inputs(est, data)[te])
    truth = data["truth"][te]
    assert pred.shape == truth.shape and pred.dtype == np.float64
    corr = [np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]
    assert min(corr) > min_corr, corr
    constant = np.nanmean(data["Y"][:150], axis=0)  # per-candidate mean of the training labels
    mse = ((pred - truth) ** 2).mean()
    base = ((constant - truth) ** 2).mean()
    assert mse < 0.6 * base, (mse, base)


def test_predictions_stay_in_the_unit_interval_where_a_linear_model_would_leave_it(fitted, data):
    """Pooled inputs 50x longer than any training row: ridge's raw output must leave [0, 1] there (a
    linear function grows with its input), so the bounds of the scaled-quality contract are the
    clip's doing, and the saturated cells sit exactly on them."""
    est = fitted["linear"]
    far = 50 * data["pooled"][175:]
    pred = est.predict(far)
    assert pred.min() >= 0 and pred.max() <= 1
    assert (pred == 0).any() and (pred == 1).any()


@pytest.mark.parametrize("name", ["knn", "linear", "transformer"])
def test_save_load_roundtrip_is_exact(fitted, data, name, tmp_path):
    est = fitted[name]
    X = _inputs(est, data)[175:]
    est.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estimator.json", "estimator.safetensors"]
    doc = json.loads((tmp_path / "estimator.json").read_text())
    assert doc["kind"] == name and doc["shapes"] == {"n_features_in": X.shape[-1], "n_candidates": 3}
    loaded = load_estimator(tmp_path)
    assert type(loaded) is type(est) and loaded.get_params() == est.get_params()
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))


@pytest.mark.parametrize("name", ["knn", "linear", "transformer"])
def test_bad_input_raises_clear_errors(fitted, data, name):
    est = _make(name)
    X, Y = _inputs(est, data)[:40], data["Y"][:40]
    with pytest.raises(EstimatorError, match="not fitted"):
        est.predict(X)
    wrong_rank = data["pooled"][:40] if est.input_kind == "tokens" else data["tokens"][:40]
    with pytest.raises(EstimatorError, match="embeddings of"):
        est.fit(wrong_rank, Y)
    with pytest.raises(EstimatorError, match="one row per prompt"):
        est.fit(X, Y[:30])
    with pytest.raises(EstimatorError, match="MetricScaler"):
        est.fit(X, Y * 5)
    with pytest.raises(EstimatorError, match="training labels had 3"):
        est.fit(X, Y, X_val=X[:5], Y_val=Y[:5, :2])
    with pytest.raises(EstimatorError, match="must match"):
        est.fit(X, Y, counts=data["counts"][:40, :2])
    no_labels = Y.copy()
    no_labels[:, 1] = np.nan
    with pytest.raises(EstimatorError, match=r"candidate column\(s\) \[1\]"):
        est.fit(X, no_labels)
    fit_est = fitted[name]
    with pytest.raises(EstimatorError, match="same embedder"):
        fit_est.predict(X[..., :5])
    assert issubclass(EstimatorError, CatimageError)


def test_make_estimator_errors_and_sklearn_params():
    with pytest.raises(CatimageError, match="choose one of"):
        make_estimator("forest")
    with pytest.raises(CatimageError, match="valid ones"):
        make_estimator("knn", n_neighbours=3)
    est = make_estimator("linear", alphas=(0.1, 1.0))
    twin = clone(est)
    assert twin.get_params() == {"alphas": (0.1, 1.0), "use_counts": True}
    assert make_estimator("transformer").input_kind == "tokens"


def test_knn_hand_computed_nan_and_count_weighting():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    Y = np.array([[0.2, np.nan], [0.8, 0.4], [0.0, 1.0]])
    counts = np.array([[1, 0], [3, 2], [1, 1]])
    est = make_estimator("knn", k=2).fit(X, Y, counts)
    pred = est.predict(np.array([[1.0, 0.05]], dtype=np.float32))
    # Neighbours: rows 0 and 1. Candidate 0: (1*0.2 + 3*0.8) / 4; candidate 1: row 0 has no label.
    np.testing.assert_allclose(pred, [[0.65, 0.4]])
    unweighted = make_estimator("knn", k=2, use_counts=False).fit(X, Y, counts)
    np.testing.assert_allclose(unweighted.predict(np.array([[1.0, 0.05]], dtype=np.float32)), [[0.5, 0.4]])


def test_knn_auto_k_is_the_validation_argmin(fitted):
    est = fitted["knn"]
    assert set(est.val_mse_) == {5, 10, 20, 40, 80}
    assert est.k_ == min(est.val_mse_, key=est.val_mse_.get)
    # Without validation data, k is chosen by leave-one-out: at most n - 1 neighbours remain.
    assert make_estimator("knn").fit(np.eye(4, dtype=np.float32), np.full((4, 1), 0.5)).k_ == 3


def test_linear_drops_nan_rows_per_candidate(data):
    X, Y = data["pooled"][:120], data["Y"][:120].copy()
    Y[:40, 0] = np.nan
    full = make_estimator("linear", alphas=(1.0,), use_counts=False).fit(X, Y)
    rows = np.isfinite(Y[:, 0])
    alone = make_estimator("linear", alphas=(1.0,), use_counts=False).fit(X[rows], Y[rows, :1])
    np.testing.assert_allclose(full.coef_[0], alone.coef_[0], atol=1e-10)
    np.testing.assert_allclose(full.intercept_[0], alone.intercept_[0], atol=1e-10)


def test_linear_alpha_chosen_on_validation(data):
    X, Y = data["pooled"], data["Y"]
    est = make_estimator("linear", alphas=(1e-3, 1e3)).fit(X[:150], Y[:150], X_val=X[150:], Y_val=Y[150:])
    # A huge penalty flattens the planted slope: validation must prefer the small one.
    assert (est.alpha_ == 1e-3).all()


def test_masked_bce_ignores_missing_labels():
    probs = torch.tensor([[0.7, 0.2], [0.4, 0.9]])
    y = torch.tensor([[1.0, 0.0], [0.5, 0.3]])
    w = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    y_other = y.clone()
    y_other[0, 1] = 1.0  # the masked entry's value must not matter
    row0 = -np.log(0.7)  # the second entry has weight 0
    row1 = -(0.5 * np.log(0.4) + 0.5 * np.log(0.6)) + 2 * -(0.3 * np.log(0.9) + 0.7 * np.log(0.1))
    expected = (row0 + row1) / 2
    assert float(masked_bce_loss(probs, y, w)) == pytest.approx(expected, rel=1e-5)
    assert float(masked_bce_loss(probs, y_other, w)) == pytest.approx(expected, rel=1e-5)
    Y = np.array([[0.5, np.nan], [np.nan, 0.25]])
    counts = np.array([[2, 0], [0, 4]])
    np.testing.assert_allclose(loss_weights(Y, counts), [[2 / 3, 0], [0, 4 / 3]])


def test_transformer_with_nan_labels_is_finite_and_deterministic(data):
    X, Y = data["tokens"][:80], data["Y"][:80].copy()
    Y[::2, 1] = np.nan
    params = dict(FAST_TRANSFORMER, max_epochs=4)
    a = make_estimator("transformer", **params).fit(X, Y, data["counts"][:80])
    b = make_estimator("transformer", **params).fit(X, Y, data["counts"][:80])
    pa, pb = a.predict(X), b.predict(X)
    assert np.isfinite(pa).all()
    np.testing.assert_array_equal(pa, pb)
    assert len(a.val_loss_) == 4  # 80 prompts: 10% held out internally for early stopping


def test_transformer_early_stopping_keeps_the_best_epoch(data):
    """Brute force: the weights early stopping restores are those of a fit that simply ran
    best_epoch + 1 epochs (same seed, same batches), and it stopped `patience` epochs after them."""
    X, Y, counts = data["tokens"][:150], data["Y"][:150], data["counts"][:150]
    params = dict(FAST_TRANSFORMER, lr=1e-2, patience="auto", max_epochs=60)
    stopped = make_estimator("transformer", **params).fit(X, Y, counts)
    assert stopped.patience_ == 10  # "auto": a sixth of the 60-epoch cap
    best = stopped.best_epoch_
    assert stopped.val_loss_[best] == min(stopped.val_loss_)
    assert len(stopped.train_loss_) == best + 1 + stopped.patience_ < 60  # it stopped early, on patience
    straight = make_estimator("transformer", **dict(params, max_epochs=best + 1, patience=10_000)).fit(X, Y, counts)
    np.testing.assert_array_equal(stopped.predict(X), straight.predict(X))


def test_transformer_padding_does_not_change_predictions(fitted, data):
    est = fitted["transformer"]
    X = data["tokens"][175:]
    padded = np.concatenate([X, np.zeros((X.shape[0], 5, X.shape[2]), np.float32)], axis=1)
    np.testing.assert_allclose(est.predict(padded), est.predict(X), atol=1e-6)


def test_transformer_epoch_pieces_make_a_normal_estimator(data, tmp_path):
    """What a Ray Train worker does: build, loop train_epoch, wrap with from_module, save."""
    X, Y, counts = data["tokens"][:100], data["Y"][:100], data["counts"][:100]
    params = dict(FAST_TRANSFORMER)
    torch.manual_seed(0)
    module = build_module(X.shape[-1], Y.shape[1], width=32, heads=2, layers=2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    loader = make_loader(X, Y, loss_weights(Y, counts), batch_size=32)
    before = evaluate_loss(module, X, Y, counts)
    for _ in range(5):
        train_epoch(module, loader, optimizer)
    after = evaluate_loss(module, X, Y, counts)
    assert after < before
    est = TransformerEstimator.from_module(module, params)
    est.save(tmp_path)
    np.testing.assert_array_equal(load_estimator(tmp_path).predict(X), est.predict(X))
    with pytest.raises(EstimatorError, match="does not match"):
        TransformerEstimator.from_module(module, dict(params, width=64, heads=4))


def test_masked_mse_weights():
    pred = np.array([[0.5, 0.5]])
    Y = np.array([[1.0, np.nan]])
    assert masked_mse(pred, Y) == pytest.approx(0.25)
    with pytest.raises(EstimatorError, match="no labelled"):
        masked_mse(pred, np.full((1, 2), np.nan))


def test_linear_ridge_path_matches_sklearn_ridge():
    """The one-SVD alpha sweep must give exactly what sklearn's weighted Ridge gives."""
    from sklearn.linear_model import Ridge

    from catimage.estimators.linear import ridge_path

    rng = np.random.default_rng(0)
    X, y, w = rng.normal(size=(60, 8)), rng.normal(size=60), rng.integers(1, 4, size=60).astype(float)
    for alpha, coef, intercept in ridge_path(X, y, w, [0.01, 1.0, 30.0]):
        ref = Ridge(alpha=alpha).fit(X, y, sample_weight=w)
        np.testing.assert_allclose(coef, ref.coef_, rtol=1e-8, atol=1e-10)
        assert intercept == pytest.approx(ref.intercept_, rel=1e-8, abs=1e-10)
