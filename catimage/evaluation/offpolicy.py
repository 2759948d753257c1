"""Off-policy evaluation: what another policy would have earned on the traffic that was served.

The served log (catimage.tables.served_log) holds, per request, the choice the serving policy drew
(a candidate or a plan: the `plan` column), the probability it drew it with (`propensity`), what it
returned (the online decision score of the returned image) and what it spent (every attempt's pool
cost plus scoring). For a target policy pi that would choose action a with probability pi(a | x):

    IPS     V = mean_i  w_i r_i,                                   w_i = pi(a_i | x_i) / p_i
    SNIPS   V = sum_i w_i r_i / sum_i w_i                          (self-normalised: lower variance, tiny bias)
    DR      V = mean_i [ sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]
    DM      V = mean_i   sum_a pi(a | x_i) q(x_i, a)               (reward model only: biased, for reference)

IPS and DR are unbiased when every action the target takes has a logged propensity > 0 (epsilon
exploration, catimage.policy.explore); DR stays unbiased with any reward model q fitted on other
data and has lower variance the better q is. The same estimators run with r := cost give the
target's mean cost, and utility at lam is quality - lam * cost. Intervals: percentile bootstrap over
requests, one shared set of resamples for every figure, so that differences between two policies
(`compare_policies`) are paired.

Rewards here are the DECISION metric (what serving scored online); the judge is never logged. An
estimate of quality is therefore an estimate of the decision metric's mean, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catimage.errors import CatimageError, TableError
from catimage.model.promotion import Figure, PromotionEvidence
from catimage.policy.routing import route

log = logging.getLogger(__name__)

__all__ = [
    "ESTIMATORS",
    "LoggedRequests",
    "OffPolicyResult",
    "TargetPolicy",
    "cascade_target",
    "compare_policies",
    "evaluate_logged",
    "evaluate_policy",
    "holdout_by_time",
    "logged_requests",
    "router_target",
]

ESTIMATORS = ("ips", "snips", "dr", "dm")
QUANTITIES = ("quality", "cost", "utility")
DEFAULT_BOOT = 1000
_BOOT_CHUNK = 100


@dataclass
class LoggedRequests:
    """One row per served request: what was chosen, with what probability, what it earned and cost."""

    request_ids: list[str]
    prompt_ids: list[str]
    prompts: list[str]
    actions: list[str]
    propensity: np.ndarray  # (n,)
    reward: np.ndarray  # (n,) decision score of the returned image
    cost: np.ndarray  # (n,) pool cost + scoring cost of every attempt drawn
    lam: np.ndarray  # (n,) the lambda the serving policy decided with (NaN: not logged)
    model_version: list[str]
    metric: str

    @property
    def n(self) -> int:
        return len(self.request_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LoggedRequests:
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: [xs[i] for i in idx]
        return LoggedRequests(
            pick(self.request_ids), pick(self.prompt_ids), pick(self.prompts), pick(self.actions),
            self.propensity[idx], self.reward[idx], self.cost[idx], self.lam[idx], pick(self.model_version),
            self.metric,
        )


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()


def logged_requests(log_table: pa.Table, metric: str) -> LoggedRequests:
    """Group a served log (rows = attempts) into requests; the reward is `metric` of the returned image.

    Requests whose returned image has no score (the scorer failed) cannot be weighed and are left
    out, counted in a warning; a request logged without a returned row is an error in the log.
    """
    need = {"request_id", "returned", "propensity", "plan", "pool_cost", "decision_cost", metric}
    missing = sorted(need - set(log_table.column_names))
    if missing:
        raise TableError(f"the served log lacks column(s) {missing}; is it a catimage served log with metric {metric!r}?")
    costs = log_table.group_by("request_id").aggregate([("pool_cost", "sum"), ("decision_cost", "sum")])
    returned = log_table.filter(pc.equal(log_table.column("returned"), True))
    ids = _column(returned, "request_id")
    if len(set(ids)) != len(ids):
        raise TableError("the served log has requests with more than one returned attempt; each request returns one image")
    no_return = set(_column(costs, "request_id")) - set(ids)
    if no_return:
        raise TableError(f"{len(no_return)} request(s) in the served log have no returned attempt, e.g. {sorted(no_return)[:3]}")
    spent = dict(zip(_column(costs, "request_id"),
                     np.asarray(_column(costs, "pool_cost_sum")) + np.asarray(_column(costs, "decision_cost_sum"))))
    reward = np.asarray(returned.column(metric).to_numpy(zero_copy_only=False), dtype=np.float64)
    keep = np.isfinite(reward)
    if not keep.all():
        log.warning("off-policy evaluation: %d of %d request(s) returned an unscored image and are left out",
                    int((~keep).sum()), keep.size)
    returned = returned.filter(pa.array(keep))
    if returned.num_rows == 0:
        raise TableError(f"no logged request has a returned image scored with {metric!r}")
    ids = _column(returned, "request_id")
    lam = returned.column("lam").to_numpy(zero_copy_only=False) if "lam" in returned.column_names else None
    return LoggedRequests(
        request_ids=ids,
        prompt_ids=_column(returned, "prompt_id"),
        prompts=_column(returned, "prompt"),
        actions=_column(returned, "plan"),
        propensity=np.asarray(returned.column("propensity").to_numpy(zero_copy_only=False), dtype=np.float64),
        reward=reward[keep],
        cost=np.array([spent[r] for r in ids], dtype=np.float64),
        lam=np.full(len(ids), np.nan) if lam is None else np.asarray(lam, dtype=np.float64),
        model_version=_column(returned, "model_version"),
        metric=metric,
    )


@dataclass
class TargetPolicy:
    """A policy to evaluate on logged requests: its action distribution and (for DR) reward models.

    `probs[i, k]`: probability of `actions[k]` on logged request i (rows sum to 1). `reward_model`
    and `cost_model` (n, K): the expected decision score and cost of each action on each request,
    from a model fitted on OTHER data than the evaluated requests; None leaves DR and DM out.
    """

    name: str
    actions: list[str]
    probs: np.ndarray
    reward_model: np.ndarray | None = None
    cost_model: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, dtype=np.float64)
        k = len(self.actions)
        if len(set(self.actions)) != k:
            raise CatimageError(f"target {self.name!r}: action names repeat")
        if self.probs.ndim != 2 or self.probs.shape[1] != k:
            raise CatimageError(f"target {self.name!r}: probs must be (requests, {k} actions), got {self.probs.shape}")
        if (self.probs < -1e-12).any() or not np.allclose(self.probs.sum(axis=1), 1.0, atol=1e-6):
            raise CatimageError(f"target {self.name!r}: each row of probs must be a probability distribution")
        for name in ("reward_model", "cost_model"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.float64)
                if value.shape != self.probs.shape or not np.isfinite(value).all():
                    raise CatimageError(f"target {self.name!r}: {name} must be finite, shaped like probs {self.probs.shape}")
                setattr(self, name, value)


def router_target(model: Any, logged: LoggedRequests, lam: float, name: str = "router") -> TargetPolicy:
    """A fitted router (RouterModel) as a target: its argmax at `lam` on each logged prompt; its own
    predictions as the reward model and the pool costs as the cost model."""
    pred = model.predict(logged.prompts)
    decisions = route(pred, model.costs, lam)
    probs = np.zeros_like(pred)
    probs[np.arange(logged.n), decisions] = 1.0
    if model.metric != logged.metric:
        log.warning("router %s predicts %s but the log rewards %s: its reward model is off-scale (DR stays "
                    "unbiased, with more variance)", name, model.metric, logged.metric)
    return TargetPolicy(name, list(model.candidates), probs, pred, np.broadcast_to(model.costs, pred.shape).copy())


def cascade_target(model: Any, logged: LoggedRequests, lam: float, name: str = "cascade") -> TargetPolicy:
    """A fitted cascade (CascadeModel) as a target: its plan at `lam` on each logged prompt; its expected
    plan values and costs as reward and cost models.

    Actions are named by `action_key`, as serving logs them. Only the plans the target chooses and
    the logged actions it knows are kept as columns (a plan set has thousands). A logged plan the
    target's plan set lacks (another threshold grid) can never match: its weight is 0 and the DR
    estimate rests on the reward model there; keep the plan thresholds fixed across retrains
    (`CascadeOptions.plan_thresholds`) so that plans keep their names.
    """
    from catimage.policy.explore import action_key

    value, cost = model.plan_values(model.predict_stats(logged.prompts))
    chosen = route(value, cost, lam)
    keys = [action_key(p) for p in model.plans]
    index = {k: j for j, k in enumerate(keys)}
    known = {index[a] for a in logged.actions if a in index}
    cols = sorted(set(chosen.tolist()) | known)
    pos = {c: k for k, c in enumerate(cols)}
    probs = np.zeros((logged.n, len(cols)))
    probs[np.arange(logged.n), [pos[c] for c in chosen.tolist()]] = 1.0
    if model.judge_metric != logged.metric:
        log.warning("cascade %s predicts %s but the log rewards %s: its reward model is off-scale (DR stays "
                    "unbiased, with more variance)", name, model.judge_metric, logged.metric)
    return TargetPolicy(name, [keys[c] for c in cols], probs, value[:, cols], cost[:, cols])


# --- estimators -----------------------------------------------------------------------------------


@dataclass
class _Terms:
    """Per-request terms whose (weighted) means are the estimates."""

    weights: np.ndarray  # (n,) pi(a_i | x_i) / p_i
    ips: dict[str, np.ndarray]  # quantity -> (n,) w r
    dr: dict[str, np.ndarray] | None
    dm: dict[str, np.ndarray] | None


def _terms(logged: LoggedRequests, target: TargetPolicy) -> _Terms:
    if target.probs.shape[0] != logged.n:
        raise CatimageError(f"target {target.name!r} has {target.probs.shape[0]} rows for {logged.n} logged requests")
    if (logged.propensity <= 0).any() or (logged.propensity > 1).any():
        raise TableError("logged propensities must be in (0, 1]; the log is corrupt or was not written by catimage")
    index = {a: k for k, a in enumerate(target.actions)}
    col = np.array([index.get(a, -1) for a in logged.actions])
    rows = np.arange(logged.n)
    pi_logged = np.where(col >= 0, target.probs[rows, np.maximum(col, 0)], 0.0)
    w = pi_logged / logged.propensity
    observed = {"quality": logged.reward, "cost": logged.cost}
    ips = {q: w * v for q, v in observed.items()}
    dr = dm = None
    if target.reward_model is not None and target.cost_model is not None:
        models = {"quality": target.reward_model, "cost": target.cost_model}
        dm = {q: (target.probs * m).sum(axis=1) for q, m in models.items()}
        dr = {}
        for q, m in models.items():
            at_logged = np.where(col >= 0, m[rows, np.maximum(col, 0)], 0.0)
            dr[q] = dm[q] + w * (observed[q] - at_logged)
    return _Terms(w, ips, dr, dm)


@dataclass(frozen=True)
class _Stat:
    """A statistic of resampled requests: mean of `num` (or sum num / sum den when `den` is given)."""

    num: np.ndarray
    den: np.ndarray | None = None

    def value(self, idx: np.ndarray | None = None) -> np.ndarray | float:
        if idx is None:
            if self.den is None:
                return float(self.num.mean())
            return float(self.num.sum() / self.den.sum()) if self.den.sum() > 0 else float("nan")
        num = self.num[idx].sum(axis=-1)
        den = self.den[idx].sum(axis=-1) if self.den is not None else idx.shape[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den


def _statistics(logged: LoggedRequests, terms: _Terms, lam: float) -> dict[tuple[str, str], _Stat]:
    """(estimator, quantity) -> statistic, utility = quality - lam * cost for each estimator."""
    stats: dict[tuple[str, str], _Stat] = {}
    sources = {"ips": terms.ips, "dr": terms.dr, "dm": terms.dm}
    for est, parts in sources.items():
        if parts is None:
            continue
        for q in ("quality", "cost"):
            stats[(est, q)] = _Stat(parts[q])
        stats[(est, "utility")] = _Stat(parts["quality"] - lam * parts["cost"])
    for q in ("quality", "cost"):
        stats[("snips", q)] = _Stat(terms.ips[q], terms.weights)
    stats[("snips", "utility")] = _Stat(terms.ips["quality"] - lam * terms.ips["cost"], terms.weights)
    return stats


def _bootstrap(stats: Mapping[Any, _Stat], n: int, n_boot: int, seed: int) -> dict[Any, np.ndarray]:
    """(n_boot,) resampled values of every statistic, all on the SAME resamples of the n requests."""
    rng = np.random.default_rng(seed)
    out = {k: np.empty(n_boot) for k in stats}
    for start in range(0, n_boot, _BOOT_CHUNK):
        idx = rng.integers(0, n, size=(min(_BOOT_CHUNK, n_boot - start), n))
        for k, s in stats.items():
            out[k][start : start + idx.shape[0]] = s.value(idx)
    return out


def _figure(point: float, samples: np.ndarray, confidence: float) -> Figure:
    finite = samples[np.isfinite(samples)]
    if finite.size < 10 or not np.isfinite(point):
        return Figure(float(point), None, None)
    tail = (1.0 - confidence) / 2
    return Figure(float(point), float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail)))


@dataclass
class OffPolicyResult:
    """Estimates of one target policy on logged requests, beside the logging policy's realised figures."""

    target: str
    metric: str
    lam: float
    n_requests: int
    effective_sample_size: float
    match_rate: float
    figures: dict[str, dict[str, Figure]]  # estimator -> quantity -> estimate
    logging: dict[str, Figure]  # realised by the serving (logging) policy
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "decision_metric": self.metric, "lambda": self.lam, "n_requests": self.n_requests,
            "effective_sample_size": self.effective_sample_size, "match_rate": self.match_rate,
            "estimates": {e: {q: f.to_dict() for q, f in qs.items()} for e, qs in self.figures.items()},
            "logging_policy_realised": {q: f.to_dict() for q, f in self.logging.items()},
            "notes": self.notes,
        }


