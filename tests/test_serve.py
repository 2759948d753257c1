"""The Serve app for real: a local Ray, Serve on a free port (tests/conftest.py), HTTP requests with httpx.

One module-scoped deployment serves three applications:

* `catimage` (route /): the tiny pool, except that `tiny-sd-2`'s generator is a hosted endpoint
  that is down (a closed local port), so any request routed there must fall back; bearer-token
  auth on (the shared client sends the key), the online budget controller on;
* `broken` (route /broken): every generator fails (two closed ports, one endpoint that accepts the
  connection and never answers, cut off by the candidate's request_timeout_s) -> 503;
* `scripted` (route /scripted): only `tiny-sd-2` draws, through a real loopback endpoint whose
  answers each test scripts (ok / fail / hold until released: tests/train_serve_fixtures.py), with
  the budget controller on: partial failures, in-flight counts and accounting, decided by events.

The router model is a knn over TF-IDF fitted on the planted quality table (tests/train_serve_fixtures.py):
animal prompts are predicted good and cheap on tiny-sd-2, text prompts need tiny-sd-8/tiny-sdxl-4.
`serve run` of the shipped config is tests/test_serve_run.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from train_serve_fixtures import (
    REPO,
    SERVE_KEYS_ENV,
    SERVE_OTHER_TOKEN,
    SERVE_TEST_TOKEN,
    ScriptedImageServer,
    free_port,
    scrape_metrics_until,
    tiny_pool_dict,
    write_planted_table,
    write_pool,
)

CAT = "a photo of a cat in the snow"
SIGN = 'a neon sign that reads "SALE"'
TOKEN = SERVE_TEST_TOKEN
OTHER_TOKEN = SERVE_OTHER_TOKEN
KEYS_ENV = SERVE_KEYS_ENV


def _down_url() -> str:
    """A local URL nothing listens on: connecting fails at once (a hosted API that is down)."""
    return f"http://127.0.0.1:{free_port()}/v1/images/generations"


def _http_generator(url: str) -> dict:
    return {"kind": "http", "url": url, "model": "unreachable", "max_retries": 0, "timeout_s": 5}


@pytest.fixture(scope="module")
def silent_server():
    """Accepts TCP connections (the kernel backlog does) but never answers: a hung generator."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/images/generations"
    sock.close()


@pytest.fixture(scope="module")
def scripted_server():
    server = ScriptedImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory, silent_server, scripted_server):
    """Quality table, the two pools and the router model (knn + tfidf, fitted in-process)."""
    from jobs.train_estimator import run_train

    root = tmp_path_factory.mktemp("serve")
    table = write_planted_table(root / "table.parquet")
    main = tiny_pool_dict()
    for cand in main["candidates"]:
        cand["serve"] = {"num_cpus": 0.1, "request_timeout_s": 60}
    main["candidates"][2]["serve"].update(max_batch_size=4, batch_wait_timeout_s=0.2)  # @serve.batch path
    main["candidates"][0]["generator"] = _http_generator(_down_url())
    broken = tiny_pool_dict()
    for cand in broken["candidates"]:
        cand["generator"] = _http_generator(_down_url())
        cand["serve"] = {"num_cpus": 0.05, "request_timeout_s": 60}
    broken["candidates"][1]["generator"] = _http_generator(silent_server)
    broken["candidates"][1]["serve"]["request_timeout_s"] = 1.0
    scripted = tiny_pool_dict()  # only tiny-sd-2 draws, through the scripted endpoint
    scripted["candidates"][0]["generator"] = scripted_server.generator_block()
    scripted["candidates"][0]["serve"] = {"num_cpus": 0.05, "request_timeout_s": 120}
    for cand in scripted["candidates"][1:]:
        cand.pop("generator")
    main_pool = write_pool(root / "main_pool.yaml", main)
    broken_pool = write_pool(root / "broken_pool.yaml", broken)
    scripted_pool = write_pool(root / "scripted_pool.yaml", scripted)
    model = run_train(table, main_pool, root / "model", estimator="knn", embedder="tfidf").model_dir
    return {"root": root, "model": model, "main_pool": main_pool, "broken_pool": broken_pool, "scripted_pool": scripted_pool}


# --- shipped configs ----------------------------------------------------------------------------


def test_shipped_serve_configs_validate():
    """serve/config.yaml and the RayService's inline config are valid Serve configs with valid AppArgs."""
    from ray.serve.schema import ServeDeploySchema

    from catimage.tables.pool import load_pool
    from serve.schemas import AppArgs

    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    inline = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, inline):
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        assert app["import_path"] == "serve.app:build_app"
        args = AppArgs.model_validate(app["args"])
        pool = load_pool(REPO / args.pool.removeprefix("/app/"))  # the image has the repo at /app
        assert all(c.generator is not None for c in pool.candidates)


