"""The router with a real MiniLM embedder, live over HTTP: warm-up before ready, a big /v1/route batch
that must not stall /v1/generate, and an internal failure that must not leak.

Apps (one Ray, one Serve on a free loopback port):

* `minilm` (route /): knn over MiniLM embeddings of the planted table; only `tiny-sd-2` has a
  generator (the others are predicted, never drawn);
* `misconfigured` (route /bad): the same bundle with its embedder forced onto `cuda` (this machine
  has none) and warm-up off, so the first decision raises a torch error, not a catimage one.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_serve_fixtures import (  # noqa: E402
    free_port,
    start_local_ray,
    tiny_pool_dict,
    write_planted_table,
    write_pool,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_cache):
    import ray
    from ray import serve

    from jobs.train_estimator import run_train
    from serve.app import AppArgs, build_app

    root = tmp_path_factory.mktemp("minilm")
    table = write_planted_table(root / "table.parquet")
    pool = tiny_pool_dict()
    for cand in pool["candidates"]:
        cand["serve"] = {"num_cpus": 0.1, "request_timeout_s": 120}
    for cand in pool["candidates"][1:]:
        cand.pop("generator")
    pool_path = write_pool(root / "pool.yaml", pool)
    model = run_train(table, pool_path, root / "model", estimator="knn", embedder="minilm").model_dir
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(model_dir=model, pool=str(pool_path), router_num_cpus=0.1)), name="minilm", route_prefix="/")
        bad = AppArgs(model_dir=model, pool=str(pool_path), router_num_cpus=0.05, warmup=False,
                      embedder_overrides={"device": "cuda"})
        serve.run(build_app(bad), name="misconfigured", route_prefix="/bad")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_router_is_warm_before_it_reports_ready(app):
    """The replica embedded and predicted before Serve counted it ready: the first request pays far less
    than the warm-up (loading MiniLM + the first forward pass) did."""
    warm = app.get("/healthz").json()["warmup_s"]
    assert warm is not None and warm > 0
    first = app.post("/v1/generate", json={"prompt": "a photo of an otter on a rock", "return": "none"})
    assert first.status_code == 200, first.text
    assert first.json()["router_ms"] / 1000 < warm / 2, (first.json()["router_ms"], warm)


def test_big_route_batch_does_not_stall_generate(app):
    """A 256-prompt /v1/route runs in chunks on the model thread; a /v1/generate sent meanwhile waits
    for one chunk, not for the whole batch."""
    # Long prompts (about 120 tokens each) so that embedding the batch takes seconds, not a fraction of one.
    scene = ("a watercolour of a lighthouse on a cliff at dusk, seagulls over the waves, a fishing boat with red "
             "sails, rain clouds over the hills, a stone path winding up to a cottage with a blue door and ")
    prompts = [f"{scene * 2}number {i}" for i in range(256)]
    out: dict = {}

    def big() -> None:
        start = time.monotonic()
        out["route"] = app.post("/v1/route", json={"prompts": prompts, "lambda": 0.01})
        out["route_s"] = time.monotonic() - start
        out["route_end"] = time.monotonic()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)  # the batch is on the model thread by now
    gen_start = time.monotonic()
    gen = app.post("/v1/generate", json={"prompt": "a photo of a heron in the reeds", "return": "none"})
    thread.join(timeout=280)
    assert out["route"].status_code == 200 and len(out["route"].json()["decisions"]) == 256
    assert gen.status_code == 200, gen.text
    assert gen_start < out["route_end"], "the batch had finished before generate was sent: nothing was tested"
    # The router's share of generate (embedding + decision, including any wait for the model thread)
    # is one chunk at most, not the whole batch; drawing the image afterwards is not the router's.
    assert gen.json()["router_ms"] / 1000 < out["route_s"] / 2, (gen.json()["router_ms"], out["route_s"])


def test_internal_error_is_500_with_an_id_and_no_internals(app):
    r = app.post("/bad/v1/route", json={"prompts": ["a cat"]})
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail.startswith("internal error while routing (error id ") and "the router's log has the details" in detail
    for leak in ("cuda", "CUDA", "NVIDIA", "Traceback", "File ", ".py"):
        assert leak not in r.text, r.text
    g = app.post("/bad/v1/generate", json={"prompt": "a cat", "return": "none"})
    assert g.status_code == 500 and "internal error while choosing a candidate" in g.json()["detail"]
