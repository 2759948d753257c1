"""The logging deployment: every drawn attempt becomes a served-log row (catimage.tables.served_log).

    Router --LogClient.submit(rows)--> ServedLog replica(s) --ServedLogWriter--> <uri>/hour=.../part-*.parquet
                                                        \\--tally--> <uri>/_tally/<app>#<deployment>/<replica>.json

Serving must not wait for, nor fail because of, logging: the router's `LogClient` buffers each
request's rows and sends them in batches in the background: one `append_many` call per
`client_batch_rows` rows, at the latest `client_flush_interval_s` after the first buffered row, as
soon as the router has no request in flight, and when the router shuts down (one call per request
cost the router and the logger a Serve call each; under a burst the router's actor calls, to the
generators and the logger alike, were ~14 % of its py-spy samples). The buffer
is bounded (`client_max_buffered_rows`: past it the oldest requests' rows are dropped and counted,
as the logger's own buffer does; rows also wait there while `max_in_flight` calls are
outstanding). It retries once when a logger replica died, and counts every row it could not hand
over. A router replica killed outright loses what its buffer held, uncounted (a router keeps no
tally): normally under `client_batch_rows` rows or `client_flush_interval_s` of traffic, at most
`client_max_buffered_rows` while the logger is not keeping up.

A logger replica buffers rows (bounded memory: `max_buffered_rows`) and writes them in batches:
when `flush_rows` are waiting, every `flush_interval_s`, and when Serve shuts the replica down
(`__del__`). A replica killed between flushes loses its unflushed rows, and says how many: before it
acknowledges a batch it records its running counts (rows accepted, written, dropped) in a small
"tally" file beside the data. Any live replica compares the tallies with the replicas still alive
(Ray's named actors): the rows a dead replica accepted and never wrote are `rows_lost` (in its
`state()` and the `catimage_log_rows_lost` gauge). The tally folder starts with `_`, so pyarrow
and Ray Data skip it when they read the log.

Exact, except in two windows of a few milliseconds: a replica killed after a Parquet file is
written but before its tally is updated over-states the loss by that file's rows; one killed after
its tally is updated but before its acknowledgement reaches the router makes the router resend
those rows (retried), so they are both written and counted lost. `LogClient.state()["retried"]`
bounds the second.
"""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve reads annotations at runtime.
import asyncio
import json
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from catimage.errors import TableError
from catimage.tables.served_log import LogConfig, ServedLogWriter, ServedRow, resolve_filesystem

log = logging.getLogger("catimage.serve")

__all__ = [
    "LOG_DEPLOYMENT",
    "LogClient",
    "LogServeArgs",
    "ServedLog",
    "TallyAudit",
    "audit_tallies",
    "log_options",
]

LOG_DEPLOYMENT = "ServedLog"
TALLY_DIR = "_tally"


