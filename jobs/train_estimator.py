"""Ray Train job: fit the router's quality estimator and write a model directory `RouterModel.load` reads.

    python jobs/train_estimator.py TABLE --pool POOL.yaml --out DIR [--estimator transformer]
        [--embedder minilm] [--num-workers 1] [--use-gpu] [--max-epochs 50]
    ray job submit --working-dir . -- python jobs/train_estimator.py ...      (on a cluster)

The Transformer estimator trains on a Ray Train `TorchTrainer`: the driver reads the quality table,
averages samples per (prompt, candidate), fits the metric scaler on the train split and embeds every
prompt once (per-token); the arrays reach the workers as Ray Data datasets (`train` sharded across
workers, `val` (the early-stopping prompts, never the calibration prompts) whole on each). Each epoch
every worker reports its early-stopping loss `val_loss` with a checkpoint (the estimator in the core's
safetensors + JSON format, plus the optimizer and early-stopping state); Train keeps the two best by it, retries failed workers (`FailureConfig`) and the loop
resumes from the latest checkpoint. The best checkpoint becomes the bundle's estimator.

Every other estimator is cheap and fits in-process. Either way the whole fit is
`catimage.model.router_model.fit_router` (the pipeline `catimage fit` and `catimage evaluate` use): this
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

from catimage.errors import CatimageError

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
    n_calibration: int
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


def _early_stopping_arrays(shard: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole early-stopping set as numpy arrays (it is small: one row per held-out prompt)."""
    xs, ys, ws = [], [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
        ws.append(batch["w"])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def _fresh_state(count_scale: float) -> dict[str, Any]:
    """The loop state a run starts from (and every checkpoint stores)."""
    return {"epoch": -1, "best_val_loss": None, "best_epoch": None, "waited": 0, "history": [], "resumed_at": [],
            "count_scale": float(count_scale)}


def _restore_or_start(module: Any, optimizer: Any, count_scale: float) -> dict[str, Any]:
    """Resume from Train's latest checkpoint (weights, optimizer, loop state) when there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return _fresh_state(count_scale)
    with checkpoint.as_directory() as ckpt_dir:
        state = _load_checkpoint(Path(ckpt_dir), module, optimizer)
    state["resumed_at"] = [*state["resumed_at"], state["epoch"] + 1]
    log.info("resumed from the checkpoint of epoch %d", state["epoch"])
    return state


def _maybe_inject_failure(config: dict[str, Any], epoch: int) -> None:
    """The test hook: fail once at `fail_at_epoch` (a marker file says it already did)."""
    fail_at = config.get("fail_at_epoch")
    if fail_at is not None and epoch == fail_at and not Path(config["fail_marker"]).exists():
        Path(config["fail_marker"]).write_text(f"failed once at epoch {epoch}\n")
        raise RuntimeError(f"injected worker failure at epoch {epoch} (test hook)")


def _early_stopping_loss(module: Any, X_val: np.ndarray, Y_val: np.ndarray, W_val: np.ndarray) -> float:
    import torch

    from catimage.estimators.transformer import masked_bce_loss, predict_module

    probs = torch.from_numpy(predict_module(_unwrap(module), X_val))
    return float(masked_bce_loss(probs, torch.from_numpy(Y_val).double(), torch.from_numpy(W_val).double()))


def _record_epoch(state: dict[str, Any], epoch: int, train_loss: float, val_loss: float) -> None:
    """Update the best epoch and the patience counter in place."""
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"] - 1e-7:
        state["best_val_loss"], state["best_epoch"], state["waited"] = val_loss, epoch, 0
    else:
        state["waited"] += 1
    state["epoch"] = epoch
    state["history"] = [*state["history"], {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}]


def _report_epoch(config: dict[str, Any], module: Any, optimizer: Any, params: dict[str, Any],
                  state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """`ray.train.report` this epoch's metrics with a checkpoint (a barrier every worker reaches).

    Local mode (num_workers=0) keeps no copy of a reported checkpoint, so there they are written
    where they stay, keeping the latest and the best epoch; otherwise rank 0 writes a temporary one.
    """
    import ray.train

    epoch, saved_params = state["epoch"], {**params, "device": "cpu"}
    if config.get("local_checkpoint_root"):
        root = Path(config["local_checkpoint_root"])
        ckpt_dir = root / f"epoch_{epoch:04d}"
        _save_checkpoint(ckpt_dir, module, optimizer, saved_params, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
        for old in root.glob("epoch_*"):
            if old.name not in (f"epoch_{epoch:04d}", f"epoch_{state['best_epoch']:04d}"):
                shutil.rmtree(old, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            _save_checkpoint(Path(tmp), module, optimizer, saved_params, state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: AdamW epochs over the `train` shard, early-stopping loss + checkpoint each epoch.

    Every worker computes the same early-stopping loss on the full `val` set, so all of them stop at
    the same epoch and call `ray.train.report` the same number of times (it is a barrier). Returns
    the loop state (history, best epoch, resumptions), which Train hands back as `Result.return_value`.
    """
    import ray.train
    import ray.train.torch
    import torch

    from catimage.estimators.transformer import arch_params, build_module, train_epoch

    params = dict(config["params"])
    torch.manual_seed(int(params.get("random_state", 0)))
    module = ray.train.torch.prepare_model(build_module(config["d_in"], config["n_outputs"], **arch_params(params)))
    optimizer = torch.optim.AdamW(module.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))
    state = _restore_or_start(module, optimizer, config["count_scale"])
    X_val, Y_val, W_val = _early_stopping_arrays(ray.train.get_dataset_shard("val"))
    train_shard = ray.train.get_dataset_shard("train")
    batch_size, patience = int(params["batch_size"]), int(params["patience"])
    for epoch in range(state["epoch"] + 1, int(config["max_epochs"])):
        epoch_start = time.perf_counter()
        _maybe_inject_failure(config, epoch)
        batches = (
            (b["x"], b["y"], b["w"])
            for b in train_shard.iter_torch_batches(
                batch_size=batch_size, dtypes=torch.float32,
                local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=epoch,
            )
        )
        train_loss = train_epoch(module, batches, optimizer)
        train_s = time.perf_counter() - epoch_start
        val_loss = _early_stopping_loss(module, X_val, Y_val, W_val)
        _record_epoch(state, epoch, train_loss, val_loss)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_epoch": state["best_epoch"],
                   "train_s": train_s}
        _report_epoch(config, module, optimizer, params, state, metrics)
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

    The fit is `catimage.model.router_model.fit_router` (the pipeline `fit` and `evaluate` use), with
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
        params, sets = _train_sets(est, data, self.options["max_epochs"])
        _init_ray(self.options["num_cpus"])
        storage = Path(self.options["storage_path"] or self.out_dir / "ray_train")
        storage.mkdir(parents=True, exist_ok=True)
        run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        loop_config = {
            "params": params, "d_in": sets.d_in, "n_outputs": sets.n_outputs,
            "max_epochs": int(params["max_epochs"]), "count_scale": sets.count_scale,
            "fail_at_epoch": self.options["fail_at_epoch"], "fail_marker": str(storage / f"{run_name}.injected-failure"),
            "local_checkpoint_root": (str(storage / run_name / "local_checkpoints")
                                      if self.options["num_workers"] == 0 else None),
        }
        log.info("Ray Train: %d train / %d early-stopping prompts, %d worker(s), gpu=%s",
                 sets.n_train, sets.n_early_stopping, self.options["num_workers"], self.options["use_gpu"])
        result = self._trainer(loop_config, sets, storage, run_name).fit()
        if result.error is not None:
            raise RuntimeError(
                f"Ray Train run failed after {self.options['max_failures']} retries: {result.error}"
            ) from result.error
        return self._fitted(result, loop_config)

    def _trainer(self, loop_config: dict[str, Any], sets: _TrainSets, storage: Path, run_name: str) -> Any:
        import ray.train
        from ray.train.torch import TorchTrainer

        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=self.options["num_workers"], use_gpu=self.options["use_gpu"]),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(storage.resolve()),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
                ),
                failure_config=ray.train.FailureConfig(max_failures=self.options["max_failures"]),
            ),
            datasets={"train": sets.train, "val": sets.val},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )

    def _fitted(self, result: Any, loop_config: dict[str, Any]) -> Any:
        """The best epoch's estimator, with the run's history on it and in the outcome."""
        from catimage.estimators import load_estimator

        last_state = result.return_value
        if not last_state or last_state.get("best_epoch") is None:
            raise RuntimeError("Ray Train finished without a validated epoch; max_epochs must be >= 1")
        if loop_config["local_checkpoint_root"]:
            best_dir = Path(loop_config["local_checkpoint_root"]) / f"epoch_{last_state['best_epoch']:04d}"
            fitted = load_estimator(best_dir / ESTIMATOR_SUBDIR)
        else:
            with result.get_best_checkpoint(metric="val_loss", mode="min").as_directory() as best_dir:
                fitted = load_estimator(Path(best_dir) / ESTIMATOR_SUBDIR)
        fitted.best_epoch_ = int(last_state["best_epoch"])
        fitted.train_loss_ = [h["train_loss"] for h in last_state["history"]]
        fitted.val_loss_ = [h["val_loss"] for h in last_state["history"]]
        oc = self.outcome
        oc.best_epoch, oc.best_val_loss = int(last_state["best_epoch"]), float(last_state["best_val_loss"])
        oc.epochs_run, oc.history = len(last_state["history"]), last_state["history"]
        oc.resumed_at, oc.ray_run_path = last_state["resumed_at"], str(result.path)
        return fitted


