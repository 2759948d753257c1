"""Pure helpers of the quality-table build job (`catimage build`, `jobs/build_dataset.py`).

The Ray shell only wires these together; everything that decides *what* gets generated, how a
failing batch is isolated and retried, and how the output of several (possibly crashed) runs is
merged lives here so it can be tested without a cluster.

Output layout of one build directory ``OUTPUT``::

    OUTPUT/quality.parquet            the quality table (`catimage.tables.table` schema): what fit/evaluate read
    OUTPUT/errors.parquet             rows that kept failing: prompt_id, prompt, candidate, seed, error, attempts
    OUTPUT/parts/run-<id>/*.parquet   raw rows each run wrote (never overwritten; one fresh folder per run)
    OUTPUT/images/<candidate>/...     the images, when `save_images` is on (or `image_dir`)

Why the parts: Ray Data's `write_parquet(mode="overwrite")` has lost files under parallel writes
(ray issue 55043), and a job can die mid-write. So each run appends its own folder, a resumed run
skips the keys already complete (`done_keys`), and `consolidate` rebuilds the two tables from the
union of all parts, keeping the first complete row per key (prompt_id, candidate, seed) and writing
them atomically (temporary file + rename). A crash at any point can therefore never put a key twice
into `quality.parquet`; truncated part files (a run killed mid-write) are skipped with a warning.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from catimage.errors import CatimageError
from catimage.generators.spec import GeneratorSpec
from catimage.metrics.spec import MetricSpec
from catimage.tables.pool import Pool, load_pool
from catimage.tables.table import stable_prompt_id

if TYPE_CHECKING:
    from catimage.generators.base import Generator
    from catimage.metrics.base import Scorer

log = logging.getLogger(__name__)

KEY_COLUMNS = ("prompt_id", "candidate", "seed")
TABLE_FILE = "quality.parquet"
ERRORS_FILE = "errors.parquet"
PARTS_DIR = "parts"
IMAGE_COLUMN = "image"
# Columns of the raw rows the job writes into parts/ besides the metric columns.
RAW_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("candidate", pa.string()),
        ("seed", pa.int64()),
        ("cost", pa.float64()),
        ("image_path", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int64()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("candidate", pa.string()),
        ("seed", pa.int64()),
        ("error", pa.string()),
        ("attempts", pa.int64()),
    ]
)
WORK_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("candidate", pa.string()), ("seed", pa.int64())]
)
PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])
Key = tuple[str, str, int]


# --------------------------------------------------------------------------------------- config


class BuildConfig(BaseModel):
    """Everything one `catimage build` run needs; the CLI and `jobs/build_dataset.py` both fill it.

    `measure_cost`: when on, each row's `cost` is the wall seconds its generator batch took divided
    by the batch's rows (model loading excluded; a solo retry counts alone). `None` (default) means
    "on exactly when some selected candidate declares no `cost:` in the pool". Downstream,
    `Pool.cost_vector` prefers declared costs, so measured seconds only stand in for missing ones,
    and only in a pool whose `cost_unit` is seconds: it refuses a pool in another unit (the job warns
    at the start of such a build).
    """

    model_config = ConfigDict(extra="forbid")

    pool: Path
    prompts: Path
    output: Path
    seeds: PositiveInt = Field(default=1, description="Samples S per (prompt, candidate): seed indices 0..S-1.")
    limit: PositiveInt | None = Field(default=None, description="Use only the first N prompts of the file.")
    candidates: list[str] | None = Field(default=None, description="Build only these candidates (pool order kept).")
    save_images: Literal["none", "png", "webp"] = "none"
    image_dir: str | None = Field(default=None, description="Folder or URI for images; default OUTPUT/images.")
    measure_cost: bool | None = None
    max_retries: int = Field(default=2, ge=0, description="Solo retries of a row after its batch failed.")
    max_actor_restarts: int = Field(default=3, ge=0, description="Ray restarts of a crashed worker process.")
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs of a local Ray (no cluster address).")
    address: str | None = Field(default=None, description="Ray cluster address; default $RAY_ADDRESS or local.")
    wait_for_resources: bool = Field(
        default=False,
        description="Start even when the cluster lacks the resources the pool asks for (nodes will join); "
        "otherwise such a build fails at once instead of waiting forever.",
    )

    def load_pool(self) -> Pool:
        """The pool restricted to the candidates this run builds, checked for what a build needs."""
        pool = load_pool(self.pool)
        if self.candidates:
            unknown = sorted(set(self.candidates) - set(pool.names))
            if unknown:
                raise CatimageError(f"unknown candidates {unknown} in --candidates; {self.pool} has {pool.names}")
            pool = pool.select([n for n in pool.names if n in set(self.candidates)])
        no_gen = [c.name for c in pool.candidates if c.generator is None]
        if no_gen:
            raise CatimageError(
                f"candidates {no_gen} in {self.pool} have no `generator:` block, so they cannot be built; "
                "add one or leave them out with --candidates"
            )
        if not pool.metrics:
            raise CatimageError(
                f"{self.pool} declares no `metrics:`; add e.g. `metrics: [{{name: clip_score}}]` so the build "
                "knows what to score"
            )
        return pool

    def wants_cost(self, pool: Pool) -> bool:
        if self.measure_cost is not None:
            return self.measure_cost
        return any(c.cost is None for c in pool.candidates)

    def image_root(self) -> str | None:
        if self.save_images == "none":
            return None
        return self.image_dir or str(Path(self.output) / "images")


@dataclass
class BuildResult:
    """What a run did; `table_path` is what `catimage fit/evaluate --table` reads."""

    table_path: Path | None
    errors_path: Path
    run_dir: Path | None
    total_keys: int  # work items this config asks for
    already_done: int  # complete before this run started
    attempted: int  # pending items this run tried
    written: int  # complete rows this run added
    errors: int  # keys in the errors table
    table_rows: int  # rows of quality.parquet (all runs, all candidates)
    seconds: float


# -------------------------------------------------------------------------------------- prompts


PROMPT_FILE_TYPES = ".txt, .csv, .tsv, .parquet or .jsonl"


def read_prompts(path: str | Path) -> pa.Table:
    """Read prompts into a table (prompt_id, prompt), first occurrence wins.

    Formats by suffix: ``.txt`` (one prompt a line; blank lines skipped), ``.csv`` (a ``prompt`` or
    ``Prompt`` column), ``.tsv`` (PartiPrompts: ``Prompt``; no quoting), ``.parquet``, ``.jsonl``
    (objects with ``prompt``). A ``prompt_id`` (or ``id``) column, when present, is kept so ids
    match an external set; otherwise the id is `stable_prompt_id(text)`.
    """
    path = Path(path)
    raw = _read_prompt_file(path)
    texts = _prompt_texts(raw, path)
    ids = _given_prompt_ids(raw, path)
    out_ids, out_texts, skipped_empty = _unique_prompts(ids, texts, path)
    if skipped_empty:
        log.warning("%s: skipped %d empty prompt(s)", path, skipped_empty)
    if not out_ids:
        raise CatimageError(f"prompt file {path} holds no prompts; put one prompt per line (or row)")
    dupes = len(texts) - skipped_empty - len(out_ids)
    if dupes:
        log.info("%s: dropped %d duplicate prompt(s)", path, dupes)
    return pa.table({"prompt_id": out_ids, "prompt": out_texts}, schema=PROMPTS_SCHEMA)


def _read_prompt_file(path: Path) -> pa.Table:
    """The file as a table, by suffix; errors say which file types are read."""
    if not path.is_file():
        raise CatimageError(f"prompt file {path} does not exist; pass --prompts PATH ({PROMPT_FILE_TYPES})")
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path], pa.Table]] = {
        ".txt": _read_prompt_lines,
        ".csv": pacsv.read_csv,
        ".tsv": lambda p: pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False)),
        ".parquet": pq.read_table,
        ".pq": pq.read_table,
        ".jsonl": pajson.read_json,
        ".ndjson": pajson.read_json,
    }
    if suffix not in readers:
        raise CatimageError(f"{path}: unknown prompt file type {suffix!r}; use {PROMPT_FILE_TYPES}")
    try:
        return readers[suffix](path)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        if "Empty CSV file" in str(err) or path.stat().st_size == 0:
            raise CatimageError(f"prompt file {path} is empty; put one prompt per line (or row)") from None
        raise CatimageError(f"cannot read prompts from {path}: {err}") from None


def _read_prompt_lines(path: Path) -> pa.Table:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return pa.table({"prompt": pa.array([line for line in lines if line], pa.string())})


def _prompt_texts(raw: pa.Table, path: Path) -> list[str | None]:
    """The prompt column, stripped (None stays None: an empty prompt is skipped later)."""
    text_col = next((c for c in ("prompt", "Prompt", "text") if c in raw.column_names), None)
    if text_col is None:
        raise CatimageError(
            f"{path} has no prompt column (columns: {raw.column_names}); name the column `prompt` "
            "(or `Prompt` as in PartiPrompts)"
        )
    return [None if t is None else str(t).strip() for t in raw.column(text_col).to_pylist()]


def _given_prompt_ids(raw: pa.Table, path: Path) -> list[str] | None:
    """The file's own ids (a `prompt_id` or `id` column), or None when ids come from the text."""
    id_col = next((c for c in ("prompt_id", "id") if c in raw.column_names), None)
    if id_col is None:
        return None
    ids = raw.column(id_col).to_pylist()
    if any(i is None or str(i).strip() == "" for i in ids):
        raise CatimageError(
            f"{path}: column {id_col!r} has empty values; fill them, or drop the column to derive ids "
            "from the prompt text"
        )
    return [str(i).strip() for i in ids]