def _logging_stats(logged: LoggedRequests, lam: float) -> dict[tuple[str, str], _Stat]:
    return {
        ("logging", "quality"): _Stat(logged.reward),
        ("logging", "cost"): _Stat(logged.cost),
        ("logging", "utility"): _Stat(logged.reward - lam * logged.cost),
    }


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise CatimageError(f"lambda must be a number >= 0, got {lam}")
    return lam


def evaluate_policy(
    logged: LoggedRequests, target: TargetPolicy, lam: float = 0.0, *, n_boot: int = DEFAULT_BOOT,
    confidence: float = 0.95, seed: int = 0,
) -> OffPolicyResult:
    """IPS, SNIPS, DR and DM estimates (with bootstrap intervals) of `target` on `logged`, and the
    logging policy's realised figures on the same requests and resamples."""
    lam = _check_lam(lam)
    if logged.n < 2:
        raise CatimageError("off-policy evaluation needs at least 2 logged requests")
    terms = _terms(logged, target)
    stats = {**_statistics(logged, terms, lam), **_logging_stats(logged, lam)}
    samples = _bootstrap(stats, logged.n, n_boot, seed)
    figures: dict[str, dict[str, Figure]] = {}
    for (est, q), s in stats.items():
        if est != "logging":
            figures.setdefault(est, {})[q] = _figure(s.value(), samples[(est, q)], confidence)
    w = terms.weights
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
    notes = [f"quality is the decision metric {logged.metric!r} as scored online, not the judge"]
    if terms.dr is None:
        notes.append("no reward model given: DR and DM left out")
    return OffPolicyResult(
        target=target.name, metric=logged.metric, lam=lam, n_requests=logged.n, effective_sample_size=ess,
        match_rate=float((w > 0).mean()), figures=figures,
        logging={q: _figure(stats[("logging", q)].value(), samples[("logging", q)], confidence) for q in QUANTITIES},
        notes=notes,
    )


