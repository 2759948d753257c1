"""Test-wide settings (never reach a hub, keep torch to the two cores we have) and the Ray sessions tests
run on: one fixture per kind (`ray_local`, `serve_url`, `two_node_cluster`), each on free ports."""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (CI has it; a user's fresh clone may not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tiny pipelines build into the session's temp dir (shared across modules), never ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "catimage-cache"
    threads = torch.get_num_threads()
    # One torch thread: these models are tiny, and on a busy 2-core machine two OpenMP threads
    # that wait on each other made a 64x64 image 20-50x slower than one thread.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CATIMAGE_CACHE", str(root))
            yield root
    finally:
        torch.set_num_threads(threads)


# --- Ray sessions: one fixture per kind, each on free ports -----------------------------------------------

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # train_serve_fixtures, for every test module and Ray worker alike
    sys.path.insert(0, str(TESTS_DIR))

from train_serve_fixtures import (
    SERVE_KEYS_ENV,
    SERVE_LOG_SALT,
    SERVE_LOG_SALT_ENV,
    SERVE_OTHER_TOKEN,
    SERVE_TEST_TOKEN,
    free_port,
    start_local_ray,
)

RAY_TEST_ENV = {
    # Custom metrics exported every 0.5 s instead of 10 s (the Prometheus test need not wait long).
    "RAY_metrics_report_interval_ms": "500",
    # Serve's autoscaling metrics likewise.
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    # API keys an app may read (auth_token_env); replicas inherit the environment Ray starts with.
    SERVE_KEYS_ENV: f"tester:{SERVE_TEST_TOKEN},other:{SERVE_OTHER_TOKEN}",
    # The served log's hashing key (tests/test_serve_logging.py), whichever module started the Ray.
    SERVE_LOG_SALT_ENV: SERVE_LOG_SALT,
}


def _start_test_ray() -> None:
    """A local Ray (2 CPUs, no dashboard) with the environment above set while it starts (Ray's
    processes keep it), restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_TEST_ENV.items():
            mp.setenv(key, value)
        start_local_ray()


def _ray_is_clean(limit_s: float = 15.0) -> bool:
    """Every CPU free again (Serve's controller and proxy hold none): the module left no actor behind
    that the next one would find. Released resources come back asynchronously, hence the wait."""
    import ray

    deadline = time.monotonic() + limit_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= ray.cluster_resources().get("CPU", 0.0) - 1e-6:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_local():
    """The suite's local Ray: started by the first module that asks and kept for the next one, since
    starting and stopping Ray (and Serve) costs ~8 s a module on 2 cores; stopped when the session
    ends, or at once when a module leaves an actor behind (the next module then starts a fresh one).
    A fixture that needs a Ray of its own (`two_node_cluster`) stops it too."""
    import ray

    if not ray.is_initialized():
        _start_test_ray()
    yield
    if ray.is_initialized() and not _ray_is_clean():
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_when_the_session_ends():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


SERVE_PORT = pytest.StashKey[tuple[str, int]]()
"""(the Ray node Serve was started on, its HTTP port): Serve is started once per Ray session."""


@pytest.fixture(scope="module")
def serve_url(ray_local, request):
    """Serve's HTTP proxy on a free loopback port of `ray_local`: its base URL. Serve stays up for the
    next module; the applications this module deployed are deleted when it ends."""
    import ray
    from ray import serve

    node = ray.get_runtime_context().get_node_id()
    started = request.config.stash.get(SERVE_PORT, None)
    if started is None or started[0] != node:
        started = (node, start_serve(serve))
        request.config.stash[SERVE_PORT] = started
    try:
        yield f"http://127.0.0.1:{started[1]}"
    finally:
        for name in list(serve.status().applications):
            serve.delete(name)


def start_serve(serve, attempts: int = 3) -> int:
    """serve.start on a free loopback port; on a machine loaded enough that the HTTP proxy actor misses
    Serve's 60 s start-up limit (Serve then kills it: ActorDiedError), shut down and start again."""
    import ray

    for attempt in range(attempts):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError):
            serve.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


FAST_NODE_DEATH = {"health_check_period_ms": 1000}
"""The GCS marks a killed node dead after ~5 s instead of Ray's default ~15 s (still 5 missed checks, one
a second instead of one every 3 s); a slow but live raylet still has the default 10 s to answer each check,
so a loaded machine does not get a live node marked dead."""


@pytest.fixture
def two_node_cluster():
    """ray.cluster_utils.Cluster: a 1-CPU head with the dashboard (job API) on free ports and a
    2-CPU worker node. Yields (cluster, worker node, dashboard address)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    dash = free_port()
    cluster = Cluster(
        initialize_head=True,
        # Free ports for the dashboard and its agent (the agent's default, 52365, may be another Ray's).
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
                        "dashboard_agent_listen_port": free_port(), "_system_config": FAST_NODE_DEATH},
    )
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster, worker, f"http://127.0.0.1:{dash}"
    finally:
        ray.shutdown()
        cluster.shutdown()
