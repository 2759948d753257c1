"""Bounded loopback load test of the Serve app: autoscaling up and down, latency, the router's cost.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--embedder minilm]
        [--backend torch|onnx] [--phases latency,load,burst] [--burst 48] [--burst-rounds 3] [--mu 0.02]
    .venv/bin/python benchmarks/serve_load.py --world [--requests 400] [--build-prompts 40] [--build-seeds 4]

`--world`: serving vs build throughput on the shipped world pool. First the Ray Data build of the world
pool (catimage/data/world_pool.yaml: 7 candidates, both metrics scored) over `--build-prompts` world
prompts x `--build-seeds` seeds, its steady images/s read from its part files as
benchmarks/build_throughput.py does (rows after the first part file / time from the first to the
last); then the shipped serve/config.yaml app (world router, world pool, its batching and queues) on
a fresh local Ray, three bursts of `--requests` concurrent /v1/generate (all at once) of distinct
world prompts, each with its PNG: `cold` right after deployment at the config's budget (a candidate
that scales starts its replica during the burst), `warm` right after (replicas up, as the build's
steady rate has its actors up), `equal work` warm at a budget equal to the pool's mean cost (the
build's work per image: it draws every candidate alike). Per burst: answered, failed, images/s of
answered requests over the wall time, p50/p99, candidates drawn, images per generate() call, CPU per
image by stage; then serving / build for each (goal >= 0.7 with 0 failed). The load generator is
aiohttp and counts replicas from process titles: it shares the two cores with what it measures.

What it does, all on 127.0.0.1 with a local Ray (2 CPUs) and the tiny pool:

1. fits a knn router (planted quality table of tests/train_serve_fixtures.py) and deploys the app
   with the cheapest candidate's generator autoscaling 1..--max-replicas (target 2 ongoing requests,
   upscale delay 1 s, downscale delay 3 s, 2 s look-back) and Serve's metric push intervals cut to
   0.5 s (the defaults, 10 s, are for production);
2. latency, one request at a time: the generator called through its DeploymentHandle from this
   process, through a minimal HTTP passthrough app (proxy -> ingress -> generator, no routing),
   and through the router (proxy -> router: embed + predict + rule -> generator). The router hop's
   added latency is router p50 - passthrough p50 (same number of hops; the difference is routing),
   for fresh prompts (the embedder runs) and for repeated ones (the router's embedding cache answers);
3. load: a fixed number of requests at a fixed concurrency, all at a budget equal to the cheapest
   cost (so all go to that candidate), while a poller samples the deployment's replica count from
   serve.status() (the starting count is sampled too); then it waits for the count to come back
   down. Failed responses are counted apart: latency and throughput are of answered requests only;
4. burst: two more apps on a planted quality table in which tiny-sd-8 is the best candidate and
   tiny-sdxl-4 nearly as good (0.01-0.02 lower) on every prompt, one replica each, lambda 0, one
   with load-aware routing off and one with it on (`--mu` quality units per second of expected
   wait). `--burst` requests arrive at once; p50/p99 latency and the mean planted quality of what
   was drawn, median over `--burst-rounds` interleaved rounds.

It prints figures; it asserts nothing (tests live in tests/test_serve.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Serve's autoscaling metrics are pushed every 10 s by default; the demo needs sub-second reactions.
# Set before Ray starts so the controller, proxy and replicas inherit them.
FAST_AUTOSCALING_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
for _k, _v in FAST_AUTOSCALING_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx
from fastapi import FastAPI
from ray import serve

passthrough_api = FastAPI(title="direct generator passthrough (benchmark only)")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(passthrough_api)
class Passthrough:
    """HTTP straight to one generator deployment: the same hops as the router, minus the routing."""

    def __init__(self, app_name: str, deployment: str) -> None:
        self.handle = serve.get_deployment_handle(deployment, app_name=app_name)

    @passthrough_api.post("/generate")
    async def generate(self, body: dict) -> dict:
        png = await self.handle.remote(body["prompt"], int(body["seed"]), body.get("return", "png_base64") != "none")
        return {"image": base64.b64encode(png).decode("ascii") if png else None}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _replicas(app: str, deployment: str) -> tuple[int, int]:
    """(running, all states) replica counts of one deployment, from the public serve.status()."""
    status = serve.status()
    app_status = status.applications.get(app)
    dep = app_status.deployments.get(deployment) if app_status else None
    if dep is None:
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
    return states.get("RUNNING", 0), sum(states.values())


class ReplicaPoller(threading.Thread):
    def __init__(self, app: str, deployment: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.app, self.deployment, self.every_s = app, deployment, every_s
        self.samples: list[tuple[float, int, int]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            running, total = _replicas(self.app, self.deployment)
            self.samples.append((time.monotonic() - self.t0, running, total))
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _prepare(workdir: Path, embedder: str, max_replicas: int) -> tuple[Path, Path, str, float]:
    from train_serve_fixtures import tiny_pool_dict, write_planted_table, write_pool

    from jobs.train_estimator import run_train

    table = write_planted_table(workdir / "table.parquet")
    pool = tiny_pool_dict()
    cheapest = min(pool["candidates"], key=lambda c: c["cost"])
    for cand in pool["candidates"]:
        cand["serve"] = {"num_cpus": 0.1, "max_ongoing_requests": 4, "request_timeout_s": 60}
    cheapest["serve"]["autoscaling"] = {
        "min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2,
        "upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
    }
    pool_path = write_pool(workdir / "pool.yaml", pool)
    model = Path(run_train(table, pool_path, workdir / "model", estimator="knn", embedder=embedder).model_dir)
    return model, pool_path, cheapest["name"], float(cheapest["cost"])


def _sequential(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _interleaved(fns: dict, n: int) -> dict[str, list[float]]:
    """n timings of each path, one request at a time, alternating paths so that background load
    drifts (other processes on the machine) hit every path alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(n):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            out[name].append((time.perf_counter() - start) * 1000)
    return out


