"""report.html: escaping, self-containment, tolerance of partial reports, gallery building, and one
real-browser check (headless Chromium screenshots a page with planted solid-colour images).

Expected pixel geometry comes from the planted images and the page's CSS contract, written out
here by hand: every gallery image sits in a 128 x 128 px box (object-fit: contain, so a 64 x 32
image fills 128 x 64), and each budget that chose a cell adds a 5 px ring around that box, the
first budget's ring innermost, in Okabe-Ito orange #E69F00 then bluish green #009E73.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catimage.errors import CatimageError
from catimage.evaluation.gallery import (
    Budget,
    Gallery,
    GalleryCell,
    GalleryRow,
    PlanTrace,
    TraceAttempt,
    gallery_from_predictions,
    gallery_from_report,
    gallery_from_router,
    plan_traces,
    report_test_prompt_ids,
    table_images,
)
from catimage.evaluation.html import render_html, write_html_report

BOX = 128  # CSS box of a gallery image (px)
RING = 5  # one budget's ring (px)
ORANGE, GREEN = (0xE6, 0x9F, 0x00), (0x00, 0x9E, 0x73)
ACCENT = (0x0B, 0x5C, 0xAD)  # the ring of the image a plan returned
RED, BLUE, MAGENTA, CYAN = (255, 0, 0), (0, 0, 255), (255, 0, 255), (0, 255, 255)
YELLOW, PURPLE = (255, 255, 0), (128, 0, 128)


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def checkerboard(n: int = 8) -> bytes:
    """n x n one-pixel black/white squares, black at (0, 0)."""
    arr = ((np.add.outer(np.arange(n), np.arange(n)) % 2) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([arr] * 3, axis=-1)).save(buf, format="PNG")
    return buf.getvalue()


class Collect(HTMLParser):
    """Every tag and attribute of a page, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = Collect()
    collector.feed(page)
    return collector.tags


def planted_gallery() -> Gallery:
    """Row A: red (cheap) chosen at the tight budget, blue (mid) at the loose one, a checkerboard (dear).
    Row B: magenta (cheap) chosen at both budgets, a 64 x 32 cyan (mid), no image (dear)."""
    cands = ["cheap", "mid", "dear"]
    row_a = GalleryRow(
        "a red square",
        (GalleryCell("cheap", png(RED, (32, 32)), 0.7, 0.61),
         GalleryCell("mid", png(BLUE, (32, 32)), 0.8, 0.74),
         GalleryCell("dear", checkerboard(8), 0.9, 0.72)),
        {"tight": "cheap", "loose": "mid"}, "pa",
    )
    row_b = GalleryRow(
        "a magenta square",
        (GalleryCell("cheap", png(MAGENTA, (16, 16)), 0.5, 0.55),
         GalleryCell("mid", png(CYAN, (64, 32)), 0.4, 0.41),
         GalleryCell("dear", None, None, 0.30)),
        {"tight": "cheap", "loose": "cheap"}, "pb",
    )
    return Gallery(cands, [row_a, row_b], [Budget("tight", 1.5, 0.2), Budget("loose", 3.0, 0.0)],
                   costs=[1.0, 2.0, 4.0], metric="clip_score", cost_unit="tflops")


MINIMAL_REPORT = {"meta": {"metric": "clip_score", "cost_unit": "tflops", "notes": ["Costs are ASSUMED."]},
                  "summary": {"best_fixed": "dear"}}


# --- fast checks -----------------------------------------------------------------------------------


def test_hostile_text_is_escaped_everywhere() -> None:
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    gallery = Gallery(
        ["a"], [GalleryRow(evil, (GalleryCell("a", png(RED, (4, 4)), 0.5, 0.5),), {evil[:10]: "a"}, evil)],
        [Budget(evil[:10])],
    )
    report = {"meta": {"notes": [evil], "metric": evil, "estimator": evil},
              "summary": {"best_fixed": evil, "trials": {"n": 2, evil: 1.0}},
              "fixed": [{"candidate": evil, "cost": 1.0, "quality": 0.5}]}
    page = render_html(report, gallery)
    tags = parse(page)
    assert "script" not in {t for t, _ in tags}
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in tags if t == "img")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_page_is_self_contained(tmp_path: Path) -> None:
    path = write_html_report(MINIMAL_REPORT, tmp_path, planted_gallery(), plot=png((9, 9, 9), (20, 10)))
    page = path.read_text()
    tags = parse(page)
    refs = [(t, k, v) for t, attrs in tags for k, v in attrs.items() if k in ("src", "href", "srcset", "poster", "data")]
    assert refs and all(v.startswith("data:") for _, _, v in refs), refs
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert "url(" not in page and "@import" not in page
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    # 1 plot + 5 planted images (the sixth cell has none); each decodes to the planted pixels
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == 6
    decoded = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).convert("RGB") for s in imgs]
    assert [im.size for im in decoded] == [(20, 10), (32, 32), (32, 32), (8, 8), (16, 16), (64, 32)]
    assert decoded[1].getpixel((5, 5)) == RED and decoded[5].getpixel((63, 31)) == CYAN
    assert page.count("no image") == 1


