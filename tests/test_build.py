"""The quality-table build: pure helpers (prompt reading, work keys, merge of runs, per-row retries)
and the Ray Data job end to end on the tiny pool (acceptance size, a SIGKILL mid-run, a failing prompt).

The in-process builds share one local Ray for the module (conftest's `ray_local`, 2 CPUs): `run_build`
uses a running Ray and never shuts it down, and each build is its own Ray Data job that releases its
actors when it ends, so no test depends on another's state. Only the build that is SIGKILLed runs in
a subprocess with its own Ray (that is what it kills).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catimage.errors import CatimageError
from catimage.tables.build import (
    ERRORS_FILE,
    TABLE_FILE,
    BuildConfig,
    ImageSink,
    consolidate,
    decode_image,
    done_keys,
    expand_work,
    generate_batch,
    keys_of,
    new_run_dir,
    pending,
    read_prompts,
    record_lost,
    score_batch,
)
from catimage.tables.table import read_quality_table, stable_prompt_id

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `jobs/` is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))
# Imported here, not inside a test: Ray binds its log handler to the sys.stderr of its first import,
# and one taken while `capsys` is active is closed by the next test ("I/O operation on closed file").
from jobs.build_dataset import check_cluster_fits, ray_session, run_build
from jobs.build_dataset import main as build_main

TINY_POOL = ROOT / "configs" / "tiny_pool.yaml"
MARKER = "PLANTED-FAILURE"
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
THINGS = ["cat", "dog", "car", "house", "tree", "boat", "bird", "chair"]


def make_prompts(n: int) -> list[str]:
    out = [f"a {c} {t}" for t in THINGS for c in COLORS][:n]
    assert len(out) == n
    return out


# ------------------------------------------------------------------------------- read_prompts


def test_read_prompts_txt_strips_skips_blanks_and_dedupes(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n\n  a blue dog  \na red cat\na  red   cat\n")
    t = read_prompts(path)
    assert t.column_names == ["prompt_id", "prompt"]
    # "a  red   cat" collapses to the same stable id as "a red cat" and is a duplicate.
    assert t.column("prompt").to_pylist() == ["a red cat", "a blue dog"]
    assert t.column("prompt_id").to_pylist() == [stable_prompt_id("a red cat"), stable_prompt_id("a blue dog")]


def test_read_prompts_csv_tsv_parquet_jsonl(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text('prompt_id,prompt\nx1,"a cat, sitting"\nx2,a dog\n')
    t = read_prompts(tmp_path / "p.csv")
    assert t.column("prompt_id").to_pylist() == ["x1", "x2"]
    assert t.column("prompt").to_pylist() == ["a cat, sitting", "a dog"]

    # PartiPrompts style: `Prompt` column, tab separated, quotes inside text are literal.
    (tmp_path / "parti.tsv").write_text(
        'Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n'
        'The words "Fly" on a wall\tOutdoor\tComplex\t\n"quoted" start\tArts\tBasic\t\n'
    )
    t = read_prompts(tmp_path / "parti.tsv")
    assert t.column("prompt").to_pylist() == ["bond", 'The words "Fly" on a wall', '"quoted" start']
    assert t.column("prompt_id").to_pylist()[0] == stable_prompt_id("bond")

    pq.write_table(pa.table({"prompt": ["p one", "p two", "p one"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet").column("prompt").to_pylist() == ["p one", "p two"]

    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"id": 7, "prompt": "seven"}, {"id": 8, "prompt": "eight"}]) + "\n"
    )
    t = read_prompts(tmp_path / "p.jsonl")
    assert t.column("prompt_id").to_pylist() == ["7", "8"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "holds no prompts"),
        ("blank.txt", "\n  \n", "holds no prompts"),
        ("empty.csv", "", "is empty"),
        ("nocol.csv", "text_x,other\na,b\n", "no prompt column"),
        ("p.yaml", "prompt: a", "unknown prompt file type"),
        ("ids.csv", "prompt_id,prompt\n1,a\n1,b\n", "used for two different prompts"),
        ("holes.csv", "prompt_id,prompt\n1,a\n,b\n", "has empty values"),
    ],
)
def test_read_prompts_errors_say_what_to_do(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CatimageError, match=message):
        read_prompts(path)


def test_read_prompts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatimageError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- work and resume


def test_expand_work_and_pending() -> None:
    prompts = pa.table({"prompt_id": ["p1", "p2"], "prompt": ["one", "two"]})
    work = expand_work(prompts, ["A", "B"], seeds=3)
    assert work.num_rows == 12
    keys = keys_of(work)
    assert len(set(keys)) == 12
    assert keys[:4] == [("p1", "A", 0), ("p1", "A", 1), ("p1", "A", 2), ("p2", "A", 0)]
    assert keys[6] == ("p1", "B", 0)
    assert work.column("prompt").to_pylist()[3] == "two"
    left = pending(work, {("p1", "A", 1), ("p2", "B", 2)})
    assert left.num_rows == 10
    assert ("p1", "A", 1) not in set(keys_of(left))
    with pytest.raises(CatimageError):
        expand_work(prompts, ["A"], seeds=0)


def _raw(rows: list[dict]) -> pa.Table:
    base = {"prompt": "text", "cost": None, "image_path": None, "error": None, "attempts": 1, "clip_score": None}
    return pa.Table.from_pylist(
        [{**base, **r} for r in rows],
        schema=pa.schema(
            [
                ("prompt_id", pa.string()),
                ("candidate", pa.string()),
                ("seed", pa.int64()),
                ("sharpness", pa.float64()),
                ("prompt", pa.string()),
                ("cost", pa.float64()),
                ("image_path", pa.string()),
                ("error", pa.string()),
                ("attempts", pa.int64()),
                ("clip_score", pa.float64()),
            ]
        ),
    )


def test_consolidate_unions_runs_keeps_first_complete_row_and_skips_truncated_parts(tmp_path: Path) -> None:
    out = tmp_path / "build"
    run1 = new_run_dir(out, "0001")
    run2 = new_run_dir(out, "0002")
    run1.mkdir(parents=True)
    run2.mkdir(parents=True)
    pq.write_table(
        _raw(
            [
                {"prompt_id": "p1", "candidate": "A", "seed": 0, "sharpness": 1.0, "clip_score": 10.0},
                {"prompt_id": "p1", "candidate": "A", "seed": 1, "error": "generate: boom", "attempts": 3},
                {"prompt_id": "p2", "candidate": "A", "seed": 0, "sharpness": 2.0, "clip_score": None},  # incomplete
                {"prompt_id": "p3", "candidate": "A", "seed": 0, "error": "generate: bad", "attempts": 4},
            ]
        ),
        run1 / "a.parquet",
    )
    pq.write_table(
        _raw(
            [
                {"prompt_id": "p1", "candidate": "A", "seed": 0, "sharpness": 99.0, "clip_score": 99.0},  # duplicate
                {"prompt_id": "p1", "candidate": "A", "seed": 1, "sharpness": 3.0, "clip_score": 30.0},  # recovered
                {"prompt_id": "p2", "candidate": "A", "seed": 0, "sharpness": 4.0, "clip_score": 40.0},
                {"prompt_id": "p3", "candidate": "A", "seed": 0, "error": "generate: still bad", "attempts": 4},
            ]
        ),
        run2 / "b.parquet",
    )
    # A run killed mid-write leaves a file without a Parquet footer: it must be skipped, not fatal.
    full = (run2 / "b.parquet").read_bytes()
    (run2 / "c.parquet").write_bytes(full[: len(full) // 2])

    assert done_keys(out, ["sharpness", "clip_score"]) == {("p1", "A", 0), ("p1", "A", 1), ("p2", "A", 0)}
    assert done_keys(out, ["sharpness", "clip_score", "aesthetic"]) == set()  # a new metric: nothing complete

    order = pa.table(
        {"prompt_id": ["p2", "p1", "p1"], "prompt": ["t"] * 3, "candidate": ["A"] * 3, "seed": [0, 0, 1]}
    ).cast(pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("candidate", pa.string()), ("seed", pa.int64())]))
    quality, errors = consolidate(out, ["sharpness", "clip_score"], order=order)
    assert keys_of(quality) == [("p2", "A", 0), ("p1", "A", 0), ("p1", "A", 1)]  # work order
    assert quality.column("sharpness").to_pylist() == [4.0, 1.0, 3.0]  # first complete row wins (not 99)
    assert "error" not in quality.column_names and "cost" not in quality.column_names  # all-null cost dropped
    assert keys_of(errors) == [("p3", "A", 0)]  # p1/A/1 recovered in run 2, so it is no error
    assert errors.column("attempts").to_pylist() == [8]  # summed over both runs
    assert errors.column("error").to_pylist() == ["generate: still bad"]  # the latest message

    table = read_quality_table(out / TABLE_FILE)
    assert table.num_rows == 3
    assert pq.read_table(out / ERRORS_FILE).num_rows == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rows_a_run_lost_reach_the_errors_table_and_are_retried_later(tmp_path: Path) -> None:
    out = tmp_path / "build"
    work = expand_work(pa.table({"prompt_id": ["p1", "p2"], "prompt": ["one", "two"]}), ["A"], seeds=1)
    run1 = new_run_dir(out, "0001")
    run1.mkdir(parents=True)
    pq.write_table(_raw([{"prompt_id": "p1", "candidate": "A", "seed": 0, "sharpness": 1.0, "clip_score": 1.0}]), run1 / "x.parquet")
    assert record_lost(work, run1, "lost: worker died") == 1  # p2's block never came back
    quality, errors = consolidate(out, ["sharpness", "clip_score"], order=work)
    assert keys_of(quality) == [("p1", "A", 0)]
    assert errors.to_pylist() == [
        {"prompt_id": "p2", "prompt": "two", "candidate": "A", "seed": 0, "error": "lost: worker died", "attempts": 1}
    ]
    assert pending(work, done_keys(out, ["sharpness", "clip_score"])).num_rows == 1  # the next run retries p2
    run2 = new_run_dir(out, "0002")
    run2.mkdir(parents=True)
    pq.write_table(_raw([{"prompt_id": "p2", "candidate": "A", "seed": 0, "sharpness": 2.0, "clip_score": 2.0}]), run2 / "y.parquet")
    assert record_lost(work.slice(1), run2, "lost") == 0
    quality, errors = consolidate(out, ["sharpness", "clip_score"], order=work)
    assert quality.num_rows == 2 and errors.num_rows == 0


def test_new_run_dir_is_fresh(tmp_path: Path) -> None:
    a, b = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "parts"
    a.mkdir(parents=True)
    with pytest.raises(CatimageError):
        new_run_dir(tmp_path, a.name.removeprefix("run-"))


# ------------------------------------------------------------------------ per-batch retries


class SolidColour:
    """A real (if trivial) generator: a solid image whose colour encodes the seed; raises for MARKER
    prompts, and once for prompts containing 'flaky' (then works)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.flaked: set[str] = set()

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        self.calls.append(len(prompts))
        for p in prompts:
            if MARKER in p:
                raise RuntimeError(f"cannot draw {p!r}")
            if "flaky" in p and p not in self.flaked:
                self.flaked.add(p)
                raise RuntimeError("transient")
        return [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]