async def _load(url: str, prompts: list[str], n: int, concurrency: int, budget: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    chosen: dict[str, int] = {}
    fallbacks = 0

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(i: int) -> None:
            nonlocal fallbacks
            async with sem:
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/generate", json={"prompt": prompts[i % len(prompts)], "seed": i, "budget": budget})
                except httpx.HTTPError as err:
                    errors.append(f"{type(err).__name__}: {err}")
                    return
                if r.status_code != 200:  # failures never enter latency or throughput
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                latencies.append((time.perf_counter() - start) * 1000)
                body = r.json()
                chosen[body["candidate"]] = chosen.get(body["candidate"], 0) + 1
                fallbacks += body["fallback"] is not None

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "chosen": chosen, "fallbacks": fallbacks, "wall_s": wall}


def latency_phase(url: str, dep: str, prompts: list[str], budget: float, n: int) -> None:
    """One request at a time through three paths, interleaved; fresh prompts (cache misses) and repeats."""
    handle = serve.get_deployment_handle(dep, app_name="catimage")
    http = httpx.Client(base_url=url, timeout=120)
    own: dict[str, list[float]] = {"fresh": [], "repeat": []}
    fresh_prompts = [f"{prompts[i % len(prompts)]}, picture {i}" for i in range(10 * n + 20)]

    def via_handle(i: int) -> None:
        handle.remote(prompts[i % len(prompts)], i, True).result()

    def via_passthrough(i: int) -> None:
        r = http.post("/direct/generate", json={"prompt": prompts[i % len(prompts)], "seed": i})
        r.raise_for_status()

    def via_router(prompt: str, i: int, kind: str) -> None:
        r = http.post("/v1/generate", json={"prompt": prompt, "seed": i, "budget": budget})
        r.raise_for_status()
        own[kind].append(r.json()["router_ms"])

    def fresh(i: int) -> None:  # a prompt the router has never seen: the embedder runs
        via_router(fresh_prompts[i], i, "fresh")

    def repeat(i: int) -> None:  # one of 40 prompts seen before: the embedding cache answers
        via_router(prompts[i % len(prompts)], i, "repeat")

    for fn in (via_handle, via_passthrough, repeat):  # warm-up: connections, first-call paths, the cache
        _sequential(fn, len(prompts))
    own["repeat"].clear()
    lat = _interleaved({"handle": via_handle, "passthrough": via_passthrough, "fresh": lambda i: fresh(i + 20),
                        "repeat": repeat}, n)
    http.close()
    print(f"\nlatency, one request at a time ({n} each, interleaved), ms:      p50     p99")
    for name, label in (("handle", "generator via DeploymentHandle (no HTTP)"),
                        ("passthrough", "HTTP -> passthrough -> generator"),
                        ("fresh", "HTTP -> router -> generator, fresh prompts"),
                        ("repeat", "HTTP -> router -> generator, repeated prompts")):
        print(f"  {label:<48} {_pct(lat[name], 50):7.1f} {_pct(lat[name], 99):7.1f}")
    for kind in ("fresh", "repeat"):
        added = _pct(lat[kind], 50) - _pct(lat["passthrough"], 50)
        print(f"  router hop added p50, {kind + ' prompts':<16} (router - passthrough): {added:7.1f}   (target <= 10 ms)")
        print(f"  router's own choosing time (router_ms) p50, {kind} prompts: {statistics.median(own[kind]):7.1f}")
    print(f"  HTTP+proxy+ingress overhead p50 (passthrough - handle): {_pct(lat['passthrough'], 50) - _pct(lat['handle'], 50):.1f}")