class LogServeArgs(BaseModel):
    """Where the served log goes and how its deployment runs (`log:` in the app's args)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Log every drawn attempt (false: no logging deployment).")
    uri: str = Field(
        default="served_log",
        description="Root of the log: a local folder (relative paths are made absolute where the app is "
        "built), s3://bucket/prefix, gs://..., or any fsspec URI.",
    )
    flush_rows: int = Field(default=500, ge=1, description="Write a file once this many rows are buffered.")
    flush_interval_s: float = Field(default=10.0, gt=0, description="Also write what is buffered this often.")
    max_buffered_rows: int = Field(default=20_000, ge=1, description="Memory bound per replica (oldest dropped, counted).")
    hash_prompts: bool = Field(default=False, description="Privacy: store a keyed hash instead of the prompt text.")
    hash_salt_env: str = Field(
        default="CATIMAGE_LOG_SALT", description="Environment variable holding the hash key (never put it in the config)."
    )
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.05, ge=0)
    max_ongoing_requests: int = Field(default=256, ge=1)
    batch_wait_timeout_s: float = Field(default=0.02, ge=0, description="How long appends wait to share a batch.")
    max_in_flight: int = Field(default=256, ge=1, description="Router side: outstanding append calls before rows are dropped.")
    retries: int = Field(default=1, ge=0, description="Router side: resends when a logger replica died.")
    client_batch_rows: int = Field(default=64, ge=1, description="Router side: rows sent per append call.")
    client_flush_interval_s: float = Field(
        default=0.25, gt=0, description="Router side: the longest a buffered row waits for its batch to fill."
    )
    client_max_buffered_rows: int = Field(
        default=4096, ge=1, description="Router side: memory bound of the router's buffer (oldest dropped, counted)."
    )

    @model_validator(mode="after")
    def _client_buffer_holds_a_batch(self) -> "LogServeArgs":
        if self.client_max_buffered_rows < self.client_batch_rows:
            raise ValueError(
                f"log.client_max_buffered_rows ({self.client_max_buffered_rows}) must be at least "
                f"log.client_batch_rows ({self.client_batch_rows}), or a batch never fills; raise it or lower the batch"
            )
        return self

    def writer_config(self, metrics: Sequence[str]) -> LogConfig:
        """The served_log writer's config; reads the hash key from the environment when hashing."""
        salt = ""
        if self.hash_prompts:
            salt = os.environ.get(self.hash_salt_env, "")
            if not salt:
                raise TableError(
                    f"log.hash_prompts is on but ${self.hash_salt_env} is empty: export a long random secret there "
                    "(for example `openssl rand -hex 32`) on every node, or turn hash_prompts off"
                )
        return LogConfig(
            uri=self.uri, metrics=tuple(metrics), flush_rows=self.flush_rows,
            max_buffered_rows=max(self.max_buffered_rows, self.flush_rows), hash_prompts=self.hash_prompts,
            hash_salt=salt,
        )

    def absolute(self) -> "LogServeArgs":
        """A copy whose local uri is absolute (replicas may start in another directory)."""
        if "://" in self.uri:
            return self
        return self.model_copy(update={"uri": os.path.abspath(self.uri)})


def log_options(args: LogServeArgs) -> dict[str, Any]:
    """Serve deployment options of the logging deployment."""
    return {
        "name": LOG_DEPLOYMENT,
        "num_replicas": args.num_replicas,
        "ray_actor_options": {"num_cpus": args.num_cpus},
        "max_ongoing_requests": args.max_ongoing_requests,
    }


# --- the tally: running counts a replica keeps beside the data ----------------------------------


@dataclass
class TallyAudit:
    """What the tallies say: rows lost in dead replicas, rows dropped (buffer full), per replica."""

    lost: int
    dropped: int
    dead: dict[str, int]
    """Dead replica id -> rows it accepted and never wrote."""
    live: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"rows_lost": self.lost, "rows_dropped": self.dropped, "lost_by_dead_replica": dict(self.dead),
                "live_replicas": list(self.live)}


class Tally:
    """One replica's tally file: `{accepted, written, dropped, closed, time}`, replaced atomically."""

    def __init__(self, uri: str, key: str, replica: str) -> None:
        self.fs, root = resolve_filesystem(uri)
        self.directory = f"{root.rstrip('/')}/{TALLY_DIR}/{key}"
        self.path = f"{self.directory}/{replica}.json"
        self.fs.create_dir(self.directory, recursive=True)

    def write(self, counts: dict[str, Any]) -> None:
        data = json.dumps({**counts, "time": datetime.now(UTC).isoformat()}).encode()
        tmp = f"{self.directory}/.{os.path.basename(self.path)}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, self.path)


def _tally_key(app: str, deployment: str) -> str:
    return f"{app}#{deployment}".replace("/", "_")


