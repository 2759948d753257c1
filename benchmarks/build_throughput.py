"""Images/s of the Ray Data build job vs a plain Python loop over the same generator and metric.

    python benchmarks/build_throughput.py [--candidate tiny-sd-8] [--metric sharpness] [--prompts 64] [--seeds 2]
    python benchmarks/build_throughput.py --submit-timing [--prompts 20] [--seeds 2]

Modes (one candidate, one metric, the same prompts and seeds):

  plain   a fresh process: load the generator and scorer, loop over batches (torch on 1 thread)
  ray1    `run_build` with one generator actor (Ray gives an actor of num_cpus <= 1 one torch thread)
  ray2    the same with two generator actors

Two figures per mode:

  end to end   wall seconds including imports, model load, and for Ray its start, actor start-up
               and shutdown: what a user waits for on a build this small
  steady       images/s once running, both sides without their first batch (which pays for the
               first inference: lazy init, allocator, caches): for `plain` the images after the
               first batch divided by the time after it; for Ray the rows written after the first
               part file divided by the time between the first and the last part file (mtimes)

`--submit-timing`: where the time of a build submitted with `ray job submit` goes. A local head with
the job API (ray.cluster_utils, its own processes, stopped afterwards; never `ray stop`, which would
stop every Ray on the machine), then the whole tiny pool build submitted with `--working-dir .`; each
line `ray job submit` streams back is time-stamped, which splits the wall time into: head start,
package upload + job start, driver imports until the build's first log line, the Ray Data run, and
the end. The same build in-process (`run_build`, a private local Ray) is timed for comparison.

overhead ratio = steady s/image of ray1 / steady s/image of plain (target <= 1.3). Note that ray1
also overlaps scoring (its own actor) with generation, which a plain loop cannot. The script
prints figures and asserts nothing; it prints the load average beside each run, since on a shared
machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq

from catimage.tables.build import BuildConfig, part_files, read_prompts
from catimage.tables.pool import load_pool

COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "pink", "gray"]
THINGS = ["cat", "dog", "car", "house", "tree", "boat", "bird", "chair", "lamp", "cup"]


def write_prompts(path: Path, n: int) -> Path:
    prompts = [f"a {c} {t}" for t in THINGS for c in COLORS]
    prompts = [f"{p} number {i // len(prompts)}" if i >= len(prompts) else p for i, p in enumerate(prompts * (n // len(prompts) + 1))][:n]
    path.write_text("\n".join(prompts) + "\n")
    return path


def sub_pool(pool_path: Path, candidate: str, metric: str, workers: int, out: Path) -> Path:
    """The pool with one candidate (at `workers` actors of 0.5 CPU each) and one metric."""
    pool = load_pool(pool_path).select([candidate])
    metrics = [m for m in pool.metrics if m.name == metric]
    if not metrics:
        raise SystemExit(f"metric {metric!r} is not in {pool_path}")
    cand = pool.get(candidate)
    cand = cand.model_copy(update={"build": cand.build.model_copy(update={"concurrency": workers, "num_cpus": 0.5})})
    pool.model_copy(update={"candidates": [cand], "metrics": metrics}).save(out)
    return out


def plain_loop(pool_path: Path, prompts_path: Path, seeds: int) -> dict[str, float]:
    """Generate and score every (prompt, seed) in this process; seconds for load and for the loop."""
    import torch

    from catimage.generators import generation_seed, make_generator
    from catimage.metrics import make_scorer
    from catimage.tables.build import decode_image, encode_image

    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = load_pool(pool_path)
    cand = pool.candidates[0]
    gen = make_generator(cand.generator, device="cpu")
    scorer = make_scorer(pool.metrics[0], device="cpu")
    prompts = read_prompts(prompts_path)
    items = [
        (pid, p, s)
        for pid, p in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist())
        for s in range(seeds)
    ]
    loaded = time.perf_counter()
    bs = cand.build.batch_size
    first_end = None
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        images = gen.generate([p for _, p, _ in chunk], [generation_seed(pid, s) for pid, _, s in chunk])
        images = [decode_image(encode_image(im)) for im in images]  # the job's PNG round trip
        scorer.score([p for _, p, _ in chunk], images)
        if first_end is None:
            first_end = time.perf_counter()
    end = time.perf_counter()
    first = min(bs, len(items))
    return {"load": loaded - start, "loop": end - loaded, "images": len(items),
            "steady_images": len(items) - first, "steady_s": end - first_end}


def run_plain(pool_path: Path, prompts_path: Path, seeds: int) -> tuple[float, float]:
    """(end-to-end wall of a fresh process, steady images/s of its loop)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--plain-run", str(pool_path), str(prompts_path), str(seeds)],
        capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - start
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    if stats["steady_images"] <= 0:
        return wall, float("nan")
    return wall, stats["steady_images"] / stats["steady_s"]  # like Ray's figure: after the first batch


def run_ray(pool_path: Path, prompts_path: Path, seeds: int, out: Path) -> tuple[float, float]:
    """(end-to-end wall of `run_build` incl. local Ray start/stop, steady images/s from part files)."""
    from jobs.build_dataset import run_build

    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(pool=pool_path, prompts=prompts_path, output=out, seeds=seeds, num_cpus=2, measure_cost=False)
    start = time.perf_counter()
    result = run_build(cfg, progress=False)
    wall = time.perf_counter() - start
    if result.table_rows != result.total_keys:
        print(f"  warning: {result.total_keys - result.table_rows} rows missing ({result.errors} errors)")
    files = sorted(part_files(out), key=lambda p: p.stat().st_mtime_ns)
    if len(files) < 2:
        return wall, float("nan")
    rows_after_first = sum(pq.read_metadata(p).num_rows for p in files[1:])
    span = (files[-1].stat().st_mtime_ns - files[0].stat().st_mtime_ns) / 1e9
    return wall, rows_after_first / max(span, 1e-9)