def load_phase(url: str, dep: str, prompts: list[str], budget: float, args: argparse.Namespace) -> None:
    print(f"\nload: {args.requests} requests, concurrency {args.concurrency}, budget {budget:g}")
    poller = ReplicaPoller("catimage", dep)
    poller.start()
    while not poller.samples:
        time.sleep(0.05)
    start_running = poller.samples[0][1]
    result = asyncio.run(_load(url, prompts, args.requests, args.concurrency, budget))
    load_end = time.monotonic() - poller.t0
    deadline = time.monotonic() + args.settle_timeout_s
    while time.monotonic() < deadline:
        if poller.samples and poller.samples[-1][1] <= start_running and poller.samples[-1][2] <= start_running:
            break
        time.sleep(0.5)
    poller.stop()
    lats = result["latencies"]
    print(f"  wall {result['wall_s']:.1f} s; answered {len(lats)} of {args.requests}, failed {len(result['errors'])}; "
          f"throughput of answered requests {len(lats) / result['wall_s']:.1f} req/s; fallbacks {result['fallbacks']}, "
          f"answered by {result['chosen']}")
    print(f"  latency of answered requests p50 {_pct(lats, 50):.0f} ms, p99 {_pct(lats, 99):.0f} ms")
    for err in result["errors"][:5]:
        print(f"    failed: {err}")
    peak = max(s[1] for s in poller.samples)
    first_up = next((s[0] for s in poller.samples if s[1] > start_running), None)
    back = next((s[0] for s in poller.samples if s[0] > load_end and s[1] <= start_running and s[2] <= start_running), None)
    print(f"  replicas of {dep} (serve.status(), every 0.5 s): start {start_running} running (sampled), peak {peak}"
          + (f", first up at +{first_up:.1f} s" if first_up is not None else ", never scaled up")
          + f", load ended at +{load_end:.1f} s"
          + (f", back to {start_running} at +{back:.1f} s" if back is not None else ", not back before the timeout"))
    changes, last = [], None
    for ts, running, total in poller.samples:
        if (running, total) != last:
            changes.append(f"+{ts:.1f}s {running}/{total}")
            last = (running, total)
    print("  timeline (running/all replicas): " + ", ".join(changes))


# The burst world: tiny-sd-8 best, tiny-sdxl-4 a near-tie (0.01-0.02 lower), tiny-sd-2 poor.
BURST_QUALITY = {
    "animal": {"tiny-sd-2": 0.60, "tiny-sd-8": 0.90, "tiny-sdxl-4": 0.89},
    "text": {"tiny-sd-2": 0.15, "tiny-sd-8": 0.90, "tiny-sdxl-4": 0.88},
}


