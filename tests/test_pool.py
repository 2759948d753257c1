"""Pool files: validation messages a user can act on, and cost lookup."""

from pathlib import Path

import numpy as np
import pytest

from catimage.errors import PoolError
from catimage.generators.spec import DiffusersSpec, HttpSpec
from catimage.tables.pool import load_pool, pool_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = Path(__file__).resolve().parents[1] / "catimage" / "data"


def _pool(**over):
    data = {"cost_unit": "tflops", "candidates": [{"name": "a", "cost": 1.0}, {"name": "b", "cost": 3.0}]}
    data.update(over)
    return data


def test_costs_in_requested_order():
    pool = pool_from_dict(_pool())
    np.testing.assert_array_equal(pool.cost_vector(["b", "a"]), [3.0, 1.0])


def test_declared_cost_wins_over_measured_and_measured_fills_gaps():
    pool = pool_from_dict(_pool(cost_unit="seconds", candidates=[{"name": "a", "cost": 1.0}, {"name": "b"}]))
    np.testing.assert_array_equal(pool.cost_vector(measured={"a": 9.0, "b": 2.5}), [1.0, 2.5])


def test_measured_seconds_never_fill_a_cost_in_another_unit():
    """A gflops pool with one undeclared cost over a table of measured seconds: refused, not mixed."""
    pool = pool_from_dict(_pool(cost_unit="gflops", candidates=[{"name": "a", "cost": 1.0}, {"name": "b"}]))
    with pytest.raises(PoolError, match=r"\['b'\].*measured theirs in seconds.*pool counts cost in gflops"):
        pool.cost_vector(measured={"a": 0.2, "b": 0.5})
    # Measured costs of candidates that declare theirs are ignored, so nothing mixes there.
    declared = pool_from_dict(_pool(cost_unit="gflops"))
    np.testing.assert_array_equal(declared.cost_vector(measured={"a": 0.2, "b": 0.5}), [1.0, 3.0])


def test_costs_from_elsewhere_must_be_in_the_pools_unit():
    pool = pool_from_dict(_pool(cost_unit="gflops"))
    pool.require_unit("gflops", "the router")
    with pytest.raises(PoolError, match="the router counts cost in seconds, but the pool counts cost in gflops"):
        pool.require_unit("seconds", "the router")


def test_missing_cost_says_how_to_get_one():
    pool = pool_from_dict(_pool(candidates=[{"name": "a"}]))
    with pytest.raises(PoolError, match="catimage cost"):
        pool.cost_vector()


@pytest.mark.parametrize("unit", ["dollars", "s", "TFLOPs", "relative (SDXL-50 = 1)", ""])
def test_unknown_cost_units_are_refused_with_the_known_ones_listed(unit):
    with pytest.raises(PoolError, match=r"unknown cost_unit.*seconds, gflops, tflops, usd, relative"):
        pool_from_dict(_pool(cost_unit=unit))


def test_build_memory_reads_human_sizes():
    pool = pool_from_dict(_pool(candidates=[{"name": "a", "cost": 1, "build": {"memory": "768MiB"}},
                                            {"name": "b", "cost": 1, "build": {"memory": "1.5GiB"}},
                                            {"name": "c", "cost": 1}]))
    assert pool.get("a").build.memory == 768 * 2**20
    assert pool.get("b").build.memory == 3 * 2**29
    assert pool.get("c").build.memory is None
    with pytest.raises(PoolError, match=r"candidates\.0\.build\.memory"):
        pool_from_dict(_pool(candidates=[{"name": "a", "cost": 1, "build": {"memory": "lots"}}]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_pool(candidates=[{"name": "a", "cost": 1}, {"name": "a", "cost": 2}]), "duplicate candidate names"),
        (_pool(candidates=[{"name": "a", "cost": -1}]), "greater than or equal to 0"),
        (_pool(candidates=[{"name": "a", "cost": 1, "steps": 4}]), r"candidates\.0\.steps: unknown key"),
        (_pool(colour="red"), "colour: unknown key"),
        (_pool(candidates=[]), "at least 1"),
        ({"candidates": [{"name": "a"}]}, "cost_unit"),
        (_pool(candidates=[{"name": "a", "generator": {"kind": "ftp"}}]), "unknown generator kind"),
        (_pool(candidates=[{"name": "a", "generator": {"model": "m", "stepz": 3}}]), "stepz"),
        (_pool(candidates=[{"name": "a", "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}]), "min_replicas"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_pools_are_rejected_with_the_reason(data, message):
    with pytest.raises(PoolError, match=message):
        pool_from_dict(data)


def test_generator_blocks_parse_by_kind():
    pool = pool_from_dict(
        _pool(
            candidates=[
                {"name": "sd", "generator": {"model": "tiny:sd", "steps": 4}},
                {"name": "api", "generator": {"kind": "http", "url": "http://127.0.0.1:1/v1/images", "model": "x"}},
            ]
        )
    )
    assert isinstance(pool.get("sd").generator, DiffusersSpec)
    assert pool.get("sd").generator.steps == 4
    assert isinstance(pool.get("api").generator, HttpSpec)


def test_unknown_candidate_lookup_lists_the_pool():
    with pytest.raises(PoolError, match=r"unknown candidate 'c'.*\['a', 'b'\]"):
        pool_from_dict(_pool()).get("c")


def test_save_load_roundtrip(tmp_path):
    pool = pool_from_dict(_pool()).with_costs({"a": 0.5})
    pool.save(tmp_path / "p.yaml")
    again = load_pool(tmp_path / "p.yaml")
    assert again == pool
    assert again.get("a").cost == 0.5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        load_pool(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cost_unit: [unclosed\n")
    with pytest.raises(PoolError, match="not valid YAML"):
        load_pool(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*pool*.yaml")))
def test_shipped_pool_files_load(name):
    pool = load_pool(CONFIGS / name)
    assert pool.names


def test_report_notes_flag_assumed_costs_and_tiny_models():
    assert pool_from_dict(_pool()).report_notes() == []
    notes = pool_from_dict(_pool(costs_assumed=True, candidates=[{"name": "t", "cost": 1, "generator": {"model": "tiny:sd"}}])).report_notes()
    assert any("ASSUMED" in n for n in notes) and any("tiny random-weight" in n for n in notes)


def test_serve_start_up_refuses_a_router_fitted_in_another_unit(tmp_path):
    """The shipped world router counts GFLOPs; the same pool relabelled in seconds would make every
    budget a number of seconds read as GFLOPs. Refused before anything is deployed (no Ray needed)."""
    import yaml

    from serve.app import build_app

    data = yaml.safe_load((DATA / "world_pool.yaml").read_text())
    data["cost_unit"] = "seconds"
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PoolError, match="counts cost in gflops, but the pool counts cost in seconds"):
        build_app({"model_dir": str(DATA / "world_router"), "pool": str(tmp_path / "pool.yaml")})