def test_hot_swap_patch_changes_only_the_routers_user_config():
    """deploy/kuberay/hot-swap-patch.yaml is rayservice.yaml's Serve config with only the Router's
    user_config changed: what makes the update a lightweight reconfigure, not a redeploy."""
    from ray.serve.schema import ServeDeploySchema

    from serve.serving_model import user_config_model

    service = yaml.safe_load(yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    patch = yaml.safe_load(yaml.safe_load((REPO / "deploy" / "kuberay" / "hot-swap-patch.yaml").read_text())["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(patch)
    (old,), (new,) = service["applications"], patch["applications"]
    (old_router,), (new_router,) = old.pop("deployments"), new.pop("deployments")
    assert old == new and service["http_options"] == patch["http_options"]
    before, after = old_router.pop("user_config"), new_router.pop("user_config")
    assert old_router == new_router == {"name": "Router"}
    assert user_config_model(before) == ("/models/router", "v1") and user_config_model(after) == ("/models/router_v2", "v2")


def test_kuberay_manifests_keep_the_job_api_inside_and_require_a_token():
    """The dashboard's job API runs arbitrary commands: no manifest may publish it; the Serve API needs a key."""
    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    job = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    for head in (service["spec"]["rayClusterConfig"]["headGroupSpec"], job["spec"]["rayClusterSpec"]["headGroupSpec"]):
        assert head["serviceType"] == "ClusterIP"
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": app["args"]["auth_token_env"], "valueFrom": {"secretKeyRef": {"name": "catimage-api-keys", "key": "keys"}}} in env
    policy = yaml.safe_load((REPO / "deploy" / "kuberay" / "networkpolicy.yaml").read_text())
    open_rules = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_rules for p in rule["ports"]] == [8000]  # only Serve is open to all
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_rayjob_entrypoint_parses():
    from jobs.build_dataset import _parser

    job = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "jobs/build_dataset.py"]
    args = _parser().parse_args(words[2:])
    assert (REPO / args.pool).is_file()


# --- the shared deployment ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(files, serve_url):
    """Three apps on one Serve: `catimage` (auth, controller), `broken` (/broken), `scripted` (/scripted)."""
    from ray import serve

    from serve.app import AppArgs, build_app

    main_args = AppArgs(
        model_dir=files["model"], pool=str(files["main_pool"]), auth_token_env=KEYS_ENV, budget=4.0,
        budget_controller={"window": 20, "sync_interval_s": 0.1, "per_key_budgets": {"other": 7.0}},
        exploration={"epsilon": 0.0},  # decisions are compared with /v1/route's (exploration: test_serve_policy.py)
    )
    serve.run(build_app(main_args), name="catimage", route_prefix="/")
    serve.run(
        build_app(AppArgs(model_dir=files["model"], pool=str(files["broken_pool"]), router_num_cpus=0.1)),
        name="broken", route_prefix="/broken",
    )
    scripted_args = AppArgs(model_dir=files["model"], pool=str(files["scripted_pool"]), router_num_cpus=0.05,
                            budget=4.0, budget_controller={"window": 20, "sync_interval_s": 0.1},
                            exploration={"epsilon": 0.0})
    serve.run(build_app(scripted_args), name="scripted", route_prefix="/scripted")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=serve_url, timeout=120, headers=headers) as client:
        yield client


