"""Budget drift: fixed lambda versus the online budget controller when the prompt mix shifts.

    .venv/bin/python benchmarks/budget_drift.py [--budget 1.0] [--window 200] [--embedder minilm] [--trials 5]

On GenAI-Bench (527 prompts x 6 models, human ratings; ASSUMED illustrative costs of
configs/genai_bench_pool.yaml), for each trial:

1. split the prompts in half: a knn router is fitted on one half (MiniLM embeddings), the other
   half is the live traffic (never seen by the router);
2. label each live prompt easy or hard by its mean human rating over the six models (below the
   median = hard);
3. calibrate lambda offline for the budget B on a sample of the *phase-1 mix* (80 % easy);
4. stream `--requests` requests: the first half drawn from the phase-1 mix, the second half from a
   harder mix (80 % hard);
5. route the same stream twice: at the fixed offline lambda, and with the controller
   (catimage.policy.budget, the same code the Serve app runs; lambda refreshed every `--sync-every`
   requests as the Serve routers do);
6. print the realised mean cost and mean rating per window, and for the controller's phase-2
   windows after the first, the offline optimum: the router's own deferral curve on those very
   prompts (hindsight lambda, randomised between neighbouring points) at the controller's realised
   cost.

Goals: the controller holds each window's mean cost within +-5 % of B from the second phase-2
window on, where fixed lambda overshoots; its rating within 1 % of the offline optimum at the same
cost. Prints; asserts nothing.

`--policy cascade` (or `both`, the default; the route run needs the shared GenAI-Bench ratings and
is skipped without them) runs the same experiment with CASCADES on the shipped scene world
(catimage/data/world_table.parquet: 1,000 prompts x 7 candidates x 4 seeds, GFLOPs costs), as the
Serve app controls them (serve/model_state.py, serve/budget_coordinator.py): its own controller
(`cascade:*`), lambda from the cascade bundle's `lambda_for_budget`, and one observation per request
worth its REALISED plan cost: every generation drawn plus 0.043 GFLOPs of scene_decider scoring per
image, the escalations as they happened in the table (catimage.evaluation.cascade.simulate_plans on
the prompt's own seed rows). Per trial: a cascade (knn router + draw estimator over MiniLM, plans of
<= 4 attempts) is fitted on half of the prompts (a tenth of that half calibrates lambda); the other
half is the live traffic, easy or hard by its mean scene_score over the candidates (below the
median = hard); the stream shifts from 20 % to 80 % hard halfway. Printed per window: realised
mean cost and judge (scene_score) of fixed lambda and of the controller; then whether every window
from the second on (phase 1 included) is within +-5 % of B.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from catimage.estimators import make_estimator
from catimage.features.cache import CachedEmbedder
from catimage.features.registry import make_embedder
from catimage.policy.budget import BudgetController, ControllerConfig, lambda_scale
from catimage.policy.routing import calibrate_lambda, deferral_curve, interpolate_curve, route
from catimage.tables.table import MetricScaler, load_pool_matrix


def _stream(rng: np.random.Generator, easy: np.ndarray, hard: np.ndarray, n: int, hard_share: float) -> np.ndarray:
    pick_hard = rng.random(n) < hard_share
    return np.where(pick_hard, rng.choice(hard, n), rng.choice(easy, n))


def _controlled(pred: np.ndarray, costs: np.ndarray, ctrl: BudgetController, sync_every: int) -> np.ndarray:
    """Route a stream one request at a time; lambda refreshes every `sync_every` requests."""
    chosen = np.empty(pred.shape[0], dtype=np.int64)
    lam = ctrl.lam
    pending: list[float] = []
    for i in range(pred.shape[0]):
        chosen[i] = route(pred[i : i + 1], costs, lam)[0]
        pending.append(float(costs[chosen[i]]))
        if len(pending) >= sync_every:
            lam = ctrl.observe(pending)
            pending.clear()
    return chosen


def run_trial(args: argparse.Namespace, X: np.ndarray, Y: np.ndarray, labels: np.ndarray, costs: np.ndarray,
              seed: int, verbose: bool) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    perm = rng.permutation(n)
    fit_idx, live_idx = perm[: n // 2], perm[n // 2 :]
    scaler = MetricScaler.fit(Y[fit_idx])
    est = make_estimator("knn").fit(X[fit_idx], scaler.transform(Y[fit_idx]))
    pred_live = scaler.inverse_transform(est.predict(X[live_idx]))
    lab_live = labels[live_idx]
    hardness = np.nanmean(lab_live, axis=1)
    cut = np.median(hardness)
    easy, hard = np.nonzero(hardness >= cut)[0], np.nonzero(hardness < cut)[0]

    calib = _stream(rng, easy, hard, args.calibration, 0.2)
    lam_offline = calibrate_lambda(pred_live[calib], costs, args.budget)
    half = args.requests // 2
    stream = np.concatenate([_stream(rng, easy, hard, half, 0.2), _stream(rng, easy, hard, args.requests - half, 0.8)])
    pred_s, lab_s = pred_live[stream], lab_live[stream]

    fixed = route(pred_s, costs, lam_offline)
    cfg = ControllerConfig(budget=args.budget, window=args.window, ki=args.ki, kp=args.kp, max_step=args.max_step)
    ctrl = BudgetController(cfg, lam_offline=lam_offline, scale=lambda_scale(pred_live[calib], costs))
    controlled = _controlled(pred_s, costs, ctrl, args.sync_every)

    rows = np.arange(stream.size)
    cost_f, cost_c = costs[fixed], costs[controlled]
    q_f, q_c = lab_s[rows, fixed], lab_s[rows, controlled]
    W = args.window
    if verbose:
        print(f"\ntrial seed {seed}: lambda offline {lam_offline:.4g} (calibrated on the phase-1 mix), scale {ctrl.scale:.4g}")
        print(f"{'window':>6} {'mix':>7} | {'fixed: cost':>11} {'err':>7} {'rating':>7} | {'ctrl: cost':>10} {'err':>7} {'rating':>7} {'lambda end':>10}")
    lam_trace = []  # lambda at each window end (replay, cheap)
    replay = BudgetController(cfg, lam_offline=lam_offline, scale=ctrl.scale)
    for w in range(stream.size // W):
        sl = slice(w * W, (w + 1) * W)
        replay.observe(cost_c[sl])
        lam_trace.append(replay.lam)
        if verbose:
            mix = "easy" if (w + 1) * W <= half else "HARD"
            print(f"{w:6d} {mix:>7} | {cost_f[sl].mean():11.3f} {cost_f[sl].mean() / args.budget - 1:+7.1%} {q_f[sl].mean():7.3f} |"
                  f" {cost_c[sl].mean():10.3f} {cost_c[sl].mean() / args.budget - 1:+7.1%} {q_c[sl].mean():7.3f} {lam_trace[-1]:10.4g}")

    # Phase 2 after its first window: held within +-5 %? and quality vs the hindsight optimum.
    p2 = slice(half + W, stream.size)
    win_errs = [cost_c[s : s + W].mean() / args.budget - 1 for s in range(half + W, stream.size - W + 1, W)]
    fixed_errs = [cost_f[s : s + W].mean() / args.budget - 1 for s in range(half + W, stream.size - W + 1, W)]
    # The noise floor: the best fixed lambda in hindsight (calibrated on phase 2's own prompts) still
    # sees its window means scatter, since a window is only `W` draws of a very uneven cost.
    hind = costs[route(pred_s, costs, calibrate_lambda(pred_s[half:], costs, args.budget))]
    hind_errs = [hind[s : s + W].mean() / args.budget - 1 for s in range(half + W, stream.size - W + 1, W)]
    curve = deferral_curve(pred_s[p2], costs, lab_s[p2])
    realised = float(cost_c[p2].mean())
    optimum = float(interpolate_curve(curve, realised))
    return {
        "lam_offline": lam_offline,
        "ctrl_max_abs_err": max(abs(e) for e in win_errs),
        "fixed_mean_err": float(np.mean(fixed_errs)),
        "fixed_max_abs_err": max(abs(e) for e in fixed_errs),
        "hindsight_max_abs_err": max(abs(e) for e in hind_errs),
        "ctrl_mean_err": float(np.mean(win_errs)),
        "ctrl_cost": realised,
        "ctrl_rating": float(q_c[p2].mean()),
        "optimum_rating": optimum,
        "fixed_rating": float(q_f[p2].mean()),
        "fixed_cost": float(cost_f[p2].mean()),
        "ratio": float(q_c[p2].mean()) / optimum,
    }


# --- cascades on the scene world -------------------------------------------------------------------


def _cascade_setup(args: argparse.Namespace):
    """The world table's per-draw scores (decision scene_decider, judge scene_score), matrix, costs."""
    import pyarrow.parquet as pq

    from catimage.tables.draws import cascade_inputs
    from catimage.tables.pool import load_pool
    from catimage.tables.table import aggregate

    table = pq.read_table(ROOT / "catimage" / "data" / "world_table.parquet")
    pool = load_pool(ROOT / "catimage" / "data" / "world_pool.yaml")
    names = list(pool.names)
    inputs = cascade_inputs(table, pool, names, "scene_score")
    matrix = aggregate(table, "scene_score", names)
    embedder = make_embedder(args.embedder)
    if args.embedder == "tfidf":
        embedder.fit(matrix.prompts)
    else:
        embedder = CachedEmbedder(embedder)
    return matrix, inputs, pool.cost_vector(names), embedder