def _unique_prompts(
    ids: list[str] | None, texts: list[str | None], path: Path
) -> tuple[list[str], list[str], int]:
    """(ids, texts, empty prompts skipped): the first row of each id; a given id used for two
    different prompts is an error, a repeated text without given ids is a duplicate."""
    out_ids: list[str] = []
    out_texts: list[str] = []
    seen: dict[str, str] = {}
    skipped_empty = 0
    for pid, text in zip(ids if ids is not None else [None] * len(texts), texts):
        if not text:
            skipped_empty += 1
            continue
        pid = pid if pid is not None else stable_prompt_id(text)
        if pid in seen:
            if seen[pid] != text and ids is not None:
                raise CatimageError(
                    f"{path}: prompt id {pid!r} is used for two different prompts ({seen[pid]!r} and {text!r}); "
                    "ids must be unique"
                )
            continue
        seen[pid] = text
        out_ids.append(pid)
        out_texts.append(text)
    return out_ids, out_texts, skipped_empty


def expand_work(prompts: pa.Table, candidates: Sequence[str], seeds: int) -> pa.Table:
    """Every (prompt, candidate, seed index) to build: candidate-major, then prompt, then seed."""
    if seeds < 1:
        raise CatimageError(f"seeds must be >= 1, got {seeds}")
    if not candidates:
        raise CatimageError("no candidates to build")
    n = prompts.num_rows
    pids = np.asarray(prompts.column("prompt_id").to_pylist(), dtype=object)
    texts = np.asarray(prompts.column("prompt").to_pylist(), dtype=object)
    per_cand = n * seeds
    return pa.table(
        {
            "prompt_id": np.tile(np.repeat(pids, seeds), len(candidates)).tolist(),
            "prompt": np.tile(np.repeat(texts, seeds), len(candidates)).tolist(),
            "candidate": np.repeat(np.asarray(list(candidates), dtype=object), per_cand).tolist(),
            "seed": np.tile(np.arange(seeds, dtype=np.int64), n * len(candidates)),
        },
        schema=WORK_SCHEMA,
    )


