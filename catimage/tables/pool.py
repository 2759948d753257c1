"""The candidate pool: which generators exist, what each costs, and how to run and serve it.

A pool file is YAML::

    cost_unit: tflops            # what `cost` counts per image: seconds, gflops, tflops, usd or relative
    metrics:                     # optional: the scorers `catimage build` runs
      - {name: clip_score, params: {model: ViT-B-32, pretrained: /ckpt/clip.pt}}
    candidates:
      - name: sdxl-20
        cost: 239.4              # optional when the quality table carries measured costs
        generator: {model: stabilityai/stable-diffusion-xl-base-1.0, steps: 20, scheduler: euler}
        build: {batch_size: 4, concurrency: 1, num_gpus: 1, num_cpus: 4, memory: 12GiB}
        serve: {num_gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 4}}

Everything is validated on load (unknown keys, duplicate names, negative costs, unknown cost units)
so that a typo fails at the first command rather than hours into a cluster job.

One pool holds one cost unit. Declared costs are in it by definition; the costs a build measures
(the quality table's `cost` column) are seconds per image (`MEASURED_COST_UNIT`), so they stand in
for undeclared costs only in a pool whose unit is seconds. `Pool.cost_vector` is the one place
that turns a pool (and a table's measurements) into costs, and it refuses anything else, naming
the candidates and the units: a figure computed on mixed units would be wrong without an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from catimage.errors import PoolError
from catimage.generators.spec import DiffusersSpec, GeneratorSpec, parse_generator_spec
from catimage.metrics.spec import MetricSpec

# What a cost may count, per image. One spelling each: reports print the unit as written here.
COST_UNITS: tuple[str, ...] = ("seconds", "gflops", "tflops", "usd", "relative")
# What the build job measures into the quality table's `cost` column (wall seconds per image).
MEASURED_COST_UNIT = "seconds"


class BuildResources(BaseModel):
    """How the Ray Data build job runs this candidate's generator actor pool."""

    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt = 4
    concurrency: PositiveInt = 1
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    memory: ByteSize | None = Field(
        default=None,
        description="Host memory one generator actor holds (e.g. 768MiB, 12GiB): what Ray reserves for it, so that "
        "a node is never given more actors than fit in its memory. None reserves nothing.",
    )


class Autoscaling(BaseModel):
    """Ray Serve `autoscaling_config` for one generator deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: PositiveInt = 1
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeResources(BaseModel):
    """How Ray Serve runs this candidate's generator deployment."""

    model_config = ConfigDict(extra="forbid")

    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    max_ongoing_requests: PositiveInt = 4
    max_batch_size: PositiveInt = 1
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    request_timeout_s: float = Field(default=300.0, gt=0)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)