def test_large_images_are_downscaled_before_embedding(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (1000, 500), (10, 200, 30)).save(big)
    gallery = Gallery(["a"], [GalleryRow("p", (GalleryCell("a", big, 1.0, 1.0),), {})], [])
    srcs = [a["src"] for t, a in parse(render_html({}, gallery)) if t == "img"]
    assert len(srcs) == 1 and srcs[0].startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert im.size == (320, 160)


@pytest.mark.parametrize(
    "report",
    [{}, {"summary": {}}, MINIMAL_REPORT,
     {"summary": {"best_fixed": "x", "cost_ratio_or_miss": 1.0, "missed_best_fixed": True, "oracle_gain_fraction": float("nan"),
                  "trials": {"n": 3}, "bootstrap_gain_ci": [0.1, 0.25], "new_figure": {"deep": [1, 2, 3]}},
      "fixed": [{"candidate": "x", "cost": 1.0}], "hull": [], "router": []}],
)
def test_partial_reports_do_not_crash(tmp_path: Path, report: dict) -> None:
    page = write_html_report(report, tmp_path).read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    if "bootstrap_gain_ci" in report.get("summary", {}):
        assert "bootstrap_gain_ci" in page and "[0.1, 0.25]" in page  # unknown keys still shown
        assert "never reaches" in page  # cost ratio None


def _table(tmp_path: Path) -> pa.Table:
    """2 prompts x 2 candidates x 2 seeds; only seed 1 of (p1, a) has an image."""
    img = tmp_path / "p1-a-1.png"
    img.write_bytes(png(RED, (8, 8)))
    return pa.table({
        "prompt_id": ["p1", "p1", "p1", "p1", "p2", "p2", "p2", "p2"],
        "prompt": ["one", "one", "one", "one", "two", "two", "two", "two"],
        "candidate": ["a", "a", "b", "b", "a", "a", "b", "b"],
        "seed": [0, 1, 0, 1, 0, 1, 0, 1],
        "image_path": [None, str(img), None, None, None, None, None, None],
        "clip_score": [0.2, 0.4, 0.5, 0.9, 0.1, 0.1, 0.3, 0.5],
    })


def test_gallery_from_predictions_takes_scores_images_and_choices_from_the_table(tmp_path: Path) -> None:
    table = _table(tmp_path)
    pred = np.array([[0.3, 0.6], [0.2, 0.1]])
    g = gallery_from_predictions(table, ["p2", "p1"], pred[::-1], ["a", "b"], {"tight": [0, 0], "loose": ["a", "b"]})
    assert [r.prompt for r in g.rows] == ["two", "one"]
    two, one = g.rows
    assert two.chosen == {"tight": "a", "loose": "a"} and one.chosen == {"tight": "a", "loose": "b"}
    a1, b1 = one.cells
    assert a1.image == str(tmp_path / "p1-a-1.png") and a1.score == pytest.approx(0.4)  # the seed with an image
    assert a1.mean_score == pytest.approx(0.3) and a1.n_samples == 2
    assert b1.image is None and b1.score is None and b1.mean_score == pytest.approx(0.7)
    assert a1.predicted == pytest.approx(0.3) and two.cells[1].predicted == pytest.approx(0.1)
    with pytest.raises(CatimageError, match="not in the quality table"):
        gallery_from_predictions(table, ["p9"], np.zeros((1, 2)), ["a", "b"], {})
    with pytest.raises(CatimageError, match="shape"):
        gallery_from_predictions(table, ["p1"], np.zeros((2, 2)), ["a", "b"], {})


