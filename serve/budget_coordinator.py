"""The BudgetCoordinator deployment: one online budget controller per key, shared by every router
replica."""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve and FastAPI read
# annotations at runtime.
import logging
from typing import Any

from ray import serve

log = logging.getLogger("catimage.serve")

CASCADE_PREFIX = "cascade:"  # serve.model_state.CASCADE_PREFIX (not imported: this replica needs no FastAPI)


def _offline_lambdas(model_dir: str) -> tuple[dict[str, Any], float]:
    """(policy -> lambda_for_budget, lambda scale) of a router or cascade bundle."""
    from pathlib import Path

    from catimage.model.router_model import RouterModel
    from catimage.policy.budget import lambda_scale

    path = Path(model_dir)
    if (path / "cascade.json").is_file():
        from catimage.model.cascade_model import CascadeModel

        cascade = CascadeModel.load(path)
        router = cascade.router
        policies = {"route": router.lambda_for_budget, "cascade": cascade.lambda_for_budget}
    else:
        router = RouterModel.load(path)
        policies = {"route": router.lambda_for_budget}
    # Plan values and routing predictions are both in the judge's units, costs in the pool's: one scale.
    return policies, lambda_scale(router.calibration_pred, router.costs)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class BudgetCoordinator:
    """Holds the online budget controllers (catimage.policy.budget) for the whole application.

    Router replicas call `sync` every `sync_interval_s` with the realised costs they served since the
    last call and get every key's current lambda back, so the deployment-wide average is held however
    many router replicas share the traffic. Keys: `*` and API key names for routed requests, the same
    prefixed `cascade:` for cascaded ones (a cascade bundle only); one observation is one returned
    image's whole realised cost (every attempt drawn and scored for it). If this replica restarts,
    controllers start again from the offline lambda (their state is a few numbers, rebuilt within
    one window). A hot swap calls `use_model`: every controller keeps what it learned of the live
    traffic (its integral and window) and moves by the difference between the new and the old model's
    offline lambdas (`BudgetController.shift`): the old model's lambda means nothing to the new one's
    predictions, but the traffic's drift from calibration is the same for both. In the world's closed
    loop (docs/learning.md) restarting lost the budget for a window after each swap (+6.1 %); shifting
    held every window within 5 %.
    """

    def __init__(self, model_dir: str, budgets: dict[str, float], config: dict[str, Any],
                 version: str | None = None) -> None:
        from ray.serve.metrics import Gauge

        self.budgets = {k: float(v) for k, v in budgets.items()}
        self.config = dict(config)
        tags = ("key",)
        self.g_lambda = Gauge("catimage_budget_lambda", "Current lambda of the online budget controller.", tags)
        self.g_window = Gauge("catimage_budget_window_cost", "Mean realised cost over the controller's window.", tags)
        self.g_budget = Gauge("catimage_budget", "Average cost per request the controller holds (its budget).", tags)
        self.version: str | None = None
        self.controllers: dict[str, Any] = {}
        self._start(model_dir, version or model_dir)

    def _start(self, model_dir: str, version: str) -> None:
        """Controllers for `model_dir`'s offline lambdas: existing ones shifted onto them, new keys created."""
        from catimage.policy.budget import BudgetController, ControllerConfig

        policies, scale = _offline_lambdas(model_dir)
        controllers = {}
        for policy, for_budget in policies.items():
            prefix = CASCADE_PREFIX if policy == "cascade" else ""
            for key, budget in self.budgets.items():
                lam0 = float(for_budget(budget))
                ctrl = self.controllers.get(prefix + key)
                if ctrl is None:
                    ctrl = BudgetController(ControllerConfig(budget=budget, **self.config), lam_offline=lam0, scale=scale)
                else:
                    ctrl.shift(lam0 - ctrl.lam_offline)
                controllers[prefix + key] = ctrl
        self.controllers = controllers
        self.version = version
        self._export()

    def use_model(self, model_dir: str, version: str) -> dict[str, float]:
        """A hot swap: controllers shift onto `model_dir`'s offline lambdas (once per version)."""
        if version != self.version:
            log.info("budget controllers shift to model %s (was %s)", version, self.version)
            self._start(model_dir, version)
        return {key: ctrl.lam for key, ctrl in self.controllers.items()}

    def _export(self) -> None:
        for key, ctrl in self.controllers.items():
            state = ctrl.state()
            self.g_lambda.set(state["lambda"], tags={"key": key})
            self.g_budget.set(state["budget"], tags={"key": key})
            if state["window_mean_cost"] is not None:
                self.g_window.set(state["window_mean_cost"], tags={"key": key})

    def sync(self, observed: dict[str, list[Any]]) -> dict[str, float]:
        """Entries of serve/ledger.py per key: realised costs, and with feed-forward commitments and
        realised costs paid against them."""
        from serve.ledger import apply_entries

        for key, entries in observed.items():
            ctrl = self.controllers.get(key)
            if ctrl is not None and entries:
                apply_entries(ctrl, entries)
        self._export()
        return {key: ctrl.lam for key, ctrl in self.controllers.items()}

    def state(self) -> dict[str, dict[str, Any]]:
        return {key: {**ctrl.state(), "model_version": self.version} for key, ctrl in self.controllers.items()}