def _burst_world(workdir: Path) -> tuple[list[tuple[str, str]], dict[str, Path]]:
    import numpy as np
    import pyarrow as pa
    from train_serve_fixtures import planted_prompts, tiny_pool_dict, write_pool

    from catimage.tables.table import stable_prompt_id, write_quality_table
    from jobs.train_estimator import run_train

    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "quality")}
    for prompt, kind in planted_prompts():
        for cand, q in BURST_QUALITY[kind].items():
            for s in range(2):
                rows["prompt_id"].append(stable_prompt_id(prompt))
                rows["prompt"].append(prompt)
                rows["candidate"].append(cand)
                rows["seed"].append(s)
                rows["quality"].append(q + float(rng.normal(0, 0.003)))
    table = write_quality_table(pa.table(rows), workdir / "burst_table.parquet")
    pool = tiny_pool_dict()
    for cand in pool["candidates"]:
        cand["serve"] = {"num_cpus": 0.1, "max_ongoing_requests": 64, "request_timeout_s": 300,
                         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    pool_path = write_pool(workdir / "burst_pool.yaml", pool)
    model = Path(run_train(table, pool_path, workdir / "burst_model", estimator="knn", embedder="tfidf").model_dir)
    return planted_prompts(), {"model": model, "pool": pool_path}


async def _burst(url: str, prefix: str, prompts: list[tuple[str, str]], n: int, seed0: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n)) as client:

        async def one(i: int) -> tuple[float, str | None, str]:
            prompt, kind = prompts[i % len(prompts)]
            start = time.perf_counter()
            r = await client.post(f"{prefix}/v1/generate", json={"prompt": prompt, "seed": seed0 + i, "lambda": 0.0, "return": "none"})
            ms = (time.perf_counter() - start) * 1000
            return ms, (r.json()["candidate"] if r.status_code == 200 else None), kind

        out = await asyncio.gather(*(one(i) for i in range(n)))
    ok = [(ms, cand, kind) for ms, cand, kind in out if cand is not None]
    return {
        "lat": [ms for ms, _, _ in ok],
        "quality": [BURST_QUALITY[kind][cand] for _, cand, kind in ok],
        "failed": n - len(ok),
        "chosen": {c: sum(1 for _, cand, _ in ok if cand == c) for c in BURST_QUALITY["text"]},
    }


def burst_phase(url: str, workdir: Path, args: argparse.Namespace) -> None:
    from serve.app import AppArgs, build_app

    prompts, world = _burst_world(workdir)
    for name, mu in (("burst-off", 0.0), ("burst-on", args.mu)):
        app_args = AppArgs(model_dir=str(world["model"]), pool=str(world["pool"]), router_num_cpus=0.1,
                           router_max_ongoing_requests=256, load_aware={"mu": mu}, status_cache_s=0.5)
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
    print(f"\nburst: {args.burst} requests at once, lambda 0, one replica per candidate; "
          f"load-aware mu = {args.mu:g} quality/s; planted quality: sd-8 best, sdxl-4 within 0.02")
    runs: dict[str, list[dict]] = {"burst-off": [], "burst-on": []}
    asyncio.run(_burst(url, "/burst-off", prompts, 8, 10_000))  # warm both apps
    asyncio.run(_burst(url, "/burst-on", prompts, 8, 10_000))
    for rnd in range(args.burst_rounds):
        for name, results in runs.items():  # interleaved, so background load hits both alike
            res = asyncio.run(_burst(url, f"/{name}", prompts, args.burst, 1000 * (rnd + 1)))
            results.append(res)
            print(f"  round {rnd + 1} {name:9s} p50 {_pct(res['lat'], 50):7.0f} ms  p99 {_pct(res['lat'], 99):7.0f} ms  "
                  f"quality {statistics.mean(res['quality']):.4f}  failed {res['failed']}  drawn by {res['chosen']}  "
                  f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    med = {name: {k: statistics.median(f(r) for r in rs) for k, f in (
        ("p50", lambda r: _pct(r["lat"], 50)), ("p99", lambda r: _pct(r["lat"], 99)),
        ("quality", lambda r: statistics.mean(r["quality"])))} for name, rs in runs.items()}
    off, on = med["burst-off"], med["burst-on"]
    print(f"  median of {args.burst_rounds} rounds:   off: p50 {off['p50']:.0f} ms, p99 {off['p99']:.0f} ms, quality {off['quality']:.4f}")
    print(f"                          on:  p50 {on['p50']:.0f} ms, p99 {on['p99']:.0f} ms, quality {on['quality']:.4f}")
    print(f"  p99 change {on['p99'] / off['p99'] - 1:+.1%} (goal <= -30 %), quality change {on['quality'] / off['quality'] - 1:+.2%} "
          "(goal >= -2 %)")


def _world_prompts(n: int) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT / "catimage" / "data" / "world_table.parquet", columns=["prompt"])
    prompts = list(dict.fromkeys(table.column("prompt").to_pylist()))
    return [prompts[i % len(prompts)] + ("" if i < len(prompts) else f", take {i // len(prompts)}") for i in range(n)]


