"""The costs a router replica owes the budget controller, and the sync that pays them.

Every request's realised cost is recorded here when its plan ends (whatever became of it), per
controller key. With feed-forward, a request's EXPECTED plan cost is committed the moment it is
decided (`commit`), and its realised cost is later recorded against it, so the controller
(catimage.policy.budget) counts dear plans still drawing instead of hearing of them when they end.
A hot swap shifts the same controllers (serve/budget_coordinator.py), so a commitment stays valid
across it.
`sync` hands what is pending to the coordinator; when the coordinator cannot be reached, the
entries go back in front of anything recorded meanwhile, so nothing is lost and the order is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("catimage.serve")

Entry = float | dict[str, Any]
"""A realised cost alone (float); a commitment {"commit": expected}; or a realised cost
paid against its commitment {"cost", "expected"} (cost NaN: nothing was spent)."""
SyncFn = Callable[[dict[str, list[Entry]]], Awaitable[dict[str, float]]]


class CostLedger:
    """Pending cost entries by controller key (not thread-safe: the router's event loop owns it)."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Entry]] = {}

    def record(self, key: str, cost: float) -> None:
        """A realised cost with no commitment before it."""
        self._pending.setdefault(key, []).append(float(cost))

    def commit(self, key: str, expected: float) -> None:
        """A request just decided, at its plan's expected cost (feed-forward)."""
        self._pending.setdefault(key, []).append({"commit": float(expected)})

    def pay(self, key: str, cost: float, expected: float) -> None:
        """A committed request's realised cost (0 or less: nothing spent, the commitment is withdrawn)."""
        paid = float(cost) if cost > 0 else math.nan
        self._pending.setdefault(key, []).append({"cost": paid, "expected": float(expected)})

    def take(self) -> dict[str, list[Entry]]:
        """Everything pending, leaving the ledger empty."""
        pending, self._pending = self._pending, {}
        return pending

    def put_back(self, taken: dict[str, list[Entry]]) -> None:
        """Return costs a failed sync took, ahead of those recorded since."""
        for key, costs in taken.items():
            self._pending[key] = list(costs) + self._pending.get(key, [])

    def pending(self) -> dict[str, list[Entry]]:
        """A copy of what is owed (for tests and /v1/pool)."""
        return {k: list(v) for k, v in self._pending.items()}


async def sync(ledger: CostLedger, send: SyncFn) -> dict[str, float] | None:
    """Send the pending costs; the controllers' lambdas, or None (costs kept) when the send raised."""
    taken = ledger.take()
    try:
        return await send(taken)
    except Exception as err:  # noqa: BLE001 - any failure to reach the coordinator keeps the costs
        ledger.put_back(taken)
        log.warning("budget sync failed (%s); %d costs kept for the next sync", err, sum(map(len, taken.values())))
        return None


def apply_entries(ctrl: Any, entries: list[Entry]) -> None:
    """Feed one key's entries, in order, to its controller (`BudgetController`).

    A hot swap shifts the same controllers (serve/budget_coordinator.py), so commitments made before it
    are withdrawn as usual. A realised cost whose commitment this controller never saw (the
    coordinator replica restarted, or its key is new since) finds nothing in flight and is observed
    alone.
    """
    for entry in entries:
        if not isinstance(entry, dict):
            ctrl.observe([entry])
        elif "commit" in entry:
            ctrl.commit([entry["commit"]])
        else:
            committed = ctrl.in_flight > 0
            ctrl.observe([entry["cost"]], expected=[entry["expected"]] if committed else None)