def audit_tallies(uri: str, key: str, alive: Iterable[str]) -> TallyAudit:
    """Read every tally of a logging deployment (`key` = "<app>#<deployment>") and count the rows
    that replicas no longer alive accepted and never wrote. Usable without Serve (after shutdown,
    with `alive=()`)."""
    import pyarrow.fs as pafs

    fs, root = resolve_filesystem(uri)
    directory = f"{root.rstrip('/')}/{TALLY_DIR}/{key}"
    alive = set(alive)
    lost, dropped, dead = 0, 0, {}
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    for info in infos:
        name = info.base_name
        if info.type != pafs.FileType.File or name.startswith(".") or not name.endswith(".json"):
            continue
        replica = name[: -len(".json")]
        try:
            with fs.open_input_stream(info.path) as f:
                counts = json.loads(f.read())
        except (OSError, ValueError) as err:
            log.warning("served log: unreadable tally %s (%s)", info.path, err)
            continue
        dropped += int(counts.get("dropped", 0))
        pending = int(counts["accepted"]) - int(counts["written"]) - int(counts.get("dropped", 0))
        if replica not in alive and pending > 0:
            dead[replica] = pending
            lost += pending
    return TallyAudit(lost=lost, dropped=dropped, dead=dead, live=sorted(alive))


