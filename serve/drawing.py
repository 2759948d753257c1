"""The one place a router replica draws: call a candidate's generator deployment, retry a dead
replica, fall back down the decision's ranking, time each call, count what is in flight.

`Drawer.draw` returns a `Drawn` or raises `AllFailed` (every candidate of the order failed). It
calls `on_drawn(candidate)` the moment an image exists, before anything else can fail or be
cancelled, so that the Router's accounting (metrics, the budget controller's realised costs) sees
every image that was paid for.
"""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve reads annotations.
import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serve.errors import public_reason, replica_died
from serve.schemas import Fallback

log = logging.getLogger("catimage.serve")


@dataclass
class Drawn:
    """One successful draw and how it came about."""

    candidate: str
    png: bytes | None
    tried: list[dict[str, str]] = field(default_factory=list)
    generate_ms: float = 0.0

    def fallback(self) -> Fallback | None:
        if not self.tried:
            return None
        return Fallback(**{"from": self.tried[0]["candidate"], "reason": self.tried[0]["reason"], "tried": self.tried})


class AllFailed(Exception):
    """Every candidate of the order failed; `tried` says why, candidate by candidate."""

    def __init__(self, tried: list[dict[str, str]]) -> None:
        self.tried = tried
        super().__init__("; ".join(f"{t['candidate']}: {t['reason']}" for t in tried))


async def _resolve(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (what asyncio.wait_for cancels on timeout)."""
    return await response


class Drawer:
    """Generator handles with their timeouts, in-flight counts and measured service times."""

    def __init__(self, generators: Mapping[str, Any], timeouts: Mapping[str, float], replica_death_retries: int,
                 service_s_prior: float, metrics: Any) -> None:
        self.generators = dict(generators)
        self.timeouts = dict(timeouts)
        self.retries = replica_death_retries
        self.in_flight = {name: 0 for name in self.timeouts}
        self.service_s = {name: float(service_s_prior) for name in self.timeouts}
        self.metrics = metrics

    async def _call(self, candidate: str, prompt: str, seed: int, want_image: bool) -> bytes | None:
        response = self.generators[candidate].remote(prompt, seed, want_image)
        alone = self.in_flight[candidate] == 0  # no queue ahead (as far as this router knows)
        self._count(candidate, +1)
        start = time.perf_counter()
        try:
            png = await asyncio.wait_for(_resolve(response), timeout=self.timeouts[candidate])
        except TimeoutError:
            response.cancel()
            raise
        finally:
            self._count(candidate, -1)
        if alone:  # service time, not queueing: the load term multiplies it by the queue itself
            self.service_s[candidate] = 0.8 * self.service_s[candidate] + 0.2 * (time.perf_counter() - start)
        return png

    def _count(self, candidate: str, step: int) -> None:
        self.in_flight[candidate] += step
        self.metrics.in_flight.set(self.in_flight[candidate], tags={"candidate": candidate})

    async def _attempt(self, candidate: str, prompt: str, seed: int, want_image: bool,
                       tried: list[dict[str, str]]) -> tuple[bool, bytes | None]:
        """(drawn, png) from one candidate, retrying a dead replica; failures are appended to `tried`."""
        for attempt in range(self.retries + 1):
            try:
                return True, await self._call(candidate, prompt, seed, want_image)
            except TimeoutError:
                reason = f"timed out after {self.timeouts[candidate]:g} s (request_timeout_s)"
            except Exception as err:  # noqa: BLE001 - any generator failure is a reason to fall back
                reason = public_reason(err)
                log.warning("generator %s failed: %s", candidate, err)
                if replica_died(err) and attempt < self.retries:
                    tried.append({"candidate": candidate, "reason": reason + "; retried"})
                    continue
            break
        self.metrics.fallbacks.inc(1, tags={"candidate": candidate})
        tried.append({"candidate": candidate, "reason": reason})
        return False, None

    async def draw(self, prompt: str, order: list[str], seed: int, want_image: bool,
                   on_drawn: Callable[[str], None]) -> Drawn:
        """Try candidates in `order`; `on_drawn(candidate)` as soon as one drew; AllFailed if none did."""
        tried: list[dict[str, str]] = []
        start = time.perf_counter()
        for candidate in order:
            if candidate not in self.generators:
                tried.append({"candidate": candidate, "reason": "no generator configured for it in the pool"})
                continue
            drawn, png = await self._attempt(candidate, prompt, seed, want_image, tried)
            if drawn:
                on_drawn(candidate)
                return Drawn(candidate, png, tried, (time.perf_counter() - start) * 1000)
        raise AllFailed(tried)
