"""The main job on the embedded default: the whole catimage loop on one machine, nothing downloaded.

local Ray -> tiny pool (random-weight SD/SDXL, built locally) -> Ray Data build job -> Ray Train fit
-> evaluation report -> Ray Serve app -> routed requests at two budgets -> clean shutdown.

`catimage demo` calls `run_demo`; it is also runnable as `python jobs/demo.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from catimage.errors import CatimageError

log = logging.getLogger(__name__)

TINY_NOTE = (
    "Images were drawn by tiny random-weight models (the demo pool): they are noise, and these figures say "
    "nothing about real generators. They show that every stage runs."
)
DEMO_REQUESTS = (
    "a red apple",
    "a lighthouse at dusk",
    "a chessboard mid-game where the white queen is cornered by two black knights",
)


def embedded(name: str) -> Path:
    """A file shipped inside the package (works from any working directory, no ../shared needed)."""
    return Path(str(resources.files("catimage") / "data" / name))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise CatimageError(
                f"port {port} on {host} is already in use; pass another with --port, or omit --port to pick a free one"
            ) from None


@dataclass
class DemoResult:
    """What the demo did and where its files are."""

    out: Path
    table: Path
    model: Path
    report: dict[str, Path]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _stage(console: Console, name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(f"[bold cyan]{name}[/] ..."):
        yield
    timings[name] = time.perf_counter() - start
    console.print(f"[green]done[/] {name} [dim]({timings[name]:.1f} s)[/]")


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private local Ray for the demo (no dashboard), always shut down, Serve included."""
    import ray

    if ray.is_initialized():
        raise CatimageError("a Ray session is already running in this process; the demo starts its own")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The demo prints its own stage lines; Ray's INFO chatter would drown them.
    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds; the user needs one message
        raise CatimageError(
            f"Ray could not start ({type(err).__name__}: {err}). Check free memory and /tmp space, and that no "
            "stale Ray is running (`ray stop`)."
        ) from err
    try:
        yield
    finally:
        from ray import serve

        with contextlib.suppress(Exception):
            if serve.status().applications:
                serve.shutdown()
        ray.shutdown()


def run_demo(
    out: Path,
    pool_path: Path | None = None,
    prompts_path: Path | None = None,
    seeds: int = 2,
    metric: str = "clip_score",
    estimator: str = "transformer",
    embedder: str = "minilm",
    port: int | None = None,
    num_cpus: int = 2,
    max_epochs: int = 40,
    console: Console | None = None,
) -> DemoResult:
    """Run every stage; raise `CatimageError` with a next step on anything the user can fix."""
    from catimage.build import BuildConfig
    from catimage.embed import make_embedder
    from catimage.evaluation import evaluate_table
    from catimage.pool import load_pool
    from catimage.report import write_report
    from catimage.table import load_pool_matrix
    from jobs.build_dataset import print_summary, run_build
    from jobs.train_estimator import run_train

    console = console or Console()
    out = Path(out)
    pool_path = Path(pool_path) if pool_path else embedded("tiny_pool.yaml")
    prompts_path = Path(prompts_path) if prompts_path else embedded("demo_prompts.txt")
    pool = load_pool(pool_path)
    if port is None:
        port = free_port()
    check_port_free(port)
    timings: dict[str, float] = {}
    table_dir, model_dir, report_dir = out / "table", out / "model", out
    console.rule("[bold]catimage demo")
    console.print(
        f"pool [bold]{pool_path}[/] ({', '.join(pool.names)}), prompts [bold]{prompts_path}[/], S={seeds}, "
        f"metric {metric}, estimator {estimator} + {embedder}"
    )
    with local_ray(num_cpus):
        with _stage(console, "1/5 build the quality table (Ray Data)", timings):
            build = run_build(BuildConfig(pool=pool_path, prompts=prompts_path, output=table_dir, seeds=seeds), progress=False)
        print_summary(build, console)
        if build.table_path is None:
            raise CatimageError(f"the build wrote no rows; see the errors table {build.errors_path}")

        with _stage(console, "2/5 fit the estimator (Ray Train)", timings):
            run_train(build.table_path, pool_path, model_dir, estimator=estimator, embedder=embedder, metric=metric,
                      num_workers=1, max_epochs=max_epochs)

        with _stage(console, "3/5 evaluate (deferral curves, oracle, hull)", timings):
            pool, matrix, costs = load_pool_matrix(build.table_path, pool_path, metric=metric)
            report = evaluate_table(
                matrix, costs, estimator, {"max_epochs": max_epochs} if estimator == "transformer" else {},
                make_embedder(embedder), test_frac=0.25, val_frac=0.15, seed=0, trials=3,
                cost_unit=pool.cost_unit, notes=pool.report_notes() or [TINY_NOTE],
            )
            paths = write_report(report, report_dir)

        decisions = _serve_and_ask(console, timings, model_dir, pool_path, pool, port)

    timings_total = sum(timings.values())
    _print_final(console, out, build.table_path, model_dir, paths, report, decisions, timings_total)
    return DemoResult(out, build.table_path, model_dir, paths, decisions, timings)


