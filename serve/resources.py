"""Can this Ray cluster place the application? Checked before deploying, so that a deployment that
can never be placed (num_gpus > 0 on a cluster without GPUs, more CPUs than there are) fails at
once with what is missing, instead of Serve waiting forever with replicas PENDING.

The demand is what the app starts with: each deployment's starting replicas (initial_replicas, else
min_replicas) times its per-replica resources; and any one replica must fit the largest node. The
arithmetic is the build's (`catimage.tables.build.missing_resources`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from catimage.errors import CatimageError
from catimage.tables.build import StageDemand, describe_demand, missing_resources

log = logging.getLogger("catimage.serve")


def deployment_demand(name: str, options: Mapping[str, Any]) -> StageDemand:
    """One deployment's starting demand from its Serve options (ray_actor_options, replicas)."""
    actor = options.get("ray_actor_options") or {}
    auto = options.get("autoscaling_config") or {}
    if auto:
        start = auto.get("initial_replicas")
        replicas = int(start if start is not None else auto.get("min_replicas", 1))
    else:
        replicas = int(options.get("num_replicas", 1))
    return StageDemand(f"deployment {name}", replicas, float(actor.get("num_cpus", 1.0)),
                       float(actor.get("num_gpus", 0.0)), float(actor.get("memory", 0.0)))


def cluster_can_grow() -> bool:
    """True when an autoscaler may add nodes (Ray Data's own test, as the build job asks it;
    a private helper, hence guarded)."""
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        return bool(is_autoscaling_enabled())
    except Exception:  # noqa: BLE001 - a Ray version without it: assume a fixed cluster
        return False


def check_app_fits(demands: list[StageDemand], cluster: Mapping[str, float], largest_node: Mapping[str, float],
                   can_grow: bool, wait_for_resources: bool) -> None:
    """Raise a CatimageError naming what is missing, unless the cluster fits or may grow."""
    problems = missing_resources(demands, dict(cluster), dict(largest_node))
    if not problems:
        return
    if wait_for_resources or can_grow:
        log.warning("the cluster lacks resources for this app (%s); deploying anyway: nodes are expected to join",
                    "; ".join(problems))
        return
    raise CatimageError(
        f"this Ray cluster cannot place the Serve application: {'; '.join(problems)}. It asks for "
        f"{describe_demand(demands)}. Deploy onto a cluster that has them (RAY_ADDRESS / `serve deploy --address`), "
        "lower the candidates' `serve:` resources in the pool (num_cpus, num_gpus, autoscaling.min_replicas) or "
        "router_num_cpus, or set `wait_for_resources: true` in the app's args if nodes will join"
    )


def check_cluster(demands: list[StageDemand], wait_for_resources: bool) -> None:
    """`check_app_fits` against the running cluster (ray.cluster_resources() and its alive nodes)."""
    import ray

    if not ray.is_initialized():
        ray.init()  # what `serve run` / `serve.run` would do next anyway
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = {k: max((float(n.get(k, 0.0)) for n in nodes), default=0.0) for k in ("CPU", "GPU", "memory")}
    check_app_fits(demands, ray.cluster_resources(), largest, cluster_can_grow(), wait_for_resources)