def compare_policies(
    logged: LoggedRequests, candidate: TargetPolicy, baseline: TargetPolicy, lam: float, *,
    estimator: str = "dr", n_boot: int = DEFAULT_BOOT, confidence: float = 0.95, seed: int = 0,
) -> PromotionEvidence:
    """Candidate minus baseline on the same logged requests (paired bootstrap), as promotion evidence."""
    lam = _check_lam(lam)
    if estimator not in ESTIMATORS:
        raise CatimageError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    stats_c = _statistics(logged, _terms(logged, candidate), lam)
    stats_b = _statistics(logged, _terms(logged, baseline), lam)
    if (estimator, "quality") not in stats_c or (estimator, "quality") not in stats_b:
        raise CatimageError(f"estimator {estimator!r} needs reward and cost models for both policies")
    both = {("c", q): stats_c[(estimator, q)] for q in QUANTITIES} | {("b", q): stats_b[(estimator, q)] for q in QUANTITIES}
    samples = _bootstrap(both, logged.n, n_boot, seed)
    fig = lambda who, q: _figure(both[(who, q)].value(), samples[(who, q)], confidence)
    gains = {q: _figure(both[("c", q)].value() - both[("b", q)].value(), samples[("c", q)] - samples[("b", q)], confidence)
             for q in QUANTITIES}
    w = _terms(logged, candidate).weights
    return PromotionEvidence(
        n_requests=logged.n, lam=lam, estimator=estimator, confidence=confidence,
        candidate={q: fig("c", q) for q in QUANTITIES}, serving={q: fig("b", q) for q in QUANTITIES}, gain=gains,
        effective_sample_size=float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0,
    )