def _live_options(model, draws, costs: np.ndarray, score_cost: float, live: np.ndarray):
    """Per live prompt, its Pareto plans' predicted value and expected cost (what serving chooses among)
    and their realised judge and cost on the prompt's own seed rows."""
    from catimage.evaluation.cascade import simulate_plans
    from catimage.policy.routing import pareto_options

    prompts = [draws.prompts[i] for i in live]
    value, cost = model.plan_values(model.predict_stats(prompts))
    pv, pc, idx = pareto_options(value, cost)
    rq, rc = np.empty_like(pv), np.empty_like(pc)
    for row, i in enumerate(live):
        real = simulate_plans([model.plans[k] for k in idx[row]], draws.subset([i]), costs, score_cost)
        rq[row], rc[row] = real.quality[0], real.cost[0]
    return pv, pc, rq, rc


def _decision_ms(model, prompts: list[str]) -> str:
    """What one serving decision costs on this machine: one prompt's draw statistics and every plan's
    value and cost (embeddings cached, as the router's LRU has them for a repeated prompt)."""
    import time

    model.plan_values(model.predict_stats(prompts))  # warm: embeddings cached, code paths loaded
    times = []
    for p in prompts:
        start = time.perf_counter()
        model.plan_values(model.predict_stats([p]))
        times.append((time.perf_counter() - start) * 1000)
    return f"one prompt's plan values: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms ({len(prompts)} prompts)"