class CpuSampler(threading.Thread):
    """CPU seconds used by this process and every process it started (a local Ray's raylet, workers,
    replicas), sampled twice a second with wall-clock stamps. A process that exits keeps the CPU time
    last seen for it (Ray Data stops an actor pool when its stage is done). On a shared machine the
    wall-clock rate depends on the share the others leave us; images per CPU-second does not."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self._last: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds last seen
        self.peak_processes: dict[str, int] = {}  # a Serve replica's actor name -> most processes seen at once
        self._halt = threading.Event()

    def cpu_now(self) -> float:
        replicas: dict[str, int] = {}
        for key, (title, cpu) in process_table().items():
            self._last[key] = cpu
            if title.startswith("ray::ServeReplica:"):  # "ray::ServeReplica:<app>:<deployment>[.<method running>]"
                name = title.split()[0].rsplit(":", 1)[-1].split(".")[0]  # (the world's names hold no dot)
                replicas[name] = replicas.get(name, 0) + 1
        for name, k in replicas.items():
            self.peak_processes[name] = max(k, self.peak_processes.get(name, 0))
        return sum(self._last.values())

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.time(), self.cpu_now()))
            self._halt.wait(0.5)

    def between(self, start: float, end: float) -> float:
        """CPU seconds used between two wall-clock times (nearest samples)."""
        def at(t: float) -> float:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        return at(end) - at(start)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


CPU_ROLES = (  # (what a process's command line holds, the stage it is counted in)
    ("ServeReplica:catimage:Router", "router"), ("ProxyActor", "HTTP proxy"), ("ServeReplica:catimage:Generator-", "generators"),
    ("ServeReplica:catimage:ServedLog", "served-log replica"), ("ServeReplica:catimage:Scorer-", "scorer"),
    ("ServeController", "Serve controller"), ("BudgetCoordinator", "budget coordinator"),
)


def process_table() -> dict[tuple[int, float], tuple[str, float]]:
    """(pid, create time) -> (command line, CPU seconds so far) of this process and every process it
    started (one that exits meanwhile is left out)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = (" ".join(proc.cmdline()), t.user + t.system)
        except psutil.Error:
            continue
    return out


