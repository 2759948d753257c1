"""The served-traffic log: every attempt the Serve app draws, as a quality-table row (Arrow / Parquet).

A logged row is a quality-table row (`prompt_id, prompt, candidate, seed, cost`, one float column per
online score; `cost` keeps the table's meaning, measured seconds of the generation, null when not
measured) plus how it was served::

    latency_ms     float    time to draw (and score) this attempt
    policy         str      `route` | `cascade` | ... (what decided)
    plan           str      the plan chosen for the request (a candidate name for one-attempt routing)
    propensity     float    probability with which that plan / candidate was chosen (1 = no exploration)
    lam            float    the lambda the decision was made with
    model_version  str      which fitted model decided
    request_id     str      one request = one or more attempts
    attempt        int      0, 1, ... within the request
    returned       bool     this attempt's image was the one returned
    pool_cost      float    the candidate's cost in the pool's cost unit (what the budget controller counts)
    decision_cost  float    cost of scoring this attempt online, in the pool's cost unit (0 when unscored)
    prompt_hashed  bool     `prompt` holds a keyed hash, not the text (privacy switch)
    time           timestamp[us, UTC]

On disk: a Parquet dataset partitioned by hour (`hour=YYYY-MM-DDTHH/part-<time>-<uuid>.parquet`),
each flush a fresh file (never a rewrite: overwriting a dataset has lost files under parallel
writers, see NOTES.md), written through a pyarrow filesystem resolved from the URI, so a local
folder, `s3://`, `gs://` or any fsspec URI works. `catimage fit/train/evaluate LOGDIR` read such a
folder directly (`catimage.tables.table.read_quality_table` recognises it); the serving columns
(`SERVING_COLUMNS`) are never metrics.

Pure pyarrow (no Ray): the serving engineers' logging deployment holds one `ServedLogWriter`. This
module imports nothing of catimage but `errors` (the table module imports it, not the reverse).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from catimage.errors import TableError

log = logging.getLogger(__name__)

__all__ = [
    "SERVING_COLUMNS",
    "LogConfig",
    "ServedLogWriter",
    "ServedRow",
    "hash_prompt",
    "is_served_log",
    "read_served_log",
    "resolve_filesystem",
    "served_log_schema",
    "training_rows",
]

PARTITION = "hour"
HOUR_FORMAT = "%Y-%m-%dT%H"
HASH_PREFIX = "hash:"

_BASE_FIELDS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("prompt_id", pa.string(), False),
    ("prompt", pa.string(), False),
    ("candidate", pa.string(), False),
    ("seed", pa.int64(), False),
    ("cost", pa.float64(), True),
)
_SERVING_FIELDS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("latency_ms", pa.float64(), True),
    ("policy", pa.string(), False),
    ("plan", pa.string(), True),
    ("propensity", pa.float64(), False),
    ("lam", pa.float64(), True),
    ("model_version", pa.string(), False),
    ("request_id", pa.string(), False),
    ("attempt", pa.int64(), False),
    ("returned", pa.bool_(), False),
    ("pool_cost", pa.float64(), False),
    ("decision_cost", pa.float64(), False),
    ("prompt_hashed", pa.bool_(), False),
    ("time", pa.timestamp("us", tz="UTC"), False),
)
# How a row was served: never a quality metric (the quality table's NON_METRIC_COLUMNS include these).
SERVING_COLUMNS: tuple[str, ...] = tuple(f[0] for f in _SERVING_FIELDS) + (PARTITION,)
_TABLE_KEYS = ("prompt_id", "prompt", "candidate", "seed", "cost", "image_path")


def served_log_schema(metrics: Sequence[str]) -> pa.Schema:
    """The explicit Arrow schema of a log holding these online score columns (nullable: unscored)."""
    reserved = {f[0] for f in _BASE_FIELDS + _SERVING_FIELDS} | {PARTITION, "image_path"}
    clash = sorted(set(metrics) & reserved)
    if clash:
        raise TableError(f"metric name(s) {clash} clash with the served log's own columns; rename the metric")
    if len(set(metrics)) != len(metrics):
        raise TableError(f"metric names repeat in {list(metrics)}")
    fields = [pa.field(n, t, nullable=nul) for n, t, nul in _BASE_FIELDS]
    fields += [pa.field(m, pa.float64(), nullable=True) for m in metrics]
    fields += [pa.field(n, t, nullable=nul) for n, t, nul in _SERVING_FIELDS]
    return pa.schema(fields)


def hash_prompt(prompt: str, salt: str) -> str:
    """A keyed hash of the (whitespace-normalised) prompt: equal prompts stay equal, text is gone.

    Keyed (HMAC-SHA256) so that a short prompt cannot be recovered by hashing guesses without the salt.
    """
    norm = " ".join(prompt.split())
    return HASH_PREFIX + hmac.new(salt.encode(), norm.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


@dataclass
class ServedRow:
    """One drawn attempt, as the Serve app reports it to the logger (field names = column names)."""

    prompt_id: str
    """`catimage.tables.table.stable_prompt_id(prompt)`: the id every table uses for this text."""
    prompt: str
    candidate: str
    seed: int
    pool_cost: float
    request_id: str
    scores: Mapping[str, float | None] = field(default_factory=dict)
    attempt: int = 0
    returned: bool = True
    propensity: float = 1.0
    policy: str = "route"
    plan: str | None = None
    lam: float | None = None
    model_version: str = "unknown"
    latency_ms: float | None = None
    cost: float | None = None
    """Measured seconds of the generation (the quality table's `cost`), when measured."""
    decision_cost: float = 0.0
    time: datetime | None = None


@dataclass(frozen=True)
class LogConfig:
    """Where and how the served log is written."""

    uri: str
    """Root of the dataset: a local folder, s3://bucket/prefix, gs://..., or any fsspec URI."""
    metrics: tuple[str, ...]
    """The online score columns (fixed: the schema is explicit)."""
    flush_rows: int = 1000
    """Write a file once this many rows are buffered."""
    max_buffered_rows: int = 20_000
    """Memory bound: beyond it, while the store cannot be written, the oldest rows are dropped (counted)."""
    hash_prompts: bool = False
    """Privacy switch: store a keyed hash instead of the prompt text (such a log cannot train a router)."""
    hash_salt: str = ""
    compression: str = "zstd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        served_log_schema(self.metrics)  # validates the names
        if self.flush_rows < 1 or self.max_buffered_rows < self.flush_rows:
            raise TableError(
                f"need 1 <= flush_rows ({self.flush_rows}) <= max_buffered_rows ({self.max_buffered_rows})"
            )
        if self.hash_prompts and not self.hash_salt:
            raise TableError("hash_prompts needs a hash_salt (a secret kept outside the log), else hashes can be guessed")


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, a pyarrow URI (s3://, gs://, hdfs://) or
    any fsspec URI (wrapped in pyarrow's FSSpecHandler)."""
    if "://" not in uri:
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise TableError(f"cannot open {uri!r}: neither pyarrow nor fsspec knows its scheme ({err})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _check_row(row: ServedRow, metrics: frozenset[str]) -> None:
    """Raise TableError naming what is wrong with one row (before anything is buffered)."""
    problems = []
    if not isinstance(row.prompt, str) or not row.prompt.strip():
        problems.append("empty prompt")
    if not isinstance(row.candidate, str) or not row.candidate:
        problems.append("empty candidate")
    if not isinstance(row.request_id, str) or not row.request_id:
        problems.append("empty request_id")
    if not isinstance(row.prompt_id, str) or not row.prompt_id:
        problems.append("empty prompt_id")
    for name in ("pool_cost", "decision_cost") + (("cost",) if row.cost is not None else ()):
        value = getattr(row, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            problems.append(f"{name} {value!r} is not a finite number >= 0")
    if not (isinstance(row.propensity, int | float) and 0.0 < row.propensity <= 1.0):
        problems.append(f"propensity {row.propensity} is not in (0, 1]")
    if int(row.attempt) < 0:
        problems.append(f"attempt {row.attempt} < 0")
    unknown = sorted(set(row.scores) - metrics)
    if unknown:
        problems.append(f"score(s) {unknown} are not log columns {sorted(metrics)}")
    if problems:
        raise TableError(f"served row of request {row.request_id!r} (attempt {row.attempt}): {'; '.join(problems)}")


class ServedLogWriter:
    """Bounded buffer -> batched Parquet writes, one fresh file per hour partition per flush.

    `append` never raises for a store that cannot be written (serving must not fail because
    logging does): rows stay buffered and the next flush retries; past `max_buffered_rows` the oldest
    rows are dropped and counted in `dropped`. `flush` itself raises, so a caller that wants to know
    (shutdown, tests) does. A process killed between flushes loses at most its `pending` rows.
    """

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.schema = served_log_schema(config.metrics)
        self.fs, self.root = resolve_filesystem(config.uri)
        self._buffer: deque[dict] = deque()
        self._metrics = frozenset(config.metrics)
        self.written = 0
        self.dropped = 0
        self.files: list[str] = []
        self.last_error: str | None = None
        self.closed = False
        self._lock = threading.RLock()

    @property
    def pending(self) -> int:
        """Rows buffered, not yet written (what a crash now would lose)."""
        return len(self._buffer)

    def append(self, rows: Iterable[ServedRow]) -> int:
        """Buffer rows (all or none: each is checked first); flush when `flush_rows` are waiting."""
        if self.closed:
            raise TableError("this served log is closed; open a new ServedLogWriter")
        rows = list(rows)
        for row in rows:
            _check_row(row, self._metrics)
        records = [self._record(r) for r in rows]
        with self._lock:
            return self._buffer_records(records)

    def _buffer_records(self, records: list[dict]) -> int:
        self._buffer.extend(records)
        if len(self._buffer) >= self.config.flush_rows:
            try:
                self.flush()
            except (OSError, pa.ArrowException) as err:
                self.last_error = str(err)
                log.warning("served log: cannot write to %s (%s); %d row(s) kept in memory",
                            self.config.uri, err, len(self._buffer))
        over = len(self._buffer) - self.config.max_buffered_rows
        if over > 0:
            for _ in range(over):
                self._buffer.popleft()
            self.dropped += over
            log.error("served log: buffer full, dropped the %d oldest row(s) (%d in all)", over, self.dropped)
        return len(records)

    def _record(self, row: ServedRow) -> dict:
        when = row.time or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        prompt = row.prompt
        pid = row.prompt_id
        if self.config.hash_prompts:
            prompt = hash_prompt(prompt, self.config.hash_salt)
            pid = prompt[len(HASH_PREFIX):][:16]
        rec = {
            "prompt_id": pid, "prompt": prompt, "candidate": row.candidate, "seed": int(row.seed),
            "cost": None if row.cost is None else float(row.cost), "latency_ms": row.latency_ms, "policy": row.policy,
            "plan": row.plan if row.plan is not None else row.candidate, "propensity": float(row.propensity),
            "lam": row.lam, "model_version": row.model_version, "request_id": row.request_id,
            "attempt": int(row.attempt), "returned": bool(row.returned), "pool_cost": float(row.pool_cost), "decision_cost": float(row.decision_cost),
            "prompt_hashed": self.config.hash_prompts, "time": when.astimezone(UTC),
        }
        for m in self.config.metrics:
            value = row.scores.get(m)
            rec[m] = None if value is None or not math.isfinite(float(value)) else float(value)
        return rec

    def flush(self) -> int:
        """Write every buffered row; returns the number written. Raises if the store fails; the rows
        not written stay buffered (a failure on one hour's file keeps the hours already written out)."""
        with self._lock:
            rows = list(self._buffer)
            if not rows:
                return 0
            table = pa.Table.from_pylist(rows, schema=self.schema)
            hours = np.array([r["time"].strftime(HOUR_FORMAT) for r in rows])
            done = np.zeros(len(rows), dtype=bool)
            try:
                for hour in sorted(set(hours.tolist())):
                    idx = np.flatnonzero(hours == hour)
                    self._write_file(table.take(pa.array(idx)), hour)
                    done[idx] = True
            finally:
                self._buffer = deque(r for r, d in zip(rows, done, strict=True) if not d)
                self.written += int(done.sum())
            return int(done.sum())

    def _write_file(self, part: pa.Table, hour: str) -> None:
        import pyarrow.parquet as pq

        directory = f"{self.root.rstrip('/')}/{PARTITION}={hour}"
        name = f"part-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:12]}.parquet"
        self.fs.create_dir(directory, recursive=True)
        final = f"{directory}/{name}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            # Readers skip dot-files: a reader never sees a half-written part.
            tmp = f"{directory}/.{name}.tmp"
            pq.write_table(part, tmp, filesystem=self.fs, compression=self.config.compression)
            self.fs.move(tmp, final)
        else:  # object stores publish a PUT atomically
            pq.write_table(part, final, filesystem=self.fs, compression=self.config.compression)
        self.files.append(final)

    def close(self) -> int:
        """Flush what is left; returns the rows written by this last flush."""
        if self.closed:
            return 0
        written = self.flush()
        self.closed = True
        return written

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading -----------------------------------------------------------------------------------------


def is_served_log(path: str) -> bool:
    """True when `path` is a folder whose entries are `hour=...` partitions."""
    fs, root = resolve_filesystem(str(path))
    try:
        info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return False
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith(f"{PARTITION}=") for i in info)


def read_served_log(uri: str, since_hour: str | None = None, until_hour: str | None = None) -> pa.Table:
    """Every logged row (optionally of hours in [since_hour, until_hour]), schemas of all files unified.

    A log whose writers changed their metric set still reads: a column a file lacks is null there.
    """
    fs, root = resolve_filesystem(str(uri))
    partitioning = pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
    try:
        dataset = pads.dataset(root, filesystem=fs, format="parquet", partitioning=partitioning)
        fragments = list(dataset.get_fragments())
    except (OSError, pa.ArrowException) as err:
        raise TableError(f"cannot read the served log at {uri}: {err}") from None
    if not fragments:
        raise TableError(f"the served log at {uri} holds no Parquet files yet; serve some traffic first")
    schema = pa.unify_schemas([f.physical_schema for f in fragments] + [partitioning.schema])
    dataset = pads.dataset(root, filesystem=fs, format="parquet", partitioning=partitioning, schema=schema)
    filt = None
    if since_hour is not None:
        filt = pads.field(PARTITION) >= since_hour
    if until_hour is not None:
        upper = pads.field(PARTITION) <= until_hour
        filt = upper if filt is None else filt & upper
    table = dataset.to_table(filter=filt)
    if "time" in table.column_names:
        table = table.sort_by([("time", "ascending"), ("request_id", "ascending"), ("attempt", "ascending")])
    return table


def score_columns(table: pa.Table) -> list[str]:
    """The online score columns of a served log (every float column that is neither key nor serving)."""
    return [f.name for f in table.schema
            if pa.types.is_floating(f.type) and f.name not in SERVING_COLUMNS and f.name not in _TABLE_KEYS]


def decision_metric(table: pa.Table, metric: str | None = None) -> str:
    """The score column off-policy evaluation and retraining read: `metric`, else the log's only score."""
    scores = score_columns(table)
    if metric is None:
        if len(scores) != 1:
            raise TableError(f"the served log holds scores {scores}; choose the decision metric (--metric)")
        return scores[0]
    if metric not in scores:
        raise TableError(f"the served log has no score column {metric!r}; it has {scores}")
    return metric


def training_rows(table: pa.Table, source: str = "served log", attempts: str = "first") -> pa.Table:
    """The log's rows a fit may learn from: the quality-table columns and serving columns as they are,
    rows lacking an online score left out (counted in a warning). The caller validates the result
    (`catimage.tables.table.read_quality_table` does).

    `attempts="first"` (the default) keeps each request's first attempt only. Every attempt is a
    fair draw of its (prompt, candidate), but whether a cascade draws AGAIN depends on how the earlier
    draws scored: hard prompts leave several draws, easy ones one, and a stopped sequence's pass rate
    is not the pass rate (stop at the first pass: 1/k for a pass at draw k). Estimators that average
    or pool draws then learn a world harder than it is. The first attempt is chosen before any of the
    request's outcomes, so it is unbiased; in the world's closed loop (benchmarks/closed_loop.py)
    training on first attempts gave a larger area over the hull than on every attempt (+0.0023 on
    200 evaluation prompts, 86 % of paired resamples). `attempts="all"` keeps every drawn attempt.
    Raises for a log of hashed prompts: a router learns from prompt text.
    """
    if attempts not in ("first", "all"):
        raise TableError(f"attempts must be 'first' or 'all', got {attempts!r}")
    if attempts == "first" and "attempt" in table.column_names:
        table = table.filter(pc.equal(table.column("attempt"), 0))
    if "prompt_hashed" in table.column_names and pc.any(table.column("prompt_hashed")).as_py():
        raise TableError(
            f"{source} stores hashed prompts (the privacy switch): a router cannot learn from them. Log "
            "prompt text to train on served traffic, or train on a table built from your prompts"
        )
    if PARTITION in table.column_names:
        table = table.drop_columns([PARTITION])
    metrics = score_columns(table)
    scored = np.ones(table.num_rows, dtype=bool)
    for m in metrics:
        scored &= ~table.column(m).is_null().to_numpy(zero_copy_only=False)
    if not scored.all():
        log.warning("%s: %d of %d row(s) lack an online score and are left out of the table",
                    source, int((~scored).sum()), table.num_rows)
        table = table.filter(pa.array(scored))
    if table.num_rows == 0:
        raise TableError(f"{source} holds no scored row; a fit needs the online scores of drawn images")
    return table
