"""Ray Train job: fit the router's quality estimator and write a model directory `RouterModel.load` reads.

    python jobs/train_estimator.py TABLE --pool POOL.yaml --out DIR [--estimator transformer]
        [--embedder minilm] [--num-workers 1] [--use-gpu] [--max-epochs 50]
    ray job submit --working-dir . -- python jobs/train_estimator.py ...      (on a cluster)

The Transformer estimator trains on a Ray Train `TorchTrainer`: the driver reads the quality table,
averages samples per (prompt, candidate), fits the metric scaler on the train split and embeds every
prompt once (per-token); the arrays reach the workers as Ray Data datasets (`train` sharded across
workers, `val` whole on each). Each epoch every worker reports its validation loss with a checkpoint
(the estimator in the core's safetensors + JSON format, plus the optimizer and early-stopping state);
Train keeps the two best by validation loss, retries failed workers (`FailureConfig`) and the loop
resumes from the latest checkpoint. The best checkpoint becomes the bundle's estimator.

Every other estimator is cheap and fits in-process. Either way the whole fit is
`catimage.router_model.fit_router` (the pipeline `catimage fit` and `catimage evaluate` use): this
job only supplies its `fit_estimator` hook, so the split, scaler, embedder and calibration set are
the same as an in-process fit's and a Train-fitted bundle is interchangeable with one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Runnable as a script (`python jobs/train_estimator.py`, `ray job submit -- python ...`) from a
# checkout where the package is not installed.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from catimage.errors import CatimageError  # noqa: E402

log = logging.getLogger("catimage.jobs.train")

RAY_TRAINED = ("transformer",)
IN_PROCESS = ("knn", "linear", "twoway-knn", "twoway-ridge", "ensemble", "auto")
ESTIMATOR_CHOICES = RAY_TRAINED + IN_PROCESS
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ESTIMATOR_SUBDIR = "estimator"
SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainOutcome:
    """What `run_train` did: where the model is and how training went."""

    model_dir: str
    estimator: str
    embedder: str
    n_train: int
    n_cal: int
    best_epoch: int | None = None
    best_val_loss: float | None = None
    epochs_run: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    ray_run_path: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Data preparation (driver)
# ---------------------------------------------------------------------------------------------


def _to_dataset(X: np.ndarray, Y: np.ndarray, weights: np.ndarray) -> Any:
    """A Ray dataset with tensor columns x (T, d), y (M,) (NaN -> 0) and w (M,) loss weights."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table(
        {
            "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
            "y": ArrowTensorArray.from_numpy(np.nan_to_num(Y).astype(np.float32)),
            "w": ArrowTensorArray.from_numpy(weights.astype(np.float32)),
        }
    )
    return ray.data.from_arrow(table)


# ---------------------------------------------------------------------------------------------
# Worker loop
# ---------------------------------------------------------------------------------------------


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the model in .module


def _save_checkpoint(directory: Path, module: Any, optimizer: Any, params: dict[str, Any], state: dict[str, Any]) -> None:
    """Estimator (core format) + optimizer tensors + loop state, all safetensors/JSON (no pickle)."""
    from safetensors.torch import save_file

    from catimage.estimators.transformer import TransformerEstimator

    est = TransformerEstimator.from_module(_unwrap(module), params, count_scale=state["count_scale"])
    est.save(directory / ESTIMATOR_SUBDIR)
    opt = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": opt["param_groups"], "state": {}}
    for idx, slot in opt["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in slot.items():
            if hasattr(value, "detach"):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][name] = value
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps({**state, "optimizer": meta}, indent=2))


def _load_checkpoint(directory: Path, module: Any, optimizer: Any) -> dict[str, Any]:
    """Restore weights and optimizer in place; return the loop state saved with them."""
    import torch
    from safetensors.torch import load_file

    from catimage.estimators import load_estimator

    saved = load_estimator(directory / ESTIMATOR_SUBDIR)
    _unwrap(module).load_state_dict(saved.module_.state_dict())
    state = json.loads((directory / STATE_FILE).read_text())
    meta = state.pop("optimizer")
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    device = next(_unwrap(module).parameters()).device
    opt_state = {i: {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "step" else v) for k, v in s.items()} for i, s in opt_state.items()}
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    return state


