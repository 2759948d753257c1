"""Per-prompt router latency on this machine (prints; asserts nothing).

    .venv/bin/python benchmarks/router_latency.py [--batch 64] [--repeats 5] [--single 60]

Times, batched, (a) the prompt embedder and (b) estimator.predict + the routing rule, for every
estimator, on GenAI-Bench prompts when ../shared/data is there (else the embedded demo prompts).
Targets on the 2-core dev machine: estimator + rule <= 1 ms/prompt, minilm <= 15 ms/prompt.

Then what one /v1/generate pays in the router with MiniLM, one prompt at a time (the Serve router's
model thread runs torch on one thread): float32, int8 dynamic quantisation, a cache hit, and 8
concurrent prompts batched into one call (what `@serve.batch` does under load), per prompt; medians
over `--single` prompts, the variants interleaved so background load hits all alike. And how often
the int8 embeddings change a routing decision of a knn fitted on float32 ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from catimage.estimators import make_estimator  # noqa: E402
from catimage.features.registry import make_embedder
from catimage.policy.routing import calibrate_lambda, route  # noqa: E402
from catimage.tables.table import MetricScaler, aggregate, read_quality_table  # noqa: E402

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
    args = parser.parse_args()
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
        ms = _time_per_prompt(lambda est=est, xb=xb: route(est.predict(xb), costs, lam), len(xb), args.repeats)
        table.add_row(f"estimator + rule: {est_name}", f"{ms:.3f}", "<= 1")
    console.print(table)
    single_prompt(prompts, Y, costs, args.single, console)


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
            for name, fn in (("float32", lambda: fp32.encode(list(p))), ("int8", lambda: int8.encode(list(p))),
                             ("cache hit", lambda: cached.encode(list(p)))):
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


if __name__ == "__main__":
    main()
