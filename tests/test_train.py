"""The Ray Train job on a synthesised quality table with a planted signal (tests/train_serve_fixtures.py).

One real Ray Train run (1 worker actor) is shared by most tests; it is told to fail once at epoch 2
(`fail_at_epoch`, a test hook), so it also proves that `FailureConfig` restarts the worker and the
loop resumes from the epoch-1 checkpoint instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from train_serve_fixtures import (
    CANDIDATES,
    planted_prompts,
    planted_table,
    tiny_pool_dict,
    write_planted_table,
    write_pool,
)

from catimage.errors import CatimageError
from catimage.tables.table import write_quality_table

PARAMS = {"width": 32, "layers": 1, "heads": 2, "lr": 3e-3, "batch_size": 8, "patience": 4, "dropout": 0.0}
MAX_EPOCHS = 12


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_planted_table(tmp_path_factory.mktemp("train") / "table.parquet")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return write_pool(tmp_path_factory.mktemp("pool") / "pool.yaml", tiny_pool_dict())


@pytest.fixture(scope="module")
def trained(ray_local, table, pool, tmp_path_factory):
    from jobs.train_estimator import run_train

    out = tmp_path_factory.mktemp("model") / "router"
    outcome = run_train(
        table, pool, out, estimator="transformer", embedder="tfidf", num_workers=1, max_epochs=MAX_EPOCHS,
        estimator_params=PARAMS, calibration_frac=0.2, max_failures=1, fail_at_epoch=2,
    )
    return outcome


@pytest.mark.slow  # pays for the shared Ray Train run (~30-70 s on 2 cores, with one worker restart)
def test_worker_failure_resumes_from_checkpoint(trained):
    assert trained.resumed_at == [2]  # restarted once, at the epoch after the last checkpoint
    epochs = [h["epoch"] for h in trained.history]
    assert epochs == list(range(len(epochs)))  # no epoch repeated or skipped by the restart
    assert Path(trained.ray_run_path).is_dir()
    marker = list(Path(trained.ray_run_path).parent.glob("*.injected-failure"))
    assert len(marker) == 1


def test_best_epoch_and_early_stopping_bookkeeping(trained):
    val = [h["val_loss"] for h in trained.history]
    assert trained.best_val_loss == pytest.approx(min(val))
    assert trained.best_epoch == int(np.argmin(val))
    assert trained.best_val_loss < val[0]  # it learned something
    assert len(val) <= MAX_EPOCHS
    # Train keeps the two best checkpoints by val_loss (CheckpointConfig(num_to_keep=2)), plus the
    # latest one, which it always keeps to resume from.
    kept = [p for p in Path(trained.ray_run_path).iterdir() if p.is_dir() and p.name.startswith("checkpoint")]
    assert 1 <= len(kept) <= 3 < len(trained.history)


def test_model_directory_loads_and_learned_the_planted_signal(trained):
    from catimage.model.router_model import RouterModel

    model = RouterModel.load(trained.model_dir)
    assert model.candidates == list(CANDIDATES)
    assert model.costs.tolist() == [2.0, 8.0, 6.0]
    assert model.metric == "quality" and model.cost_unit == "relative"
    assert type(model.estimator).__name__ == "TransformerEstimator"
    assert model.calibration_pred.shape == (trained.n_calibration, 3)
    prompts = planted_prompts()
    pred = model.predict([p for p, _ in prompts])
    animal = np.array([kind == "animal" for _, kind in prompts])
    sd2, sdxl = CANDIDATES.index("tiny-sd-2"), CANDIDATES.index("tiny-sdxl-4")
    # Planted: tiny-sd-2 is good on animals and bad on text; tiny-sdxl-4 the other way round.
    assert pred[animal, sd2].mean() - pred[~animal, sd2].mean() > 0.1
    assert pred[~animal, sdxl].mean() - pred[animal, sdxl].mean() > 0.1
    summary = json.loads((Path(trained.model_dir) / "train_summary.json").read_text())
    assert summary["best_epoch"] == trained.best_epoch and summary["resumed_at"] == [2]


def test_serve_app_routes_with_the_trained_model(trained, pool, tiny_cache):
    """The Ray-trained Transformer bundle, served (Serve's local testing mode: the real deployments,
    in-process) and asked to route: it sends the planted animal prompts to the cheap tiny-sd-2 and the
    sign prompts elsewhere, as the planted table says it should."""
    from ray import serve

    from serve.app import AppArgs, build_app
    from serve.schemas import RouteRequest

    handle = serve.run(build_app(AppArgs(model_dir=trained.model_dir, pool=str(pool), budget=4.0)), _local_testing_mode=True)
    animals = ["a photo of a horse in the snow", "a photo of a wolf on a beach"]
    signs = ['a street sign that reads "EXIT"', 'a poster that reads "OPEN"']
    answer = handle.route.remote(RouteRequest(prompts=animals + signs), None).result()
    chosen = [d.candidate for d in answer.decisions]
    assert chosen[:2] == ["tiny-sd-2", "tiny-sd-2"], answer
    assert "tiny-sd-2" not in chosen[2:], answer
    assert answer.mean_cost <= 8.0 and all(d.lambda_ > 0 for d in answer.decisions)


def test_local_mode_zero_workers(ray_local, table, pool, tmp_path):
    """num_workers=0 runs the loop in the driver; checkpoints must still be kept (Train keeps none)."""
    from catimage.model.router_model import RouterModel
    from jobs.train_estimator import run_train

    outcome = run_train(
        table, pool, tmp_path / "m", embedder="tfidf", num_workers=0, max_epochs=3,
        estimator_params=PARAMS, calibration_frac=0.2,
    )
    assert [h["epoch"] for h in outcome.history] == [0, 1, 2]
    model = RouterModel.load(outcome.model_dir)
    assert model.predict(["a photo of a cat"]).shape == (1, 3)


def test_knn_fits_in_process_without_ray(table, pool, tmp_path):
    from catimage.model.router_model import RouterModel
    from jobs.train_estimator import main

    assert main([str(table), "--pool", str(pool), "--out", str(tmp_path / "knn"), "--estimator", "knn", "--embedder", "tfidf"]) == 0
    model = RouterModel.load(tmp_path / "knn")
    decision = model.decide(["a photo of a fox in the snow"], budget=2.5)[0]
    assert decision.candidate == "tiny-sd-2"


def test_table_with_unknown_candidate_is_a_user_error(pool, tmp_path):
    from jobs.train_estimator import main, run_train

    t = planted_table()
    t = t.set_column(t.column_names.index("candidate"), "candidate", pa.array(["mystery"] * t.num_rows))
    path = write_quality_table(t, tmp_path / "bad.parquet")
    with pytest.raises(CatimageError, match="does not declare"):
        run_train(path, pool, tmp_path / "out", estimator="knn", embedder="tfidf")
    assert main([str(path), "--pool", str(pool), "--out", str(tmp_path / "o"), "--estimator", "knn", "--embedder", "tfidf"]) == 2