def _live_replicas(app: str, deployment: str) -> list[str]:
    """Unique ids of the replicas of this deployment that are alive (Serve names their actors)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n[len(prefix):] for n in names if n.startswith(prefix)]


# --- the deployment ------------------------------------------------------------------------------


@serve.deployment
class ServedLog:
    """Buffers served-log rows and writes them in batches (see the module docstring).

    `append(rows)` returns an acknowledgement `{"accepted": n, "error": None | reason, "replica": id}`:
    rows that fail the log's checks are refused as a whole call (the error says why), never raised.
    """

    def __init__(self, args: dict[str, Any], metrics: Sequence[str]) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.args = LogServeArgs.model_validate(args)
        self.writer = ServedLogWriter(self.args.writer_config(metrics))
        self.app, self.deployment, self.replica = _identity()
        self.tally = Tally(self.args.uri, _tally_key(self.app, self.deployment), self.replica)
        self.accepted = 0
        self.refused = 0
        self.flush_errors = 0
        self._exported = {"accepted": 0, "written": 0, "dropped": 0}
        self._append_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._flusher: asyncio.Task | None = None
        self._closed = False
        self._lock = threading.Lock()  # one of append / flush at a time, each with its tally write
        self.m_accepted = Counter("catimage_log_rows_accepted", "Served-log rows this replica accepted.")
        self.m_written = Counter("catimage_log_rows_written", "Served-log rows this replica wrote to the store.")
        self.m_dropped = Counter("catimage_log_rows_dropped", "Served-log rows dropped because the buffer was full.")
        self.g_pending = Gauge("catimage_log_rows_pending", "Served-log rows buffered, not yet written (lost if killed now).")
        self.g_lost = Gauge("catimage_log_rows_lost", "Rows that dead logger replicas accepted and never wrote (from their tallies).")
        self.tally.write(self._counts())
        log.info("served log replica %s writing to %s", self.replica, self.args.uri)

    def _counts(self, closed: bool = False) -> dict[str, Any]:
        return {"accepted": self.accepted, "written": self.writer.written, "dropped": self.writer.dropped,
                "pending": self.writer.pending, "closed": closed}

    def _export(self) -> None:
        counts = self._counts()
        for name, metric in (("accepted", self.m_accepted), ("written", self.m_written), ("dropped", self.m_dropped)):
            delta = counts[name] - self._exported[name]
            if delta > 0:
                metric.inc(delta)
                self._exported[name] = counts[name]
        self.g_pending.set(counts["pending"])

    def _append_all(self, calls: list[list[ServedRow]]) -> list[dict[str, Any]]:
        """Buffer each caller's rows (all or none per caller), then record the tally; runs in a thread."""
        with self._lock:
            return self._append_locked(calls)

    def _append_locked(self, calls: list[list[ServedRow]]) -> list[dict[str, Any]]:
        acks = []
        for rows in calls:
            try:
                n = self.writer.append(rows)
            except TableError as err:
                self.refused += len(rows)
                acks.append({"accepted": 0, "error": str(err), "replica": self.replica})
                continue
            self.accepted += n
            acks.append({"accepted": n, "error": None, "replica": self.replica})
        self.tally.write(self._counts())  # before acknowledging: acknowledged rows are always accounted
        return acks

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.02)
    async def _append_batch(self, calls: list[list[ServedRow]]) -> list[dict[str, Any]]:
        acks = await asyncio.to_thread(self._append_all, calls)
        self._export()
        return acks

    async def append(self, rows: list[ServedRow]) -> dict[str, Any]:
        """Buffer one request's rows; flushed in batches (see the class docstring for the answer)."""
        self._ensure_flusher()
        return await self._append_batch(list(rows))

    async def append_many(self, calls: list[list[ServedRow]]) -> list[dict[str, Any]]:
        """Buffer many requests' rows sent as one call (a router's batch): one acknowledgement per
        request, each request's rows accepted or refused as a whole, one tally write for the call."""
        self._ensure_flusher()
        acks = await asyncio.to_thread(self._append_all, [list(rows) for rows in calls])
        self._export()
        return acks

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.args.flush_interval_s)
            await self.flush()

    def _flush_now(self) -> int:
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        try:
            written = self.writer.flush()
        except Exception as err:  # noqa: BLE001 - keep the rows buffered; the next flush retries
            self.flush_errors += 1
            log.warning("served log: flush to %s failed (%s); %d row(s) kept", self.args.uri, err, self.writer.pending)
            written = 0
        self.tally.write(self._counts(closed=self._closed))
        return written

    async def flush(self) -> int:
        """Write what is buffered now; returns the rows written."""
        written = await asyncio.to_thread(self._flush_now)
        self._export()
        return written

    def audit(self) -> TallyAudit:
        """Rows lost in dead replicas of this deployment (their tallies against the live replicas)."""
        result = audit_tallies(self.args.uri, _tally_key(self.app, self.deployment),
                               _live_replicas(self.app, self.deployment))
        self.g_lost.set(result.lost)
        return result

    async def state(self) -> dict[str, Any]:
        """This replica's counts and the deployment's losses (what /v1/pool shows)."""
        audit = await asyncio.to_thread(self.audit)
        return {"replica": self.replica, "uri": self.args.uri, **self._counts(), "refused": self.refused,
                "flush_errors": self.flush_errors, "last_error": self.writer.last_error, **audit.to_dict()}

    async def __del__(self) -> None:
        """Serve shuts the replica down: write everything buffered, mark the tally closed."""
        if getattr(self, "writer", None) is None or self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        await asyncio.to_thread(self._flush_now)


def _identity() -> tuple[str, str, str]:
    """(app, deployment, replica id) of this replica; outside Serve, a fresh id."""
    try:
        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment, ctx.replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside a Serve replica (local testing)
        return "local", LOG_DEPLOYMENT, uuid.uuid4().hex[:8]


# --- the router's side ---------------------------------------------------------------------------