def cpu_by_process() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds so far of this process and every process it started, each with its stage (CPU_ROLES;
    anything else: Ray's own processes and this load generator)."""
    return {
        key: (next((r for k, r in CPU_ROLES if k in line), "Ray's own processes, the load generator"), cpu)
        for key, (line, cpu) in process_table().items()
    }


def cpu_by_role(before: dict, after: dict, images: int) -> list[tuple[str, float]]:
    """Milliseconds of CPU per image answered, per stage, between two `cpu_by_process` snapshots."""
    spent: dict[str, float] = {}
    for key, (role, cpu) in after.items():
        spent[role] = spent.get(role, 0.0) + cpu - before.get(key, (role, 0.0))[1]
    return sorted(((r, 1000 * c / max(images, 1)) for r, c in spent.items()), key=lambda x: -x[1])


def world_build_rate(workdir: Path, n_prompts: int, seeds: int) -> tuple[float, float]:
    """(steady images/s, images per CPU-second) of the Ray Data build of the world pool, over the
    window benchmarks/build_throughput.py reads: from the first to the last part file."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from build_throughput import run_ray

    from catimage.tables.build import part_files

    prompts = workdir / "world_prompts.txt"
    prompts.write_text("\n".join(_world_prompts(n_prompts)) + "\n")
    pool = ROOT / "catimage" / "data" / "world_pool.yaml"
    print(f"build: world pool, {n_prompts} prompts x {seeds} seeds x 7 candidates (load avg {os.getloadavg()[0]:.1f})",
          flush=True)
    sampler = CpuSampler()
    sampler.start()
    try:
        wall, rate = run_ray(pool, prompts, seeds, workdir / "world_build")
    finally:
        sampler.stop()
    files = sorted(part_files(workdir / "world_build"), key=lambda f: f.stat().st_mtime)
    rows = sum(pq.read_metadata(f).num_rows for f in files[1:])
    cpu = sampler.between(files[0].stat().st_mtime, files[-1].stat().st_mtime)
    per_cpu = rows / max(cpu, 1e-9)
    print(f"  wall {wall:.1f} s (Ray start, actors, scoring included); steady {rate:.1f} images/s; "
          f"{per_cpu:.2f} images per CPU-second ({cpu:.0f} CPU-s for {rows} images)", flush=True)
    return rate, per_cpu


async def _world_load(url: str, prompts: list[str], budget: float | None = None) -> dict:
    """Every prompt at once, one connection each. aiohttp (a dependency of Ray Serve) rather than httpx:
    the load generator shares the two cores with what it measures, and httpx's connection pool
    scans every connection per request (quadratic in the burst): 2-3 times the client CPU."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=len(prompts))
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:

        async def one(i: int) -> tuple[float | None, str]:
            start = time.perf_counter()
            try:
                # routed: one image per request, as the build draws (the shipped config cascades by default)
                body = {"prompt": prompts[i], "seed": i, "policy": "route", **({} if budget is None else {"budget": budget})}
                async with client.post("/v1/generate", json=body) as r:
                    status, body = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as err:
                return None, f"{type(err).__name__}: {err}"
            answer = json.loads(body) if status == 200 else {}
            if not answer.get("image"):
                return None, f"HTTP {status}: {body[:200]!r}"
            return (time.perf_counter() - start) * 1000, answer["candidate"]

        start = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "ok": [(ms, c) for ms, c in out if ms is not None], "errors": [e for ms, e in out if ms is None]}


def _unbatched_pool(workdir: Path) -> Path:
    """The world pool as shipped before batching: one request per generator call, 4 ongoing."""
    import yaml

    pool = yaml.safe_load((ROOT / "catimage" / "data" / "world_pool.yaml").read_text())
    for cand in pool["candidates"]:
        cand["serve"] = {"num_cpus": cand["serve"]["num_cpus"]}
    path = workdir / "world_pool_unbatched.yaml"
    path.write_text(yaml.safe_dump(pool, sort_keys=False))
    return path


def _generator_batches(probes: int = 8) -> dict[str, tuple[int, int]]:
    """(requests, generate() calls) per candidate, summed over the replicas that `probes` stats() calls
    through the handle reached (a replica's counts are cumulative; one seen twice is counted once)."""
    from serve.app import deployment_name

    out = {}
    for app_status in serve.status().applications.values():
        for dep in app_status.deployments:
            if not dep.startswith(deployment_name("")):
                continue
            handle = serve.get_deployment_handle(dep, app_name="catimage")
            seen = {(st["requests"], st["batches"]) for st in (handle.stats.remote().result() for _ in range(probes))}
            out[dep[len(deployment_name("")):]] = (sum(r for r, _ in seen), sum(b for _, b in seen))
    return out