@dataclass
class _TrainSets:
    """The Ray datasets a Train run reads, and the shapes and weight scale the loop needs."""

    train: Any
    val: Any
    n_train: int
    n_early_stopping: int
    d_in: int
    n_outputs: int
    count_scale: float


def _train_sets(est: Any, data: Any, max_epochs: int | None) -> tuple[dict[str, Any], _TrainSets]:
    """(loop params, datasets): the schedule, early-stopping prompts and loss weights exactly as
    `TransformerEstimator.fit` would choose them, so both fits see the same data."""
    from catimage.estimators.transformer import as_token_batch, early_stopping_split, loss_weights, mean_count

    params = _transformer_params(est.get_params(), max_epochs)
    X = as_token_batch(data.X)
    plan = est.schedule(len(X))
    params.update(batch_size=plan.batch_size, max_epochs=plan.max_epochs, patience=plan.patience)
    tr, va = early_stopping_split(len(X), float(params["validation_fraction"]), int(params["random_state"]))
    if va.size == 0:
        raise CatimageError("Ray Train needs early-stopping prompts: use at least 20 training prompts")
    counts = data.counts if params.get("use_counts", True) else None
    count_scale = mean_count(data.Y[tr], counts[tr]) if counts is not None else 1.0
    w = loss_weights(data.Y[tr], None if counts is None else counts[tr], count_scale)
    w_val = loss_weights(data.Y[va], None if counts is None else counts[va], count_scale)
    return params, _TrainSets(
        train=_to_dataset(X[tr].padded(), data.Y[tr], w), val=_to_dataset(X[va].padded(), data.Y[va], w_val),
        n_train=int(tr.size), n_early_stopping=int(va.size), d_in=int(X.shape[-1]), n_outputs=int(data.Y.shape[1]),
        count_scale=float(count_scale),
    )


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