def _png(answer: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
    assert image.format == "PNG"
    image.load()
    return image


def test_generate_returns_png(served):
    r = served.post("/v1/generate", json={"prompt": CAT, "candidate": "tiny-sd-8", "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["candidate"] == "tiny-sd-8" and body["fallback"] is None
    assert body["cost"] == 8.0 and body["cost_unit"] == "relative" and body["seed"] == 7
    assert set(body["predicted_quality"]) == {"tiny-sd-2", "tiny-sd-8", "tiny-sdxl-4"}
    image = _png(body)
    assert image.size == (64, 64)
    # Same seed -> same image; another seed -> another image (the generator is deterministic per seed).
    again = served.post("/v1/generate", json={"prompt": CAT, "candidate": "tiny-sd-8", "seed": 7}).json()
    other = served.post("/v1/generate", json={"prompt": CAT, "candidate": "tiny-sd-8", "seed": 8}).json()
    assert again["image"] == body["image"]
    assert other["image"] != body["image"]


def test_generate_without_image_and_default_seed(served):
    r = served.post("/v1/generate", json={"prompt": SIGN, "lambda": 0.0, "return": "none"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] is None
    # lambda 0: the best predicted candidate; the planted table makes tiny-sd-8 best on text.
    assert body["candidate"] == "tiny-sd-8" and body["lambda"] == 0.0
    from catimage.generators import generation_seed
    from catimage.tables.table import stable_prompt_id

    assert body["seed"] == generation_seed(stable_prompt_id(SIGN), 0)


def test_tight_budget_routes_to_cheap_candidate_and_falls_back(served):
    """At a budget near the cheapest cost the cat prompt goes to tiny-sd-2, whose endpoint is down."""
    r = served.post("/v1/generate", json={"prompt": CAT, "budget": 2.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predicted_quality"]["tiny-sd-2"] > body["predicted_quality"]["tiny-sdxl-4"]
    assert body["fallback"] is not None, body
    assert body["fallback"]["from"] == "tiny-sd-2"
    assert "cannot reach" in body["fallback"]["reason"]
    assert body["candidate"] in ("tiny-sd-8", "tiny-sdxl-4")
    assert body["cost"] == {"tiny-sd-8": 8.0, "tiny-sdxl-4": 6.0}[body["candidate"]]
    _png(body)


def test_override_to_failing_candidate_falls_back(served):
    r = served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sd-2", "return": "none"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"]["from"] == "tiny-sd-2" and body["candidate"] != "tiny-sd-2"
    assert [t["candidate"] for t in body["fallback"]["tried"]] == ["tiny-sd-2"]


def test_route_batch(served):
    prompts = [CAT, "a photo of a dog on a beach", SIGN, 'a poster that reads "HELLO"']
    r = served.post("/v1/route", json={"prompts": prompts, "budget": 4.0})
    assert r.status_code == 200, r.text
    body = r.json()
    decisions = body["decisions"]
    assert [d["prompt"] for d in decisions] == prompts
    assert len({d["lambda"] for d in decisions}) == 1 and decisions[0]["lambda"] > 0
    assert decisions[0]["candidate"] == "tiny-sd-2" and decisions[1]["candidate"] == "tiny-sd-2"
    assert decisions[2]["candidate"] != "tiny-sd-2" and decisions[3]["candidate"] != "tiny-sd-2"
    for d in decisions:
        assert sorted(d["ranking"]) == ["tiny-sd-2", "tiny-sd-8", "tiny-sdxl-4"] and d["ranking"][0] == d["candidate"]
    assert body["mean_cost"] == pytest.approx(sum(d["cost"] for d in decisions) / 4)
    # A bigger lambda never picks a more expensive candidate.
    cheap = served.post("/v1/route", json={"prompts": prompts, "lambda": 1.0}).json()["decisions"]
    assert all(c["cost"] <= d["cost"] for c, d in zip(cheap, decisions))


def test_pool_reports_replicas_and_costs(served):
    r = served.get("/v1/pool")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cost_unit"] == "relative" and body["application_status"] == "RUNNING"
    rows = {c["name"]: c for c in body["candidates"]}
    assert {n: rows[n]["cost"] for n in rows} == {"tiny-sd-2": 2.0, "tiny-sd-8": 8.0, "tiny-sdxl-4": 6.0}
    for row in rows.values():
        assert row["running_replicas"] == 1 and row["replicas"].get("RUNNING") == 1
        assert row["deployment"] == f"Generator-{row['name']}" and row["in_flight"] == 0


def test_health_and_openapi(served):
    assert served.get("/healthz").json()["status"] == "ok"
    spec = served.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/route", "/v1/pool", "/healthz"} <= set(spec["paths"])
    assert served.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/generate", {"prompt": ""}, 422, "prompt is empty"),
        ("/v1/generate", {"prompt": "   "}, 422, "prompt is empty"),
        ("/v1/generate", {"prompt": "x" * 2001}, 422, "limit is 2000"),
        ("/v1/generate", {"prompt": CAT, "budget": -1}, 422, "budget"),
        ("/v1/generate", {"prompt": CAT, "budget": 1.0}, 422, "below the cheapest"),
        ("/v1/generate", {"prompt": CAT, "budget": 3.0, "lambda": 0.1}, 422, "not both"),
        ("/v1/generate", {"prompt": CAT, "lambda": -0.5}, 422, "lambda"),
        ("/v1/generate", {"prompt": CAT, "candidate": "dall-e-9"}, 422, "unknown candidate"),
        ("/v1/generate", {"prompt": CAT, "seed": -1}, 422, "seed"),
        ("/v1/generate", {"prompt": CAT, "return": "jpeg"}, 422, "return"),
        ("/v1/generate", {"prompt": CAT, "budjet": 3}, 422, "unknown field"),
        ("/v1/generate", {}, 422, "prompt"),
        ("/v1/generate", ["not", "an", "object"], 422, "body"),
        ("/v1/route", {"prompts": []}, 422, "prompts"),
        ("/v1/route", {"prompts": [CAT] * 257}, 422, "prompts"),
        ("/v1/route", {"prompts": [CAT, ""]}, 422, "prompts[1]"),
        ("/v1/route", {"prompts": [CAT], "budget": 0.5}, 422, "below the cheapest"),
    ],
)
def test_bad_requests_get_4xx_with_message(served, path, body, status, needle):
    r = served.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()


def test_malformed_json_is_400(served):
    r = served.post("/v1/generate", content=b'{"prompt": "a cat",', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]


def test_batched_generator_draws_concurrent_requests(served):
    """tiny-sdxl-4 batches up to 4 concurrent requests (max_batch_size 4): all get their own image."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(seed: int) -> httpx.Response:
        return served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sdxl-4", "seed": seed})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert [b["seed"] for b in bodies] == [0, 1, 2, 3]
    assert all(b["candidate"] == "tiny-sdxl-4" and b["fallback"] is None for b in bodies)
    assert len({b["image"] for b in bodies}) == 4
    assert all(_png(b).size == (64, 64) for b in bodies)
    from ray import serve

    stats = serve.get_deployment_handle("Generator-tiny-sdxl-4", app_name="catimage").stats.remote().result()
    assert stats["largest_batch"] > 1 and stats["batches"] < stats["requests"], stats


def test_concurrent_draws_share_one_generator_call_and_each_gets_its_own_image(served):
    """Four draws through a CallBatcher whose window never elapses (the fourth fills the call: no
    timing) go out as one draw_many call, and each gets the picture its seed draws alone."""
    from ray import serve

    from serve.drawing import CallBatcher

    handle = serve.get_deployment_handle("Generator-tiny-sdxl-4", app_name="catimage")
    seeds = [11, 12, 13, 14]
    alone = [handle.remote(SIGN, seed, True).result() for seed in seeds]

    async def together() -> tuple[list, int]:
        batcher = CallBatcher(handle, max_items=4, window_s=3600)
        out = await asyncio.gather(*(batcher.call(SIGN, seed, True) for seed in seeds))
        return out, batcher.calls

    shared, calls = asyncio.run(together())
    assert calls == 1
    _assert_each_is_its_own_seeds_picture(alone, shared)


def _assert_each_is_its_own_seeds_picture(alone: list[bytes], shared: list[bytes]) -> None:
    """shared[k] is the picture alone[k]'s seed draws (a batch's float rounding may move a channel by
    one level), and no other seed's."""
    decode = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int) for png in alone + shared]
    n = len(alone)
    for k in range(n):
        assert np.abs(decode[k] - decode[n + k]).max() <= 1
        assert all(np.abs(decode[k] - decode[n + j]).max() > 1 for j in range(n) if j != k)


