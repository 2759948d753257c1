"""The Router runs plans for real (real local Ray, real Serve, HTTP): cascades escalate, a killed scorer
or logger replica fails no request, the budget controller counts whole plans, exploration logs its
propensities, and a hot swap under load drops nothing.

Generators are planted (tests/serve_planted.py): `blank` draws a grey picture that scene_score (the
decision metric, in its own Scorer deployment) gives 0, `render` draws the prompt's own scene, which it
gives 1. Models are fitted in-process on planted tables whose truth is known by hand:

* cascade (blank passes 70 % of its draws at judge 0.95, else judge 0.1; render always passes at 0.9;
  costs 1 and 2, scoring 0.1 per image; plans of <= 2 attempts at threshold 0.5). At lambda 0 the best
  plan is "blank, then render if blank fails": 0.7 * 0.95 + 0.3 * 0.9 = 0.935 > 0.9 (render alone),
  > 0.7 * 0.95 + 0.3 * (0.7 * 0.95 + 0.3 * 0.1) = 0.8735 (blank twice). Served, blank's grey picture
  always fails: the request escalates to render, and pays 1 + 0.1 + 2 + 0.1 = 3.2.
* router A (blank always passes: mean judge 0.95 vs render's 0.9): routes to blank at lambda 0;
* router B (blank never passes: mean 0.1): routes to render.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from train_serve_fixtures import holding_log_replica, kill_replica_mid_run, replica_actors, scrape_metrics_until

PROMPTS = ["one red circle", "two blue squares", "a green triangle above a yellow circle",
           "a purple square to the left of a red triangle"]
CASCADE_COST = 1.0 + 0.1 + 2.0 + 0.1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from serve_planted import fit_planted_model, planted_pool

    root = tmp_path_factory.mktemp("policy")
    return {
        "root": root,
        "pool": planted_pool(root / "pool.yaml"),
        "cascade": fit_planted_model(root / "cascade", blank_pass=0.7, blank_judge=0.95, cascade=True),
        "a": fit_planted_model(root / "router_a", blank_pass=1.0, blank_judge=0.95, cascade=False),
        "b": fit_planted_model(root / "router_b", blank_pass=0.0, blank_judge=0.95, cascade=False),
    }


def _args(**kw):
    from serve.schemas import AppArgs

    base = {"router_num_cpus": 0, "exploration": {"epsilon": 0.0}}
    return AppArgs.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def apps(models, serve_url):
    """`cascade` (/c): the cascade bundle, 2 scorer replicas, budget controller; `logged` (/l): router B,
    epsilon 0.5, routed images scored too (score_routed), a served log on 2 replicas that never flush
    before shutdown."""
    from ray import serve
    from serve_planted import planted_app

    scorer = {"autoscaling": {"min_replicas": 2, "max_replicas": 2}, "request_timeout_s": 60}
    cascade = _args(model_dir=models["cascade"], pool=models["pool"], budget=3.0, scorer=scorer,
                    budget_controller={"window": 20, "sync_interval_s": 0.1})
    serve.run(planted_app(cascade), name="cascade", route_prefix="/c")
    log_uri = str(models["root"] / "log")
    logged = _args(model_dir=models["b"], pool=models["pool"], exploration={"epsilon": 0.5, "seed": 0}, score_routed=True,
                   scorer={"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "request_timeout_s": 60},
                   log={"uri": log_uri, "flush_rows": 100_000, "flush_interval_s": 3600, "num_replicas": 2,
                        "num_cpus": 0})
    serve.run(planted_app(logged), name="logged", route_prefix="/l")
    with httpx.Client(base_url=serve_url, timeout=120) as client:
        yield {"client": client, "log_uri": log_uri, "serve": serve}


def _post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _png_equal(b64: str, expected: bytes) -> bool:
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"))
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_generator_whose_images_fail_the_scorer_makes_the_request_escalate(apps):
    from serve_planted import planted_png

    from catimage.generators import generation_seed
    from catimage.tables.table import stable_prompt_id

    prompt = PROMPTS[2]
    body = _post(apps["client"], "/c/v1/generate", {"prompt": prompt, "policy": "cascade", "lambda": 0.0})
    assert body["policy"] == "cascade" and body["plan"] == {"attempts": ["blank", "render"], "threshold": 0.5}
    blank, render = body["attempts"]
    assert (blank["candidate"], blank["decision_score"], blank["accepted"]) == ("blank", 0.0, False)
    assert (render["candidate"], render["decision_score"], render["accepted"]) == ("render", 1.0, True)
    assert body["returned"] == 1 and body["candidate"] == "render" and body["decision_score"] == 1.0
    seeds = [generation_seed(stable_prompt_id(prompt), j) for j in range(2)]
    assert [blank["seed"], render["seed"]] == seeds and body["seed"] == seeds[1]
    assert _png_equal(body["image"], planted_png("render", prompt, seeds[1]))
    assert body["cost"] == pytest.approx(CASCADE_COST) and body["decision_metric"] == "scene_score"
    # The OpenAI endpoint takes the same path (policy fields as extra body fields).
    r = apps["client"].post("/c/v1/images/generations", json={"prompt": prompt, "policy": "cascade", "model": "auto:lambda=0"})
    assert r.status_code == 200, r.text
    info = r.json()["catimage"]
    assert info["candidate"] == "render" and info["cost"] == pytest.approx(CASCADE_COST)
    assert [a["candidate"] for a in info["attempts"][0]] == ["blank", "render"] and info["decision_scores"] == [1.0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prometheus_counts_attempts_by_outcome_and_draws_per_request(apps):
    """After one cascaded request (blank rejected at 0, render accepted at 1): the attempts counter by
    candidate and outcome (acceptance rate = accepted / (accepted + rejected)), images per request,
    and the scoring cost reach Ray's Prometheus endpoint. Counts only ever grow (other tests add)."""
    import ray

    _post(apps["client"], "/c/v1/generate", {"prompt": PROMPTS[3], "policy": "cascade", "lambda": 0.0, "return": "none"})
    port = ray.nodes()[0]["MetricsExportPort"]

    def sample(text: str, name: str, **tags: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and 'application="cascade"' in line and all(
                    f'{k}="{v}"' in line for k, v in tags.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def done(text: str) -> bool:
        return (sample(text, "ray_catimage_attempts_total", candidate="render", outcome="accepted") >= 1
                and sample(text, "ray_catimage_attempts_total", candidate="blank", outcome="rejected") >= 1
                and sample(text, "ray_catimage_attempts_per_request_count", policy="cascade") >= 1
                and sample(text, "ray_catimage_scoring_cost_total", metric="scene_score") >= 0.2 - 1e-9)

    text = scrape_metrics_until(port, done, 60)
    assert done(text), [ln for ln in text.splitlines() if "catimage_attempts" in ln or "scoring_cost" in ln][:20]
    assert sample(text, "ray_catimage_attempts_total", candidate="blank", outcome="accepted") == 0  # grey never passes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_request_limits_and_policies_the_model_lacks(apps):
    client = apps["client"]
    # max_attempts 1: only one-attempt plans; best value at lambda 0 is render (0.9 > blank's 0.695).
    one = _post(client, "/c/v1/generate", {"prompt": PROMPTS[0], "policy": "cascade", "lambda": 0.0, "max_attempts": 1,
                                           "return": "none"})
    assert [a["candidate"] for a in one["attempts"]] == ["render"] and one["image"] is None
    # min_quality above every plan's threshold: the best plan, its threshold raised (render scores 1 >= 0.99).
    strict = _post(client, "/c/v1/generate", {"prompt": PROMPTS[0], "policy": "cascade", "lambda": 0.0,
                                              "min_quality": 0.99, "return": "none"})
    assert strict["plan"] == {"attempts": ["blank", "render"], "threshold": 0.99} and strict["candidate"] == "render"
    # parallel 2: both drawn in one wave, the best (render) kept.
    both = _post(client, "/c/v1/generate", {"prompt": PROMPTS[0], "policy": "cascade", "lambda": 0.0, "parallel": 2,
                                            "return": "none"})
    assert [a["wave"] for a in both["attempts"]] == [0, 0] and both["candidate"] == "render"
    # Routing is one unscored draw; asking it for cascade fields is a 422 that says what to do.
    routed = _post(client, "/c/v1/generate", {"prompt": PROMPTS[0], "policy": "route", "lambda": 0.0, "return": "none"})
    assert routed["policy"] == "route" and routed["attempts"][0]["scored"] is False and routed["cost"] == 2.0
    r = client.post("/c/v1/generate", json={"prompt": PROMPTS[0], "policy": "route", "parallel": 2})
    assert r.status_code == 422 and "apply to the cascade policy" in r.text
    r = client.post("/l/v1/generate", json={"prompt": PROMPTS[0], "policy": "cascade"})
    assert r.status_code == 422 and "needs a cascade bundle" in r.text and "catimage fit --policy cascade" in r.text
    # /v1/route shows the plan per prompt with the cascade policy.
    plans = _post(client, "/c/v1/route", {"prompts": PROMPTS[:2], "lambda": 0.0, "policy": "cascade"})
    assert all(d["plan"] == {"attempts": ["blank", "render"], "threshold": 0.5} for d in plans["decisions"])


def _controller(client, key: str) -> dict:
    return client.get("/c/v1/pool").json()["budget_controller"][key]


def _total(state: dict) -> float:
    return (state["mean_cost_all"] or 0.0) * state["observed"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cascade_controller_counts_each_requests_whole_realised_cost(apps):
    """Requests at the app's budget feed their own controller key (`cascade:*` for cascades, `*` for
    routing): one observation per request, worth every draw and every scoring of its plan, as the
    answers themselves list them."""
    client = apps["client"]
    before, before_route = _controller(client, "cascade:*"), _controller(client, "*")
    costs = [_post(client, "/c/v1/generate", {"prompt": PROMPTS[i % 4], "return": "none", "seed": 100 + 10 * i})["cost"]
             for i in range(6)]
    for body in [_post(client, "/c/v1/generate", {"prompt": PROMPTS[1], "policy": "route", "return": "none"})]:
        route_cost = body["cost"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after, after_route = _controller(client, "cascade:*"), _controller(client, "*")
        if after["observed"] >= before["observed"] + 6 and after_route["observed"] >= before_route["observed"] + 1:
            break
        time.sleep(0.1)
    assert after["observed"] == before["observed"] + 6 and after_route["observed"] == before_route["observed"] + 1
    assert _total(after) - _total(before) == pytest.approx(sum(costs))
    assert _total(after_route) - _total(before_route) == pytest.approx(route_cost)
    assert after["budget"] == 3.0 and after["model_version"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_scorer_replica_killed_under_load_fails_no_request(apps):

    client = apps["client"]
    replicas = replica_actors("cascade", "Scorer-scene_score")
    assert len(replicas) == 2
    before = sum(client.get("/c/v1/pool").json()["scorer"]["failures"].values())

    def ask(i: int) -> httpx.Response:
        return client.post("/c/v1/generate", json={"prompt": PROMPTS[i % 4], "policy": "cascade", "lambda": 0.0,
                                                   "seed": 1000 + 10 * i, "return": "none"})

    answers = kill_replica_mid_run(ask, 40, 6, replicas[0])
    assert [r.status_code for r in answers] == [200] * 40, [r.text for r in answers if r.status_code != 200][:2]
    bodies = [r.json() for r in answers]
    unscored = sum(a["score_error"] is not None for b in bodies for a in b["attempts"])
    after = sum(client.get("/c/v1/pool").json()["scorer"]["failures"].values())
    assert after - before == unscored
    for b in bodies:  # whatever was scored follows the planted signal
        for a in b["attempts"]:
            if a["scored"]:
                assert a["decision_score"] == (0.0 if a["candidate"] == "blank" else 1.0)
    assert replicas[0] not in replica_actors("cascade", "Scorer-scene_score")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_logger_replica_killed_under_load_fails_no_request_and_the_lost_rows_are_counted(apps):
    """Also: every row carries the propensity the answer gave (epsilon 0.5 over two candidates:
    greedy render 0.5 + 0.25 = 0.75, the explored blank 0.25) and the routed image's online score
    (score_routed: scene_score 1 for render's picture, 0 for blank's; each paid 0.1 for scoring)."""
    import ray

    from catimage.tables.served_log import read_served_log
    from serve.log_deployment import audit_tallies

    client, uri = apps["client"], apps["log_uri"]
    n = 60
    killed = threading.Event()

    def ask(i: int) -> httpx.Response:
        return client.post("/l/v1/generate", json={"prompt": PROMPTS[i % 4], "seed": 10 * i, "return": "none"})

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(n)]
        deadline = time.monotonic() + 120
        while not killed.is_set() and time.monotonic() < deadline:
            acked = client.get("/l/v1/pool").json()["served_log"]["acked"]
            victim = holding_log_replica("logged", uri) if acked >= n // 4 else None
            if victim is not None:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                killed.set()
            time.sleep(0.05)
        answers = [f.result() for f in futures]
    assert killed.is_set()
    assert [r.status_code for r in answers] == [200] * n
    bodies = [r.json() for r in answers]
    for b in bodies:
        assert b["propensity"] == pytest.approx(0.25 if b["explored"] else 0.75)
        assert b["candidate"] == ("blank" if b["explored"] else "render")
        assert b["decision_score"] == (0.0 if b["explored"] else 1.0)
        assert b["cost"] == pytest.approx((1.0 if b["explored"] else 2.0) + 0.1)
    assert 0 < sum(b["explored"] for b in bodies) < n
    produced = sum(1 for b in bodies for a in b["attempts"] if a["draw_error"] is None)
    deadline = time.monotonic() + 60
    while True:
        sent = client.get("/l/v1/pool").json()["served_log"]
        if sent["in_flight"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    logger = apps["serve"].get_deployment_handle("ServedLog", "logged")
    reported = logger.state.remote().result()["rows_lost"]
    while reported == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        reported = logger.state.remote().result()["rows_lost"]
    apps["serve"].delete("logged")  # graceful: the live replica writes what it holds
    table = read_served_log(uri)
    audit = audit_tallies(uri, "logged#ServedLog", alive=[])
    lost = produced - table.num_rows
    assert lost > 0 and reported == audit.lost, (lost, reported, audit)
    assert audit.lost - sent["retried"] <= lost <= audit.lost + sent["failed"], (lost, audit, sent)
    assert sent["sent"] == produced and sent["dropped"] == 0
    by_request = {b["request_id"]: b for b in bodies}
    rows = table.to_pylist()
    assert rows and all(r["request_id"] in by_request for r in rows)
    for r in rows:
        b = by_request[r["request_id"]]
        assert r["propensity"] == pytest.approx(b["propensity"]) and r["candidate"] == b["candidate"]
        assert r["policy"] == "route" and r["model_version"] == b["model_version"]
        assert r["scene_score"] == b["decision_score"] and r["decision_cost"] == pytest.approx(0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hot_swap_under_load_drops_nothing_and_decides_with_the_new_model(models, serve_url):
    """reconfigure in place (the Router replica is not restarted); every answer's decision is the one
    its model version makes (A: blank, B: render, from the planted tables' means)."""
    from ray import serve
    from serve_planted import planted_app

    expected = {"A": "blank", "B": "render"}
    args = _args(model_dir=models["a"], pool=models["pool"])
    serve.run(planted_app(args, {"model_dir": models["a"], "model_version": "A"}, code_version="1"), name="swap",
              route_prefix="/s")
    results: list[tuple[int, str | None, str | None]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=serve_url, timeout=120) as client:
            i = 0
            while not stop.is_set():
                r = client.post("/s/v1/generate", json={"prompt": PROMPTS[i % 4], "lambda": 0.0, "return": "none",
                                                        "seed": worker * 10_000 + i})
                body = r.json() if r.status_code == 200 else {}
                results.append((r.status_code, body.get("model_version"), body.get("candidate")))
                i += 1

    def seen(version: str) -> int:
        return sum(v == version for _, v, _ in list(results))

    with httpx.Client(base_url=serve_url, timeout=120) as client:
        assert client.get("/s/v1/pool").json()["model_version"] == "A"
        router_before = replica_actors("swap", "Router")
        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: seen("A") >= 20)
            serve.run(planted_app(args, {"model_dir": models["b"], "model_version": "B"}, code_version="1"), name="swap",
                      route_prefix="/s")
            _wait(lambda: seen("B") >= 20)
        finally:
            stop.set()
            for t in threads:
                t.join()
        pool = client.get("/s/v1/pool").json()
        # A model that does not fit the app is refused; B keeps serving.
        serve.run(planted_app(args, {"model_dir": str(models["root"] / "nothing"), "model_version": "C"}, code_version="1"),
                  name="swap", route_prefix="/s")
        refused = client.get("/s/v1/pool").json()
    assert [s for s, _, _ in results] == [200] * len(results)
    assert all(c == expected[v] for _, v, c in results), [r for r in results if r[2] != expected.get(r[1])][:3]
    assert pool["model_version"] == "B" and pool["swap"]["outcome"] == "done" and pool["swap"]["from"] == "A"
    assert replica_actors("swap", "Router") == router_before  # the same replica, reconfigured in place
    assert refused["model_version"] == "B" and refused["swap"]["outcome"] == "refused"
    assert "not a catimage model directory" in refused["swap"]["problems"][0]
    serve.delete("swap")


def _wait(condition, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