def test_gallery_from_router_routes_with_the_router_calibration(tmp_path: Path) -> None:
    """Cheapest-cost budget: every prompt goes to the cheapest candidate; a budget at the dearest cost
    lets lambda be 0, so each prompt goes to its best predicted candidate."""
    from catimage.model.router_model import RouterModel
    from catimage.tables.table import aggregate

    rng = np.random.default_rng(0)
    words = ["cat", "dog", "castle", "river", "chess", "robot", "garden", "storm"]
    rows = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "quality")}
    for i in range(40):
        prompt = f"{words[i % 8]} {words[(i * 3) % 8]} number {i}"
        for cand, base in (("cheap", 0.3), ("dear", 0.6)):
            rows["prompt_id"].append(f"id{i}")
            rows["prompt"].append(prompt)
            rows["candidate"].append(cand)
            rows["seed"].append(0)
            rows["quality"].append(base + 0.3 * (i % 2) * (cand == "dear") + 0.01 * rng.standard_normal())
    table = pa.table(rows)
    router = RouterModel.fit(aggregate(table), np.array([1.0, 5.0]), "tflops", embedder_name="tfidf",
                             estimator_name="knn", estimator_params={"k": 3})
    g = gallery_from_router(table, router, {"tight": 1.0, "loose": 5.0}, prompt_ids=[f"id{i}" for i in range(10)],
                            max_rows=6)
    assert len(g.rows) == 6 and g.n_total == 10 and g.costs == [1.0, 5.0]
    assert all(r.chosen["tight"] == "cheap" for r in g.rows)
    for r in g.rows:
        best = max(r.cells, key=lambda c: (c.predicted, -g.costs[g.candidates.index(c.candidate)]))
        assert r.chosen["loose"] == best.candidate
    assert g.budgets[1].lam == 0.0


def test_gallery_from_report_shows_trial_zero_test_prompts_and_routes_them(tmp_path: Path) -> None:
    """The gallery's rows are exactly the report's test prompts, and lambda for each budget comes from
    the calibration prompts, not from the test predictions shown.

    Calibration predictions (cheap, dear): dear leads by 1.0, .8, .6 and .2 at a cost gap of 2, so a
    prompt leaves dear once lambda passes half its lead: .5, .4, .3, .1. Budget 2 allows 2 of the 4 on
    dear (1 + k/2 <= 2): lambda .3. At lambda .3 test prompt "one" (lead .3, needs lambda < .15)
    goes to the cheap candidate; calibrated on the two test predictions instead (2 on dear cost 2:
    lambda 0), it would go to the dear one. At budget 3 (the dearest cost) lambda is 0 either way.
    """
    report = {
        "meta": {"candidates": ["a", "b"], "costs": [1.0, 3.0], "metric": "clip_score", "cost_unit": "tflops"},
        "test_predictions": {"prompt_ids": ["p2", "p1"], "pred": [[0.2, 0.1], [0.3, 0.6]],
                             "calibration_pred": [[0.0, 1.0], [0.0, 0.8], [0.0, 0.6], [0.0, 0.2]]},
    }
    g = gallery_from_report(report, _table(tmp_path), {"tight": 1.0, "mid": 2.0, "loose": 3.0})
    assert [r.prompt for r in g.rows] == ["two", "one"]
    assert [r.chosen["tight"] for r in g.rows] == ["a", "a"]
    assert g.budgets[1].lam == pytest.approx(0.3)
    assert [r.chosen["mid"] for r in g.rows] == ["a", "a"]
    assert [r.chosen["loose"] for r in g.rows] == ["a", "b"] and g.budgets[2].lam == 0.0
    with pytest.raises(CatimageError, match="test_predictions"):
        gallery_from_report({"meta": report["meta"]}, _table(tmp_path), {"tight": 1.0})
    without = {**report, "test_predictions": {k: v for k, v in report["test_predictions"].items()
                                              if k != "calibration_pred"}}
    with pytest.raises(CatimageError, match="calibration"):
        gallery_from_report(without, _table(tmp_path), {"tight": 1.0})


def test_report_test_prompt_ids_name_the_prompts_the_figures_used() -> None:
    """The report's fixed-candidate qualities are means over its test prompts: recompute them by hand."""
    from catimage.evaluation.trials import EvaluateOptions, evaluate_table
    from catimage.tables.table import aggregate

    rng = np.random.default_rng(1)
    n = 60
    table = pa.table({
        "prompt_id": [f"q{i}" for i in range(n) for _ in range(2)],
        "prompt": [f"prompt {i} {'long ' * (i % 5)}" for i in range(n) for _ in range(2)],
        "candidate": ["a", "b"] * n,
        "quality": rng.uniform(0, 1, 2 * n),
    })
    report = evaluate_table(aggregate(table), [1.0, 2.0], EvaluateOptions(estimator="knn", estimator_params={"k": 3},
                                                                          embedder="tfidf", test_frac=0.2, seed=7))
    ids = report_test_prompt_ids(report, table)
    assert len(ids) == report["meta"]["n_test"] == 12
    assert np.asarray(report["test_predictions"]["calibration_pred"]).shape == (6, 2)  # 10 % of 60, for the gallery
    values = dict(zip(zip(table.column("prompt_id").to_pylist(), table.column("candidate").to_pylist()),
                      table.column("quality").to_pylist()))
    for point in report["fixed"]:
        assert point["quality"] == pytest.approx(np.mean([values[(p, point["candidate"])] for p in ids]))