def test_a_burst_waits_in_the_router_for_a_free_call_and_leaves_as_one_batch(served):
    """One call out at most, four draws a call, a window that never elapses: of six draws, four fill
    the first call; the other two wait in the router (not in a second call, not for their window)
    and leave together the moment the first call comes back. Each gets the picture its seed draws alone."""
    from ray import serve

    from serve.drawing import CallBatcher

    handle = serve.get_deployment_handle("Generator-tiny-sdxl-4", app_name="catimage")
    seeds = [21, 22, 23, 24, 25, 26]
    alone = [handle.remote(SIGN, seed, True).result() for seed in seeds]

    async def burst() -> tuple[list, tuple[int, int], int]:
        batcher = CallBatcher(handle, max_items=4, window_s=3600, max_calls=1)
        draws = [asyncio.ensure_future(batcher.call(SIGN, seed, True)) for seed in seeds]
        await asyncio.sleep(0)  # every draw handed to the batcher: the fourth sent the first call
        while_first_out = (batcher.calls_out, batcher.waiting)
        return await asyncio.gather(*draws), while_first_out, batcher.calls

    shared, while_first_out, calls = asyncio.run(burst())
    assert while_first_out == (1, 2) and calls == 2
    _assert_each_is_its_own_seeds_picture(alone, shared)


def test_in_process_generators_warm_up_before_ready_and_hosted_ones_do_not(served):
    """build_app's `warmup: true` (the default): an in-process pipeline drew one image at one denoising
    step before its replica reported ready; a hosted endpoint was not called (each call costs)."""
    from ray import serve

    local = serve.get_deployment_handle("Generator-tiny-sdxl-4", app_name="catimage").stats.remote().result()
    hosted = serve.get_deployment_handle("Generator-tiny-sd-2", app_name="scripted").stats.remote().result()
    assert local["warmup_steps"] == 1 and hosted["warmup_steps"] == 0, (local, hosted)