def keys_of(table: pa.Table) -> list[Key]:
    """The (prompt_id, candidate, seed) key of each row, in order."""
    return list(
        zip(
            table.column("prompt_id").to_pylist(),
            table.column("candidate").to_pylist(),
            (int(s) for s in table.column("seed").to_pylist()),
        )
    )


def pending(work: pa.Table, done: set[Key]) -> pa.Table:
    """The rows of `work` whose key is not in `done` (order kept)."""
    if not done:
        return work
    mask = pa.array([k not in done for k in keys_of(work)], pa.bool_())
    return work.filter(mask)


# ------------------------------------------------------------------------------- parts & merge


def new_run_dir(output: str | Path, run_id: str | None = None) -> Path:
    """A fresh, not yet existing folder ``OUTPUT/parts/run-<UTC time>-<random>`` (sortable by start)."""
    run_id = run_id or f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{secrets.token_hex(3)}"
    path = Path(output) / PARTS_DIR / f"run-{run_id}"
    if path.exists():
        raise CatimageError(f"run folder {path} already exists; pick another run id")
    return path


def part_files(output: str | Path) -> list[Path]:
    """All part files, oldest run first (then by file name), so "first" means "earliest written"."""
    root = Path(output) / PARTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("run-*/**/*.parquet") if p.is_file())


