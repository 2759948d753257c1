"""The realised costs a router replica owes the budget controller, and the sync that pays them.

Every drawn image's cost is recorded here the moment it is drawn (whatever later becomes of the
request), per controller key. `sync` hands what is pending to the coordinator; when the coordinator
cannot be reached, the costs go back in front of anything recorded meanwhile, so nothing is lost
and the order is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("catimage.serve")

SyncFn = Callable[[dict[str, list[float]]], Awaitable[dict[str, float]]]


class CostLedger:
    """Pending realised costs by controller key (not thread-safe: the router's event loop owns it)."""

    def __init__(self) -> None:
        self._pending: dict[str, list[float]] = {}

    def record(self, key: str, cost: float) -> None:
        self._pending.setdefault(key, []).append(float(cost))

    def take(self) -> dict[str, list[float]]:
        """Everything pending, leaving the ledger empty."""
        pending, self._pending = self._pending, {}
        return pending

    def put_back(self, taken: dict[str, list[float]]) -> None:
        """Return costs a failed sync took, ahead of those recorded since."""
        for key, costs in taken.items():
            self._pending[key] = list(costs) + self._pending.get(key, [])

    def pending(self) -> dict[str, list[float]]:
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