def test_a_partial_call_waits_for_the_call_out_and_a_full_one_does_not(served, scripted_server):
    """Four draws a call, three calls out at most, one of them partial; the scripted endpoint holds
    every call until released (states are read while held: events, not times). A lone draw leaves on
    its window; two draws that come while it is out wait behind it; four more make a full call with
    those two, which leaves at once beside the first; the two left over wait until both are back, then
    leave as one call and draw. Counted by hand: 3 calls, at most 2 out at once."""
    from ray import serve

    from serve.drawing import CallBatcher

    handle = serve.get_deployment_handle("Generator-tiny-sd-2", app_name="scripted")
    scripted_server.release.clear()
    scripted_server.script[:] = ["hold"] * 5  # the lone draw's request and the full call's four

    async def trickle() -> tuple[list, list[tuple[int, int]], int]:
        batcher = CallBatcher(handle, max_items=4, window_s=0, max_calls=3, max_partial_calls=1)
        draws = [asyncio.ensure_future(batcher.call(CAT, 1, True))]
        deadline = time.monotonic() + 60
        while batcher.calls_out == 0 and time.monotonic() < deadline:  # the lone draw's window elapses
            await asyncio.sleep(0.001)
        seen = [(batcher.calls_out, batcher.waiting)]
        draws += [asyncio.ensure_future(batcher.call(CAT, seed, True)) for seed in (2, 3)]
        await asyncio.sleep(0.05)  # their window elapses too: the held call out keeps them waiting
        seen.append((batcher.calls_out, batcher.waiting))
        draws += [asyncio.ensure_future(batcher.call(CAT, seed, True)) for seed in range(4, 8)]
        await asyncio.sleep(0)  # handed over: the fourth waiting draw filled a call, which left
        seen.append((batcher.calls_out, batcher.waiting))
        scripted_server.release.set()
        return await asyncio.gather(*draws, return_exceptions=True), seen, batcher.calls

    try:
        out, seen, calls = asyncio.run(trickle())
    finally:
        scripted_server.release.set()
    assert seen == [(1, 0), (1, 2), (2, 2)] and calls == 3, (seen, calls)
    # The held calls answer 500 once released; the last call (seeds 6 and 7) draws.
    assert [isinstance(o, bytes) for o in out] == [False] * 5 + [True] * 2, out


def _pool_rows(served, prefix: str = "") -> dict:
    return {c["name"]: c for c in served.get(f"{prefix}/v1/pool").json()["candidates"]}


def test_in_flight_counts_outstanding_calls(served, scripted_server):
    """While a call is held at the scripted endpoint (an event, not a time window), /v1/pool counts
    it; once released (the endpoint then fails), it is back to 0."""
    scripted_server.arrived.clear()
    scripted_server.release.clear()
    scripted_server.script[:] = ["hold"]
    out: dict = {}

    def call() -> None:
        out["r"] = served.post("/scripted/v1/generate", json={"prompt": CAT, "candidate": "tiny-sd-2", "return": "none"})

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert scripted_server.arrived.wait(120), "the held request never reached the endpoint"
        held = _pool_rows(served, "/scripted")
    finally:
        scripted_server.release.set()
        thread.join(120)
    assert held["tiny-sd-2"]["in_flight"] == 1 and held["tiny-sd-8"]["in_flight"] == 0
    assert out["r"].status_code == 503  # the held call failed, and no other candidate has a generator
    assert all(row["in_flight"] == 0 for row in _pool_rows(served, "/scripted").values())


def test_all_candidates_failing_is_503(served):
    r = served.post("/broken/v1/generate", json={"prompt": CAT, "return": "none"})
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "every candidate failed" in detail
    assert "tiny-sd-8: timed out after 1 s" in detail  # the hung endpoint, cut off by request_timeout_s
    assert detail.count("cannot reach") == 2  # (the hung endpoint's 120 s client timeout never came into it: see above)
    # The broken app still routes: decisions need no generator.
    assert served.post("/broken/v1/route", json={"prompts": [CAT]}).status_code == 200


def test_prometheus_metrics(served):
    """Requests, cost, fallbacks and router latency reach Ray's Prometheus endpoint, per candidate.

    Every count asserted here comes from this test's own requests (other tests can only add to them)."""
    import ray

    assert served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sdxl-4", "return": "none"}).status_code == 200
    pinned = served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sd-2", "return": "none"})
    assert pinned.status_code == 200 and pinned.json()["fallback"]["from"] == "tiny-sd-2"
    drew = pinned.json()["candidate"]
    port = ray.nodes()[0]["MetricsExportPort"]

    def sample(text: str, name: str, candidate: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and f'candidate="{candidate}"' in line and 'application="catimage"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def done(text: str) -> bool:
        return (sample(text, "ray_catimage_requests_total", "tiny-sdxl-4") >= 1 + (drew == "tiny-sdxl-4")
                and sample(text, "ray_catimage_fallbacks_total", "tiny-sd-2") >= 1)

    text = scrape_metrics_until(port, done, 30)
    assert done(text), [ln for ln in text.splitlines() if "catimage_" in ln][:20]
    assert sample(text, "ray_catimage_cost_total", "tiny-sdxl-4") >= 6.0
    assert sample(text, "ray_catimage_requests_total", drew) >= 1
    assert sample(text, "ray_catimage_predicted_quality_scaled_count", "tiny-sdxl-4") >= 1
    assert "ray_catimage_router_latency_ms_bucket" in text
    # The budget controller's gauges (the coordinator exports them at start-up).
    assert 'ray_catimage_budget{' in text and 'key="*"' in text


# --- safety: bad input, auth, what errors reveal ------------------------------------------------


def _raw(served, path: str, body: bytes, **headers) -> httpx.Response:
    """POST a raw JSON body (httpx's json= cannot encode a lone surrogate; a client can still send one)."""
    return served.post(path, content=body, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/generate", b'{"prompt": "\\ud800"}', "prompt: Value error"),
        ("/v1/generate", b'{"prompt": "a cat \\udfff in the snow"}', "lone surrogate (U+DFFF) at character 6"),
        ("/v1/route", b'{"prompts": ["a cat", "\\ud800"]}', "prompts[1]: prompt is not valid Unicode"),
        ("/v1/generate", b'{"prompt": "a cat", "candidate": "\\ud800"}', "candidate: not valid Unicode text"),
        ("/v1/images/generations", b'{"prompt": "\\ud800", "model": "auto"}', "lone surrogate"),
    ],
)
def test_lone_surrogates_are_422(served, path, body, needle):
    r = _raw(served, path, body)
    assert r.status_code == 422, r.text
    assert "lone surrogate" in r.json()["detail"]
    assert needle.replace("prompt: Value error", "prompt: prompt is not valid Unicode") in r.json()["detail"]


