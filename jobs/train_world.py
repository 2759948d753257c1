"""Ray Train job: train one scene-world generator and export it as a `WorldPipeline` folder.

    python jobs/train_world.py --model small --steps 8000 --out catimage/data/world
    python jobs/train_world.py --model large --steps 4800 --batch-size 48 --out catimage/data/world
    ray job submit --working-dir . -- python jobs/train_world.py --model large ...   (on a cluster)

The two sizes are independent runs: on a 2-core machine start them side by side against one Ray
head (`ray start --head --num-cpus 2`, then both commands with RAY_ADDRESS=auto), one CPU each.

The driver builds (or reloads) the prompt bank under `--storage` (MiniLM tokens of the training
prompts; on a multi-node cluster `--storage` must be shared storage), then runs a one-worker
`TorchTrainer`: every `--report-every` steps the worker reports the running loss, every
`--checkpoint-every` steps a checkpoint (`WorldTrainer.save_checkpoint`: weights, EMA, optimiser,
LR schedule, loss history). The run is named after the model and its settings, so re-running the
same command resumes from the latest checkpoint (Ray Train's restoration by storage path + name), and
each step's batch is a pure function of (seed, step): a resumed run continues exactly as an
uninterrupted one. At the end the EMA weights are exported (float16 safetensors) to `--out/<model>`
with `training_log.json` (settings, parameter count, loss curve, seconds per step) for the model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from catimage.world.models import MODELS
from catimage.world.training import TrainSettings

log = logging.getLogger("catimage.jobs.train_world")

TRAINING_LOG = "training_log.json"


def bank_dir(storage: Path, settings: TrainSettings) -> Path:
    return storage / f"bank-{settings.bank_seed}-{settings.bank_size}"


def ensure_bank(storage: Path, settings: TrainSettings) -> Path:
    """Build the prompt bank once (MiniLM on every training prompt); later runs reload it."""
    from filelock import FileLock

    from catimage.features.registry import make_embedder
    from catimage.world.training import PromptBank, build_prompt_bank

    path = bank_dir(storage, settings)
    with FileLock(str(path) + ".lock"):  # two runs started side by side build it once
        if not (path / "tokens.safetensors").is_file():
            bank = build_prompt_bank(settings.bank_size, settings.bank_seed, make_embedder("minilm"))
            tmp = Path(tempfile.mkdtemp(dir=storage, prefix=".bank-"))
            bank.save(tmp)
            tmp.rename(path)
    PromptBank.load(path, settings.bank_seed, settings.bank_size)  # fails loudly if stale
    return path


def run_name(settings: TrainSettings) -> str:
    digest = hashlib.sha1(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:8]
    return f"world-{settings.model}-{digest}"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One worker: resume if a checkpoint exists, step, report, checkpoint; return the loss history."""
    import ray.train
    import torch

    from catimage.world.training import PromptBank, WorldTrainer

    torch.set_num_threads(int(config["threads"]))
    settings = TrainSettings(**config["settings"])
    bank = PromptBank.load(config["bank"], settings.bank_seed, settings.bank_size)
    trainer = WorldTrainer(settings, bank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            trainer.load_checkpoint(ckpt_dir)
        log.info("resumed %s at step %d", settings.model, trainer.step_index)
    report_every, ckpt_every = int(config["report_every"]), int(config["checkpoint_every"])
    losses: list[float] = []
    tick = time.perf_counter()
    while trainer.step_index < settings.steps:
        losses.append(trainer.step())
        k = trainer.step_index
        if k % report_every and k != settings.steps:
            continue
        seconds = (time.perf_counter() - tick) / len(losses)
        entry = {"step": k, "loss": float(sum(losses) / len(losses)), "s_per_step": seconds,
                 "lr": trainer.optimizer.param_groups[0]["lr"]}
        trainer.history.append(entry)
        losses, tick = [], time.perf_counter()
        if k % ckpt_every == 0 or k == settings.steps:
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_checkpoint(tmp)
                ray.train.report(entry, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(entry)
    return {"history": trainer.history}


def run(settings: TrainSettings, out: Path, storage: Path, report_every: int = 50, checkpoint_every: int = 250,
        threads: int = 1, use_gpu: bool = False, max_failures: int = 3) -> Path:
    """Train `settings.model` on Ray Train and export the EMA weights to `out/<model>`."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from catimage.world.training import PromptBank, WorldTrainer

    storage = storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    bank = ensure_bank(storage, settings)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    start = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": asdict(settings), "bank": str(bank), "report_every": report_every,
                           "checkpoint_every": checkpoint_every, "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=run_name(settings), storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"world training failed: {result.error}") from result.error
    final = WorldTrainer(settings, PromptBank.load(bank, settings.bank_seed, settings.bank_size))
    with result.checkpoint.as_directory() as ckpt_dir:
        final.load_checkpoint(ckpt_dir)
    export_dir = out / settings.model
    final.export(export_dir)
    (export_dir / TRAINING_LOG).write_text(json.dumps({
        "settings": asdict(settings), "unet_parameters": final.n_params, "history": final.history,
        "wall_seconds_this_invocation": time.perf_counter() - start, "threads": threads,
        "ray_run": run_name(settings),
    }, indent=1))
    from catimage.world.card import write_model_card

    write_model_card(out)
    log.info("exported %s (%d parameters) to %s; model card %s", settings.model, final.n_params, export_dir, out)
    return export_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--bank-size", type=int, default=TrainSettings.bank_size)
    parser.add_argument("--out", type=Path, default=_ROOT / "catimage" / "data" / "world")
    parser.add_argument("--storage", type=Path, default=Path("runs/world_train"))
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) of the worker")
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    try:
        settings = TrainSettings(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, bank_size=args.bank_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(settings, args.out, args.storage, args.report_every, args.checkpoint_every, args.threads, args.use_gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