def _report_burst(label: str, result: dict, cpu: float, roles: list[tuple[str, float]], costs: dict[str, float],
                  batches: dict[str, tuple[int, int]], replicas: dict[str, int], n: int) -> tuple[float, float]:
    """Print one burst's figures; (images/s, images per CPU-second) of its answered requests."""
    lats = [ms for ms, _ in result["ok"]]
    drawn: dict[str, int] = {}
    for _, cand in result["ok"]:
        drawn[cand] = drawn.get(cand, 0) + 1
    rate = len(lats) / result["wall_s"]
    print(f"  {label}: answered {len(lats)} of {n}, failed {len(result['errors'])}; wall {result['wall_s']:.1f} s; "
          f"{rate:.1f} images/s; latency p50 {_pct(lats, 50) / 1000:.1f} s, p99 {_pct(lats, 99) / 1000:.1f} s")
    mean_cost = sum(costs[c] * k for c, k in drawn.items()) / max(len(lats), 1)
    print(f"    mean cost of an image drawn {mean_cost:.2f} GFLOPs (the build's: the pool's mean, "
          f"{sum(costs.values()) / len(costs):.2f}): {rate * mean_cost:.1f} GFLOPs/s")
    print(f"    drawn by {dict(sorted(drawn.items()))}; {len(lats) / max(cpu, 1e-9):.2f} images per CPU-second "
          f"({cpu:.0f} CPU-s); generator replica processes, most at once: "
          + ", ".join(f"{k[len('Generator-'):]} {v}" for k, v in sorted(replicas.items()) if k.startswith("Generator-")))
    print("    images per generate() call (replicas seen through the handle, since deployment): "
          + ", ".join(f"{c} {r / b:.1f} ({r} in {b})" for c, (r, b) in sorted(batches.items()) if b))
    print(f"    CPU per image answered, by stage (ms; load avg {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{r} {ms:.1f}" for r, ms in roles) + f"; all {sum(ms for _, ms in roles):.1f}")
    for err in result["errors"][:5]:
        print(f"      failed: {err}")
    return rate, len(lats) / max(cpu, 1e-9)


def _burst_of(url: str, prompts: list[str], budget: float | None) -> tuple[dict, float, list[tuple[str, float]], dict[str, int]]:
    """One burst of concurrent requests: its result, CPU seconds, CPU per image by stage, and the most
    replica processes of each deployment seen at once (counted from process titles: no call to Serve)."""
    sampler = CpuSampler()
    sampler.start()
    t0, before = time.time(), cpu_by_process()
    try:
        result = asyncio.run(_world_load(url, prompts, budget))
        cpu, after = sampler.between(t0, time.time()), cpu_by_process()
    finally:
        sampler.stop()
    return result, cpu, cpu_by_role(before, after, len(result["ok"])), sampler.peak_processes


def world_serve_rate(n: int, pool: Path | None = None) -> dict[str, tuple[float, float]]:
    """(images/s, images per CPU-second) of `n` concurrent /v1/generate on the shipped config
    (optionally another pool file), answered ones only, in three bursts of distinct prompts:
    `cold`, right after deployment, at the config's budget (a candidate that needs a second replica
    starts it during the burst); `warm`, right after it (the replicas it scaled to still up:
    `downscale_delay_s` is 60 s), which compares with the build's steady rate (its actors' start-up
    excluded); `equal work`, warm again at a budget equal to the pool's mean cost, the work per image
    of the build, which draws every candidate alike (images/s of mixes that cost differently per
    image do not compare)."""
    import ray
    import yaml
    from train_serve_fixtures import free_port

    from catimage.tables.pool import load_pool
    from serve.app import build_app

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    args = {k: (str(ROOT / v) if k in ("model_dir", "pool") else v) for k, v in app["args"].items()}
    if pool is not None:
        args["pool"] = str(pool)
        print(f"serve: pool {pool.name} instead of the shipped one")
    costs = {c.name: float(c.cost) for c in load_pool(args["pool"]).candidates}
    bursts = {"cold": None, "warm": None, "equal work": sum(costs.values()) / len(costs)}
    env_vars = (app.get("runtime_env") or {}).get("env_vars") or {}  # as `serve run` would give the replicas
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    figures = {}
    try:
        t = time.perf_counter()
        serve.run(build_app(args), name="catimage", route_prefix="/")
        print(f"serve: the shipped serve/config.yaml app deployed in {time.perf_counter() - t:.1f} s; "
              f"{len(bursts)} bursts of {n} concurrent /v1/generate (load avg {os.getloadavg()[0]:.1f})", flush=True)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_world_load(url, _world_prompts(8)))  # first calls: connections, first batches
        prompts = _world_prompts(len(bursts) * n)[::-1]  # distinct prompts throughout: none answered from a cache
        for k, (label, budget) in enumerate(bursts.items()):
            result, cpu, roles, replicas = _burst_of(url, prompts[k * n:(k + 1) * n], budget)
            at = f"budget {args.get('budget')} (the config's)" if budget is None else f"budget {budget:.2f} (the pool's mean cost)"
            figures[label] = _report_burst(f"{label} burst, {at}", result, cpu, roles, costs, _generator_batches(), replicas, n)
    finally:
        serve.shutdown()
        ray.shutdown()
    return figures


