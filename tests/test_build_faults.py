"""A worker node dies in the middle of a build submitted with `ray job submit`: the job completes and
every (prompt, candidate, seed) row is in the quality table exactly once.

A two-node Ray cluster on this machine (ray.cluster_utils.Cluster: two raylets on loopback): the
head with 1 CPU and the job API (dashboard on a free port), a worker with 2 CPUs. The build is submitted
the way users do (`ray job submit --working-dir`); once it has written its first part file the worker
node is removed (its raylet and every process on it SIGKILLed) and a fresh one joins, as an autoscaler
would replace it.

The pool has two candidates (two generator pools joined by a union, as any multi-candidate build):
tiny-sd-2, in-process, and a hosted one whose endpoint (a real loopback server the test scripts)
holds its first request until the test releases it, so the build cannot finish before the worker is
killed however fast the machine is (an event, not a race with the clock); and the weight-free
sharpness metric: three actor processes per pass instead of five (each costs ~8 CPU-seconds of
imports on 2 cores). Each actor asks 0.4 CPU, so the three (1.2 CPUs) cannot all fit on the 1-CPU
head: at least one build actor surely runs on the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from train_serve_fixtures import REPO, ScriptedImageServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROMPTS = [f"a {c} {t}" for c in ("red", "blue", "green") for t in ("cat", "boat", "house", "tree")][:10]
CANDIDATES = ("tiny-sd-2", "hosted")
ACTOR_CPUS = 0.4  # 3 actors x 0.4 = 1.2 CPUs > the head's 1 CPU; the 0.1-CPU write task still fits on either node


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def test_worker_node_killed_mid_build_submitted_as_a_job(tmp_path, tiny_cache, two_node_cluster):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    endpoint = ScriptedImageServer()
    endpoint.script[:] = ["wait"]  # the hosted candidate's first request waits for the release, then draws
    # The tiny pool's tiny-sd-2 and a hosted candidate on the scripted endpoint, blocks of 4 rows,
    # sharpness only, every actor at 0.4 CPU (the module docstring says why).
    pool = yaml.safe_load((REPO / "catimage" / "data" / "tiny_pool.yaml").read_text())
    (local,) = [c for c in pool["candidates"] if c["name"] == CANDIDATES[0]]
    hosted = {**local, "name": CANDIDATES[1], "generator": {**endpoint.generator_block(), "timeout_s": 600}}
    pool["candidates"] = [local, hosted]
    pool["metrics"] = [m for m in pool["metrics"] if m["name"] == "sharpness"]
    for cand in pool["candidates"]:
        cand["build"] = {**cand["build"], "batch_size": 4, "num_cpus": ACTOR_CPUS}
    pool["metrics"][0]["num_cpus"] = ACTOR_CPUS
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text(yaml.safe_dump(pool, sort_keys=False))
    out = tmp_path / "build"
    cluster, worker, address = two_node_cluster
    try:
        client = JobSubmissionClient(address)
        env = {**os.environ, "RAY_ADDRESS": address}
        command = [_ray_bin(), "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
                   "--submission-id", "build-fault", "--", sys.executable, "jobs/build_dataset.py",
                   "--pool", str(pool_path), "--prompts", str(prompts),
                   "--output", str(out), "--seeds", "2", "--no-progress"]
        for _ in range(30):  # the dashboard's job API comes up a few seconds after the head
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
            submitted = submit.returncode == 0 or "already exists" in submit.stdout + submit.stderr
            if submitted:
                break
            time.sleep(2)
        assert submitted, submit.stdout + submit.stderr
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.monotonic() + 600
        on_worker = []
        while time.monotonic() < deadline:
            status = client.get_job_status("build-fault")
            assert status not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs("build-fault")[-4000:]
            parts = list(out.glob("parts/run-*/*.parquet"))
            alive_there = [("node_id", "=", worker.node_id), ("state", "=", "ALIVE")]
            on_worker = [a for a in list_actors(address=address, filters=alive_there)
                         if "Stage" in (a.class_name or "") or "MapWorker" in (a.class_name or "")]
            if parts and on_worker and endpoint.arrived.is_set():
                break
            time.sleep(0.5)
        assert on_worker and endpoint.arrived.is_set(), "no build actor ran on the worker node, or none reached the endpoint"
        assert not client.get_job_status("build-fault").is_terminal()  # the held request keeps it running
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: the worker's raylet and every process on it
        cluster.add_node(num_cpus=2)
        endpoint.release.set()
        while time.monotonic() < deadline:
            status = client.get_job_status("build-fault")
            if status.is_terminal():
                break
            time.sleep(1)
        logs = client.get_job_logs("build-fault")
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
    finally:
        ray.shutdown()
        endpoint.close()
    table = pq.read_table(out / "quality.parquet")
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("candidate").to_pylist(),
                    table.column("seed").to_pylist()))
    assert len(keys) == len(set(keys)) == len(PROMPTS) * len(CANDIDATES) * 2
    assert set(table.column("candidate").to_pylist()) == set(CANDIDATES)
    assert set(table.column("prompt").to_pylist()) == set(PROMPTS)