def read_parts(output: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The union of every readable part file (columns unified; a missing column reads as null).

    `columns` limits what is read (resuming a large build only needs keys, errors and metrics).
    A file that cannot be read (a run killed mid-write leaves a truncated file without a footer)
    is skipped with a warning: its rows were never complete, so a later run regenerates them.
    """
    tables = []
    for path in part_files(output):
        try:
            if columns is None:
                tables.append(pq.read_table(path))
            else:
                present = set(pq.read_schema(path).names)
                tables.append(pq.read_table(path, columns=[c for c in columns if c in present]))
        except (pa.ArrowInvalid, OSError) as err:
            log.warning("skipping unreadable part %s (a run was probably killed while writing it): %s", path, err)
    if not tables:
        return RAW_SCHEMA.empty_table()
    tables = [_normalise_raw(t) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


def _normalise_raw(table: pa.Table) -> pa.Table:
    """Cast known columns to their types and add missing ones as nulls, so parts always concatenate."""
    for field in RAW_SCHEMA:
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                table = table.set_column(table.column_names.index(field.name), field.name, pc.cast(col, field.type))
        else:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def complete_mask(raw: pa.Table, metrics: Sequence[str]) -> np.ndarray:
    """Rows with no error and a finite value for every metric in `metrics`."""
    ok = np.asarray(raw.column("error").is_null().to_pylist(), dtype=bool) if raw.num_rows else np.zeros(0, bool)
    for name in metrics:
        if name not in raw.column_names:
            return np.zeros(raw.num_rows, dtype=bool)
        vals = raw.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        ok &= np.isfinite(vals)
    return ok


def done_keys(output: str | Path, metrics: Sequence[str]) -> set[Key]:
    """Keys that previous runs completed (no error, every metric of `metrics` present)."""
    raw = read_parts(output, columns=[*KEY_COLUMNS, "error", *metrics])
    if raw.num_rows == 0:
        return set()
    mask = complete_mask(raw, metrics)
    return set(keys_of(raw.filter(pa.array(mask))))


def _first_per_key(table: pa.Table) -> pa.Table:
    """Keep the first row of each key (row order = preference order)."""
    if table.num_rows == 0:
        return table
    idx = pa.array(np.arange(table.num_rows, dtype=np.int64))
    firsts = (
        table.select(list(KEY_COLUMNS)).append_column("__i", idx).group_by(list(KEY_COLUMNS), use_threads=False)
        .aggregate([("__i", "min")])
        .column("__i_min")
    )
    order = np.sort(firsts.to_numpy())
    return table.take(pa.array(order))


def consolidate(
    output: str | Path,
    metrics: Sequence[str],
    order: pa.Table | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Rebuild ``quality.parquet`` and ``errors.parquet`` from all parts; return (quality, errors).

    Quality: the first complete row per key across every run (rows of earlier runs and of other
    candidates are kept: the table is the union of everything built into OUTPUT). Rows come in
    the order of `order` (the work table, so pool / prompt / seed order) and then by key.
    Errors: keys with no complete row whose attempts failed: the last error message and the
    attempts summed over runs (rows a run lost to worker crashes are in its parts too: `record_lost`).
    Both files are replaced atomically, so a reader never sees half a table.
    """
    output = Path(output)
    metrics = list(metrics)
    raw = read_parts(output)
    mask = complete_mask(raw, metrics)
    good = _first_per_key(raw.filter(pa.array(mask)))
    done = set(keys_of(good))
    quality = _order_rows(_to_quality(good, metrics), order)

    failed = raw.filter(pa.array(~mask & np.asarray(raw.column("error").is_valid().to_pylist(), dtype=bool)))
    errors = _summarise_errors(failed, done)

    output.mkdir(parents=True, exist_ok=True)
    if quality.num_rows:
        _atomic_write(quality, output / TABLE_FILE)
    elif (output / TABLE_FILE).exists():  # nothing complete any more (metrics changed): do not leave a stale table
        (output / TABLE_FILE).unlink()
    _atomic_write(errors, output / ERRORS_FILE)
    return quality, errors


def _to_quality(good: pa.Table, metrics: list[str]) -> pa.Table:
    cols = ["prompt_id", "prompt", "candidate", "seed"]
    for opt in ("cost", "image_path"):
        if opt in good.column_names and good.column(opt).null_count < good.num_rows:
            cols.append(opt)
    table = good.select(cols + metrics)
    for name in metrics:
        table = table.set_column(table.column_names.index(name), name, pc.cast(table.column(name), pa.float64()))
    return table


def _order_rows(table: pa.Table, order: pa.Table | None) -> pa.Table:
    if table.num_rows == 0:
        return table
    rank: dict[Key, int] = {}
    if order is not None:
        rank = {k: i for i, k in enumerate(keys_of(order))}
    big = len(rank)
    keys = keys_of(table)
    # Rows not in `order` (earlier runs, other candidates) follow, sorted by key.
    tail = sorted((k, i) for i, k in enumerate(keys) if k not in rank)
    tail_rank = {i: big + j for j, (_, i) in enumerate(tail)}
    positions = np.array([rank.get(k, tail_rank.get(i, 0)) for i, k in enumerate(keys)], dtype=np.int64)
    return table.take(pa.array(np.argsort(positions, kind="stable")))


def _summarise_errors(failed: pa.Table, done: set[Key]) -> pa.Table:
    per_key: dict[Key, dict[str, Any]] = {}
    for row in failed.select(ERRORS_SCHEMA.names).to_pylist():
        key = (row["prompt_id"], row["candidate"], int(row["seed"]))
        if key in done:
            continue
        entry = per_key.setdefault(key, {**row, "attempts": 0})
        entry["attempts"] += int(row["attempts"] or 1)
        entry["error"] = row["error"]  # the latest run's message
    rows = list(per_key.values())
    if not rows:
        return ERRORS_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


LOST_FILE = "lost.parquet"


def record_lost(attempted: pa.Table, run_dir: Path, reason: str) -> int:
    """Write the rows of `attempted` that this run's parts do not mention at all (their block failed
    past Ray's retries, e.g. a worker that kept crashing) into ``run_dir/lost.parquet`` as error
    rows, so they reach the errors table instead of vanishing; a later run retries them. Returns
    how many there were.
    """
    seen: set[Key] = set()
    for path in sorted(Path(run_dir).glob("**/*.parquet")):
        try:
            seen.update(keys_of(pq.read_table(path, columns=list(KEY_COLUMNS))))
        except (pa.ArrowInvalid, OSError):
            continue
    lost = pending(attempted.select(WORK_SCHEMA.names), seen)
    if lost.num_rows:
        lost = lost.append_column("error", pa.array([reason] * lost.num_rows, pa.string()))
        lost = lost.append_column("attempts", pa.array([1] * lost.num_rows, pa.int64()))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write(lost, Path(run_dir) / LOST_FILE)
    return lost.num_rows


# ---------------------------------------------------------------------------------- resources

RESOURCE_KEYS = ("CPU", "GPU", "memory")


@dataclass(frozen=True)
class StageDemand:
    """One actor pool of the build plan: what each actor asks Ray for, and how many there are."""

    stage: str  # "generate <candidate>" or "score <metric>"
    actors: int
    cpu: float
    gpu: float
    memory: float  # bytes

    def per_actor(self) -> dict[str, float]:
        return {"CPU": self.cpu, "GPU": self.gpu, "memory": self.memory}


def build_demand(pool: Pool) -> list[StageDemand]:
    """Every actor pool the build starts, from the pool's `build:` blocks and metric specs.

    Ray Data starts every pool's actors when the run starts (fixed-size pools), so the plan needs
    their sum at once; a pool whose actors cannot all be placed waits forever.
    """
    stages = [
        StageDemand(f"generate {c.name}", c.build.concurrency, c.build.num_cpus, c.build.num_gpus,
                    float(c.build.memory or 0))
        for c in pool.candidates
    ]
    stages += [StageDemand(f"score {m.name}", m.concurrency, m.num_cpus, m.num_gpus, float(m.memory or 0))
               for m in pool.metrics]
    return stages


def missing_resources(
    stages: Sequence[StageDemand], cluster: dict[str, float], largest_node: dict[str, float]
) -> list[str]:
    """What the cluster lacks to run every stage at once, in words; empty when it fits.

    Two checks: the sum over all actors against the cluster's totals, and each single actor
    against the largest node (an actor never spans nodes). Both are necessary, not sufficient:
    packing actors onto nodes can still fail, which Ray then reports as pending.
    """
    problems = []
    for key in RESOURCE_KEYS:
        need = sum(s.actors * s.per_actor()[key] for s in stages)
        have = float(cluster.get(key, 0.0))
        if need > have + 1e-9:
            problems.append(f"{_amount(key, need)} in all, the cluster has {_amount(key, have)}")
    for s in stages:
        too_big = [k for k in RESOURCE_KEYS if s.per_actor()[k] > float(largest_node.get(k, 0.0)) + 1e-9]
        if too_big:
            asks = ", ".join(_amount(k, s.per_actor()[k]) for k in too_big)
            offers = ", ".join(_amount(k, float(largest_node.get(k, 0.0))) for k in too_big)
            problems.append(f"one `{s.stage}` actor asks {asks}, the largest node has {offers}")
    return problems


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.3g} GiB memory"
    return f"{value:g} {key}"


