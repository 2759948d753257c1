"""The logging deployment (serve/log_deployment.py): rows reach the served log, a killed replica's
unflushed rows are counted as lost, the privacy switch stores no prompt text.

The loss test is counted from three independent places: the rows this test submitted, the rows on
disk after shutdown (read back with catimage.tables.served_log), and what the deployment reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from train_serve_fixtures import SERVE_LOG_SALT, SERVE_LOG_SALT_ENV, holding_log_replica, replica_actors

from catimage.errors import TableError
from catimage.tables.served_log import ServedRow, read_served_log
from serve.log_deployment import LogServeArgs, audit_tallies

METRIC = "scene_decider"


def _rows(i: int, n: int) -> list[ServedRow]:
    prompt = f"{1 + i % 3} red circles"
    return [
        ServedRow(prompt_id=f"p{i}", prompt=prompt, candidate="small-4", seed=1000 * i + j, pool_cost=1.4,
                  request_id=f"r{i}", scores={METRIC: 0.5}, attempt=j, returned=j == n - 1, policy="cascade",
                  decision_cost=0.04)
        for j in range(n)
    ]


def _write_tally(root: Path, key: str, replica: str, **counts) -> None:
    folder = root / "_tally" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{replica}.json").write_text(json.dumps(counts))


def test_audit_counts_only_what_dead_replicas_never_wrote(tmp_path):
    key = "app#ServedLog"
    _write_tally(tmp_path, key, "dead1", accepted=10, written=4, dropped=1, closed=False)  # 5 lost
    _write_tally(tmp_path, key, "dead2", accepted=7, written=7, dropped=0, closed=True)  # shut down cleanly
    _write_tally(tmp_path, key, "live", accepted=9, written=2, dropped=0, closed=False)  # still buffering
    audit = audit_tallies(str(tmp_path), key, alive=["live"])
    assert (audit.lost, audit.dropped, audit.dead) == (5, 1, {"dead1": 5})
    assert audit_tallies(str(tmp_path), key, alive=[]).lost == 5 + 7


def test_hashing_without_a_key_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.delenv("CATIMAGE_LOG_SALT", raising=False)
    with pytest.raises(TableError, match="export a long random secret"):
        LogServeArgs(uri="x", hash_prompts=True).writer_config([METRIC])
    assert LogServeArgs(uri="rel/dir").absolute().uri == str(Path("rel/dir").resolve())


@pytest.fixture(scope="module")
def log_salt():
    """The privacy switch's key in this process too (the replicas have it from the test Ray's
    environment: tests/conftest.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SERVE_LOG_SALT_ENV, SERVE_LOG_SALT)
        yield


@pytest.fixture(scope="module")
def ray_serve(log_salt, serve_url):
    from ray import serve

    return serve


def _deploy(serve, name: str, args: LogServeArgs, replicas: int):
    from serve.log_deployment import ServedLog, log_options

    args = args.model_copy(update={"num_replicas": replicas, "num_cpus": 0})
    return serve.run(ServedLog.options(**log_options(args)).bind(args.model_dump(), [METRIC]),
                     name=name, route_prefix=None)