def _val_arrays(shard: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole validation set as numpy arrays (it is small: one row per held-out prompt)."""
    xs, ys, ws = [], [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
        ws.append(batch["w"])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: AdamW epochs over the `train` shard, validation loss + checkpoint each epoch.

    Every worker computes the same validation loss on the full `val` set, so all of them stop at the
    same epoch and call `ray.train.report` the same number of times (it is a barrier). Returns the
    loop state (history, best epoch, resumptions), which Train hands back as `Result.return_value`.
    """
    import ray.train
    import ray.train.torch
    import torch

    from catimage.estimators.transformer import arch_params, build_module, masked_bce_loss, predict_module, train_epoch

    params = dict(config["params"])
    torch.manual_seed(int(params.get("random_state", 0)))
    module = build_module(config["d_in"], config["n_outputs"], **arch_params(params))
    module = ray.train.torch.prepare_model(module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))

    state: dict[str, Any] = {
        "epoch": -1, "best_val_loss": None, "best_epoch": None, "waited": 0, "history": [], "resumed_at": [],
        "count_scale": float(config["count_scale"]),
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = _load_checkpoint(Path(ckpt_dir), module, optimizer)
        state["resumed_at"] = [*state["resumed_at"], state["epoch"] + 1]
        log.info("resumed from the checkpoint of epoch %d", state["epoch"])

    X_val, Y_val, W_val = _val_arrays(ray.train.get_dataset_shard("val"))
    train_shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    batch_size, patience = int(params["batch_size"]), int(params["patience"])
    fail_at = config.get("fail_at_epoch")
    # Local mode (num_workers=0) keeps no copy of a reported checkpoint: write them where they stay.
    local_root = Path(config["local_checkpoint_root"]) if config.get("local_checkpoint_root") else None

    for epoch in range(state["epoch"] + 1, int(config["max_epochs"])):
        epoch_start = time.perf_counter()
        if fail_at is not None and epoch == fail_at and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text(f"failed once at epoch {epoch}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch} (test hook)")
        batches = (
            (b["x"], b["y"], b["w"])
            for b in train_shard.iter_torch_batches(
                batch_size=batch_size, dtypes=torch.float32,
                local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=epoch,
            )
        )
        train_loss = train_epoch(module, batches, optimizer)
        train_s = time.perf_counter() - epoch_start
        probs = torch.from_numpy(predict_module(_unwrap(module), X_val))
        val_loss = float(masked_bce_loss(probs, torch.from_numpy(Y_val).double(), torch.from_numpy(W_val).double()))
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"] - 1e-7:
            state["best_val_loss"], state["best_epoch"], state["waited"] = val_loss, epoch, 0
        else:
            state["waited"] += 1
        state["epoch"] = epoch
        state["history"] = [*state["history"], {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}]
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_epoch": state["best_epoch"],
            "train_s": train_s,
        }
        saved_params = {**params, "device": "cpu"}
        if local_root is not None:
            ckpt_dir = local_root / f"epoch_{epoch:04d}"
            _save_checkpoint(ckpt_dir, module, optimizer, saved_params, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            for old in local_root.glob("epoch_*"):
                if old.name not in (f"epoch_{epoch:04d}", f"epoch_{state['best_epoch']:04d}"):
                    shutil.rmtree(old, ignore_errors=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _save_checkpoint(Path(tmp), module, optimizer, saved_params, state)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        log.info("epoch %d: train %.4f, val %.4f (%.2f s)", epoch, train_loss, val_loss, time.perf_counter() - epoch_start)
        if state["waited"] >= patience:
            break
    return state


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _transformer_params(estimator_params: dict[str, Any] | None, max_epochs: int | None) -> dict[str, Any]:
    from catimage.estimators import make_estimator

    est = make_estimator("transformer", **(estimator_params or {}))  # validates names and defaults
    params = est.get_params()
    if max_epochs is not None:
        params["max_epochs"] = int(max_epochs)
    params["device"] = "cpu"  # where the saved estimator loads; Train places the workers' copies
    return params


def _init_ray(num_cpus: int | None) -> None:
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)


def run_train(
    table_path: str | Path,
    pool_path: str | Path,
    out_dir: str | Path,
    estimator: str = "transformer",
    embedder: str = "minilm",
    metric: str | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    max_epochs: int | None = 50,
    *,
    estimator_params: dict[str, Any] | None = None,
    embedder_params: dict[str, Any] | None = None,
    calibration_frac: float = 0.1,
    seed: int = 0,
    max_failures: int = 2,
    storage_path: str | Path | None = None,
    num_cpus: int | None = None,
    fail_at_epoch: int | None = None,
) -> TrainOutcome:
    """Fit an estimator on a quality table and write the router bundle to `out_dir`.

    The fit is `catimage.router_model.fit_router` (the pipeline `fit` and `evaluate` use), with
    the estimator fit handed to Ray Train for the transformer: `num_workers` workers (0 = in the
    driver process; `use_gpu` gives each a GPU); every other estimator fits in-process.
    `max_failures` worker failures are retried from the latest checkpoint. Checkpoints live under
    `storage_path` (default: `<out_dir>/ray_train`; use shared storage on a multi-node cluster).
    `fail_at_epoch` is a test hook: the worker raises once at that epoch so the retry path can be
    checked.
    """
    from catimage.estimators import ESTIMATOR_KINDS
    from catimage.model.router_model import RouterModel
    from catimage.tables.table import load_pool_matrix, split_prompts

    start = time.perf_counter()
    estimator = estimator.lower()
    if estimator not in ESTIMATOR_KINDS:
        raise CatimageError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATOR_KINDS)}")
    if num_workers < 0:
        raise CatimageError(f"num_workers must be >= 0, got {num_workers}")
    out_dir = Path(out_dir)
    pool, matrix, costs = load_pool_matrix(table_path, pool_path, metric=metric)
    split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=calibration_frac, seed=seed)
    outcome = TrainOutcome(str(out_dir), estimator, embedder, len(split.train), len(split.calibration))
    hook = None
    if estimator in RAY_TRAINED:
        hook = _RayTrainFit(
            outcome, out_dir, num_workers=num_workers, use_gpu=use_gpu, max_epochs=max_epochs,
            max_failures=max_failures, storage_path=storage_path, num_cpus=num_cpus, fail_at_epoch=fail_at_epoch,
        )
    params = dict(estimator_params or {})
    if estimator in RAY_TRAINED and max_epochs is not None:
        params["max_epochs"] = int(max_epochs)
    model = RouterModel.fit(
        matrix, costs, pool.cost_unit, embedder_name=embedder, embedder_params=embedder_params,
        estimator_name=estimator, estimator_params=params, calibration_frac=calibration_frac, seed=seed,
        notes=pool.report_notes(), fit_estimator=hook,
    )
    model.save(out_dir)
    outcome.seconds = time.perf_counter() - start
    (out_dir / SUMMARY_FILE).write_text(json.dumps(asdict(outcome), indent=2))
    if outcome.best_epoch is not None:
        log.info("best epoch %d, val loss %.4f; model written to %s", outcome.best_epoch, outcome.best_val_loss, out_dir)
    return outcome


