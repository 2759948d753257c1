"""Per-prompt router latency on this machine (prints; asserts nothing).

    .venv/bin/python benchmarks/router_latency.py [--batch 64] [--repeats 5] [--single 60]
    .venv/bin/python benchmarks/router_latency.py --world-only [--single 200]

Times, batched, (a) the prompt embedder and (b) estimator.predict + the routing rule, for every
estimator, on GenAI-Bench prompts when ../shared/data is there (else the embedded demo prompts).
Targets on the 2-core dev machine: estimator + rule <= 1 ms/prompt, minilm <= 15 ms/prompt.

Then what one /v1/generate pays in the router with MiniLM, one prompt at a time (the Serve router's
model thread runs torch on one thread): float32, int8 dynamic quantisation, a cache hit, and 8
concurrent prompts batched into one call (what `@serve.batch` does under load), per prompt; medians
over `--single` prompts, the variants interleaved so background load hits all alike. And how often
the int8 embeddings change a routing decision of a knn fitted on float32 ones.

Then the shipped world router (catimage/data/world_router, MiniLM + twoway-ridge) on the world table's
1,000 prompts, each unseen (no cache), one at a time on one torch thread, as the Serve router's model
thread runs it: per prompt, the embedding alone and the whole decision (embed + predict + rule: the
router's own share of the hop), with MiniLM in float32 torch, float32 through ONNX Runtime (the
shipped config's `embedder_overrides: {backend: onnx}`) and torch int8; and the share of prompts whose
decision equals float32 torch's, at the shipped config's budget and across budgets (goal: <= 10 ms
per unseen prompt with >= 98 % of decisions equal). The HTTP hop (router - passthrough) is measured
by benchmarks/serve_load.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from catimage.estimators import make_estimator
from catimage.features.registry import make_embedder
from catimage.policy.routing import calibrate_lambda, route
from catimage.tables.table import MetricScaler, aggregate, read_quality_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts_and_labels(data: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    path = data / "genai-bench-527" / "genai_image.json"
    if path.is_file():
        m = aggregate(read_quality_table(path))
        costs = np.array([3.0, 0.0026, 1.5, 2.0, 0.35, 1.0])[: len(m.candidates)]
        return m.prompts, MetricScaler.fit(m.mean).transform(m.mean), costs
    prompts = (ROOT / "catimage" / "data" / "demo_prompts.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    return prompts, rng.random((len(prompts), 3)), np.array([1.0, 2.0, 4.0])


def _time_per_prompt(fn, n: int, repeats: int) -> float:
    fn()  # warm-up (lazy init, caches, allocator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single", type=int, default=60, help="prompts timed one at a time (MiniLM variants)")
    parser.add_argument("--single-only", action="store_true", help="only the one-prompt-at-a-time MiniLM section")
    parser.add_argument("--world-only", action="store_true", help="only the shipped world router section")
    args = parser.parse_args()
    if args.world_only:
        world_router(args.single, Console(width=160))
        return
    prompts, Y, costs = _prompts_and_labels(args.data)
    batch = prompts[: args.batch]
    console = Console(width=160)
    if args.single_only:
        single_prompt(prompts, Y, costs, args.single, console)
        return
    console.print(f"torch threads: {torch.get_num_threads()}, batch {len(batch)} prompts, best of {args.repeats}")

    table = Table(title="router latency per prompt (ms), batched")
    table.add_column("stage")
    table.add_column("ms / prompt", justify="right")
    table.add_column("target", justify="right")
    embedders = {"minilm": make_embedder("minilm"), "tfidf": make_embedder("tfidf").fit(prompts)}
    pooled = {name: e.encode(prompts) for name, e in embedders.items()}
    tokens = embedders["minilm"].encode_tokens(prompts)
    for name, emb in embedders.items():
        # A fresh list each call so no embedding cache can answer instead of the model.
        ms = _time_per_prompt(lambda emb=emb: emb.encode(list(batch)), len(batch), args.repeats)
        table.add_row(f"embed: {name} (pooled)", f"{ms:.2f}", "<= 15" if name == "minilm" else "")
    ms = _time_per_prompt(lambda: embedders["minilm"].encode_tokens(list(batch)), len(batch), args.repeats)
    table.add_row("embed: minilm (per-token)", f"{ms:.2f}", "<= 15")

    n_train = len(prompts) - len(batch)
    for est_name in ("knn", "linear", "transformer"):
        est = make_estimator(est_name, **({"max_epochs": 5} if est_name == "transformer" else {}))
        X = tokens if est.input_kind == "tokens" else pooled["minilm"]
        est.fit(X[:n_train], Y[:n_train])
        lam = calibrate_lambda(est.predict(X[:64]), costs, float(np.median(costs)))
        xb = X[n_train:][: len(batch)]
        ms = _time_per_prompt(lambda est=est, xb=xb, lam=lam: route(est.predict(xb), costs, lam), len(xb), args.repeats)
        table.add_row(f"estimator + rule: {est_name}", f"{ms:.3f}", "<= 1")
    console.print(table)
    single_prompt(prompts, Y, costs, args.single, console)
    world_router(args.single, console)


def single_prompt(prompts: list[str], Y: np.ndarray, costs: np.ndarray, n: int, console: Console) -> None:
    import statistics

    from serve.embedding_cache import LruEmbeddingCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, int8 = make_embedder("minilm"), make_embedder("minilm", quantize="int8")
        cached = LruEmbeddingCache(make_embedder("minilm"), 4096)
        for e in (fp32, int8, cached):
            e.encode(prompts[:8])  # load + first pass
        cached.encode(prompts[:n])  # fill: every timed call below is a hit
        times: dict[str, list[float]] = {"float32": [], "int8": [], "cache hit": [], "batch of 8, per prompt": []}
        for i in range(n):
            p = [prompts[i % len(prompts)]]
            for name, fn in (("float32", lambda p=p: fp32.encode(list(p))), ("int8", lambda p=p: int8.encode(list(p))),
                             ("cache hit", lambda p=p: cached.encode(list(p)))):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
            group = [prompts[(i * 8 + k) % len(prompts)] for k in range(8)]
            start = time.perf_counter()
            fp32.encode(group)
            times["batch of 8, per prompt"].append((time.perf_counter() - start) * 1000 / 8)
        table = Table(title=f"MiniLM, one prompt per call, 1 torch thread (median of {n}, interleaved)")
        table.add_column("variant")
        table.add_column("ms / prompt", justify="right")
        for name, vals in times.items():
            table.add_row(name, f"{statistics.median(vals):.2f}")
        console.print(table)
        # Decisions: a knn fitted on float32 embeddings, served with int8 ones.
        n_fit = len(prompts) // 2
        X32, X8 = fp32.encode(prompts), int8.encode(prompts)
        est = make_estimator("knn").fit(X32[:n_fit], Y[:n_fit])
        lam = calibrate_lambda(est.predict(X32[:n_fit]), costs, float(np.median(costs)))
        a = route(est.predict(X32[n_fit:]), costs, lam)
        b = route(est.predict(X8[n_fit:]), costs, lam)
        cos = float(np.median(np.sum(X32 * X8, axis=1)))
        console.print(f"int8 vs float32: median cosine of embeddings {cos:.4f}; routing decisions equal on "
                      f"{np.mean(a == b):.1%} of {len(a)} held-out prompts (knn fitted on float32)")
    finally:
        torch.set_num_threads(threads)


def _world_variants() -> dict:
    """The shipped world router with MiniLM run three ways (each its own fitted-model copy)."""
    from catimage.features.registry import load_embedder
    from catimage.model.router_model import RouterModel

    bundle = ROOT / "catimage" / "data" / "world_router"
    out = {}
    for name, runtime in (("float32 torch", {}), ("float32 onnx", {"backend": "onnx"}), ("int8 torch", None)):
        model = RouterModel.load(bundle)
        if runtime is None:
            model.embedder = make_embedder("minilm", quantize="int8")
        elif runtime:
            model.embedder = load_embedder(bundle / "embedder", **runtime)
        out[name] = model
    return out


def world_router(n: int, console: Console) -> None:
    """Per unseen prompt ms (embedding, whole decision) and decision agreement with float32 torch."""
    import statistics

    import pyarrow.parquet as pq

    from catimage.policy.routing import utility_ranking

    prompts = list(dict.fromkeys(pq.read_table(ROOT / "catimage" / "data" / "world_table.parquet",
                                               columns=["prompt"]).column("prompt").to_pylist()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = _world_variants()
        for model in models.values():
            model.predict(prompts[:8])  # load + first pass (ONNX: export once, then cached)
        ref = models["float32 torch"]
        lam = ref.lambda_for_budget(3.0)  # serve/config.yaml's budget
        embed: dict[str, list[float]] = {k: [] for k in models}
        decide: dict[str, list[float]] = {k: [] for k in models}
        for i in range(n):
            p = [f"{prompts[i % len(prompts)]}, take {i}"]  # never seen: no cache anywhere can answer
            for name, model in models.items():
                start = time.perf_counter()
                model.embedder.encode(p)
                embed[name].append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                utility_ranking(model.predict(p), model.costs, lam)
                decide[name].append((time.perf_counter() - start) * 1000)
        table = Table(title=f"world router, one unseen prompt per call, 1 torch thread (median of {n}, interleaved)")
        for col in ("MiniLM", "embed ms", "decision ms (embed+predict+rule)"):
            table.add_column(col, justify="right" if col != "MiniLM" else "left")
        for name in models:
            table.add_row(name, f"{statistics.median(embed[name]):.2f}", f"{statistics.median(decide[name]):.2f}")
        console.print(table)
        preds = {name: model.predict(prompts) for name, model in models.items()}
        budgets = (1.2, 2.0, 3.0, 4.5, 6.0)
        for name in ("float32 onnx", "int8 torch"):
            agree = []
            for budget in budgets:
                lam_b = ref.lambda_for_budget(budget)
                a = route(preds["float32 torch"], ref.costs, lam_b)
                b = route(preds[name], ref.costs, lam_b)
                agree.append(float(np.mean(a == b)))
            cos = float(np.median(np.sum(ref.embedder.encode(prompts[:200]) * models[name].embedder.encode(prompts[:200]), axis=1)))
            console.print(f"{name}: decisions equal to float32 torch's on {agree[budgets.index(3.0)]:.1%} of {len(prompts)} "
                          f"world prompts at budget 3.0 (by budget {dict(zip(budgets, [f'{x:.1%}' for x in agree]))}); "
                          f"median embedding cosine {cos:.6f}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
