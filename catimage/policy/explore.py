"""Exploration with known propensities: what lets logged traffic evaluate and train other policies.

A policy that always takes its argmax never shows what the other choices would have earned on the
prompts it serves, and off-policy evaluation (catimage.evaluation.offpolicy) can only weigh a
logged choice by the probability with which it was drawn. So serving draws its choice from

    p(k | x) = (1 - epsilon) * base(k | x) + epsilon * uniform(k | allowed(x))

where `base` is the policy's own choice (one-hot on argmax_k utility[x, k], exact ties to the
cheaper choice) or, with a `temperature`, a softmax over the utilities, and `allowed(x)` is every
choice whose expected cost is at most `max_cost` (the policy's own pick is always allowed). The
choice and its probability `p(k | x)` are returned together; serving logs the probability as the
row's `propensity`. A choice is a candidate (routing) or a plan (cascades): anything with a
utility (expected quality - lam * expected cost) and an expected cost per prompt.

How exploration respects the budget, two ways that work together:

1. `max_cost` bounds what exploration may draw (e.g. twice the budget), so a small epsilon can
   never spend on the few choices that cost many times the budget;
2. serving feeds the REALISED cost of every attempt, exploration included, to the online budget
   controller (catimage.policy.budget). Exploration raises the average cost at a given lambda by
   `exploration_overhead`; the controller's lambda rises until the average is back at the budget,
   so exploration is paid for by slightly cheaper greedy choices, not by overspending.

Deterministic given a `numpy.random.Generator`: the same rng state gives the same draws.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from catimage.errors import CatimageError

__all__ = [
    "Exploration",
    "ExplorationConfig",
    "action_key",
    "choice_probabilities",
    "exploration_overhead",
    "explore",
    "greedy_choice",
]


@dataclass(frozen=True)
class ExplorationConfig:
    """How much traffic explores, and what it may draw."""

    epsilon: float = 0.05
    """Share of traffic drawn uniformly from the allowed choices (0 = never explore)."""
    temperature: float | None = None
    """With a value: the base policy is a softmax over utilities at this temperature (metric units);
    None: the base policy is the argmax."""
    max_cost: float | None = None
    """Exploration draws only choices whose expected cost is at most this (the pool's cost unit);
    None: any choice. The policy's own pick is always allowed."""

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, int | float) and 0.0 <= self.epsilon <= 1.0):
            raise CatimageError(f"exploration epsilon must be in [0, 1], got {self.epsilon!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise CatimageError(f"exploration temperature must be a positive number or None, got {self.temperature!r}")
        if self.max_cost is not None and not (math.isfinite(self.max_cost) and self.max_cost >= 0):
            raise CatimageError(f"exploration max_cost must be a number >= 0 or None, got {self.max_cost!r}")


@dataclass(frozen=True)
class Exploration:
    """Drawn choices, their probabilities, and what the policy alone would have picked."""

    choice: np.ndarray  # (n,) int: index of the drawn choice
    propensity: np.ndarray  # (n,) float: probability with which it was drawn (log this)
    greedy: np.ndarray  # (n,) int: the policy's own pick
    probs: np.ndarray  # (n, K) the whole distribution (rows sum to 1)

    @property
    def explored(self) -> np.ndarray:
        """(n,) bool: the draw differs from the policy's own pick."""
        return self.choice != self.greedy


def _check(utility: Any, cost: Any) -> tuple[np.ndarray, np.ndarray]:
    utility = np.asarray(utility, dtype=np.float64)
    if utility.ndim != 2 or utility.shape[1] == 0:
        raise CatimageError(f"utility must be a (prompts, choices) array, got shape {utility.shape}")
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), utility.shape)
    if not np.isfinite(utility).all():
        raise CatimageError("utility has NaN/infinite values; give every choice a finite utility")
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise CatimageError("expected costs must be finite numbers >= 0 (one per prompt and choice, or per choice)")
    return utility, cost


def greedy_choice(utility: Any, cost: Any) -> np.ndarray:
    """(n,) argmax of utility per row; exact ties go to the cheaper choice, then the lower index."""
    utility, cost = _check(utility, cost)
    best = utility.max(axis=1, keepdims=True)
    tied_cost = np.where(utility == best, cost, np.inf)
    return np.argmin(tied_cost, axis=1)


def choice_probabilities(utility: Any, cost: Any, config: ExplorationConfig) -> tuple[np.ndarray, np.ndarray]:
    """((n, K) probabilities of each choice, (n,) greedy choice) under `config`; rows sum to 1."""
    utility, cost = _check(utility, cost)
    n, k = utility.shape
    greedy = greedy_choice(utility, cost)
    rows = np.arange(n)
    allowed = np.ones((n, k), dtype=bool) if config.max_cost is None else cost <= config.max_cost
    allowed[rows, greedy] = True
    if config.temperature is None:
        base = np.zeros((n, k))
        base[rows, greedy] = 1.0
    else:
        z = np.where(allowed, utility / config.temperature, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        base = np.exp(z)
        base /= base.sum(axis=1, keepdims=True)
    uniform = allowed / allowed.sum(axis=1, keepdims=True)
    probs = (1.0 - config.epsilon) * base + config.epsilon * uniform
    return probs, greedy


def explore(utility: Any, cost: Any, config: ExplorationConfig, rng: np.random.Generator) -> Exploration:
    """Draw one choice per prompt (row) and return it with its probability.

    One uniform number per row (inverse CDF), so the draws depend only on the rng state and the
    probabilities: the same seed replays the same traffic.
    """
    probs, greedy = choice_probabilities(utility, cost, config)
    u = rng.random(probs.shape[0])
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    choice = np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)
    for i in np.flatnonzero(probs[np.arange(choice.size), choice] <= 0):  # rounding at the CDF's top
        choice[i] = int(np.flatnonzero(probs[i, : choice[i]] > 0)[-1])
    propensity = probs[np.arange(choice.size), choice]
    return Exploration(choice=choice, propensity=propensity, greedy=greedy, probs=probs)


def exploration_overhead(probs: Any, greedy: Any, cost: Any) -> float:
    """Expected extra cost per request of exploring, at a fixed lambda: E_p[cost] - cost[greedy].

    What the budget controller has to win back by raising lambda (see the module docstring).
    """
    probs = np.asarray(probs, dtype=np.float64)
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), probs.shape)
    greedy = np.asarray(greedy, dtype=np.int64)
    return float(((probs * cost).sum(axis=1) - cost[np.arange(greedy.size), greedy]).mean())


def action_key(choice: Any) -> str:
    """The one string that names a choice in the served log's `plan` column and in off-policy evaluation.

    A candidate name stays itself; a one-attempt unscored plan (routing) is its candidate's name; any
    other plan (catimage.policy.plans.Plan) is its wire form as compact JSON, exact to the threshold.
    """
    if isinstance(choice, str):
        return choice
    if getattr(choice, "is_route", False):
        return str(choice.attempts[0])
    if hasattr(choice, "to_dict"):
        return json.dumps(choice.to_dict(), separators=(",", ":"), sort_keys=True)
    raise CatimageError(f"cannot name choice {choice!r}: give a candidate name or a Plan")
