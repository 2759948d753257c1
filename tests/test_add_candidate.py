"""Adding a candidate to a fitted router from a few labelled prompts, without retraining."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from catimage.cli import app
from catimage.errors import CatimageError
from catimage.model.add_candidate import add_from_table, ridge_loo
from catimage.model.router_model import RouterModel
from catimage.tables.pool import pool_from_dict
from catimage.tables.table import QualityMatrix, write_quality_table

CATS = ["a cat sleeping on a sofa", "a kitten playing with yarn", "a tabby cat on a windowsill", "a cat in a box"]
SHIPS = ["a sailing ship in a storm", "a pirate ship at sea", "an old ship in the harbour", "a ship under full sail"]


def _prompts(n: int, offset: int = 0) -> tuple[list[str], np.ndarray]:
    ship = (np.arange(n) + offset) % 2 == 1
    texts = [f"{(SHIPS if s else CATS)[i % 4]}, picture {i + offset}" for i, s in enumerate(ship)]
    return texts, ship


@pytest.fixture(scope="module")
def router() -> RouterModel:
    """Two base candidates, equally good on both kinds; prompt offsets make labels noisy."""
    rng = np.random.default_rng(0)
    prompts, _ = _prompts(120)
    offset = rng.normal(0, 0.1, 120)
    mean = np.stack([0.5 + offset, 0.6 + offset], axis=1) + rng.normal(0, 0.03, (120, 2))
    matrix = QualityMatrix([f"p{i}" for i in range(120)], prompts, ["cheap", "mid"], "quality", mean,
                           np.ones((120, 2), int), np.full((120, 2), np.nan), np.full(2, np.nan))
    return RouterModel.fit(matrix, np.array([1.0, 2.0]), "seconds", "tfidf", {"dim": None}, "twoway-knn", calibration_frac=0.2)


def _new_labels(prompts: list[str], ship: np.ndarray, seed: int) -> np.ndarray:
    """The new candidate 'ace' is excellent on ships, poor on cats."""
    return np.where(ship, 0.95, 0.3) + np.random.default_rng(seed).normal(0, 0.03, len(prompts))


def test_added_candidate_is_routed_to_where_it_is_best(router, tmp_path):
    model = RouterModel.load(router.save(tmp_path / "base"))
    prompts, ship = _prompts(40, offset=1000)
    added = model.add_candidate("ace", 2.5, prompts, _new_labels(prompts, ship, 1))
    assert model.candidates == ["cheap", "mid", "ace"] and model.costs.tolist() == [1.0, 2.0, 2.5]
    test_prompts, test_ship = _prompts(20, offset=5000)
    chosen = [d.candidate for d in model.decide(test_prompts, lam=0.0)]
    assert all(c == "ace" for c, s in zip(chosen, test_ship) if s)
    assert not any(c == "ace" for c, s in zip(chosen, test_ship) if not s)
    pred = model.predict(test_prompts)[:, 2]
    # True gap 0.65 (labels above the base table's range are clipped by its scaler): most of it is learnt.
    assert pred[test_ship].mean() - pred[~test_ship].mean() > 0.4
    assert model.calibration_pred.shape[1] == 3  # budgets now account for the new candidate
    assert model.lambda_for_budget(2.5) == 0.0
    # Round trip: the saved router keeps the candidate and predicts the same.
    again = RouterModel.load(model.save(tmp_path / "with-ace"))
    assert again.candidates == model.candidates and again.added[0].n_labels == added.n_labels == 40
    np.testing.assert_allclose(again.predict(test_prompts), model.predict(test_prompts))


def test_add_candidate_errors(router):
    with pytest.raises(CatimageError, match="already"):
        router.add_candidate("mid", 1.0, ["a cat"] * 5, np.full(5, 0.5))
    with pytest.raises(CatimageError, match="at least 3"):
        router.add_candidate("new", 1.0, ["a cat", "a ship"], np.array([0.5, 0.6]))


def test_add_from_table_uses_pool_cost_and_base_rows(router):
    prompts, ship = _prompts(30, offset=2000)
    labels = _new_labels(prompts, ship, 2)
    rows = {"prompt_id": [f"n{i}" for i in range(30)] * 2, "prompt": prompts * 2,
            "candidate": ["ace"] * 30 + ["cheap"] * 30, "quality": [*labels, *np.full(30, 0.5)]}
    model = copy.deepcopy(router)  # keep the module fixture untouched
    pool = pool_from_dict({"cost_unit": "seconds", "candidates": [{"name": "ace", "cost": 2.5}]})
    added = add_from_table(model, pa.table(rows), pool)
    assert [a.name for a in added] == ["ace"] and added[0].cost == 2.5 and added[0].n_labels == 30


def test_ridge_loo_recovers_a_linear_rule():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(60, 3))
    y = F @ np.array([0.5, -0.2, 0.0]) + 0.1 + rng.normal(0, 0.01, 60)
    alpha, coef, intercept = ridge_loo(F, y, np.ones(60))
    np.testing.assert_allclose(coef, [0.5, -0.2, 0.0], atol=0.02)
    assert intercept == pytest.approx(0.1, abs=0.01) and alpha < 1


def test_cli_add_candidate(router, tmp_path):
    base = router.save(tmp_path / "base")
    prompts, ship = _prompts(30, offset=3000)
    table = pa.table({"prompt_id": [f"n{i}" for i in range(30)], "prompt": prompts, "candidate": ["ace"] * 30,
                      "quality": _new_labels(prompts, ship, 3)})
    write_quality_table(table, tmp_path / "new.parquet")
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(
        {"cost_unit": "seconds", "candidates": [{"name": "cheap", "cost": 1.0}, {"name": "mid", "cost": 2.0},
                                          {"name": "ace", "cost": 2.5}]}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["add-candidate", str(base), "--table", str(tmp_path / "new.parquet"),
                                      "--pool", str(tmp_path / "pool.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "added ace" in result.output
    assert RouterModel.load(out).candidates == ["cheap", "mid", "ace"]
    again = CliRunner().invoke(app, ["add-candidate", str(out), "--table", str(tmp_path / "new.parquet"),
                                     "--pool", str(tmp_path / "pool.yaml"), "--out", str(tmp_path / "o2")])
    assert again.exit_code == 2 and "lacks" in again.output