def holdout_by_time(log_table: pa.Table, frac: float) -> tuple[pa.Table, pa.Table]:
    """(training rows, held-out rows) of a served log: the newest `frac` of requests are held out, and
    every row of a prompt that a held-out request served is left out of training (prompt-disjoint),
    so the candidate is judged on traffic and prompts it never learned from, as it will be served."""
    if not 0 < frac < 1:
        raise CatimageError(f"the held-out share of logged requests must be in (0, 1), got {frac}")
    for name in ("request_id", "time", "prompt_id"):
        if name not in log_table.column_names:
            raise TableError(f"the served log lacks column {name!r}; is it a catimage served log?")
    first = log_table.group_by("request_id").aggregate([("time", "min")]).sort_by([("time_min", "ascending"),
                                                                                    ("request_id", "ascending")])
    n_hold = max(1, round(first.num_rows * frac))
    if n_hold >= first.num_rows:
        raise CatimageError(f"{first.num_rows} logged request(s) are too few to hold out {frac:.0%} of them")
    held_ids = pa.array(_column(first, "request_id")[-n_hold:])
    is_held = pc.is_in(log_table.column("request_id"), value_set=held_ids)
    held = log_table.filter(is_held)
    held_prompts = pa.array(sorted(set(_column(held, "prompt_id"))))
    train = log_table.filter(pc.invert(pc.is_in(log_table.column("prompt_id"), value_set=held_prompts)))
    return train, held