def _serve_and_ask(console, timings, model_dir, pool_path, pool, port) -> list[dict[str, Any]]:
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.schemas import AppArgs

    costs = sorted(c.cost for c in pool.candidates if c.cost is not None)
    budgets = (costs[0] + 0.25 * (costs[1] - costs[0]) if len(costs) > 1 else costs[0], costs[-1])
    decisions: list[dict[str, Any]] = []
    with _stage(console, f"4/5 start the Serve app on 127.0.0.1:{port}", timings):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(AppArgs(model_dir=str(model_dir), pool=str(pool_path))), name="catimage",
                  route_prefix="/", blocking=False)
        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
    with _stage(console, "5/5 routed requests at two budgets", timings):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for budget in budgets:
                for prompt in DEMO_REQUESTS:
                    resp = client.post("/v1/generate", json={"prompt": prompt, "budget": budget, "seed": 0, "return": "png_base64"})
                    if resp.status_code != 200:
                        raise CatimageError(f"the Serve app answered {resp.status_code}: {resp.text}")
                    body = resp.json()
                    decisions.append({"budget": budget, "prompt": prompt, **{k: body.get(k) for k in
                                      ("candidate", "cost", "lambda", "predicted_quality", "fallback")},
                                      "image_bytes": len(body.get("image") or "") * 3 // 4})
            pool_status = client.get("/v1/pool").json()
    names = list(decisions[0]["predicted_quality"] or {}) if decisions else []
    table = Table(title=f"routed requests (POST /v1/generate); q̂ = predicted {metric_name(model_dir)}")
    for col in ("budget", "λ", "prompt", "chosen", "cost", *[f"q̂ {n}" for n in names], "PNG bytes"):
        if col == "prompt":
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=40)
        else:
            table.add_column(col, no_wrap=True, justify="left" if col == "chosen" else "right")
    for d in decisions:
        q = d["predicted_quality"] or {}
        table.add_row(f"{d['budget']:.3g}", f"{d['lambda']:.3g}", d["prompt"], d["candidate"], f"{d['cost']:.3g}",
                      *[f"{q.get(n, float('nan')):.3f}" for n in names], str(d["image_bytes"]))
    console.print(table)
    console.print("why: each prompt goes to argmax_m q̂_m(x) − λ·c_m; λ is the smallest value whose average cost on "
                  "held-out prompts meets the budget, so the tighter budget pushes prompts to cheaper candidates.")
    replicas = {c["name"]: c.get("replicas") for c in pool_status.get("candidates", [])}
    console.print(f"GET /v1/pool replicas: {replicas}")
    with _stage(console, "shut down Serve and Ray", timings):
        serve.shutdown()
    return decisions


def metric_name(model_dir: Path) -> str:
    import json

    return json.loads((Path(model_dir) / "router.json").read_text()).get("metric", "quality")


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise CatimageError(f"the Serve app did not become healthy at {url} within {timeout_s:.0f} s")


def _print_final(console, out, table_path, model_dir, paths, report, decisions, seconds) -> None:
    summary = report["summary"]
    console.rule("[bold]summary")
    tab = Table(show_header=False)
    tab.add_column("what")
    tab.add_column("value", overflow="fold")
    tab.add_row("quality table", str(table_path))
    tab.add_row("model directory", str(model_dir))
    for key, path in paths.items():
        tab.add_row(key, str(path))
    tab.add_row("best fixed candidate", str(summary.get("best_fixed")))
    tab.add_row("router quality at its cost", _fmt(summary.get("quality_at_best_fixed_cost")))
    tab.add_row("area over the mixture hull", _fmt(summary.get("area_over_hull")))
    by_budget: dict[float, list[str]] = {}
    for d in decisions:
        by_budget.setdefault(d["budget"], []).append(d["candidate"])
    for budget, chosen in by_budget.items():
        tab.add_row(f"chosen at budget {budget:.3g}", ", ".join(chosen))
    tab.add_row("total seconds", f"{seconds:.0f}")
    console.print(tab)
    for note in report.get("meta", {}).get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        run_demo(args.out, port=args.port)
    except CatimageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