def _controlled_plans(pv, pc, rc, ctrl: BudgetController, sync_every: int, lag: float = 0.0,
                      feed_forward: bool = False) -> np.ndarray:
    """Serve the stream one request at a time; each request's realised plan cost feeds the controller.

    `lag` > 0: a request's cost reaches the controller `lag * cost / B` requests after it was decided
    (dear plans draw longer and report later, as in serving with requests in flight); 0: at once.
    `feed_forward`: each decision's expected plan cost is committed at the next sync
    (`BudgetController.commit`), its realised cost observed against it when it arrives."""
    import heapq

    budget = ctrl.config.budget
    chosen = np.empty(pv.shape[0], dtype=np.int64)
    lam, pending, due, decided = ctrl.lam, [], [], []
    for i in range(pv.shape[0]):
        chosen[i] = route(pv[i : i + 1], pc[i : i + 1], lam)[0]
        cost, expected = float(rc[i, chosen[i]]), float(pc[i, chosen[i]])
        decided.append(expected)
        heapq.heappush(due, (i + lag * cost / budget, i, cost, expected))
        while due and due[0][0] <= i:
            pending.append(heapq.heappop(due)[2:])
        if len(decided) >= sync_every:
            if feed_forward:
                ctrl.commit(decided)
            if pending:
                costs, exp = zip(*pending, strict=True)
                ctrl.observe(costs, expected=exp if feed_forward else None)
            lam = ctrl.lam
            pending.clear()
            decided.clear()
    return chosen


