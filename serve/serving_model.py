"""The model a Router replica serves, as one unit that can be swapped while requests flow.

A model directory is either a router bundle (`router.json`, from `catimage fit` / `catimage train`)
or a cascade bundle (`cascade.json` + `router/`, catimage.model.cascade_model), which routes with
its router and plans cascades with the rest. `ServingModel` holds what one request needs (router,
cascade if any, version); a request reads the replica's current `ServingModel` once and uses that
object to the end, so a swap never mixes two models inside one request.

Hot swap: the Router's Serve `user_config` names the model (`{"model_dir": DIR, "model_version": V}`,
or a retrain job's `serving.json` as it is: `{"model_version": V, "path": DIR}`); Serve calls the
Router's `reconfigure` with it, in place, without restarting the replica. The new model is loaded
off the event loop, checked against what the app was deployed with (`swap_problems`), and only then
replaces the old one; a model that does not fit is refused (logged and shown in /v1/pool) and the
old one keeps serving.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError

__all__ = ["ServingModel", "bundle_meta", "load_serving_model", "model_version", "swap_problems", "user_config_model"]


def _router_dir(model_dir: str | Path) -> Path:
    """Where the router bundle of a model directory is (the directory itself, or its `router/`)."""
    path = Path(model_dir)
    return path / "router" if (path / "cascade.json").is_file() else path


def bundle_meta(model_dir: str | Path) -> dict[str, Any]:
    """router.json (candidates, costs, cost unit, metric) and, for a cascade bundle, its cascade.json
    under "cascade"; read without loading any weights (what the app builder checks)."""
    meta_path = _router_dir(model_dir) / "router.json"
    if not meta_path.is_file():
        raise CatimageError(
            f"{model_dir} is not a catimage model directory (no router.json, nor cascade.json with router/); "
            "create one with `catimage fit` / `catimage train` (or fit a cascade), and give its path as model_dir"
        )
    meta = json.loads(meta_path.read_text())
    cascade = Path(model_dir) / "cascade.json"
    meta["cascade"] = json.loads(cascade.read_text()) if cascade.is_file() else None
    return meta


def model_version(model_dir: str | Path, given: str | None = None) -> str:
    """`given`, else the directory's name and a hash of its metadata files (same files, same version)."""
    if given:
        return str(given)
    path = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("cascade.json", "router.json", "router/router.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    return f"{path.resolve().name}-{digest.hexdigest()[:10]}"


@dataclass(frozen=True)
class ServingModel:
    """Router bundle (+ cascade bundle), where it came from and its version."""

    model_dir: str
    version: str
    router: Any
    """catimage.model.router_model.RouterModel, embedder loaded with the app's runtime options."""
    cascade: Any | None
    """catimage.model.cascade_model.CascadeModel sharing `router`, or None (routing only)."""

    @property
    def candidates(self) -> list[str]:
        return list(self.router.candidates)

    @property
    def costs(self) -> dict[str, float]:
        return {c: float(v) for c, v in zip(self.router.candidates, self.router.costs, strict=True)}

    @property
    def cost_unit(self) -> str:
        return str(self.router.cost_unit)

    @property
    def decision_metric(self) -> str | None:
        return None if self.cascade is None else str(self.cascade.decision_metric)

    @property
    def score_cost(self) -> float:
        return 0.0 if self.cascade is None else float(self.cascade.score_cost)


def load_serving_model(
    model_dir: str | Path, overrides: Mapping[str, Any], cache_size: int, version: str | None = None,
) -> ServingModel:
    """Load a router or cascade bundle as served (blocking: call it off the event loop)."""
    from serve.bundle import load_router_model

    router = load_router_model(_router_dir(model_dir), overrides, cache_size)
    cascade = None
    if (Path(model_dir) / "cascade.json").is_file():
        from catimage.model.cascade_model import CascadeModel

        cascade = CascadeModel.load(model_dir)
        cascade.router = router  # one router (and one embedding cache) for both policies
    return ServingModel(str(model_dir), model_version(model_dir, version), router, cascade)


def user_config_model(user_config: Mapping[str, Any] | None) -> tuple[str, str | None] | None:
    """(model_dir, version or None) named by a Router user_config; None when it names no model."""
    if not user_config:
        return None
    unknown = sorted(set(user_config) - {"model_dir", "path", "model_version"})
    if unknown:
        raise CatimageError(
            f"the Router's user_config takes model_dir (or path) and model_version, not {unknown}; "
            "e.g. {model_dir: /models/v2, model_version: v2}, or the retrain job's serving.json as it is"
        )
    model_dir = user_config.get("model_dir") or user_config.get("path")
    if not model_dir:
        raise CatimageError("the Router's user_config names no model: give model_dir (or path)")
    version = user_config.get("model_version")
    return str(model_dir), (None if version is None else str(version))


def swap_problems(
    new: ServingModel, generators: Iterable[str], cost_unit: str, decision_metric: str | None,
) -> list[str]:
    """Why `new` cannot replace the served model in place (empty: it can).

    In place means with the deployments the app already has: every candidate must have a generator
    deployment, costs must be in the same unit (the budget is), and a cascade must decide with the
    metric whose Scorer deployment (and served-log column) exists. Anything else is a new app
    version (`serve deploy` with new args), which Serve rolls out replica by replica.
    """
    problems = []
    missing = sorted(set(new.candidates) - set(generators))
    if missing:
        problems.append(f"candidates {missing} have no generator deployment in this app")
    if new.cost_unit != cost_unit:
        problems.append(f"its costs are in {new.cost_unit}, the app's budget in {cost_unit}")
    if new.decision_metric is not None and new.decision_metric != decision_metric:
        have = f"the app scores with {decision_metric}" if decision_metric else "the app has no scorer deployment"
        problems.append(f"its cascade decides with {new.decision_metric}, {have}")
    return problems
