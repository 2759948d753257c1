"""Faults, for real, against a live Serve app on loopback: a replica killed under load, an overloaded
router, a generator that runs past its timeout.

One module-scoped app (`faults`), the knn + TF-IDF router of tests/train_serve_fixtures.py and the
tiny pool, with:

* `tiny-sd-2`: two fixed replicas (the one killed under load);
* `tiny-sd-8`: a deliberately slow drawing (a tiny SD at 400 steps, many seconds on this machine)
  with `request_timeout_s` 1, drawn one at a time per replica;
* `tiny-sdxl-4`: a real hosted endpoint on loopback whose answers the test scripts
  (`ScriptedImageServer`): "ok" at once (the fast fallback), or "hold" until the test releases it;
* the router: at most 4 ongoing requests and 8 queued, so a burst overflows it (a tighter queue
  also rejects ordinary traffic on a loaded machine: Serve counts requests waiting for a replica
  slot assignment as queued).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from train_serve_fixtures import (
    ScriptedImageServer,
    kill_replica_mid_run,
    replica_actors,
    tiny_pool_dict,
    write_planted_table,
    write_pool,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
APP = "faults"
SIGN = 'a neon sign that reads "SALE"'


@pytest.fixture(scope="module")
def scripted_server():
    server = ScriptedImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_cache, serve_url, scripted_server):
    from ray import serve

    from jobs.train_estimator import run_train
    from serve.app import AppArgs, build_app

    root = tmp_path_factory.mktemp("faults")
    table = write_planted_table(root / "table.parquet")
    pool = tiny_pool_dict()
    sd2, sd8, sdxl4 = pool["candidates"]
    sd2["serve"] = {"num_cpus": 0.1, "max_ongoing_requests": 2, "request_timeout_s": 60,
                    "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    sd8["generator"] = {"model": "tiny:sd", "steps": 400, "height": 64, "width": 64}
    # Two ongoing requests: a draw (one at a time, the replica's lock) and the stats() probes beside it.
    sd8["serve"] = {"num_cpus": 0.1, "max_ongoing_requests": 2, "request_timeout_s": 1.0}
    sdxl4["generator"] = scripted_server.generator_block()
    # Longer than any wait in these tests: a held call ends when the test releases it, not on a timer.
    sdxl4["serve"] = {"num_cpus": 0.1, "request_timeout_s": 300}
    pool_path = write_pool(root / "pool.yaml", pool)
    model = run_train(table, pool_path, root / "model", estimator="knn", embedder="tfidf").model_dir
    args = AppArgs(
        model_dir=model, pool=str(pool_path), router_num_cpus=0.1,
        router_max_ongoing_requests=4, router_max_queued_requests=8, retry_after_s=3,
    )
    serve.run(build_app(args), name=APP, route_prefix="/")
    with httpx.Client(base_url=serve_url, timeout=180) as client:
        yield client


def _running(deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[deployment]
    return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}.get("RUNNING", 0)


def test_killed_replica_under_load_fails_no_request_and_is_replaced(app):

    before = replica_actors(APP, "Generator-tiny-sd-2")
    assert len(before) == 2

    def ask(i: int) -> httpx.Response:
        return app.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sd-2", "seed": i, "return": "none"})

    answers = kill_replica_mid_run(ask, 30, 3, before[0])
    assert [a.status_code for a in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200]
    served_by = [a.json()["candidate"] for a in answers]
    assert served_by.count("tiny-sd-2") >= 20  # retried on the surviving replica, rarely a fallback
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replica_actors(APP, "Generator-tiny-sd-2")
        if _running("Generator-tiny-sd-2") == 2 and before[0] not in now and len(now) == 2:
            break
        time.sleep(1)
    now = replica_actors(APP, "Generator-tiny-sd-2")
    assert before[0] not in now and len(now) == 2 and _running("Generator-tiny-sd-2") == 2, now


def _wait_stats(handle, pred, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    stats = handle.stats.remote().result()
    while not pred(stats) and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = handle.stats.remote().result()
    return stats


def test_generator_timeout_frees_the_replica(app):
    """tiny-sd-8 needs many seconds per image; the router gives up after 1 s and falls back, and a
    cancelled call stops drawing at the next denoising step instead of finishing for nobody."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator-tiny-sd-8", app_name=APP)
    r = app.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sd-8", "return": "none"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["candidate"] != "tiny-sd-8"
    assert body["fallback"]["reason"] == "timed out after 1 s (request_timeout_s)"
    stats = _wait_stats(handle, lambda s: s["busy"] == 0, 60)
    assert stats["busy"] == 0 and stats["interrupted"] >= 1, stats
    assert stats["unet_steps"] < 400, stats  # the timed-out drawing stopped before its last step
    # The same through the handle: the drawing is under way, then cancelled; counted in UNet steps, not
    # seconds (a loaded machine slows both alike): the replica stops well before the drawing's 400.
    before = stats
    response = handle.remote(SIGN, 7, False)
    assert _wait_stats(handle, lambda s: s["busy"] == 1, 60)["busy"] == 1
    response.cancel()
    stats = _wait_stats(handle, lambda s: s["busy"] == 0, 60)
    assert stats["busy"] == 0 and stats["interrupted"] == before["interrupted"] + 1, stats
    assert stats["unet_steps"] - before["unet_steps"] < 400, (before, stats)


def test_overload_answers_503_with_retry_after(app, scripted_server):
    """4 ongoing + 8 queued at the router: of a burst of 24 requests held at the scripted endpoint, the
    overflow is rejected at once, not queued. "At once" is an event, not a time: while every call that
    got in is held (nothing released, so no slot can free), the overflow has already been answered 503,
    which a queued request never could be. Serve enforces both limits best effort (a request being
    assigned as another arrives can slip in: ray-project/ray#42947; one run on a loaded machine let
    17 in where 4 + 8 were configured), so the test asserts on the answers that came while held, not
    on how many: at least one, every one a 503."""
    burst, capacity = 24, 4 + 8
    scripted_server.release.clear()
    held_before = scripted_server.served.count("hold")
    scripted_server.script[:] = ["hold"] * burst
    answers: list[httpx.Response] = []
    answered = threading.Condition()

    def ask(i: int) -> None:
        r = app.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sdxl-4", "seed": i, "return": "none"})
        with answered:
            answers.append(r)
            answered.notify_all()

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(burst)]
    for t in threads:
        t.start()
    try:
        with answered:  # deadlines for a broken app, not races: the overflow needs no release to be answered
            answered.wait_for(lambda: len(answers) >= 1, timeout=120)
            # More evidence if it comes (the configured overflow); nothing below depends on how much.
            answered.wait_for(lambda: len(answers) >= burst - capacity, timeout=30)
            while_held = list(answers)  # nothing has been released yet: only the finally below releases
    finally:
        scripted_server.release.set()  # the held calls fail (HTTP 500) and fall back to a drawing candidate
        for t in threads:
            t.join(180)
        scripted_server.script.clear()
    assert while_held, "no request was answered while every admitted one was held"
    for r in while_held:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "3"
        assert "backpressure" in r.text
    codes = [r.status_code for r in answers]
    assert len(codes) == burst and set(codes) <= {200, 503}, [r.text for r in answers if r.status_code not in (200, 503)]
    held = scripted_server.served.count("hold") - held_before
    assert 1 <= held <= burst - codes.count(503), (held, codes)  # a rejected request never reached the generator
    assert 200 in codes, codes  # those let in were answered once released (from a fallback)
