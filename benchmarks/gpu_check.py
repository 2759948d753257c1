"""GPU readiness: the three Ray stages on CUDA, on the embedded pool; prints what it measured.

    .venv/bin/python benchmarks/gpu_check.py [--prompts 40] [--seeds 2] [--requests 20] [--out runs/gpu_check]

On a machine with CUDA (exits 2 without it, having run nothing):

1. build: the Ray Data job with every generator in float16 on the GPU and GPU actor pools
   (generators and scorers each take a fraction of one GPU, so all pools share it);
2. train: Ray Train (TorchTrainer) fitting the Transformer estimator with `use_gpu=True`;
3. serve: the Serve app with GPU generator replicas (fractional GPUs, `device=cuda`), a burst of
   routed requests over HTTP on loopback, and the replicas' device as each reports it.

Prints seconds, images/s, rows, GPU memory and latency per stage, and asserts nothing. The pool is
the embedded one (`catimage/data/tiny_pool.yaml` unless `--pool`); with its random-weight models
the figures measure the machinery (scheduling, fp16 casts, GPU placement), not image quality.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def gpu_pool(src: Path, dst: Path, share: float) -> Path:
    """The pool with fp16 CUDA generators and fractional-GPU build/serve/metric resources."""
    import yaml

    data = yaml.safe_load(src.read_text())
    for cand in data["candidates"]:
        gen = cand.get("generator") or {}
        if gen.get("kind", "diffusers") == "diffusers":
            gen.update(dtype="float16", device="cuda")
        cand["build"] = {**cand.get("build", {}), "num_gpus": share, "num_cpus": 1, "concurrency": 1}
        cand["serve"] = {**cand.get("serve", {}), "num_gpus": share, "num_cpus": 0.5, "request_timeout_s": 120}
    for metric in data.get("metrics", []):
        metric.update(num_gpus=share, num_cpus=0.5)
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def stage_build(pool: Path, prompts: Path, out: Path, seeds: int, limit: int) -> Path:
    import pyarrow.parquet as pq

    from catimage.tables.build import BuildConfig
    from jobs.build_dataset import run_build

    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(pool=pool, prompts=prompts, output=out, seeds=seeds, limit=limit, measure_cost=True)
    start = time.perf_counter()
    result = run_build(cfg, progress=False)
    wall = time.perf_counter() - start
    table = pq.read_table(result.table_path) if result.table_path else None
    print(f"build: {result.table_rows}/{result.total_keys} rows, {result.errors} errors, {wall:.1f} s end to end, "
          f"{result.attempted / wall:.1f} images/s (incl. Ray start and model loads)")
    if table is not None and "cost" in table.column_names:
        per = {}
        for cand, cost in zip(table.column("candidate").to_pylist(), table.column("cost").to_pylist()):
            per.setdefault(cand, []).append(cost)
        print("  measured seconds per image (fp16, GPU): "
              + ", ".join(f"{c} {statistics.median(v) * 1000:.1f} ms" for c, v in per.items()))
    return result.table_path


def stage_train(table: Path, pool: Path, out: Path, epochs: int) -> Path:
    from jobs.train_estimator import run_train

    start = time.perf_counter()
    outcome = run_train(table, pool, out, estimator="transformer", embedder="minilm", num_workers=1, use_gpu=True,
                        max_epochs=epochs, embedder_params={"device": "cuda"})
    print(f"train (Ray Train, 1 GPU worker): {len(outcome.history)} epochs in {time.perf_counter() - start:.1f} s, "
          f"best val loss {outcome.best_val_loss:.4f} at epoch {outcome.best_epoch}")
    return Path(outcome.model_dir)


def stage_serve(model: Path, pool: Path, requests: int) -> None:
    import httpx
    from ray import serve
    from train_serve_fixtures import free_port

    from serve.app import AppArgs, build_app, deployment_name

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        start = time.perf_counter()
        serve.run(build_app(AppArgs(model_dir=str(model), pool=str(pool), device="cuda", router_num_cpus=1,
                                    embedder_overrides={"device": "cuda"})), name="gpu", route_prefix="/")
        print(f"serve: deployed (GPU generator replicas, router on cuda) in {time.perf_counter() - start:.1f} s")
        prompts = (ROOT / "catimage" / "data" / "demo_prompts.txt").read_text().split("\n")
        prompts = [p for p in prompts if p.strip()]
        lat, router_ms, chosen = [], [], {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            for i in range(requests):
                t = time.perf_counter()
                r = client.post("/v1/generate", json={"prompt": prompts[i % len(prompts)], "seed": i})
                lat.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    print(f"  request {i}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                router_ms.append(body["router_ms"])
                chosen[body["candidate"]] = chosen.get(body["candidate"], 0) + 1
            pool_state = client.get("/v1/pool").json()
        print(f"  {requests} sequential requests: p50 {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms; "
              f"router_ms p50 {statistics.median(router_ms):.1f}; drawn by {chosen}")
        for row in pool_state["candidates"]:
            dep = deployment_name(row["name"])
            stats = serve.get_deployment_handle(dep, app_name="gpu").stats.remote().result()
            print(f"  {row['name']}: {row['running_replicas']} replica(s) running, device {stats.get('device')}, "
                  f"{stats['requests']} requests")
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=ROOT / "catimage" / "data" / "tiny_pool.yaml")
    ap.add_argument("--prompts", type=Path, default=ROOT / "catimage" / "data" / "demo_prompts.txt")
    ap.add_argument("--limit", type=int, default=40, help="prompts to build")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--gpu-share", type=float, default=0.2, help="GPU fraction per actor / replica")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was run (run it on a GPU machine)")
        return 2
    import ray

    name = torch.cuda.get_device_name(0)
    print(f"device: {torch.cuda.device_count()} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    args.out.mkdir(parents=True, exist_ok=True)
    pool = gpu_pool(args.pool, args.out / "gpu_pool.yaml", args.gpu_share)
    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    try:
        table = stage_build(pool, args.prompts, args.out / "build", args.seeds, args.limit)
        if table is None:
            print("build wrote no table; stopping")
            return 1
        model = stage_train(table, pool, args.out / "model", args.epochs)
        stage_serve(model, pool, args.requests)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