def test_gallery_rejects_inconsistent_rows() -> None:
    with pytest.raises(CatimageError, match="expected"):
        Gallery(["a", "b"], [GalleryRow("p", (GalleryCell("a"),), {})], [])
    with pytest.raises(CatimageError, match="unknown budget"):
        Gallery(["a"], [GalleryRow("p", (GalleryCell("a"),), {"nope": "a"})], [Budget("tight")])


# --- the real browser ------------------------------------------------------------------------------


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed in CI; .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("headless Chromium not found (apt-get install -y chromium) and not in CI: browser check skipped")


def screenshot(page: Path, out: Path, size: tuple[int, int]) -> np.ndarray:
    binary = chromium_binary()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--force-color-profile=srgb", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def block(shot: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right; inclusive) of exactly-`colour` pixels, checked solid."""
    mask = (np.abs(shot - np.array(colour)) <= 2).all(axis=-1)
    ys, xs = np.nonzero(mask)
    assert ys.size, f"no {colour} pixels in the screenshot"
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    assert mask[top:bottom + 1, left:right + 1].all(), f"{colour} block is not solid"
    return int(top), int(left), int(bottom), int(right)


def near(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 3) -> bool:
    return bool((np.abs(pixel - np.array(colour)) <= tol).all())


def ring_colours(shot: np.ndarray, box: tuple[int, int, int, int], offset: int) -> list[np.ndarray]:
    """Pixels `offset` px outside the middle of the box's left, right and top edges."""
    top, left, bottom, right = box
    mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
    return [shot[mid_y, left - offset], shot[mid_y, right + offset], shot[top - offset, mid_x]]