def _hindsight_costs(pv: np.ndarray, pc: np.ndarray, rc: np.ndarray, half: int, budget: float) -> np.ndarray:
    """Realised costs at the one fixed lambda whose phase-2 mean REALISED cost is the budget (bisection,
    in hindsight): its phase-2 windows still scatter, since a window is `W` uneven plan costs."""
    rows = np.arange(pv.shape[0])

    def mean_cost(lam: float) -> float:
        return float(rc[rows[half:], route(pv[half:], pc[half:], lam)].mean())

    lo, hi = 0.0, 1.0
    while mean_cost(hi) > budget and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_cost(mid) > budget else (lo, mid)
    return rc[rows, route(pv, pc, hi)]


def cascade_trial(args: argparse.Namespace, setup, seed: int, verbose: bool) -> dict[str, float]:
    from catimage.model.cascade_model import CascadeOptions, fit_cascade
    from catimage.tables.table import split_prompts

    matrix, inputs, costs, embedder = setup
    draws, score_cost = inputs.draws, inputs.score_cost
    rng = np.random.default_rng(seed)
    perm = rng.permutation(matrix.n_prompts)
    fit_idx, live = perm[: matrix.n_prompts // 2], perm[matrix.n_prompts // 2 :]
    split = split_prompts(fit_idx.size, 0.0, 0.1, seed=seed)
    model = fit_cascade(matrix, draws, costs, "gflops", fit_idx[split.train], fit_idx[split.calibration],
                        score_cost=score_cost, options=CascadeOptions(max_attempts=4), estimator="knn",
                        embedder=embedder)
    pv, pc, rq, rc = _live_options(model, draws, costs, score_cost, live)
    hardness = matrix.mean[live].mean(axis=1)
    cut = np.median(hardness)
    easy, hard = np.nonzero(hardness >= cut)[0], np.nonzero(hardness < cut)[0]
    half = args.requests // 2
    stream = np.concatenate([_stream(rng, easy, hard, half, 0.2), _stream(rng, easy, hard, args.requests - half, 0.8)])
    budget = args.cascade_budget
    lam_offline = model.lambda_for_budget(budget)
    rows = np.arange(stream.size)
    fixed = route(pv[stream], pc[stream], lam_offline)
    cfg = ControllerConfig(budget=budget, window=args.window, ki=args.ki, kp=args.kp, max_step=args.max_step)
    scale = lambda_scale(model.router.calibration_pred, model.router.costs)
    ctrl = BudgetController(cfg, lam_offline=lam_offline, scale=scale)
    controlled = _controlled_plans(pv[stream], pc[stream], rc[stream], ctrl, args.sync_every, args.lag,
                                   args.feed_forward)
    cost_f, cost_c = rc[stream][rows, fixed], rc[stream][rows, controlled]
    q_f, q_c = rq[stream][rows, fixed], rq[stream][rows, controlled]
    W = args.window
    starts = range(0, stream.size - W + 1, W)
    errs = [cost_c[s : s + W].mean() / budget - 1 for s in starts]
    fixed_errs = [cost_f[s : s + W].mean() / budget - 1 for s in starts]
    if verbose:
        print(f"\ncascade trial seed {seed}: lambda offline {lam_offline:.4g} (the bundle's calibration), scale "
              f"{scale:.4g}, {len(model.plans)} plans, scorer {score_cost:g} GFLOPs per image; "
              f"{_decision_ms(model, [draws.prompts[i] for i in live[:50]])}")
        print(f"{'window':>6} {'mix':>5} | {'fixed: cost':>11} {'err':>7} {'judge':>6} | {'ctrl: cost':>10} {'err':>7} "
              f"{'judge':>6} {'lambda end':>10}")
        replay = BudgetController(cfg, lam_offline=lam_offline, scale=scale)
        for w, s0 in enumerate(starts):
            sl = slice(s0, s0 + W)
            mix = "easy" if s0 + W <= half else "HARD"
            lam_end = replay.observe(cost_c[sl])
            print(f"{w:6d} {mix:>5} | {cost_f[sl].mean():11.3f} {fixed_errs[w]:+7.1%} {q_f[sl].mean():6.3f} |"
                  f" {cost_c[sl].mean():10.3f} {errs[w]:+7.1%} {q_c[sl].mean():6.3f} {lam_end:10.4g}")
    hind = _hindsight_costs(pv[stream], pc[stream], rc[stream], half, budget)
    hind_errs = [hind[s : s + W].mean() / budget - 1 for s in range(half, stream.size - W + 1, W)]
    return {
        "hindsight_max_abs_err": max(abs(e) for e in hind_errs),
        "ctrl_max_abs_err": max(abs(e) for e in errs[1:]),
        "ctrl_within": sum(abs(e) <= 0.05 for e in errs[1:]),
        "windows": len(errs) - 1,
        "fixed_max_abs_err": max(abs(e) for e in fixed_errs[1:]),
        "fixed_p2_err": float(cost_f[half:].mean() / budget - 1),
        "ctrl_p2_err": float(cost_c[half:].mean() / budget - 1),
        "ctrl_judge": float(q_c.mean()),
        "fixed_judge": float(q_f.mean()),
    }


def run_cascade(args: argparse.Namespace) -> None:
    setup = _cascade_setup(args)
    print(f"\nCASCADES on the scene world: budget B = {args.cascade_budget:g} GFLOPs per request; window {args.window}; "
          f"{args.requests} requests, mix shifts at {args.requests // 2}; controller ki={args.ki} kp={args.kp} "
          f"max_step={args.max_step}, lambda refreshed every {args.sync_every} requests; feedback lag {args.lag:g} "
          "requests x cost / B; " + ("expected plan costs committed at decision (feed-forward)" if args.feed_forward
                                     else "realised costs only"))
    results = [cascade_trial(args, setup, seed, verbose=seed == 0) for seed in range(args.trials)]
    print(f"\ncascades, {args.trials} trials (split + stream re-drawn), every window from the second on, median [min, max]:")
    for key, label in (("fixed_max_abs_err", "fixed lambda: worst window |error|"),
                       ("ctrl_max_abs_err", "controller:   worst window |error|"),
                       ("fixed_p2_err", "fixed lambda: phase-2 mean cost error"),
                       ("ctrl_p2_err", "controller:   phase-2 mean cost error")):
        vals = [r[key] for r in results]
        print(f"  {label:40s} {statistics.median(vals):+.1%} [{min(vals):+.1%}, {max(vals):+.1%}]")
    vals = [r["hindsight_max_abs_err"] for r in results]
    print(f"  noise floor: hindsight fixed lambda (its phase-2 realised mean = B), worst phase-2 window |error| "
          f"{statistics.median(vals):+.1%} [{min(vals):+.1%}, {max(vals):+.1%}]")
    within = sum(r["ctrl_within"] for r in results)
    total = sum(r["windows"] for r in results)
    print(f"  controller windows within +-5 % of B: {within} of {total}"
          + ("" if within == total else "  (goal: all; NOT met)"))
    print(f"  judge (scene_score) mean over the stream: controller {statistics.median([r['ctrl_judge'] for r in results]):.3f},"
          f" fixed lambda {statistics.median([r['fixed_judge'] for r in results]):.3f} (median of trials)")


# --- the same through the real Serve app ------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_args(args: argparse.Namespace) -> tuple[dict, dict]:
    """The shipped serve/config.yaml app (the world cascade), with the budget controller on."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    out = {k: (str(ROOT / v) if k in ("model_dir", "pool") else v) for k, v in app["args"].items()}
    out.update(budget=args.cascade_budget, log=None,
               budget_controller={"window": args.serve_window, "sync_interval_s": 0.25})
    return out, (app.get("runtime_env") or {}).get("env_vars") or {}


async def _serve_stream(url: str, prompts: list[str], concurrency: int) -> list[dict]:
    import asyncio

    import httpx

    sem = asyncio.Semaphore(concurrency)
    out: list[dict] = [{} for _ in prompts]

    async def one(i: int, client: httpx.AsyncClient) -> None:
        async with sem:
            r = await client.post("/v1/generate", json={"prompt": prompts[i], "seed": i, "return": "none"})
            body = r.json() if r.status_code == 200 else {}
            out[i] = {"status": r.status_code, "cost": body.get("cost"), "explored": body.get("explored"),
                      "lambda": body.get("lambda"), "policy": body.get("policy"),
                      "drawn": sum(a["draw_error"] is None for a in body.get("attempts", [])),
                      "attempts": [(a["candidate"], a["decision_score"], a["cost"]) for a in body.get("attempts", [])],
                      "plan": body.get("plan")}

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(prompts))))
    return out


def run_serve(args: argparse.Namespace) -> None:
    """The shipped app for real (local Ray, 2 CPUs): cascaded requests at the app's budget, the prompt
    mix shifting from 20 % to 80 % hard halfway, `--serve-concurrency` in flight; per window (in
    request order): realised mean cost, images drawn per request, explored share."""
    import asyncio
    import time

    import httpx
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from catimage.tables.table import aggregate
    from serve.app import build_app

    table = pq.read_table(ROOT / "catimage" / "data" / "world_table.parquet")
    matrix = aggregate(table, "scene_score")
    rng = np.random.default_rng(0)
    hardness = matrix.mean.mean(axis=1)
    cut = np.median(hardness)
    easy, hard = np.nonzero(hardness >= cut)[0], np.nonzero(hardness < cut)[0]
    n, half, W = args.serve_requests, args.serve_requests // 2, args.serve_window
    stream = np.concatenate([_stream(rng, easy, hard, half, 0.2), _stream(rng, easy, hard, n - half, 0.8)])
    prompts = [matrix.prompts[i] for i in stream]
    app_args, env_vars = _serve_args(args)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    try:
        serve.run(build_app(app_args), name="catimage", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        start, load0 = time.perf_counter(), os.getloadavg()[0]
        out = asyncio.run(_serve_stream(url, prompts, args.serve_concurrency))
        took, load1 = time.perf_counter() - start, os.getloadavg()[0]
        state = httpx.get(f"{url}/v1/pool", timeout=60).json()["budget_controller"]["cascade:*"]
    finally:
        serve.shutdown()
        ray.shutdown()
    ok = [o for o in out if o.get("status") == 200]
    print(f"\nSERVE (the shipped world cascade app, local Ray on 2 CPUs): {len(ok)} of {n} answered in {took:.0f} s "
          f"({len(ok) / took:.2f} requests/s), {args.serve_concurrency} in flight, load average {load0:.1f} -> {load1:.1f}; "
          f"budget {args.cascade_budget:g} GFLOPs, controller window {W}, policy {sorted({o['policy'] for o in ok})}")
    print(f"{'window':>6} {'mix':>5} | {'mean cost':>9} {'err':>7} {'images/req':>10} {'explored':>8} {'lambda (last)':>13}")
    errs = []
    for w, s0 in enumerate(range(0, n - W + 1, W)):
        part = [o for o in out[s0 : s0 + W] if o.get("status") == 200]
        cost = float(np.mean([o["cost"] for o in part]))
        errs.append(cost / args.cascade_budget - 1)
        mix = "easy" if s0 + W <= half else "HARD"
        print(f"{w:6d} {mix:>5} | {cost:9.3f} {errs[-1]:+7.1%} {np.mean([o['drawn'] for o in part]):10.2f} "
              f"{np.mean([bool(o['explored']) for o in part]):8.1%} {part[-1]['lambda']:13.4g}")
    if args.serve_dump:
        Path(args.serve_dump).write_text(json.dumps(out))
    within = sum(abs(e) <= 0.05 for e in errs[1:])
    print(f"  windows from the second on within +-5 % of B: {within} of {len(errs) - 1}"
          + ("" if within == len(errs) - 1 else "  (goal: all; NOT met)"))
    print(f"  the controller (cascade:*): {state['observed']} observed, mean realised cost {state['mean_cost_all']:.3f}, "
          f"lambda {state['lambda']:.4g} (offline {state['lambda_offline']:.4g})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "genai-bench-527" / "genai_image.json")
    ap.add_argument("--pool", type=Path, default=ROOT / "configs" / "genai_bench_pool.yaml")
    ap.add_argument("--embedder", default="minilm", choices=("minilm", "tfidf"))
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=1000, help="phase-1-mix draws lambda is calibrated on")
    ap.add_argument("--sync-every", type=int, default=8, help="requests between lambda refreshes (Serve: per sync)")
    ap.add_argument("--ki", type=float, default=ControllerConfig.ki)
    ap.add_argument("--kp", type=float, default=ControllerConfig.kp)
    ap.add_argument("--max-step", type=float, default=ControllerConfig.max_step)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--policy", choices=("route", "cascade", "both", "serve"), default="both",
                    help="serve: the cascade through the real Serve app (shipped config), not in the default runs")
    ap.add_argument("--serve-requests", type=int, default=1200)
    ap.add_argument("--serve-window", type=int, default=100)
    ap.add_argument("--serve-concurrency", type=int, default=16)
    ap.add_argument("--serve-dump", type=Path, default=None, help="write every answer's summary here (JSON)")
    ap.add_argument("--cascade-budget", type=float, default=3.0, help="GFLOPs per request (the world pool's unit)")
    ap.add_argument("--lag", type=float, default=0.0,
                    help="cascades: a cost reaches the controller lag x cost / B requests after its decision")
    ap.add_argument("--feed-forward", action="store_true",
                    help="cascades: commit each decision's expected plan cost at once, correct when it is paid")
    args = ap.parse_args(argv)
    if args.policy == "serve":
        run_serve(args)
        return
    if args.policy in ("cascade", "both"):
        run_cascade(args)
    if args.policy == "cascade":
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: the route run needs the shared GenAI-Bench ratings (--data)")
    _pool, matrix, costs = load_pool_matrix(args.data, args.pool)
    embedder = make_embedder(args.embedder)
    if args.embedder == "tfidf":
        embedder.fit(matrix.prompts)
    else:
        embedder = CachedEmbedder(embedder)
    X = embedder.encode(matrix.prompts)
    labels = matrix.mean
    print(f"GenAI-Bench: {len(matrix.prompts)} prompts x {len(matrix.candidates)} candidates; costs (ASSUMED) "
          + ", ".join(f"{c} {v:g}" for c, v in zip(matrix.candidates, costs)))
    print(f"budget B = {args.budget:g}; window {args.window} requests; {args.requests} requests, mix shifts at "
          f"{args.requests // 2}; controller ki={args.ki} kp={args.kp} max_step={args.max_step}, lambda refreshed every "
          f"{args.sync_every} requests; knn router over {args.embedder}")
    results = [run_trial(args, X, labels, labels, costs, seed, verbose=seed == 0) for seed in range(args.trials)]
    print(f"\nphase 2 (harder mix) after its first window, {args.trials} trials (split + stream re-drawn), median [min, max]:")

    def fmt(key: str, pct: bool = False) -> str:
        vals = [r[key] for r in results]
        f = (lambda v: f"{v:+.1%}") if pct else (lambda v: f"{v:.3f}")
        return f"{f(statistics.median(vals))} [{f(min(vals))}, {f(max(vals))}]"

    print(f"  fixed lambda: mean cost error vs B        {fmt('fixed_mean_err', True)}   rating {fmt('fixed_rating')}")
    print(f"  controller:   mean cost error vs B        {fmt('ctrl_mean_err', True)}   rating {fmt('ctrl_rating')}")
    print(f"  fixed lambda: worst window |error|        {fmt('fixed_max_abs_err', True)}")
    print(f"  controller:   worst window |error|        {fmt('ctrl_max_abs_err', True)}   (goal <= 5 %)")
    print(f"  noise floor: hindsight fixed lambda (calibrated on phase 2 itself), worst window |error| "
          f"{fmt('hindsight_max_abs_err', True)}")
    print(f"  offline optimum at the controller's cost: rating {fmt('optimum_rating')}")
    print(f"  controller rating / optimum               {fmt('ratio')}   (goal >= 0.99)")


if __name__ == "__main__":
    main()