class Candidate(BaseModel):
    """One generator configuration the router can choose."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    cost: float | None = Field(default=None, ge=0)
    generator: GeneratorSpec | None = None
    build: BuildResources = Field(default_factory=BuildResources)
    serve: ServeResources = Field(default_factory=ServeResources)

    @field_validator("generator", mode="before")
    @classmethod
    def _parse_generator(cls, value: Any) -> Any:
        if value is None or isinstance(value, BaseModel):
            return value
        return parse_generator_spec(value)

    @field_validator("cost")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not np.isfinite(value):
            raise ValueError("cost must be a finite number")
        return value


class Pool(BaseModel):
    """A validated pool; the order of `candidates` is the column order everywhere downstream."""

    model_config = ConfigDict(extra="forbid")

    cost_unit: str = Field(description=f"what every cost counts, per image: one of {', '.join(COST_UNITS)}")
    candidates: list[Candidate] = Field(min_length=1)
    metrics: list[MetricSpec] = Field(default_factory=list)
    decision_metric: str | None = Field(
        default=None,
        description="The metric a cascade reads online to accept or escalate (one of `metrics`, with its `cost`): "
        "the default of `catimage evaluate --decision-metric` and of serving. Unset: the judge decides, and "
        "every cascade figure is an upper bound.",
    )
    description: str | None = None
    costs_assumed: bool = Field(
        default=False, description="True when costs are illustrative, not measured: every report says so."
    )

    @field_validator("cost_unit")
    @classmethod
    def _known_unit(cls, value: str) -> str:
        if value not in COST_UNITS:
            raise ValueError(
                f"unknown cost_unit {value!r}: use one of {', '.join(COST_UNITS)} (per image; say what `relative` "
                "is relative to in `description`)"
            )
        return value

    @model_validator(mode="after")
    def _unique(self) -> Pool:
        seen: set[str] = set()
        dupes = [c.name for c in self.candidates if c.name in seen or seen.add(c.name)]
        if dupes:
            raise ValueError(f"duplicate candidate names: {sorted(set(dupes))}; each name must be unique")
        mnames = [m.name for m in self.metrics]
        if len(set(mnames)) != len(mnames):
            raise ValueError(f"duplicate metric names in metrics: {mnames}")
        if self.decision_metric is not None and self.decision_metric not in mnames:
            raise ValueError(
                f"decision_metric {self.decision_metric!r} is not one of the pool's metrics {mnames}: add it to "
                "`metrics:` (with its `cost:` per image) or remove decision_metric"
            )
        return self

    def metric(self, name: str) -> MetricSpec | None:
        """The pool's spec of metric `name`, or None when the pool does not declare it."""
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def get(self, name: str) -> Candidate:
        for cand in self.candidates:
            if cand.name == name:
                return cand
        raise PoolError(f"unknown candidate {name!r}; the pool has {self.names}")

    def select(self, names: Iterable[str]) -> Pool:
        """The sub-pool of `names`, in that order (e.g. the candidates a quality table covers)."""
        return self.model_copy(update={"candidates": [self.get(n) for n in names]})

    def cost_vector(
        self,
        names: Iterable[str] | None = None,
        measured: Mapping[str, float] | None = None,
        measured_unit: str = MEASURED_COST_UNIT,
    ) -> np.ndarray:
        """Costs in `names` order, all in `cost_unit`: the declared cost, else the measured one.

        Declared costs win because the user wrote them on purpose (e.g. GFLOPs rather than the
        seconds the build job measured). A measured cost stands in for an undeclared one only when
        it is in the pool's unit; otherwise the pool is refused, naming the candidates and both
        units, since routing on mixed units silently compares seconds with GFLOPs.
        """
        names = list(self.names if names is None else names)
        measured = {k: float(v) for k, v in (measured or {}).items() if np.isfinite(v)}
        undeclared = [n for n in names if self.get(n).cost is None]
        mixed = [n for n in undeclared if n in measured] if measured_unit != self.cost_unit else []
        if mixed:
            raise PoolError(
                f"candidates {mixed} declare no cost, and the table measured theirs in {measured_unit}, but the pool "
                f"counts cost in {self.cost_unit}: one pool holds one unit. Declare their `cost:` in {self.cost_unit} "
                f"(e.g. `catimage cost POOL.yaml --unit {self.cost_unit} --out POOL.yaml` counts FLOPs), or set "
                f"`cost_unit: {measured_unit}` and declare no cost in another unit"
            )
        missing = [n for n in undeclared if n not in measured]
        if missing:
            raise PoolError(
                f"no cost for candidates {missing}: give `cost:` (in {self.cost_unit}) in the pool file, or build the "
                "quality table with measured seconds (a `cost` column) in a pool with `cost_unit: seconds`, or run "
                "`catimage cost POOL.yaml --out POOL.yaml`"
            )
        return np.array([self.get(n).cost if self.get(n).cost is not None else measured[n] for n in names], dtype=np.float64)

    def require_unit(self, unit: str, source: str) -> None:
        """Refuse costs from `source` (e.g. a fitted router bundle) counted in another unit than the
        pool's: a budget in the pool's unit would silently be read in the other one."""
        if unit != self.cost_unit:
            raise PoolError(
                f"{source} counts cost in {unit}, but the pool counts cost in {self.cost_unit}: one pool holds one "
                f"unit. Use the pool the router was fitted with, or refit it on this pool"
            )

    def report_notes(self) -> list[str]:
        """What every report made with this pool must say about where its numbers come from."""
        notes = []
        if self.costs_assumed:
            notes.append("Costs are ASSUMED (illustrative), not measured.")
        if any(isinstance(c.generator, DiffusersSpec) and c.generator.model.startswith("tiny:") for c in self.candidates):
            notes.append(
                "Images were drawn by tiny random-weight models (the test/demo pool): they are noise, and the "
                "quality figures say nothing about real generators."
            )
        if any(isinstance(c.generator, DiffusersSpec) and c.generator.model.startswith("world:") for c in self.candidates):
            notes.append(
                "Images come from the scene world: 32x32 generators trained on rendered shapes "
                "(catimage/data/world/MODEL_CARD.md), scored by scene_score, a verifier of what each prompt asks "
                "for. The figures are real measurements in that world, not claims about photographic generators."
            )
        return notes

    def with_costs(self, costs: Mapping[str, float]) -> Pool:
        """A copy with `costs` written in (what `catimage cost` saves)."""
        cands = [c.model_copy(update={"cost": float(costs[c.name])}) if c.name in costs else c for c in self.candidates]
        return self.model_copy(update={"candidates": cands})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see catimage/tables/pool.py for the keys a pool takes)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def pool_from_dict(data: Any, source: str = "pool") -> Pool:
    """Validate an already-parsed pool mapping, with one readable message listing every problem."""
    if not isinstance(data, dict):
        raise PoolError(f"{source}: a pool must be a mapping with `cost_unit` and `candidates`, got {type(data).__name__}")
    try:
        return Pool.model_validate(data)
    except ValidationError as err:
        raise PoolError(f"{source} is not a valid pool:\n{_format_validation(err)}") from None


def load_pool(path: str | Path) -> Pool:
    """Read and validate a pool YAML file."""
    path = Path(path)
    if not path.is_file():
        raise PoolError(f"pool file {path} does not exist; pass --pool PATH to a YAML pool file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PoolError(f"{path} is not valid YAML: {err}") from None
    return pool_from_dict(data, source=str(path))