MARKS = (  # (label, substring of a line `ray job submit` streams back), in the order they appear
    ("package uploaded", "Uploading package"),
    ("job submitted", "submitted successfully"),
    ("driver: imports done, build planned", "build:"),
    ("Ray Data: execution started", "Starting execution"),
    ("Ray Data: execution finished", "xecution finished"),
    ("driver: summary printed", "catimage build"),
    ("job succeeded", "succeeded"),
)


def submit_timing(n_prompts: int, seeds: int) -> None:
    """Time the phases of a build submitted with `ray job submit` against an in-process one."""
    import socket

    import ray
    from ray.cluster_utils import Cluster

    from jobs.build_dataset import run_build

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    work = Path(tempfile.mkdtemp(prefix="catimage-submit-"))
    prompts = write_prompts(work / "prompts.txt", n_prompts)
    pool = ROOT / "catimage" / "data" / "tiny_pool.yaml"
    try:
        cfg = BuildConfig(pool=pool, prompts=prompts, output=work / "inproc", seeds=seeds, num_cpus=2)
        start = time.perf_counter()
        result = run_build(cfg, progress=False)
        inproc = time.perf_counter() - start
        print(f"in-process run_build: {result.attempted} rows in {inproc:.1f} s (load avg {os.getloadavg()[0]:.1f})")
        dash = free_port()
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
            "dashboard_agent_listen_port": free_port()})
        try:
            head_s = time.perf_counter() - t0
            env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}
            cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                   "--working-dir", str(ROOT), "--", sys.executable, "jobs/build_dataset.py", "--pool", str(pool),
                   "--prompts", str(prompts), "--output", str(work / "job"), "--seeds", str(seeds), "--no-progress"]
            t1 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            seen: dict[str, float] = {}
            for line in proc.stdout:
                for label, needle in MARKS:
                    if label not in seen and needle in line:
                        seen[label] = time.perf_counter() - t1
            proc.wait()
            total = time.perf_counter() - t1
        finally:
            cluster.shutdown()
            ray.shutdown()
        print(f"ray job submit (head with the job API, 2 CPUs): head start {head_s:.1f} s (not counted below), "
              f"submit to end {total:.1f} s, exit code {proc.returncode} (load avg {os.getloadavg()[0]:.1f})")
        last = 0.0
        for label, _ in MARKS:
            if label in seen:
                print(f"  +{seen[label]:6.1f} s  {label:40s} (phase {seen[label] - last:5.1f} s)")
                last = seen[label]
            else:
                print(f"  (not seen) {label}")
        print(f"  ratio submit / in-process: {total / inproc:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=ROOT / "configs" / "tiny_pool.yaml")
    ap.add_argument("--candidate", default="tiny-sd-8")
    ap.add_argument("--metric", default="sharpness")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all modes; the median is reported")
    ap.add_argument("--modes", nargs="+", default=["plain", "ray1", "ray2"], choices=["plain", "ray1", "ray2"])
    ap.add_argument("--plain-run", nargs=3, metavar=("POOL", "PROMPTS", "SEEDS"), help=argparse.SUPPRESS)
    ap.add_argument("--submit-timing", action="store_true", help="split a `ray job submit` build's wall time")
    args = ap.parse_args(argv)
    if args.plain_run:
        print(json.dumps(plain_loop(Path(args.plain_run[0]), Path(args.plain_run[1]), int(args.plain_run[2]))))
        return
    if args.submit_timing:
        submit_timing(args.prompts, args.seeds)
        return
    work = Path(tempfile.mkdtemp(prefix="catimage-bench-"))
    images = args.prompts * args.seeds
    try:
        prompts = write_prompts(work / "prompts.txt", args.prompts)
        runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
        for rnd in range(args.repeat):  # modes interleaved, so a burst of load on the box hits all of them
            for mode in args.modes:
                workers = 2 if mode == "ray2" else 1
                pool = sub_pool(args.pool, args.candidate, args.metric, workers, work / f"{mode}.yaml")
                load = os.getloadavg()[0]
                if mode == "plain":
                    wall, steady = run_plain(pool, prompts, args.seeds)
                else:
                    wall, steady = run_ray(pool, prompts, args.seeds, work / f"out-{mode}")
                runs[mode].append((wall, steady))
                print(f"round {rnd + 1} {mode:6s} {images} images: end to end {wall:7.2f} s, "
                      f"steady {steady:6.2f} img/s  (load avg {load:.1f})", flush=True)
        results = {
            mode: (statistics.median(w for w, _ in vals), statistics.median(s for _, s in vals))
            for mode, vals in runs.items()
        }
        print(f"\n{args.candidate} + {args.metric}, {images} images, median of {args.repeat} round(s)")
        print(f"{'mode':6s} {'end-to-end s':>13s} {'end-to-end img/s':>17s} {'steady img/s':>13s}")
        for mode, (wall, steady) in results.items():
            print(f"{mode:6s} {wall:13.2f} {images / wall:17.2f} {steady:13.2f}")
        if "plain" in results and "ray1" in results:
            print(f"overhead ray x1 / plain, steady s per image: {results['plain'][1] / results['ray1'][1]:.2f}")
            print(f"overhead ray x1 / plain, end to end:          {results['ray1'][0] / results['plain'][0]:.2f}")
        if "ray1" in results and "ray2" in results:
            print(f"speed-up 2 workers / 1, steady img/s:         {results['ray2'][1] / results['ray1'][1]:.2f}")
            print(f"speed-up 2 workers / 1, end to end:           {results['ray1'][0] / results['ray2'][0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