def _operating_lambda(model: Any, logged: LoggedRequests, lam: float | None, budget: float | None) -> float:
    """`lam`, else the model's calibrated lambda for `budget`, else the median lambda serving logged, else 0."""
    if lam is not None:
        return _check_lam(lam)
    if budget is not None:
        return float(model.lambda_for_budget(budget))
    finite = logged.lam[np.isfinite(logged.lam)]
    return float(np.median(finite)) if finite.size else 0.0


def evaluate_logged(
    log_table: pa.Table, models: Mapping[str, Any], *, metric: str | None = None, lam: float | None = None,
    budget: float | None = None, n_boot: int = DEFAULT_BOOT, seed: int = 0,
) -> dict[str, Any]:
    """What each fitted router in `models` would have earned on the logged traffic (IPS, SNIPS, DR, DM
    with intervals), beside the serving policy's realised figures: `catimage evaluate --logged`."""
    from catimage.tables.served_log import decision_metric

    metric = decision_metric(log_table, metric)
    logged = logged_requests(log_table, metric)
    results = {}
    for name, model in models.items():
        at = _operating_lambda(model, logged, lam, budget)
        results[name] = evaluate_policy(logged, router_target(model, logged, at, name), at, n_boot=n_boot, seed=seed)
    return {
        "decision_metric": metric,
        "n_requests": logged.n,
        "serving_model_versions": sorted(set(logged.model_version)),
        "policies": {name: r.to_dict() for name, r in results.items()},
    }