def test_browser_shows_planted_images_upscaled_and_rings_the_choices(tmp_path: Path) -> None:
    page = write_html_report(MINIMAL_REPORT, tmp_path, planted_gallery())
    start = time.perf_counter()
    shot = screenshot(page, tmp_path / "shot.png", (1200, 1400))
    print(f"chromium screenshot took {time.perf_counter() - start:.2f} s")

    red, blue, magenta, cyan = (block(shot, c) for c in (RED, BLUE, MAGENTA, CYAN))
    for box in (red, blue, magenta):  # 32 x 32 and 16 x 16 images upscaled into the 128 px box
        assert (box[2] - box[0] + 1, box[3] - box[1] + 1) == (BOX, BOX)
    assert (cyan[2] - cyan[0] + 1, cyan[3] - cyan[1] + 1) == (BOX // 2, BOX)  # 64 x 32 -> 128 x 64

    # Row A side by side: red left of blue, same top; row B below it.
    assert red[0] == blue[0] and red[3] < blue[1] and magenta[0] > red[2]

    # red: chosen at the tight budget only -> one orange ring, nothing beyond it
    for k in range(1, RING + 1):
        assert all(near(p, ORANGE) for p in ring_colours(shot, red, k)), k
    assert not any(near(p, ORANGE) or near(p, GREEN) for p in ring_colours(shot, red, RING + 3))
    # blue: chosen at the loose budget only -> one green ring
    for k in range(1, RING + 1):
        assert all(near(p, GREEN) for p in ring_colours(shot, blue, k)), k
    assert not any(near(p, ORANGE) for p in ring_colours(shot, blue, 2))
    # magenta: chosen at both -> orange inside, green outside
    for k in range(1, RING + 1):
        assert all(near(p, ORANGE) for p in ring_colours(shot, magenta, k)), k
        assert all(near(p, GREEN) for p in ring_colours(shot, magenta, RING + k)), k
    # cyan: not chosen -> no ring around its (letterboxed) box
    cyan_box = (cyan[0] - BOX // 4, cyan[1], cyan[2] + BOX // 4, cyan[3])
    assert not any(near(p, ORANGE) or near(p, GREEN) for k in (1, 3) for p in ring_colours(shot, cyan_box, k))

    # the 8 x 8 checkerboard is upscaled with hard pixel edges (image-rendering: pixelated): 16 px squares,
    # only pure black and white inside its box, no blended greys
    board = block_of_checker(shot, right_of=blue)
    assert board.shape[:2] == (BOX, BOX)
    assert all(near(board[y, x], (0, 0, 0) if ((y // 16) + (x // 16)) % 2 == 0 else (255, 255, 255))
               for y in range(0, BOX, 4) for x in range(0, BOX, 4))
    greys = ~((board == 0).all(axis=-1) | (board == 255).all(axis=-1))
    assert greys.sum() == 0


def block_of_checker(shot: np.ndarray, right_of: tuple[int, int, int, int]) -> np.ndarray:
    """The 128 x 128 region starting at the first pure-black pixel right of `right_of`, on its top row."""
    top, _, _, right = right_of
    row = shot[top, right + 1:]
    xs = np.nonzero((row == 0).all(axis=-1))[0]
    assert xs.size, "no black pixels right of the blue block on its top row"
    left = right + 1 + int(xs[0])
    return shot[top:top + BOX, left:left + BOX]


def test_missing_chromium_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        chromium_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed in CI"):
        chromium_binary()


# --- plans at work (cascade traces) ------------------------------------------------------------------

CASCADE_REPORT = {
    "meta": {"metric": "scene_score", "cost_unit": "gflops"},
    "policies": {"cascade": {
        "summary": {"best_fixed": "dear"}, "curve": [], "decision_metric": "scene_decider", "judge_metric": "scene_score",
        "upper_bound": False,
        "traces": [{"prompt_id": "p1", "prompt": "one", "label": "a > b @0.8", "budget": 2.0, "lambda": 0.1,
                    "attempts": [{"candidate": "a", "seed": 0, "decision": 0.61, "judge": 0.55, "accepted": False,
                                  "returned": False, "cost": 1.0},
                                 {"candidate": "b", "seed": 1, "decision": 0.87, "judge": 0.93, "accepted": True,
                                  "returned": True, "cost": 2.5}]}],
    }},
}


def test_plan_traces_take_images_from_the_table(tmp_path: Path) -> None:
    """(p1, a, seed 1) has the table's only image; the trace's attempt 1 is (p1, a, seed 0): no image."""
    table = _table(tmp_path)
    traces = plan_traces(CASCADE_REPORT, images=table_images(table))
    assert [(a.candidate, a.seed, a.decision, a.judge, a.returned) for a in traces[0].attempts] == [
        ("a", 0, 0.61, 0.55, False), ("b", 1, 0.87, 0.93, True)]
    assert all(a.image is None for a in traces[0].attempts)
    moved = {**CASCADE_REPORT["policies"]["cascade"]["traces"][0]}
    moved["attempts"] = [{**moved["attempts"][0], "seed": 1}]
    report = {"policies": {"cascade": {"traces": [moved]}}}
    assert plan_traces(report, images=table_images(table))[0].attempts[0].image == str(tmp_path / "p1-a-1.png")


def test_the_page_names_both_metrics_and_marks_the_returned_attempt() -> None:
    page = render_html(CASCADE_REPORT)
    assert "Plans at work" in page and "scene_decider" in page and "scene_score" in page
    assert "returned (accepted)" in page and page.count("returned (") == 1
    assert "upper bound" not in page.lower()  # the decider is not the judge
    same = {**CASCADE_REPORT, "policies": {"cascade": {**CASCADE_REPORT["policies"]["cascade"],
                                                        "decision_metric": "scene_score", "upper_bound": True}}}
    assert "an upper bound" in render_html(same)


def test_browser_rings_the_image_a_plan_returned(tmp_path: Path) -> None:
    trace = PlanTrace("a planted prompt", "p1", "a > b @0.8", (
        TraceAttempt("a", 0, 0.61, 0.55, accepted=False, returned=False, cost=1.0, image=png(YELLOW, (32, 32))),
        TraceAttempt("b", 1, 0.87, 0.93, accepted=True, returned=True, cost=2.5, image=png(PURPLE, (32, 32)))))
    page = write_html_report(CASCADE_REPORT, tmp_path, traces={"cascade": [trace]})
    shot = screenshot(page, tmp_path / "shot.png", (1200, 1400))
    yellow, purple = block(shot, YELLOW), block(shot, PURPLE)
    for box in (yellow, purple):  # 32 px images upscaled into the 128 px box
        assert (box[2] - box[0] + 1, box[3] - box[1] + 1) == (BOX, BOX)
    assert yellow[0] == purple[0] and yellow[3] < purple[1]  # side by side, in attempt order
    for k in range(1, RING + 1):
        assert all(near(p, ACCENT) for p in ring_colours(shot, purple, k)), k
    assert not any(near(p, ACCENT) for k in (1, 3) for p in ring_colours(shot, yellow, k))