def describe_demand(stages: Sequence[StageDemand]) -> str:
    """One line per stage: `generate sdxl-20: 1 x (4 CPU, 1 GPU, 12 GiB memory)`."""
    lines = []
    for s in stages:
        parts = [_amount(k, v) for k, v in s.per_actor().items() if v > 0] or ["nothing"]
        lines.append(f"{s.stage}: {s.actors} x ({', '.join(parts)})")
    return "; ".join(lines)


# ------------------------------------------------------------------------- per-batch work (actors)


def encode_image(image: Any, fmt: Literal["png", "webp"] = "png") -> bytes:
    """PIL image -> PNG (or lossless WebP) bytes: what travels between pipeline stages, never pixels."""
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", lossless=True)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> Any:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


class ImageSink:
    """Writes images under a local folder or a URI (``s3://``, ``gs://``, ``file://``; via pyarrow.fs).

    The path stored in the table's `image_path` is absolute (local) or the full URI, so it stays
    valid wherever the table is read.
    """

    def __init__(self, root: str, fmt: Literal["png", "webp"] = "png") -> None:
        self.fmt = fmt
        if "://" in root:
            self.root = root.rstrip("/")
            self._fs, self._base = pafs.FileSystem.from_uri(self.root)
        else:
            self.root = str(Path(root).expanduser().resolve())
            self._fs, self._base = pafs.LocalFileSystem(), self.root

    def save(self, candidate: str, prompt_id: str, seed: int, png: bytes) -> str:
        """Store one image (PNG bytes in; converted to WebP if asked) and return where it went."""
        data = png if self.fmt == "png" else encode_image(decode_image(png), "webp")
        folder, name = _safe(candidate), f"{_safe(prompt_id)}-{seed}.{self.fmt}"
        self._fs.create_dir(f"{self._base}/{folder}", recursive=True)
        with self._fs.open_output_stream(f"{self._base}/{folder}/{name}") as fh:
            fh.write(data)
        return f"{self.root}/{folder}/{name}"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _err(stage: str, exc: BaseException) -> str:
    tail = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{stage}: {tail}"[:2000]


