"""Shared fixtures of the Train and Serve tests: a small quality table with a planted signal, pools.

The table is synthesised directly in the long schema (no images): 40 prompts x 3 tiny candidates x
2 seeds. Prompts about animals are drawn well by `tiny-sd-2` (cheap) and badly by `tiny-sdxl-4`;
prompts about text/signs the other way round; `tiny-sd-8` (expensive) is good at both. A router
that learned anything sends animal prompts to tiny-sd-2 at a tight budget.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from catimage.tables.table import stable_prompt_id, write_quality_table

REPO = Path(__file__).resolve().parents[1]
TINY_POOL = REPO / "configs" / "tiny_pool.yaml"
CANDIDATES = ("tiny-sd-2", "tiny-sd-8", "tiny-sdxl-4")

ANIMALS = ["cat", "dog", "horse", "owl", "fox", "rabbit", "tiger", "bear", "wolf", "deer"]
PLACES = ["in a garden", "on a beach", "in the snow", "at night"]
SIGNS = ["a street sign", "a shop banner", "a neon sign", "a book cover", "a poster"]
WORDS = ["OPEN", "SALE", "HELLO", "EXIT"]

# Planted mean quality per (kind, candidate).
QUALITY = {
    "animal": {"tiny-sd-2": 0.85, "tiny-sd-8": 0.9, "tiny-sdxl-4": 0.2},
    "text": {"tiny-sd-2": 0.15, "tiny-sd-8": 0.9, "tiny-sdxl-4": 0.8},
}


def planted_prompts() -> list[tuple[str, str]]:
    """(prompt, kind): 20 animal prompts and 20 text prompts."""
    animals = [(f"a photo of a {a} {p}", "animal") for a in ANIMALS for p in PLACES[:2]]
    texts = [(f'{s} that reads "{w}"', "text") for s in SIGNS for w in WORDS]
    return animals + texts


def planted_table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "quality")}
    for prompt, kind in planted_prompts():
        for cand in CANDIDATES:
            for s in range(2):
                rows["prompt_id"].append(stable_prompt_id(prompt))
                rows["prompt"].append(prompt)
                rows["candidate"].append(cand)
                rows["seed"].append(s)
                rows["quality"].append(QUALITY[kind][cand] + float(rng.normal(0, 0.03)))
    return pa.table(rows)


def write_planted_table(path: Path) -> Path:
    return write_quality_table(planted_table(), path)


SERVE_TEST_TOKEN = "test-token-" + "x" * 24
SERVE_OTHER_TOKEN = "other-token-" + "y" * 24
SERVE_KEYS_ENV = "CATIMAGE_TEST_API_KEYS"
"""The API keys every test Ray starts with (tests/conftest.py), for apps with auth_token_env."""
SERVE_LOG_SALT_ENV, SERVE_LOG_SALT = "CATIMAGE_LOG_SALT", "test-salt-not-secret"
"""The served log's hashing key every test Ray starts with (replicas read it from their environment)."""

COSTS = {"tiny-sd-2": 2.0, "tiny-sd-8": 8.0, "tiny-sdxl-4": 6.0}


def tiny_pool_dict() -> dict:
    """configs/tiny_pool.yaml (its generator blocks), with the costs these tests assert on pinned."""
    data = yaml.safe_load(TINY_POOL.read_text())
    assert [c["name"] for c in data["candidates"]] == list(CANDIDATES), "tiny pool candidates changed"
    for cand in data["candidates"]:
        cand["cost"] = COSTS[cand["name"]]
    return data


def write_pool(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_ray(**kwargs) -> None:
    """ray.init(address="local", num_cpus=2, ...), retried: on a loaded 2-core machine the raylet can
    miss Ray's fixed 30 s registration window ("The current node timed out during startup")."""
    import ray

    kwargs = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False, **kwargs}
    for attempt in range(3):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()


class ScriptedImageServer:
    """A real hosted images endpoint on loopback (OpenAI's `{"data": [{"b64_json": ...}]}`) whose
    answers the test scripts, one per request in order: "ok" (a 64x64 PNG), "fail" (HTTP 500),
    "hold" (wait until `release` is set, then HTTP 500) or "wait" (wait until `release` is set, then
    "ok"). With the script empty it answers "ok".

    `arrived` is set when a "hold" request is being held: tests wait on these events, never on time.
    """

    def __init__(self) -> None:
        import base64
        import http.server
        import io
        import threading

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
        self.ok_body = json.dumps({"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}).encode()
        self.script: list[str] = []
        self.served: list[str] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with server._lock:
                    action = server.script.pop(0) if server.script else "ok"
                    server.served.append(action)
                if action in ("hold", "wait"):
                    server.arrived.set()
                    server.release.wait(600)
                ok = action in ("ok", "wait")
                body = server.ok_body if ok else b'{"error": {"message": "scripted failure"}}'
                self.send_response(200 if ok else 500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/images/generations"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def generator_block(self) -> dict:
        """A pool `generator:` block that draws through this server (64x64, no retries)."""
        return {"kind": "http", "url": self.url, "model": "scripted", "size": "64x64", "max_retries": 0, "timeout_s": 120}

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live Serve replica actors of `deployment` in `app` (for a test to kill one)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def holding_log_replica(app: str, uri: str) -> str | None:
    """A live logger replica whose tally says it holds rows not yet written, else None."""
    folder = Path(uri) / "_tally" / f"{app}#ServedLog"
    for name in replica_actors(app, "ServedLog"):
        tally = folder / f"{name.rsplit('#', 1)[1]}.json"
        if tally.is_file():
            counts = json.loads(tally.read_text())
            if counts["accepted"] - counts["written"] > 0:
                return name
    return None


def kill_replica_mid_run(ask, n: int, threads: int, replica: str, started: int = 4) -> list:
    """`ask(i)` for i in range(n) from `threads` client threads; once `started` answers are in (mid-run:
    most still to come), SIGKILL the Serve replica actor `replica`. Returns every answer, in order
    (an exception raised by `ask` propagates)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import ray

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(ask, i) for i in range(n)]
        while sum(f.done() for f in futures) < started:
            time.sleep(0.02)
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        return [f.result() for f in futures]


def scrape_metrics_until(port: int, done, timeout_s: float) -> str:
    """The Prometheus text of Ray's metrics port, polled until `done(text)` holds or `timeout_s` passes
    (the exporter publishes every few seconds); the caller asserts `done(text)` itself."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)
