"""The router with a real MiniLM embedder, live over HTTP: warm-up before ready, a big /v1/route batch
that must not stall /v1/generate, and an internal failure that must not leak.

Apps (one Ray, one Serve on a free loopback port):

* `minilm` (route /): knn over MiniLM embeddings of the planted table; only `tiny-sd-2` has a
  generator (the others are predicted, never drawn);
* `misconfigured` (route /bad): the same bundle with its embedder forced onto `cuda` (this machine
  has none) and warm-up off, so the first decision raises a torch error, not a catimage one;
* `combined` (route /combined): knn over a fitted `combined` embedder (MiniLM + TF-IDF + prompt
  statistics), served with runtime options (ONNX Runtime, batch size 8) and warm-up on.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from train_serve_fixtures import planted_prompts, tiny_pool_dict, write_planted_table, write_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_cache, serve_url):
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
    combined = run_train(table, pool_path, root / "combined", estimator="knn", embedder="combined").model_dir
    serve.run(build_app(AppArgs(model_dir=model, pool=str(pool_path), router_num_cpus=0.1)), name="minilm", route_prefix="/")
    bad = AppArgs(model_dir=model, pool=str(pool_path), router_num_cpus=0.05, warmup=False,
                  embedder_overrides={"device": "cuda"})
    serve.run(build_app(bad), name="misconfigured", route_prefix="/bad")
    # A fitted combined embedder served with runtime options, warm-up on (it used to crash at start-up).
    runtime = AppArgs(model_dir=combined, pool=str(pool_path), router_num_cpus=0.05,
                      embedder_overrides={"backend": "onnx", "batch_size": 8})
    serve.run(build_app(runtime), name="combined", route_prefix="/combined")
    with httpx.Client(base_url=serve_url, timeout=300) as client:
        client.combined_dir = combined
        yield client


def test_router_is_warm_before_it_reports_ready(app):
    """The replica embedded and predicted (both warm-up calls: a batch and a single prompt) before
    Serve counted it ready, so no request pays for loading MiniLM. (What that saves in time is a
    benchmark's business: benchmarks/serve_load.py.)"""
    health = app.get("/healthz").json()
    assert health["warmup_s"] is not None and health["warmup_s"] > 0
    assert health["model_calls_started"] >= 2
    first = app.post("/v1/generate", json={"prompt": "a photo of an otter on a rock", "return": "none"})
    assert first.status_code == 200, first.text


def _model_calls(app) -> int:
    return app.get("/healthz").json()["model_calls_started"]


def test_big_route_batch_does_not_stall_a_decision(app):
    """A 256-prompt /v1/route runs in 8 chunks, each its own turn on the model thread. A decision
    asked once the batch has started (seen on /healthz, not guessed from a sleep) takes the next
    turn: it is answered while the batch still runs, i.e. it waited for one chunk, not the batch."""
    # Long prompts (about 120 tokens each) so that each chunk takes a while.
    scene = ("a watercolour of a lighthouse on a cliff at dusk, seagulls over the waves, a fishing boat with red "
             "sails, rain clouds over the hills, a stone path winding up to a cottage with a blue door and ")
    prompts = [f"{scene * 2}number {i}" for i in range(256)]
    out: dict = {}
    done = threading.Event()

    def big() -> None:
        out["route"] = app.post("/v1/route", json={"prompts": prompts, "lambda": 0.01})
        done.set()

    before = _model_calls(app)
    thread = threading.Thread(target=big)
    thread.start()
    while _model_calls(app) == before and not done.is_set():  # until the batch's first chunk is on the model thread
        pass
    assert not done.is_set(), "the batch finished before its first chunk was seen: nothing was tested"
    probe = app.post("/v1/route", json={"prompts": ["a photo of a heron in the reeds"], "lambda": 0.01})
    answered_during_batch = not done.is_set()
    thread.join(280)
    assert probe.status_code == 200 and out["route"].status_code == 200
    assert len(out["route"].json()["decisions"]) == 256
    assert answered_during_batch, "the single decision waited for the whole batch"


def test_a_fitted_combined_embedder_serves_with_runtime_overrides(app):
    """Warm-up ran (it used to crash), and the served decisions are the fitted model's own (computed
    here, in-process, without Serve)."""
    from catimage.model.router_model import RouterModel

    health = app.get("/combined/healthz").json()
    assert health["status"] == "ok" and health["warmup_s"] > 0
    prompts = [p for p, _ in planted_prompts()][::5]
    r = app.post("/combined/v1/route", json={"prompts": prompts, "lambda": 0.05})
    assert r.status_code == 200, r.text
    model = RouterModel.load(app.combined_dir)
    expected = [d.candidate for d in model.decide(prompts, lam=0.05)]
    assert [d["candidate"] for d in r.json()["decisions"]] == expected
    g = app.post("/combined/v1/generate", json={"prompt": prompts[0], "return": "none"})
    assert g.status_code == 200, g.text


def test_internal_error_is_500_with_an_id_and_no_internals(app):
    r = app.post("/bad/v1/route", json={"prompts": ["a cat"]})
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail.startswith("internal error while routing (error id ") and "the router's log has the details" in detail
    for leak in ("cuda", "CUDA", "NVIDIA", "Traceback", "File ", ".py"):
        assert leak not in r.text, r.text
    g = app.post("/bad/v1/generate", json={"prompt": "a cat", "return": "none"})
    assert g.status_code == 500 and "internal error while choosing a candidate" in g.json()["detail"]