class LogClient:
    """Buffers rows and sends them to the logging deployment in batches, in the background; never
    raises, counts everything (see the module docstring for when a batch goes out).

    `sent` = `acked` + `refused` + `failed` + `dropped` + `in_flight_rows` + `buffered`, where
    `failed` are rows whose call failed after the retries (or that were still buffered when `close`
    gave up), `dropped` the oldest rows pushed out of the bounded buffer. `calls` counts append calls.
    """

    def __init__(self, handle: Any, max_in_flight: int = 256, retries: int = 1, batch_rows: int = 64,
                 flush_interval_s: float = 0.25, max_buffered_rows: int = 4096) -> None:
        self.handle = handle
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.batch_rows = int(batch_rows)
        self.flush_interval_s = float(flush_interval_s)
        self.max_buffered_rows = int(max_buffered_rows)
        self.counts = {"sent": 0, "acked": 0, "refused": 0, "failed": 0, "dropped": 0, "retried": 0, "calls": 0}
        self._tasks: set[asyncio.Task] = set()
        self._buffer: deque[list[ServedRow]] = deque()
        self._buffered = 0
        self._in_flight_rows = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def from_args(cls, handle: Any, args: LogServeArgs) -> "LogClient":
        return cls(handle, args.max_in_flight, args.retries, args.client_batch_rows, args.client_flush_interval_s,
                   args.client_max_buffered_rows)

    def submit(self, rows: Sequence[ServedRow]) -> None:
        """Buffer one request's rows without waiting (call from the event loop); a full batch goes out now."""
        if not rows:
            return
        rows = list(rows)
        self.counts["sent"] += len(rows)
        self._buffer.append(rows)
        self._buffered += len(rows)
        self._bound()
        if self._buffered >= self.batch_rows:
            self.flush()
        elif self._timer is None and self._buffer:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self._on_timer)

    def _bound(self) -> None:
        """Past `max_buffered_rows`, drop the oldest requests' rows (whole requests), counted."""
        while self._buffered > self.max_buffered_rows and self._buffer:
            old = self._buffer.popleft()
            self._buffered -= len(old)
            self.counts["dropped"] += len(old)
            log.warning("served log: router buffer full (%d calls outstanding); dropped %d row(s)",
                        len(self._tasks), len(old))

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send what is buffered as one call now (call from the event loop); while `max_in_flight` calls
        are outstanding the rows stay buffered (bounded) and the next submit or timer tries again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        if len(self._tasks) >= self.max_in_flight:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval_s, self._on_timer)
            return
        calls = list(self._buffer)
        self._buffer.clear()
        n, self._buffered = self._buffered, 0
        self._in_flight_rows += n
        task = asyncio.get_running_loop().create_task(self._send(calls, n))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, calls: list[list[ServedRow]], n: int) -> None:
        try:
            await self._send_counted(calls, n)
        finally:
            self._in_flight_rows -= n

    async def _send_counted(self, calls: list[list[ServedRow]], n: int) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(self.retries + 1):
            self.counts["calls"] += 1
            try:
                acks = await self.handle.append_many.remote(calls)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if attempt < self.retries:
                    self.counts["retried"] += n
                    continue
                log.warning("served log: logger replica died; %d row(s) not logged (%s)", n, type(err).__name__)
            except Exception as err:  # noqa: BLE001 - logging never fails serving
                log.warning("served log: append failed; %d row(s) not logged (%s)", n, err)
            else:
                for rows, ack in zip(calls, acks, strict=True):
                    if ack.get("error"):
                        self.counts["refused"] += len(rows)
                        log.error("served log refused %d row(s): %s", len(rows), ack["error"])
                    else:
                        self.counts["acked"] += len(rows)
                return
            break
        self.counts["failed"] += n

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Send what is buffered and wait for every outstanding call (tests, shutdown)."""
        self.flush()
        while self._tasks or self._buffer:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self.flush()

    async def close(self, timeout_s: float) -> None:
        """Shutdown: drain within `timeout_s`; rows still buffered then are counted as failed."""
        try:
            await asyncio.wait_for(self.drain(), timeout=timeout_s)
        except TimeoutError:
            log.warning("served log: %d row(s) still buffered and %d call(s) outstanding at shutdown",
                        self._buffered, len(self._tasks))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.counts["failed"] += self._buffered
        self._buffer.clear()
        self._buffered = 0

    def state(self) -> dict[str, int]:
        return {**self.counts, "in_flight": self.in_flight, "in_flight_rows": self._in_flight_rows,
                "buffered": self._buffered}