def _with_retries(fn: Callable[[list[int]], Any], n: int, max_retries: int, stage: str):
    """Run `fn` on all indices at once; if that raises, retry each index alone.

    Each row gets 1 + `max_retries` solo tries after its batch failed (a batch of one counts its
    batch try as the first solo try), so one bad row costs only itself, never its batch-mates.
    Returns (results, errors, attempts, seconds) per index; `attempts` counts the batch try too.
    """
    results: list[Any] = [None] * n
    t0 = time.perf_counter()
    try:
        out = list(fn(list(range(n))))
        if len(out) != n:
            raise RuntimeError(f"returned {len(out)} results for {n} inputs")
        dt = (time.perf_counter() - t0) / max(n, 1)
        return out, [None] * n, [1] * n, [dt] * n
    except Exception as exc:  # noqa: BLE001 - any failure of model code is isolated per row
        first_error = _err(stage, exc)
        if n > 1:
            log.warning("%s failed for a batch of %d (%s); retrying row by row", stage, n, exc)
    errors: list[str | None] = [first_error] * n
    attempts = [1] * n
    seconds = [0.0] * n
    solo_tries = max_retries if n == 1 else 1 + max_retries
    for i in range(n):
        for _ in range(solo_tries):
            attempts[i] += 1
            t0 = time.perf_counter()
            try:
                out = list(fn([i]))
                if len(out) != 1:
                    raise RuntimeError(f"returned {len(out)} results for 1 input")
            except Exception as exc:  # noqa: BLE001
                errors[i] = _err(stage, exc)
                continue
            results[i], seconds[i], errors[i] = out[0], time.perf_counter() - t0, None
            break
    return results, errors, attempts, seconds


