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
import math
import time
from collections.abc import Callable, Iterable, Mapping
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


def draw_args(prompt: str, seed: int, want_image: bool, tokens: Any = None) -> tuple:
    """The arguments of one draw (`Generator.__call__`), tokens only when there are some: a generator
    that takes none keeps its three-argument call."""
    return (prompt, seed, want_image) if tokens is None else (prompt, seed, want_image, tokens)


async def _resolve(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (what asyncio.wait_for cancels on timeout)."""
    return await response


CALLS_PER_REPLICA = 2
"""Shared calls a router keeps out per generator replica, at least: one drawing, one queued behind it."""


@dataclass(frozen=True)
class CallLimits:
    """How a router shares calls to one candidate's generator deployment (`CallBatcher`)."""

    max_items: int  # draws per call: the generator's max_batch_size
    max_calls: int  # calls out at once
    max_partial_calls: int = 1  # calls out at once beyond which a call that is not full waits


def call_limits(candidates: Iterable[Any]) -> dict[str, CallLimits]:
    """Each pool candidate's limits. Calls out: per replica it may scale to, its autoscaling target
    (Serve scales on ongoing calls, so calls past the target are what ask for another replica) and at
    least two. Enough to keep every replica busy and to let the candidate scale to its most replicas;
    few enough that a burst waits in the router as growing batches rather than in Serve's queue as
    small calls. A call that is not full leaves only while no other call is out: only full batches
    waiting, real load, make a candidate ask for another replica."""
    return {
        c.name: CallLimits(
            max_items=max(int(c.serve.max_batch_size), 1),
            max_calls=max(CALLS_PER_REPLICA, math.ceil(c.serve.autoscaling.target_ongoing_requests))
            * int(c.serve.autoscaling.max_replicas),
        )
        for c in candidates
    }


class CallBatcher:
    """Concurrent draws of one candidate share one generator call (`Generator.draw_many`).

    Serve assigns every call to a replica on its own (a couple of routing tasks per deployment, each
    asking replicas for their queue length): under a burst, requests waited there a median 25 s while
    the generator replicas drew 3-6 images per batch (benchmarks/serve_load.py --world). Draws that
    arrive within `window_s` of each other, up to `max_items` (the generator's `max_batch_size`),
    go out as one call, so the replica sees them together and batches them as one. At most
    `max_calls` calls are out at once: past that, draws wait here and leave together (up to
    `max_items` a call) as soon as a call comes back, so a burst reaches the replicas as full batches
    instead of a queue of small calls. A call that is not full leaves only while fewer than
    `max_partial_calls` calls are out: a candidate with a trickle of draws keeps one small call out
    and gathers the rest behind it, rather than a queue of small calls that Serve's autoscaler, which
    counts calls, would read as load worth another replica. A call is cancelled only when every draw
    in it was (a draw that gives up alone stops waiting, not drawing).
    """

    def __init__(self, handle: Any, max_items: int, window_s: float, max_calls: int | None = None,
                 max_partial_calls: int | None = None) -> None:
        self.handle = handle
        self.max_items = int(max_items)
        self.window_s = float(window_s)
        self.max_calls = None if max_calls is None else max(int(max_calls), 1)
        self.max_partial_calls = None if max_partial_calls is None else max(int(max_partial_calls), 1)
        self._pending: list[tuple[tuple, asyncio.Future]] = []  # ((prompt, seed, want_image[, tokens]), future)
        self._timer: asyncio.TimerHandle | None = None
        self.calls = 0
        self.calls_out = 0

    async def call(self, prompt: str, seed: int, want_image: bool, tokens: Any = None) -> bytes | None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((draw_args(prompt, seed, want_image, tokens), future))
        if len(self._pending) >= self.max_items:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._send)
        return await future

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = [(item, f) for item, f in self._pending if not f.done()]
        while self._pending and self._may_send(full=len(self._pending) >= self.max_items):
            batch, self._pending = self._pending[:self.max_items], self._pending[self.max_items:]
            self._call(batch)

    def _may_send(self, full: bool) -> bool:
        limits = (self.max_calls,) if full else (self.max_calls, self.max_partial_calls)
        return all(limit is None or self.calls_out < limit for limit in limits)

    def _call(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        self.calls += 1
        self.calls_out += 1
        response = self.handle.draw_many.remote([item for item, _ in batch])
        futures = [f for _, f in batch]
        task = asyncio.get_running_loop().create_task(_resolve(response))
        task.add_done_callback(lambda t: _settle(t, futures))
        task.add_done_callback(self._returned)
        for f in futures:
            f.add_done_callback(lambda _f: _cancel_if_abandoned(response, task, futures))

    @property
    def waiting(self) -> int:
        """Draws here, not yet in a call (a free call, or their window, ahead of them)."""
        return sum(1 for _, f in self._pending if not f.done())

    def _returned(self, _task: asyncio.Task) -> None:
        """A call came back: what waited for a free call leaves now (it already waited its window)."""
        self.calls_out -= 1
        if self._pending:
            self._send()


def _settle(task: asyncio.Task, futures: list[asyncio.Future]) -> None:
    """Hand each draw its image (or the call's exception); a cancelled call cancels what still waits."""
    if task.cancelled():
        for f in futures:
            f.cancel()
        return
    error = task.exception()
    for k, f in enumerate(futures):
        if f.done():
            continue
        if error is not None:
            f.set_exception(error)
        else:
            f.set_result(task.result()[k])


def _cancel_if_abandoned(response: Any, task: asyncio.Task, futures: list[asyncio.Future]) -> None:
    if not task.done() and all(f.cancelled() for f in futures):
        response.cancel()
        task.cancel()


TEXT_FEATURES_TIMEOUT_S = 10.0
"""How long a router waits for a generator to say which text features it takes, once per candidate."""


class Drawer:
    """Generator handles with their timeouts, in-flight counts and measured service times.

    `prompt_tokens(prompt)` gives (the router's embedder identity, the prompt's per-token features)
    when the router has them (its embedding cache), or None. A generator whose text encoder is that
    embedder (`Generator.text_features`, asked once per candidate) gets them with the draw instead
    of running the same encoder again on the same prompt.
    """

    def __init__(self, generators: Mapping[str, Any], timeouts: Mapping[str, float], replica_death_retries: int,
                 service_s_prior: float, metrics: Any, limits: Mapping[str, CallLimits] | None = None,
                 batch_window_s: float = 0.005,
                 prompt_tokens: Callable[[str], tuple[dict[str, Any], Any] | None] | None = None) -> None:
        self.generators = dict(generators)
        self.prompt_tokens = prompt_tokens
        self._text_features: dict[str, asyncio.Task] = {}
        self.timeouts = dict(timeouts)
        self.retries = replica_death_retries
        self.in_flight = {name: 0 for name in self.timeouts}
        self.service_s = {name: float(service_s_prior) for name in self.timeouts}
        self.metrics = metrics
        limits = limits or {}
        self.batchers = {  # candidates whose replicas batch (max_batch_size > 1): concurrent draws share calls
            name: CallBatcher(handle, limits[name].max_items, batch_window_s, limits[name].max_calls,
                              limits[name].max_partial_calls)
            for name, handle in self.generators.items() if name in limits and limits[name].max_items > 1
        }

    async def _features_of(self, candidate: str) -> dict[str, Any] | None:
        """The candidate's `text_features` (asked once; None if it takes none or cannot say)."""
        try:
            return await asyncio.wait_for(_resolve(self.generators[candidate].text_features.remote()),
                                          min(TEXT_FEATURES_TIMEOUT_S, self.timeouts[candidate]))
        except Exception as err:  # noqa: BLE001 - an older or failing generator: it encodes its own prompts
            log.warning("generator %s did not say which text features it takes (%s); it encodes its own", candidate, err)
            return None

    async def _tokens_for(self, candidate: str, prompt: str) -> Any:
        """The prompt's tokens when the candidate's generator takes the router's, else None."""
        given = None if self.prompt_tokens is None else self.prompt_tokens(prompt)
        if given is None:
            return None
        if candidate not in self._text_features:
            self._text_features[candidate] = asyncio.ensure_future(self._features_of(candidate))
        identity, tokens = given
        return tokens if await asyncio.shield(self._text_features[candidate]) == identity else None

    async def _call(self, candidate: str, prompt: str, seed: int, want_image: bool) -> bytes | None:
        """One draw: alone, its own generator call (cancelled on timeout: the replica stops drawing);
        while other draws of the candidate are in flight, through its CallBatcher."""
        tokens = await self._tokens_for(candidate, prompt)
        alone = self.in_flight[candidate] == 0  # no queue ahead (as far as this router knows)
        batcher = None if alone else self.batchers.get(candidate)
        response = None if batcher is not None else self.generators[candidate].remote(*draw_args(prompt, seed, want_image, tokens))
        waiting = batcher.call(prompt, seed, want_image, tokens) if batcher is not None else _resolve(response)
        self._count(candidate, +1)
        start = time.perf_counter()
        try:
            png = await asyncio.wait_for(waiting, timeout=self.timeouts[candidate])
        except TimeoutError:
            if response is not None:
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
