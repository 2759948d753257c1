"""The BudgetCoordinator deployment: one online budget controller per key, shared by every router
replica."""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve and FastAPI read
# annotations at runtime.
from typing import Any

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class BudgetCoordinator:
    """Holds the online budget controllers (catimage.policy.budget) for the whole application.

    Router replicas call `sync` every `sync_interval_s` with the realised costs they routed since the
    last call and get every key's current lambda back, so the deployment-wide average is held however
    many router replicas share the traffic. If this replica restarts, controllers start again from
    the offline lambda (their state is a few numbers, rebuilt within one window).
    """

    def __init__(self, model_dir: str, budgets: dict[str, float], config: dict[str, Any]) -> None:
        from ray.serve.metrics import Gauge

        from catimage.model.router_model import RouterModel
        from catimage.policy.budget import BudgetController, ControllerConfig, lambda_scale

        model = RouterModel.load(model_dir)
        scale = lambda_scale(model.calibration_pred, model.costs)
        self.controllers = {
            key: BudgetController(
                ControllerConfig(budget=float(t), **config), lam_offline=float(model.lambda_for_budget(t)), scale=scale
            )
            for key, t in budgets.items()
        }
        tags = ("key",)
        self.g_lambda = Gauge("catimage_budget_lambda", "Current lambda of the online budget controller.", tags)
        self.g_window = Gauge("catimage_budget_window_cost", "Mean realised cost over the controller's window.", tags)
        self.g_budget = Gauge("catimage_budget", "Average cost per request the controller holds (its budget).", tags)
        self._export()

    def _export(self) -> None:
        for key, ctrl in self.controllers.items():
            state = ctrl.state()
            self.g_lambda.set(state["lambda"], tags={"key": key})
            self.g_budget.set(state["budget"], tags={"key": key})
            if state["window_mean_cost"] is not None:
                self.g_window.set(state["window_mean_cost"], tags={"key": key})

    def sync(self, observed: dict[str, list[float]]) -> dict[str, float]:
        for key, costs in observed.items():
            ctrl = self.controllers.get(key)
            if ctrl is not None and costs:
                ctrl.observe(costs)
        self._export()
        return {key: ctrl.lam for key, ctrl in self.controllers.items()}

    def state(self) -> dict[str, dict[str, Any]]:
        return {key: ctrl.state() for key, ctrl in self.controllers.items()}