def generate_batch(
    generator: Generator,
    batch: pa.Table,
    *,
    seed_fn: Callable[[str, int], int],
    max_retries: int = 2,
    measure_cost: bool = False,
    sink: ImageSink | None = None,
) -> pa.Table:
    """Generate one batch of work rows: the raw columns plus `image` (PNG bytes, null on failure).

    Failing rows get `error` and `attempts` instead of being dropped; `cost` holds measured
    seconds per image when `measure_cost`.
    """
    pids = batch.column("prompt_id").to_pylist()
    prompts = batch.column("prompt").to_pylist()
    cands = batch.column("candidate").to_pylist()
    seeds = [int(s) for s in batch.column("seed").to_pylist()]
    gen_seeds = [int(seed_fn(p, s)) for p, s in zip(pids, seeds)]

    def run(idx: list[int]) -> list[bytes]:
        images = generator.generate([prompts[i] for i in idx], [gen_seeds[i] for i in idx])
        return [encode_image(img, "png") for img in images]

    images, errors, attempts, seconds = _with_retries(run, len(pids), max_retries, "generate")
    paths: list[str | None] = [None] * len(pids)
    if sink is not None:
        for i, data in enumerate(images):
            if data is None:
                continue
            try:
                paths[i] = sink.save(cands[i], pids[i], seeds[i], data)
            except Exception as exc:  # noqa: BLE001 - a full disk must not lose the whole batch silently
                errors[i], images[i] = _err("save image", exc), None
    cost = [s if (measure_cost and e is None) else None for s, e in zip(seconds, errors)]
    out = pa.table(
        {
            "prompt_id": pa.array(pids, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "candidate": pa.array(cands, pa.string()),
            "seed": pa.array(seeds, pa.int64()),
            "cost": pa.array(cost, pa.float64()),
            "image_path": pa.array(paths, pa.string()),
            "error": pa.array(errors, pa.string()),
            "attempts": pa.array(attempts, pa.int64()),
            IMAGE_COLUMN: pa.array(images, pa.binary()),
        }
    )
    return out


def score_batch(scorer: Scorer, batch: pa.Table, *, name: str, max_retries: int = 2) -> pa.Table:
    """Add column `name` (float64) to a generated batch; rows already failed stay NaN.

    A scorer failure is routed like a generation failure: the row gets `error` ("score <name>:
    ...") and lands in the errors table.
    """
    n = batch.num_rows
    errors = batch.column("error").to_pylist()
    attempts = batch.column("attempts").to_pylist()
    live = [i for i in range(n) if errors[i] is None]
    values = np.full(n, np.nan)
    if live:
        prompts = batch.column("prompt").to_pylist()
        blobs = batch.column(IMAGE_COLUMN).to_pylist()

        def run(idx: list[int]) -> list[float]:
            rows = [live[i] for i in idx]
            scores = np.asarray(
                scorer.score([prompts[r] for r in rows], [decode_image(blobs[r]) for r in rows]), dtype=np.float64
            ).reshape(-1)
            if not np.isfinite(scores).all():
                raise ValueError(f"scorer returned non-finite values {scores.tolist()}")
            return scores.tolist()

        res, errs, tries, _ = _with_retries(run, len(live), max_retries, f"score {name}")
        for j, r in enumerate(live):
            if errs[j] is None:
                values[r] = res[j]
            else:
                errors[r] = errs[j]
                attempts[r] = max(int(attempts[r] or 1), tries[j])
    out = batch.set_column(batch.column_names.index("error"), "error", pa.array(errors, pa.string()))
    out = out.set_column(out.column_names.index("attempts"), "attempts", pa.array(attempts, pa.int64()))
    col = pa.array(values, pa.float64())
    if name in out.column_names:
        return out.set_column(out.column_names.index(name), name, col)
    return out.append_column(name, col)


class GenerateStage:
    """Actor-pool UDF for Ray Data: loads one candidate's pipeline once, then turns work rows into PNG bytes.

    It lives here, not in `jobs/`, because Ray pickles it by reference: workers must import it from
    the installed `catimage` package. It needs no Ray import itself.
    """

    def __init__(
        self,
        spec: GeneratorSpec,
        device: str | None,
        max_retries: int,
        measure_cost: bool,
        image_root: str | None,
        image_format: str,
        factory: Callable[..., Generator] | None = None,
        seed_fn: Callable[[str, int], int] | None = None,
    ) -> None:
        if factory is None:
            from catimage.generators import make_generator as factory
        if seed_fn is None:
            from catimage.generators import generation_seed as seed_fn
        self._generator = factory(spec, device=device)
        self._seed_fn = seed_fn
        self._max_retries = max_retries
        self._measure_cost = measure_cost
        self._sink = ImageSink(image_root, image_format) if image_root else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return generate_batch(
            self._generator,
            batch,
            seed_fn=self._seed_fn,
            max_retries=self._max_retries,
            measure_cost=self._measure_cost,
            sink=self._sink,
        )


class ScoreStage:
    """Actor-pool UDF: loads one scorer once and adds its column; the last one drops the image bytes."""

    def __init__(
        self,
        spec: MetricSpec,
        device: str | None,
        max_retries: int,
        drop_image: bool,
        factory: Callable[..., Scorer] | None = None,
    ) -> None:
        if factory is None:
            from catimage.metrics import make_scorer as factory
        self._scorer = factory(spec, device=device)
        self._name = spec.name
        self._max_retries = max_retries
        self._drop_image = drop_image

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = score_batch(self._scorer, batch, name=self._name, max_retries=self._max_retries)
        return out.drop_columns([IMAGE_COLUMN]) if self._drop_image else out


def split_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Cut a table into blocks of `rows` rows (one generator batch each, so actors share the work)."""
    rows = max(int(rows), 1)
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def write_run_manifest(run_dir: Path, config: BuildConfig, metrics: Iterable[str], attempted: int) -> None:
    """A small JSON beside a run's parts saying what the run was asked to do (for humans and audits)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.json").write_text(
        json.dumps(
            {"config": config.model_dump(mode="json"), "metrics": list(metrics), "attempted": attempted}, indent=2
        )
    )
