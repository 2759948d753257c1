"""Ray Train job: train the scene decider (detector + calibration head) and export it.

    python jobs/train_decider.py                                   # defaults: the shipped decider
    python jobs/train_decider.py --steps 20 --calib-prompts 0 --out /tmp/decider   # a quick try
    ray job submit --working-dir . -- python jobs/train_decider.py ...             (on a cluster)

Two phases (see `catimage.world.decider` for the model):

1. The detector, on Ray Train: a one-worker `TorchTrainer` steps `DetectorTrainer` on synthetic
   batches (rendered TRAINING scenes, degraded with known labels; step k's batch is a pure function
   of (seed, k)). Every `--report-every` steps the worker reports the running loss, every
   `--checkpoint-every` steps a checkpoint (weights, BatchNorm statistics, optimiser, LR schedule,
   history). The run is named after its settings, so re-running the same command resumes from the
   latest checkpoint and continues exactly as an uninterrupted run would.
2. The calibration head, in the driver (seconds): pictures of `--calib-prompts` TRAINING-scene
   prompts (`training_prompts(n, seed=--calib-seed)`, never held out) drawn by every world pool
   candidate (`--calib-main` with `--calib-seeds` seeds, the others with one), rated by scene_score
   and cached under `--storage`; the head maps the detector's verdict features onto that scale.
   `--calib-prompts 0` skips it (the decider then scores with the raw rule score).

The export (`--out`, default catimage/data/world/decider) is float16 safetensors + decider.json,
with training_log.json (settings, parameters, FLOPs per image, loss curve, seconds per phase).
Held-out scenes are never touched here: agreement is measured by benchmarks/decider_agreement.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

from catimage.world.decider import CalibrationSettings, DeciderSettings

log = logging.getLogger("catimage.jobs.train_decider")

TRAINING_LOG = "training_log.json"
CALIB_CANDIDATES = ("small-4", "small-2", "mini-8", "small-2-g2", "small-4-g3", "small-8-g3", "small-16-g3")


def run_name(settings: DeciderSettings) -> str:
    digest = hashlib.sha1(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:8]
    return f"decider-{digest}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (step-NNNNNN), if any."""
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def save_checkpoint(trainer: Any, root: Path, keep: int = 2) -> Path:
    """Write step k's checkpoint atomically under `root` and keep the newest `keep`.

    Checkpoints live in the run's own folder rather than in a temporary one: Ray Train's local mode
    (`--workers 0`) keeps the reported folder by reference, and a resumed local run finds its last
    checkpoint here (Ray restores worker runs from its storage as usual)."""
    import shutil

    final = root / f"step-{trainer.step_index:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_checkpoint(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker: resume if a checkpoint exists, step, report, checkpoint."""
    import ray.train
    import torch

    from catimage.world.decider import DetectorTrainer

    torch.set_num_threads(int(config["threads"]))
    settings = DeciderSettings(**{**config["settings"], "widths": tuple(config["settings"]["widths"])})
    root = Path(config["checkpoint_root"])
    root.mkdir(parents=True, exist_ok=True)
    trainer = DetectorTrainer(settings)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            trainer.load_checkpoint(ckpt_dir)
    elif (latest := latest_checkpoint(root)) is not None:
        trainer.load_checkpoint(latest)
    if trainer.step_index:
        log.info("resumed the decider at step %d", trainer.step_index)
    report_every, ckpt_every = int(config["report_every"]), int(config["checkpoint_every"])
    losses: list[dict[str, float]] = []
    tick = time.perf_counter()
    while trainer.step_index < settings.steps:
        losses.append(trainer.step())
        k = trainer.step_index
        if k % report_every and k != settings.steps:
            continue
        entry: dict[str, float] = {"step": k, "s_per_step": (time.perf_counter() - tick) / len(losses),
                                   "lr": trainer.optimizer.param_groups[0]["lr"]}
        entry.update({name: sum(x[name] for x in losses) / len(losses) for name in losses[0]})
        trainer.history.append(entry)
        log.info("step %d: loss %.4f (%.2f s/step)", k, entry["loss"], entry["s_per_step"])
        losses, tick = [], time.perf_counter()
        if k % ckpt_every == 0 or k == settings.steps:
            folder = save_checkpoint(trainer, root)
            ray.train.report(entry, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        else:
            ray.train.report(entry)


def train_detector(settings: DeciderSettings, storage: Path, report_every: int, checkpoint_every: int,
                   threads: int, max_failures: int, workers: int = 1) -> Any:
    """Phase 1 on Ray Train; returns the final `DetectorTrainer` (reloaded from the last checkpoint)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from catimage.world.decider import DetectorTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    root = storage / run_name(settings) / "detector_checkpoints"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": asdict(settings), "report_every": report_every,
                           "checkpoint_every": checkpoint_every, "threads": threads, "checkpoint_root": str(root)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, **({"resources_per_worker": {"CPU": threads}} if workers else {})),
        run_config=ray.train.RunConfig(
            name=run_name(settings), storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"decider training failed: {result.error}") from result.error
    final = DetectorTrainer(settings)
    latest = latest_checkpoint(root)
    if latest is None:
        raise RuntimeError(f"the decider run left no checkpoint under {root}")
    final.load_checkpoint(latest)
    if final.step_index != settings.steps:
        raise RuntimeError(f"the last checkpoint under {root} is at step {final.step_index}, not {settings.steps}")
    return final


def calibration_set(storage: Path, n_prompts: int, seed: int, main: str, main_seeds: int) -> Any:
    """Generated pictures of training-scene prompts, rated by scene_score (cached under storage)."""
    from catimage.world.decider_sets import RatedSet, draw_cached, prompt_id, training_prompts

    prompts = training_prompts(n_prompts, seed)
    ids = [prompt_id(p) for p in prompts]
    folder = storage / f"calibration-{seed}-{n_prompts}"
    sets = [draw_cached(folder / f"{c}.npz", c, prompts, ids, main_seeds if c == main else 1)
            for c in CALIB_CANDIDATES]
    return RatedSet.concat(sets)


def fit_calibration_head(detector: Any, rated: Any, settings: CalibrationSettings) -> Any:
    import numpy as np

    from catimage.world.decider import SceneDecider, fit_calibration
    from catimage.world.parse import parse

    decider = SceneDecider(detector)
    specs = [parse(str(p)) for p in rated.prompts]
    feats = []
    for lo in range(0, len(specs), 256):
        feats += [f for _, f in decider.verdicts(specs[lo : lo + 256], list(rated.images[lo : lo + 256]))]
    return fit_calibration(np.stack(feats), rated.scores, settings)


def run(settings: DeciderSettings, out: Path, storage: Path, calib_prompts: int = 1200, calib_seed: int = 777,
        calib_main: str = "small-4", calib_seeds: int = 4, report_every: int = 50, checkpoint_every: int = 250,
        threads: int = 2, max_failures: int = 3, workers: int = 1) -> Path:
    """Both phases and the export; returns the export folder."""
    import torch

    from catimage.world.decider import SceneDecider, detector_flops

    storage = storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    final = train_detector(settings, storage, report_every, checkpoint_every, threads, max_failures, workers)
    detector_s = time.perf_counter() - start
    calibration, calib_rows, calib_s, draw_s = None, 0, 0.0, 0.0
    cal_settings = CalibrationSettings()
    if calib_prompts > 0:
        tick = time.perf_counter()
        rated = calibration_set(storage, calib_prompts, calib_seed, calib_main, calib_seeds)
        draw_s = time.perf_counter() - tick
        tick = time.perf_counter()
        calibration = fit_calibration_head(final.net, rated, cal_settings)
        calib_s, calib_rows = time.perf_counter() - tick, len(rated)
    flops = detector_flops(final.net.config)
    training = {
        "settings": asdict(settings), "calibration_settings": asdict(cal_settings),
        "calibration_data": {"prompts": calib_prompts, "seed": calib_seed, "main": calib_main,
                             "main_seeds": calib_seeds, "candidates": list(CALIB_CANDIDATES), "rows": calib_rows},
        "detector_parameters": final.n_params, "detector_gflops_per_image": flops / 1e9,
        "history": final.history, "detector_seconds_logged": sum(
            h["s_per_step"] * (h["step"] - p["step"]) for p, h in zip([{"step": 0}] + final.history[:-1], final.history)),
        "wall_seconds_detector_this_invocation": detector_s, "seconds_drawing_calibration_set": draw_s,
        "seconds_fitting_calibration": calib_s, "threads": threads, "ray_run": run_name(settings),
    }
    SceneDecider(final.net, calibration).save(out, extra={"gflops_per_image": flops / 1e9})
    (out / TRAINING_LOG).write_text(json.dumps(training, indent=1))
    log.info("exported the decider (%d detector parameters, %.4f GFLOPs per image) to %s", final.n_params,
             flops / 1e9, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DeciderSettings()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--widths", type=int, nargs=3, default=list(d.widths))
    parser.add_argument("--calib-prompts", type=int, default=1200, help="training-scene prompts (0: no calibration)")
    parser.add_argument("--calib-seed", type=int, default=777)
    parser.add_argument("--calib-main", default="small-4", choices=CALIB_CANDIDATES)
    parser.add_argument("--calib-seeds", type=int, default=4, help="seeds of --calib-main (others: 1)")
    parser.add_argument("--out", type=Path, default=_ROOT / "catimage" / "data" / "world" / "decider")
    parser.add_argument("--storage", type=Path, default=Path("runs/decider_train"))
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and Ray CPUs) of the worker, <= 2 here")
    parser.add_argument("--workers", type=int, default=1, choices=(0, 1),
                        help="1: one Ray Train worker actor; 0: Ray Train's local mode, the loop runs in this "
                             "process (on a shared 2-core machine Ray's worker actors run at niceness 15)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = DeciderSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                   widths=tuple(args.widths))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(settings, args.out, args.storage, args.calib_prompts, args.calib_seed, args.calib_main, args.calib_seeds,
        args.report_every, args.checkpoint_every, args.threads, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