class _RayTrainFit:
    """The `fit_estimator` hook of `fit_router` that trains the transformer on Ray Train.

    Early stopping holds out the same prompts TransformerEstimator.fit would (its
    `validation_fraction`, permuted with its `random_state`), so a Train-fitted bundle matches an
    in-process one; the calibration prompts stay out of training entirely.
    """

    def __init__(self, outcome: TrainOutcome, out_dir: Path, **options: Any) -> None:
        self.outcome = outcome
        self.out_dir = out_dir
        self.options = options

    def __call__(self, est: Any, data: Any) -> Any:
        import ray.train
        from ray.train.torch import TorchTrainer

        from catimage.estimators import load_estimator
        from catimage.estimators.transformer import as_token_batch, early_stopping_split, loss_weights

        o = self.options
        params = _transformer_params(est.get_params(), o["max_epochs"])
        X = as_token_batch(data.X)
        batch_size, max_epochs = est._schedule(len(X))
        params["batch_size"], params["max_epochs"] = batch_size, max_epochs
        tr, va = early_stopping_split(len(X), float(params["validation_fraction"]), int(params["random_state"]))
        if va.size == 0:
            raise CatimageError("Ray Train needs validation prompts for early stopping: use at least 20 training prompts")
        counts = data.counts if params.get("use_counts", True) else None
        count_scale = est._mean_count(data.Y[tr], counts[tr]) if counts is not None else 1.0
        w = loss_weights(data.Y[tr], None if counts is None else counts[tr], count_scale)
        w_val = loss_weights(data.Y[va], None if counts is None else counts[va], count_scale)
        X_train, X_val = X[tr].padded(), X[va].padded()

        _init_ray(o["num_cpus"])
        storage = Path(o["storage_path"]) if o["storage_path"] is not None else self.out_dir / "ray_train"
        storage.mkdir(parents=True, exist_ok=True)
        run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        num_workers = o["num_workers"]
        loop_config = {
            "params": params, "d_in": int(X.shape[-1]), "n_outputs": int(data.Y.shape[1]),
            "max_epochs": int(params["max_epochs"]), "count_scale": count_scale,
            "fail_at_epoch": o["fail_at_epoch"], "fail_marker": str(storage / f"{run_name}.injected-failure"),
            "local_checkpoint_root": str(storage / run_name / "local_checkpoints") if num_workers == 0 else None,
        }
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=o["use_gpu"]),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(storage.resolve()),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
                ),
                failure_config=ray.train.FailureConfig(max_failures=o["max_failures"]),
            ),
            datasets={"train": _to_dataset(X_train, data.Y[tr], w), "val": _to_dataset(X_val, data.Y[va], w_val)},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        log.info("Ray Train: %d train / %d early-stopping prompts, %d worker(s), gpu=%s",
                 tr.size, va.size, num_workers, o["use_gpu"])
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train run failed after {o['max_failures']} retries: {result.error}") from result.error
        last_state = result.return_value
        if not last_state or last_state.get("best_epoch") is None:
            raise RuntimeError("Ray Train finished without a validated epoch; max_epochs must be >= 1")
        if num_workers == 0:
            best_dir = Path(loop_config["local_checkpoint_root"]) / f"epoch_{last_state['best_epoch']:04d}"
            fitted = load_estimator(best_dir / ESTIMATOR_SUBDIR)
        else:
            best = result.get_best_checkpoint(metric="val_loss", mode="min")
            with best.as_directory() as best_dir:
                fitted = load_estimator(Path(best_dir) / ESTIMATOR_SUBDIR)
        fitted.best_epoch_ = int(last_state["best_epoch"])
        fitted.train_loss_ = [h["train_loss"] for h in last_state["history"]]
        fitted.val_loss_ = [h["val_loss"] for h in last_state["history"]]
        oc = self.outcome
        oc.best_epoch, oc.best_val_loss = int(last_state["best_epoch"]), float(last_state["best_val_loss"])
        oc.epochs_run, oc.history = len(last_state["history"]), last_state["history"]
        oc.resumed_at, oc.ray_run_path = last_state["resumed_at"], str(result.path)
        return fitted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="quality table (Parquet / CSV)")
    parser.add_argument("--pool", required=True, help="pool YAML (costs, cost unit)")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--estimator", default="transformer", choices=ESTIMATOR_CHOICES)
    parser.add_argument("--embedder", default="minilm", choices=("minilm", "clip", "tfidf", "combined"))
    parser.add_argument("--metric", default=None, help="quality column (default: the only one)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (0: in the driver)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--estimator-params", default=None, help='JSON object, e.g. \'{"width": 128}\'')
    parser.add_argument("--embedder-params", default=None, help="JSON object")
    parser.add_argument("--calibration-frac", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--storage-path", default=None, help="checkpoints (shared storage on a cluster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        outcome = run_train(
            args.table, args.pool, args.out, estimator=args.estimator, embedder=args.embedder, metric=args.metric,
            num_workers=args.num_workers, use_gpu=args.use_gpu, max_epochs=args.max_epochs,
            estimator_params=json.loads(args.estimator_params) if args.estimator_params else None,
            embedder_params=json.loads(args.embedder_params) if args.embedder_params else None,
            calibration_frac=args.calibration_frac, seed=args.seed, max_failures=args.max_failures, storage_path=args.storage_path,
        )
    except CatimageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in asdict(outcome).items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