def world_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="catimage-serve-world-") as tmp:
        build, build_cpu = world_build_rate(Path(tmp), args.build_prompts, args.build_seeds)
        served = world_serve_rate(args.requests)
        if args.compare_unbatched:
            before = world_serve_rate(args.requests, _unbatched_pool(Path(tmp)))
            for label in ("warm", "equal work"):
                (now, now_cpu), (was, was_cpu) = served[label], before[label]
                print(f"unbatched (the previous serve blocks), {label}: {was:.1f} images/s, {was_cpu:.2f} per CPU-second; "
                      f"batched / unbatched {now / was:.2f} (wall), {now_cpu / was_cpu:.2f} (per CPU-second)")
    for label, (rate, per_cpu) in served.items():
        print(f"serving ({label} burst) / build steady throughput: {rate:.1f} / {build:.1f} images/s = {rate / build:.2f} "
              f"(goal >= 0.7); per CPU-second {per_cpu:.2f} / {build_cpu:.2f} = {per_cpu / build_cpu:.2f} "
              f"(the same ratio with the machine to ourselves)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--embedder", default="minilm", choices=("minilm", "tfidf"))
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--settle-timeout-s", type=float, default=90.0)
    parser.add_argument("--phases", default="latency,load,burst", help="comma-separated: latency, load, burst")
    parser.add_argument("--burst", type=int, default=48, help="requests arriving at once in the burst phase")
    parser.add_argument("--burst-rounds", type=int, default=3)
    parser.add_argument("--mu", type=float, default=0.02, help="load-aware price of one second of expected wait")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                        help="how the router runs MiniLM (embedder_overrides backend)")
    parser.add_argument("--world", action="store_true", help="serving vs build throughput on the shipped world pool")
    parser.add_argument("--build-prompts", type=int, default=40, help="--world: prompts of the build run")
    parser.add_argument("--build-seeds", type=int, default=4, help="--world: seeds of the build run")
    parser.add_argument("--compare-unbatched", action="store_true",
                        help="--world: serve again with max_batch_size 1 (the previous serve blocks)")
    args = parser.parse_args(argv)
    if args.world:
        if not 1 <= args.requests <= 2000:
            parser.error("keep it bounded: --requests 1..2000")
        return world_main(args)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not (1 <= args.requests <= 2000 and 1 <= args.concurrency <= 64):
        parser.error("keep it bounded: --requests 1..2000, --concurrency 1..64")

    import warnings

    import ray

    # Serve warns that a 2 s look-back is below the deprecated 10 s metrics_interval_s; the push
    # intervals above are what actually apply.
    warnings.filterwarnings("ignore", message=".*look_back_period_s.*")
    from train_serve_fixtures import ANIMALS, PLACES, free_port

    from serve.app import AppArgs, build_app, deployment_name

    with tempfile.TemporaryDirectory(prefix="catimage-serve-load-") as tmp:
        t = time.perf_counter()
        model, pool_path, target, budget = _prepare(Path(tmp), args.embedder, args.max_replicas)
        print(f"router model: knn over {args.embedder} (planted table, backend {args.backend}), "
              f"fitted in {time.perf_counter() - t:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes skew every figure)")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": FAST_AUTOSCALING_ENV})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        try:
            t = time.perf_counter()
            serve.run(
                build_app(AppArgs(model_dir=str(model), pool=str(pool_path), autoscaling_overrides={"look_back_period_s": 2.0},
                                  embedder_overrides={} if args.backend == "torch" else {"backend": args.backend})),
                name="catimage", route_prefix="/",
            )
            dep = deployment_name(target)
            serve.run(Passthrough.bind("catimage", dep), name="direct", route_prefix="/direct")
            print(f"deployed in {time.perf_counter() - t:.1f} s; traffic goes to {dep} (budget {budget:g} = its cost)")

            prompts = [f"a photo of a {a} {p}" for a in ANIMALS for p in PLACES]
            if "latency" in phases:
                latency_phase(url, dep, prompts, budget, args.latency_samples)
            if "load" in phases:
                load_phase(url, dep, prompts, budget, args)
            if "burst" in phases:
                burst_phase(url, Path(tmp), args)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