def test_field_named_with_a_surrogate_is_422_and_valid_json(served):
    r = _raw(served, "/v1/generate", b'{"prompt": "a cat", "\\ud800": 1}')
    assert r.status_code == 422
    assert "lone surrogate" in r.json()["detail"]  # and the answer is UTF-8 JSON although the key was not


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": CAT, "budget": True}, "budget must be a number, not true"),
        ({"prompt": CAT, "lambda": False}, "lambda must be a number, not false"),
        ({"prompt": CAT, "seed": True}, "seed must be a number, not true"),
        ({"prompt": CAT, "lambda": 1e300}, "lambda 1e+300 is too large"),
        ({"prompt": CAT, "lambda": 1e12}, "routes every prompt to the cheapest"),
        ({"prompt": CAT, "candidate": "c" * 129}, "at most 128 characters"),
        ({"prompt": CAT, "budget": "4"}, "budget: Input should be a valid number"),
    ],
)
def test_booleans_huge_lambdas_and_long_candidates_are_422(served, body, needle):
    r = served.post("/v1/generate", json={**body, "return": "none"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.json()["detail"]


def test_huge_lambda_is_422_on_route_too_and_a_large_valid_one_routes_to_the_cheapest(served):
    r = served.post("/v1/route", json={"prompts": [SIGN], "lambda": 1e300})
    assert r.status_code == 422 and "too large" in r.json()["detail"]
    ok = served.post("/v1/route", json={"prompts": [SIGN], "lambda": 1000.0})
    assert ok.status_code == 200 and ok.json()["decisions"][0]["candidate"] == "tiny-sd-2"  # cost 2: the cheapest


def test_oversized_body_is_413(served):
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    r = _raw(served, "/v1/generate", big)
    assert r.status_code == 413
    assert "larger than 4194304 bytes" in r.json()["detail"]


def test_auth_rejects_missing_and_unknown_tokens(served):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope-" + "z" * 20}, {"Authorization": f"Basic {TOKEN}"}):
        r = served.post("/v1/route", json={"prompts": [CAT]}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert "missing or unknown API key" in r.json()["detail"]
    assert served.get("/v1/pool", headers={"Authorization": ""}).status_code == 401
    # Liveness needs no key; the app without auth_token_env needs none either.
    assert served.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert served.post("/broken/v1/route", json={"prompts": [CAT]}, headers={"Authorization": ""}).status_code == 200


def test_errors_do_not_leak_generator_urls(served):
    fell = served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sd-2", "return": "none"})
    assert fell.status_code == 200
    reason = fell.json()["fallback"]["reason"]
    assert "cannot reach <endpoint>" in reason
    failed = served.post("/broken/v1/generate", json={"prompt": CAT, "return": "none"})
    assert failed.status_code == 503
    for text in (fell.text, failed.text):
        assert "127.0.0.1" not in text and "http://" not in text and "/v1/images/generations" not in text
    assert failed.headers["retry-after"] == "5"


# --- the online budget controller ------------------------------------------------------------------


def test_budget_controller_counts_realised_costs_per_key(served):
    """Requests without budget/lambda are routed at the controller's lambda and feed it their realised
    cost; the key 'other' has its own controller. Animal prompts route to tiny-sd-2 at the offline
    lambda, whose endpoint is down: every draw falls back to a dearer candidate (6 or 8 > target 4), so
    the controller must raise lambda above the offline one."""
    before = served.get("/v1/pool").json()["budget_controller"]
    assert set(before) == {"*", "other"} and before["*"]["budget"] == 4.0 and before["other"]["budget"] == 7.0
    lam_offline = before["*"]["lambda_offline"]
    costs, lams = [], []
    for i in range(6):
        body = served.post("/v1/generate", json={"prompt": f"a photo of a fox number {i}", "return": "none", "seed": i}).json()
        costs.append(body["cost"])
        lams.append(body["lambda"])
    other = served.post("/v1/generate", json={"prompt": CAT, "return": "none"}, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status_code == 200
    assert all(c > 4.0 for c in costs)
    deadline = time.monotonic() + 60  # a limit for a broken sync, not a race: the loop ends once both are counted
    while time.monotonic() < deadline:
        state = served.get("/v1/pool").json()["budget_controller"]
        if state["*"]["observed"] - before["*"]["observed"] >= 6 and state["other"]["observed"] - before["other"]["observed"] >= 1:
            break
        time.sleep(0.2)
    assert state["*"]["observed"] - before["*"]["observed"] == 6
    assert state["other"]["observed"] - before["other"]["observed"] == 1
    assert state["*"]["lambda"] > lam_offline
    assert lams[0] >= lam_offline - 1e-12 and max(lams) <= state["*"]["lambda"] + 1e-12
    assert state["*"]["window_mean_cost"] > 4.0


def _observed(served, prefix: str = "", key: str = "*") -> int:
    return served.get(f"{prefix}/v1/pool").json()["budget_controller"][key]["observed"]


def _wait_observed(served, at_least: int, prefix: str = "") -> int:
    """The controller's count once it reaches `at_least` (the router syncs every 0.1 s)."""
    deadline = time.monotonic() + 60
    seen = _observed(served, prefix)
    while seen < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = _observed(served, prefix)
    return seen


def test_own_budget_and_pinned_requests_do_not_feed_the_controller(served):
    """A request with its own budget, and one pinned to a candidate (`candidate`, OpenAI `model`), is
    not the controller's to hold: neither moves lambda for routed traffic (docs/serving.md). Checked
    by order, not by waiting: a routed request sent after them is synced with or after them (one
    router replica, costs kept in order), so once it is counted, they would have been too."""
    before = _observed(served)
    assert served.post("/v1/generate", json={"prompt": CAT, "budget": 8.0, "return": "none"}).status_code == 200
    pinned = served.post("/v1/generate", json={"prompt": SIGN, "candidate": "tiny-sdxl-4", "return": "none"})
    assert pinned.status_code == 200 and pinned.json()["candidate"] == "tiny-sdxl-4"
    openai_pinned = served.post("/v1/images/generations", json={"prompt": SIGN, "model": "tiny-sd-8"})
    assert openai_pinned.status_code == 200, openai_pinned.text
    routed = served.post("/v1/generate", json={"prompt": SIGN, "return": "none", "seed": 5})
    assert routed.status_code == 200
    assert _wait_observed(served, before + 1) == before + 1


# --- the OpenAI-compatible Images endpoint ---------------------------------------------------------


def test_openai_client_generates_through_the_router(served):
    from openai import OpenAI

    client = OpenAI(base_url=str(served.base_url).rstrip("/") + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    resp = client.images.generate(model="auto", prompt=SIGN)
    image = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)
    info = resp.model_extra["catimage"]
    # The routed candidate is the router's own decision at the lambda it used.
    decision = served.post("/v1/route", json={"prompts": [SIGN], "lambda": info["lambda"]}).json()["decisions"][0]
    # (With the controller's lambda that may be tiny-sd-2, whose endpoint is down: then it fell back.)
    first_choice = info["fallback"]["from"] if info["fallback"] else info["candidate"]
    assert first_choice == decision["candidate"]
    # A budget through the documented header, and two images at once.
    two = client.images.generate(model="auto", prompt=SIGN, n=2, size="64x64", extra_headers={"X-Catimage-Budget": "8"})
    assert len(two.data) == 2 and two.data[0].b64_json != two.data[1].b64_json
    at8 = served.post("/v1/route", json={"prompts": [SIGN], "budget": 8.0}).json()["decisions"][0]
    assert two.model_extra["catimage"]["candidate"] == at8["candidate"]
    # A candidate by name, and the budget as a model suffix.
    pinned = client.images.generate(model="tiny-sdxl-4", prompt=CAT)
    assert pinned.model_extra["catimage"]["candidate"] == "tiny-sdxl-4"
    assert client.images.generate(model="auto:budget=8", prompt=SIGN).model_extra["catimage"]["candidate"] == at8["candidate"]


def test_openai_client_sees_errors_as_openai_errors(served):
    import openai

    client = openai.OpenAI(base_url=str(served.base_url).rstrip("/") + "/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.images.generate(model="dall-e-9", prompt=CAT)
    with pytest.raises(openai.BadRequestError, match="size '512x512' is not offered"):
        client.images.generate(model="auto", prompt=CAT, size="512x512")
    with pytest.raises(openai.BadRequestError, match="url' is not offered"):
        client.images.generate(model="auto", prompt=CAT, response_format="url")
    with pytest.raises(openai.UnprocessableEntityError, match="budget"):
        client.images.generate(model="auto:budget=-1", prompt=CAT)
    with pytest.raises(openai.AuthenticationError, match="missing or unknown API key"):
        openai.OpenAI(base_url=str(served.base_url).rstrip("/") + "/v1", api_key="wrong-" + "k" * 20,
                      max_retries=0).images.generate(model="auto", prompt=CAT)


# --- budget accounting with several images, sizes, control characters, start-up checks -------------


def test_images_drawn_before_a_failed_one_are_returned_and_paid(served, scripted_server):
    """n=2, the second draw fails (the scripted endpoint answers 500; no other candidate draws): the
    client gets the one image that was drawn with the failure said, and its cost reaches the
    controller (counted: one routed request sent afterwards brings the count to exactly +2)."""
    before = _observed(served, "/scripted")
    scripted_server.script[:] = ["ok", "fail"]
    r = served.post("/scripted/v1/images/generations", json={"prompt": CAT, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 1 and body["catimage"]["candidates"] == ["tiny-sd-2"]
    assert body["catimage"]["requested"] == 2 and body["catimage"]["cost"] == 2.0  # one image of tiny-sd-2
    (failed,) = body["catimage"]["failed"]
    assert failed["index"] == 1 and "tiny-sd-2" in failed["reason"] and "HTTP 500" in failed["reason"]
    assert served.post("/scripted/v1/generate", json={"prompt": CAT, "return": "none"}).status_code == 200
    assert _wait_observed(served, before + 2, "/scripted") == before + 2
    state = served.get("/scripted/v1/pool").json()["budget_controller"]["*"]
    assert state["observed"] == before + 2


def test_no_image_drawn_is_503(served, scripted_server):
    scripted_server.script[:] = ["fail"]
    r = served.post("/scripted/v1/images/generations", json={"prompt": CAT, "n": 3})
    assert r.status_code == 503 and "every candidate failed" in r.json()["error"]["message"]


def test_unknown_size_names_the_sizes_offered(served):
    r = served.post("/v1/images/generations", json={"prompt": CAT, "size": "512x512"})
    assert r.status_code == 400
    # The pool: tiny-sd-2 is a hosted endpoint (HttpSpec's default size), the two tiny models draw 64x64.
    assert r.json()["detail"] == (
        "size '512x512' is not offered; sizes offered, by candidate: tiny-sd-2 1024x1024, tiny-sd-8 64x64, "
        "tiny-sdxl-4 64x64"
    )


def test_pinned_model_is_never_dropped_by_the_size_filter(served):
    r = served.post("/v1/images/generations", json={"prompt": CAT, "model": "tiny-sd-2", "size": "64x64"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("model 'tiny-sd-2' draws 1024x1024, not size '64x64'")
    ok = served.post("/v1/images/generations", json={"prompt": CAT, "model": "tiny-sd-8", "size": "64x64"})
    assert ok.status_code == 200 and ok.json()["catimage"]["candidate"] == "tiny-sd-8"


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/generate", {"prompt": "a cat\x00 in the snow"}, "control character (U+0000) at character 5"),
        ("/v1/route", {"prompts": [CAT, "a \x1b[31mred\x1b[0m cat"]}, "prompts[1]: prompt holds a control character (U+001B)"),
        ("/v1/images/generations", {"prompt": "a cat\x7f"}, "control character (U+007F)"),
    ],
)
def test_control_characters_are_422(served, path, body, needle):
    r = served.post(path, json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_tabs_and_newlines_are_text(served):
    r = served.post("/v1/route", json={"prompts": ["a cat\tin the snow\r\nat night"], "lambda": 0.0})
    assert r.status_code == 200, r.text


def test_an_app_the_cluster_cannot_place_fails_before_deploying(files, served):
    """A candidate asking for a GPU on this GPU-less local Ray: build_app refuses at once, naming what
    is missing, instead of Serve waiting forever with the replica PENDING."""
    import ray

    from catimage.errors import CatimageError
    from serve.app import AppArgs, build_app

    assert ray.cluster_resources().get("GPU", 0) == 0
    pool = yaml.safe_load(files["main_pool"].read_text())
    pool["candidates"][1]["serve"]["num_gpus"] = 1
    path = write_pool(files["root"] / "gpu_pool.yaml", pool)
    with pytest.raises(CatimageError, match=r"cannot place the Serve application: 1 GPU in all, the cluster has 0 GPU"):
        build_app(AppArgs(model_dir=files["model"], pool=str(path)))
    assert build_app(AppArgs(model_dir=files["model"], pool=str(path), wait_for_resources=True)) is not None