class RedMean:
    name = "redness"

    def score(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        if any("unscorable" in p for p in prompts):
            raise ValueError("scorer refused")
        return np.array([np.asarray(im)[..., 0].mean() for im in images], dtype=np.float64)


def _work(prompts: list[str], seeds: int = 1) -> pa.Table:
    t = pa.table({"prompt_id": [stable_prompt_id(p) for p in prompts], "prompt": prompts})
    return expand_work(t, ["A"], seeds)


def test_generate_batch_isolates_a_failing_row_and_retries_transient_ones() -> None:
    gen = SolidColour()
    batch = _work(["ok one", f"bad {MARKER}", "flaky two", "ok three"])
    out = generate_batch(gen, batch, seed_fn=lambda pid, s: 40 + len(pid) + s, max_retries=2, measure_cost=True)
    errors = out.column("error").to_pylist()
    attempts = out.column("attempts").to_pylist()
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert errors[1].startswith("generate: RuntimeError: cannot draw")
    # batch try + (1 + max_retries) solo tries for the bad row; the flaky one fails its first solo try
    # (the batch broke at the bad row before reaching it) and recovers on the retry
    assert attempts == [2, 4, 3, 2]
    assert gen.calls == [4, 1, 1, 1, 1, 1, 1, 1]  # the batch, then ok, bad x3, flaky x2, ok
    img = decode_image(out.column("image").to_pylist()[0])
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (40 + 16, 0, 0)  # seed_fn reached the generator
    assert out.column("image").to_pylist()[1] is None
    costs = out.column("cost").to_pylist()
    assert costs[1] is None and all(c is not None and c >= 0 for i, c in enumerate(costs) if i != 1)

    scored = score_batch(RedMean(), out, name="redness")
    vals = scored.column("redness").to_pylist()
    assert vals[0] == 56.0 and np.isnan(vals[1])  # a failed row is not scored

    ok = generate_batch(SolidColour(), _work(["p", "q"], seeds=2), seed_fn=lambda pid, s: s)
    assert ok.column("error").null_count == 4 and ok.column("attempts").to_pylist() == [1, 1, 1, 1]
    assert ok.column("cost").null_count == 4  # not measured unless asked


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_generate_batch_saves_images_and_records_their_paths(tmp_path: Path, fmt: str) -> None:
    sink = ImageSink(f"file://{tmp_path}/imgs" if fmt == "webp" else str(tmp_path / "imgs"), fmt)
    out = generate_batch(SolidColour(), _work(["one", f"x {MARKER}"], seeds=1), seed_fn=lambda pid, s: 77, sink=sink)
    paths = out.column("image_path").to_pylist()
    assert paths[1] is None  # nothing drawn, nothing saved
    local = Path(paths[0].removeprefix("file://"))
    assert local.is_file() and local.suffix == f".{fmt}" and local.parent.name == "A"
    with Image.open(local) as img:
        assert img.format == fmt.upper() and img.convert("RGB").getpixel((0, 0)) == (77, 0, 0)  # lossless


def test_score_batch_routes_scorer_failures_to_errors() -> None:
    out = generate_batch(SolidColour(), _work(["fine", "unscorable thing"]), seed_fn=lambda pid, s: 9, max_retries=0)
    scored = score_batch(RedMean(), out, name="redness", max_retries=1)
    assert scored.column("error").to_pylist()[0] is None
    assert scored.column("error").to_pylist()[1].startswith("score redness: ValueError: scorer refused")
    assert scored.column("attempts").to_pylist() == [1, 3]  # the failed row: batch + 2 solo (1 + max_retries)
    assert scored.column("redness").to_pylist()[0] == 9.0


def test_build_config_checks_pool(tmp_path: Path) -> None:
    cfg = BuildConfig(pool=TINY_POOL, prompts=tmp_path / "p.txt", output=tmp_path / "o", candidates=["tiny-sdxl-4", "tiny-sd-2"])
    pool = cfg.load_pool()
    assert pool.names == ["tiny-sd-2", "tiny-sdxl-4"]  # pool order kept
    assert cfg.wants_cost(pool) is False  # the tiny pool declares its costs
    with pytest.raises(CatimageError, match="unknown candidates"):
        BuildConfig(pool=TINY_POOL, prompts="p", output="o", candidates=["nope"]).load_pool()
    nometrics = tmp_path / "pool.yaml"
    nometrics.write_text("cost_unit: seconds\ncandidates:\n  - {name: a, generator: {model: 'tiny:sd'}}\n")
    with pytest.raises(CatimageError, match="declares no `metrics:`"):
        BuildConfig(pool=nometrics, prompts="p", output="o").load_pool()


def test_cli_reports_bad_input_without_starting_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--pool", str(TINY_POOL), "--output", str(tmp_path)]
    assert build_main([*args, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert build_main([*args, "--prompts", "x.txt", "--seeds", "0"]) == 2
    assert "greater than 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------- resources


def test_sdxl_pool_demand_is_what_ray_data_reported_pending() -> None:
    """configs/sdxl_pool.yaml on a GPU-less machine: Ray Data logged "pending: 48 CPU, 11.75 GPU"
    (11 generator pools of 4 CPUs and 1 GPU; 3 GPU scorers of 1 CPU and 0.25 GPU, sharpness 1 CPU)."""
    from catimage.tables.build import build_demand, missing_resources
    from catimage.tables.pool import load_pool

    stages = build_demand(load_pool(ROOT / "configs" / "sdxl_pool.yaml"))
    assert sum(s.actors * s.cpu for s in stages) == 48 and sum(s.actors * s.gpu for s in stages) == 11.75
    node = {"CPU": 2.0, "memory": 16 * 2**30}
    problems = missing_resources(stages, node, node)
    assert "11.75 GPU in all, the cluster has 0 GPU" in problems
    assert "48 CPU in all, the cluster has 2 CPU" in problems
    assert any(p.startswith("one `generate sdxl-euler-1` actor asks 4 CPU, 1 GPU") for p in problems)


def test_a_demand_that_fits_the_cluster_in_all_but_not_on_one_node_is_refused() -> None:
    from catimage.tables.build import StageDemand, missing_resources

    stages = [StageDemand("generate big", 1, 3.0, 0.0, 0.0), StageDemand("score s", 2, 0.5, 0.0, 0.0)]
    two_nodes = {"CPU": 4.0, "GPU": 0.0, "memory": 8 * 2**30}  # 4 CPUs in all ...
    assert missing_resources(stages, two_nodes, {"CPU": 4.0, "memory": 4 * 2**30}) == []
    problems = missing_resources(stages, two_nodes, {"CPU": 2.0, "memory": 4 * 2**30})  # ... but 2 per node
    assert problems == ["one `generate big` actor asks 3 CPU, the largest node has 2 CPU"]


def test_build_memory_per_actor_counts_in_the_demand(tmp_path: Path) -> None:
    from catimage.tables.build import build_demand, missing_resources
    from catimage.tables.pool import load_pool

    pool = load_pool(ROOT / "catimage" / "data" / "world_pool.yaml")
    stages = build_demand(pool)
    per_actor = {s.stage: s.memory for s in stages}
    assert all(per_actor[f"generate {c}"] > 0 for c in pool.names)  # declared: Ray reserves it
    need = sum(s.actors * s.memory for s in stages)
    cluster = {"CPU": 2.0, "memory": need - 1}
    assert [p for p in missing_resources(stages, cluster, cluster) if "memory in all" in p]


@pytest.mark.timeout(180)
def test_a_build_the_local_cluster_cannot_hold_fails_at_once(tmp_path: Path, ray_local) -> None:
    """A real local Ray without a GPU (the module's), a pool asking one GPU: an error saying what is
    missing and what to do, before any actor starts (the same pool used to wait forever)."""
    from catimage.tables.pool import load_pool

    pool = load_pool(small_pool(tmp_path / "pool.yaml", ["tiny-sd-2"]))
    gpu = pool.get("tiny-sd-2").build.model_copy(update={"num_gpus": 1.0})
    pool.model_copy(update={"candidates": [pool.get("tiny-sd-2").model_copy(update={"build": gpu})]}).save(tmp_path / "gpu.yaml")
    prompts = _write_prompts(tmp_path / "prompts.txt", make_prompts(2))
    cfg = BuildConfig(pool=tmp_path / "gpu.yaml", prompts=prompts, output=tmp_path / "out", num_cpus=1)
    with ray_session(cfg):  # the running Ray (ray_local) for both checks
        with pytest.raises(CatimageError) as err:
            run_build(cfg, progress=False)
        # Told that nodes will join, the same check lets the build start (and wait for them).
        check_cluster_fits(cfg.load_pool(), cfg.model_copy(update={"wait_for_resources": True}))
    text = str(err.value)
    assert "1 GPU in all, the cluster has 0 GPU" in text
    assert "generate tiny-sd-2: 1 x (0.25 CPU, 1 GPU" in text and "--wait-for-resources" in text
    assert not list((tmp_path / "out").glob("parts/run-*/*.parquet"))


# -------------------------------------------------------------------------- Ray end to end


def small_pool(path: Path, candidates: list[str], batch_size: int = 4) -> Path:
    """The tiny pool cut to `candidates` and the weight-free `sharpness` metric: fewer actor processes
    to start (each costs seconds of imports on 2 cores), same job."""
    from catimage.tables.pool import load_pool

    pool = load_pool(TINY_POOL).select(candidates)
    cands = [c.model_copy(update={"build": c.build.model_copy(update={"batch_size": batch_size})}) for c in pool.candidates]
    pool.model_copy(update={"candidates": cands, "metrics": [m for m in pool.metrics if m.name == "sharpness"]}).save(path)
    return path


def _write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


class FailOnMarker:
    """The real tiny generator, with a planted failure for prompts containing MARKER."""

    def __init__(self, spec, device=None) -> None:
        from catimage.generators import make_generator

        self.inner = make_generator(spec, device=device)

    def generate(self, prompts, seeds):
        bad = [p for p in prompts if MARKER in p]
        if bad:
            raise RuntimeError(f"planted failure for {bad}")
        return self.inner.generate(prompts, seeds)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_acceptance_tiny_pool_32_prompts_3_candidates_2_seeds(tmp_path: Path, ray_local) -> None:
    prompts = _write_prompts(tmp_path / "prompts.txt", make_prompts(32))
    cfg = BuildConfig(pool=TINY_POOL, prompts=prompts, output=tmp_path / "out", seeds=2, num_cpus=2)
    result = run_build(cfg, progress=False)
    table = read_quality_table(result.table_path)
    keys = keys_of(table)
    assert len(keys) == 192 and len(set(keys)) == 192
    assert set(table.column("candidate").to_pylist()) == {"tiny-sd-2", "tiny-sd-8", "tiny-sdxl-4"}
    for metric in ("sharpness", "clip_score"):
        vals = table.column(metric).to_numpy()
        assert np.isfinite(vals).all() and vals.std() > 0  # real, varying scores
    assert result.errors == 0 and result.written == 192
    # Same seed index -> same generation seed for every candidate, so step variants differ only in steps.
    again = run_build(cfg, progress=False)  # resumable: nothing left to attempt
    assert again.attempted == 0 and again.table_rows == 192
    print(f"acceptance build: {result.seconds:.1f} s for 192 images")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigkill_mid_run_then_rerun_gives_every_key_once(tmp_path: Path, ray_local) -> None:
    prompts = _write_prompts(tmp_path / "prompts.txt", make_prompts(16))
    # one candidate and sharpness: 2 actors to start per run; 16 blocks of 2 rows, so output trickles
    pool = small_pool(tmp_path / "pool.yaml", ["tiny-sd-8"], batch_size=2)
    out = tmp_path / "out"
    args = ["--pool", str(pool), "--prompts", str(prompts), "--output", str(out), "--seeds", "2", "--num-cpus", "2",
            "--no-progress"]
    cmd = [sys.executable, str(ROOT / "jobs" / "build_dataset.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, the one the SIGKILL takes down
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done_keys(out, ["sharpness"]):  # some complete, readable output exists
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed; use more prompts"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / TABLE_FILE).exists()  # killed before consolidation
    partial = done_keys(out, ["sharpness"])
    assert 0 < len(partial) < 32, f"the kill came too late to test resuming ({len(partial)} of 32 rows done)"

    # The rerun: the same command line through the job's entry point, on the module's running Ray
    # (a fresh interpreter and a second Ray start would only cost time; resuming is run_build's).
    assert build_main(args) == 0
    table = read_quality_table(out / TABLE_FILE)
    keys = keys_of(table)
    full = set(keys_of(expand_work(read_prompts(prompts), ["tiny-sd-8"], 2)))
    assert len(keys) == len(set(keys)) == 32
    assert set(keys) == full
    assert partial < set(keys)
    assert len(list((out / "parts").glob("run-*"))) == 4  # two run folders + their manifests: nothing overwritten
    assert pq.read_table(out / ERRORS_FILE).num_rows == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_prompt_lands_in_errors_table(tmp_path: Path, ray_local) -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    bad = f"a {MARKER} prompt"
    prompts = _write_prompts(tmp_path / "p.txt", make_prompts(4) + [bad])
    pool = small_pool(tmp_path / "pool.yaml", ["tiny-sd-2"], batch_size=8)
    cfg = BuildConfig(
        pool=pool, prompts=prompts, output=tmp_path / "out", num_cpus=2, max_retries=1, save_images="webp", measure_cost=True
    )
    result = run_build(cfg, generator_factory=FailOnMarker, progress=False)
    assert result.errors == 1 and result.table_rows == 4
    table = read_quality_table(result.table_path)
    for path in table.column("image_path").to_pylist():  # saved by the actors, path in the table
        with Image.open(path) as img:
            assert img.format == "WEBP" and img.size == (64, 64)
    assert (table.column("cost").to_numpy() > 0).all()  # measured seconds per image
    errors = pq.read_table(tmp_path / "out" / ERRORS_FILE).to_pylist()
    assert errors[0]["prompt_id"] == stable_prompt_id(bad) and errors[0]["candidate"] == "tiny-sd-2"
    assert errors[0]["error"].startswith("generate: RuntimeError: planted failure")
    assert errors[0]["attempts"] == 3  # the batch of 5, then 1 + max_retries solo tries
    assert stable_prompt_id(bad) not in set(read_quality_table(result.table_path).column("prompt_id").to_pylist())