async def _load_with_a_kill(handle, app: str, uri: str, n_requests: int) -> tuple[int, dict]:
    """Submit n_requests requests' rows (1-3 each) through a LogClient, killing a logger replica that
    holds rows once half of those sent so far are acknowledged. Returns (rows submitted, client counts)."""
    import ray

    from serve.log_deployment import LogClient

    client = LogClient(handle, max_in_flight=10_000, retries=1)
    submitted, killed = 0, False
    for i in range(n_requests):
        rows = _rows(i, 1 + i % 3)
        client.submit(rows)
        submitted += len(rows)
        if i % 10 == 9:
            await asyncio.sleep(0)  # let the calls go out
        if not killed and i >= n_requests // 4:
            while client.counts["acked"] < submitted // 2:
                await asyncio.sleep(0.01)
            victim = holding_log_replica(app, uri)
            assert victim is not None, "no logger replica holds rows yet"
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed = True
    await client.drain()
    return submitted, client.state()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_logger_replica_loses_only_its_unflushed_rows_and_says_how_many(ray_serve, tmp_path):
    app = "logs"
    uri = str(tmp_path / "log")
    # Nothing is flushed before shutdown: every row a replica holds when it is killed is lost.
    args = LogServeArgs(uri=uri, flush_rows=10_000, flush_interval_s=3600)
    handle = _deploy(ray_serve, app, args, replicas=2)
    assert len(replica_actors(app, "ServedLog")) == 2
    submitted, client = asyncio.run(_load_with_a_kill(handle, app, uri, 300))
    assert client["dropped"] == 0 and client["refused"] == 0 and client["in_flight"] == 0
    # A live replica tells the loss (from the dead replica's tally), before anything is shut down.
    deadline = time.monotonic() + 60
    state = handle.state.remote().result()
    while state["rows_lost"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        state = handle.state.remote().result()
    reported = state["rows_lost"]
    ray_serve.delete(app)  # graceful: the live replicas write what they hold
    on_disk = read_served_log(uri).num_rows
    audit = audit_tallies(uri, f"{app}#ServedLog", alive=[])
    lost = submitted - on_disk
    assert lost > 0 and reported == audit.lost, (lost, reported, audit)
    # What the deployment says it lost is what is missing, up to the rows resent after a replica
    # died (possibly counted by the dead one too) and the rows whose call failed for good.
    assert audit.lost - client["retried"] <= lost <= audit.lost + client["failed"], (lost, audit, client)
    tallies = [json.loads(p.read_text()) for p in (Path(uri) / "_tally" / f"{app}#ServedLog").glob("*.json")]
    assert sum(t["accepted"] for t in tallies) == on_disk + audit.lost  # every accepted row: on disk or lost
    assert sum(t["closed"] for t in tallies) == len(tallies) - 1  # all shut down cleanly but the killed one


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rows_are_written_on_shutdown_and_prompts_hashed_when_asked(ray_serve, tmp_path):
    from serve.log_deployment import LogClient

    app = "hashed"
    uri = str(tmp_path / "log")
    handle = _deploy(ray_serve, app, LogServeArgs(uri=uri, flush_rows=4, hash_prompts=True), replicas=1)

    async def send() -> dict:
        client = LogClient(handle)
        for i in range(5):
            client.submit(_rows(i, 2))
        await client.drain()
        return client.state()

    assert asyncio.run(send())["acked"] == 10
    ray_serve.delete(app)
    table = read_served_log(uri)
    assert table.num_rows == 10
    assert all(p.startswith("hash:") for p in table.column("prompt").to_pylist())
    assert all(table.column("prompt_hashed").to_pylist())
    assert "red circles" not in " ".join(map(str, table.to_pylist()))
    assert sorted(table.column("seed").to_pylist()) == sorted(1000 * i + j for i in range(5) for j in range(2))


def test_a_router_buffer_smaller_than_its_batch_is_refused():
    with pytest.raises(ValueError, match="client_max_buffered_rows"):
        LogServeArgs(uri="x", client_batch_rows=64, client_max_buffered_rows=32)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_router_side_buffer_sends_batches_and_drops_the_oldest_past_its_bound(ray_serve, tmp_path):
    """Planted rows through LogClient: 10 requests of 2 rows in batches of 8 rows go out as 3 calls
    (after requests 4 and 8, the last 4 rows at drain); a buffer bounded at 5 rows that never sends
    (batch 100, no timer) keeps the last 2 requests of 4 and counts the 4 oldest rows dropped."""
    from serve.log_deployment import LogClient

    app = "batched"
    uri = str(tmp_path / "log")
    handle = _deploy(ray_serve, app, LogServeArgs(uri=uri), replicas=1)

    async def send() -> tuple[dict, dict, dict, dict]:
        batched = LogClient(handle, batch_rows=8, flush_interval_s=3600)
        for i in range(10):
            batched.submit(_rows(i, 2))
        queued = batched.state()  # no send task has run yet: nothing awaited since the first submit
        await batched.drain()
        bounded = LogClient(handle, batch_rows=100, flush_interval_s=3600, max_buffered_rows=5)
        for i in range(10, 14):
            bounded.submit(_rows(i, 2))
        held = bounded.state()
        await bounded.drain()
        return queued, batched.state(), held, bounded.state()

    queued, batched, held, bounded = asyncio.run(send())
    assert (queued["sent"], queued["in_flight_rows"], queued["buffered"], queued["in_flight"]) == (20, 16, 4, 2)
    assert (batched["acked"], batched["calls"], batched["buffered"], batched["in_flight"]) == (20, 3, 0, 0)
    assert (held["sent"], held["dropped"], held["buffered"]) == (8, 4, 4)
    assert (bounded["acked"], bounded["dropped"], bounded["calls"], bounded["failed"]) == (4, 4, 1, 0)
    ray_serve.delete(app)  # graceful: the replica writes what it holds
    seeds = sorted(read_served_log(uri).column("seed").to_pylist())
    assert seeds == sorted(1000 * i + j for i in [*range(10), 12, 13] for j in range(2))
