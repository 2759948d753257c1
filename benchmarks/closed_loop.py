"""Closed loop in the scene world: a policy that learns only from what it serves, against one fitted on the full table.

    nice -n 10 .venv/bin/python benchmarks/closed_loop.py [--prompts 5000] [--retrain-every 1000]
        [--budget 2.5] [--epsilon 0.1] [--decider scene_decider|noisy] [--eval-prompts 200] [--out /tmp/closed_loop]

1. The full-table policy: a cascade (router + plans, catimage.model.cascade_model.fit_cascade) fitted
   on the whole shipped world table (1,000 prompts x 7 candidates x 4 seeds): judge scene_score,
   decision metric the online decider.
2. The closed-loop policy starts from a cascade fitted on 100 of those table prompts (a built
   table: the decider stops, the table's judge is its label). From then on it learns from logged
   decision scores only (the judge never runs on the stream), put on the judge's scale by one
   offset per candidate learned on those 100 prompts (catimage.tables.judge_scale: the decider
   over-scores the cheap `mini-8` by 0.026; refitted on raw decider labels the closed loop drifted
   toward it).
3. A stream of fresh world prompts (`heldout_prompts(seed=STREAM_SEED)`, scenes disjoint from the
   table's, the demo's and the dev set's) is served in-process by both policies: images drawn by
   the world generators (catimage.generators), scored by scene_score (the judge, for the figures
   only) and by the decider. Each policy holds the budget with its own online controller
   (catimage.policy.budget) fed the realised cost of every attempt. The closed loop explores
   (catimage.policy.explore: epsilon-greedy over the 7 route plans around its own plan), scores
   every image it draws (its labels; the scorer's cost is counted), logs every attempt with its
   propensity (catimage.tables.served_log, a real Parquet log in a temporary folder), and every
   `--retrain-every` prompts refits on the 100 table prompts plus everything logged.
4. Figures: per window, the realised judge quality and cost of both policies on the stream; the
   area over the hull (THE area figure, on the judge, at the same budgets: the fixed candidates'
   cost range) of every closed-loop version and of the full-table policy on a fresh evaluation
   table (`--eval-prompts` further prompts x 7 candidates x 4 seeds, simulated by
   catimage.evaluation.cascade) and, more precisely, on the 900 table prompts the closed loop never
   saw against the full-table policy cross-fitted over 10 folds of the table; and off-policy
   evaluation (DR) of a FIXED router (the full-table policy's router at the budget's lambda) on the
   logged traffic against that router's true on-policy mean decision score on the same prompts
   and seeds.

The decider (`--decider`): the learned `scene_decider` (shipped weights; its cost per image,
`--score-cost`, 0.043 GFLOPs from its model card), read from the shipped table's column (a table
without it is drawn again with the same seeds and scored); or `noisy`, scene_score plus
Gaussian noise (sigma `--sigma`, a fixed function of prompt, candidate and seed), which needs no
redraw of the table. Images are never kept; their scores are cached outside the repository
(`--cache`) so that a rerun draws nothing twice. Prints; asserts nothing. The last line reads

    closed loop: <x> of the full-table router's area over hull after <n> served prompts; OPE error <e>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catimage.model.cascade_model import CascadeModel, CascadeOptions, fit_cascade
from catimage.policy.budget import BudgetController, ControllerConfig, lambda_scale
from catimage.policy.explore import ExplorationConfig, action_key, explore
from catimage.policy.plans import Plan, executed_attempts
from catimage.policy.routing import route
from catimage.tables.draws import Draws, draws_from_table
from catimage.tables.served_log import LogConfig, ServedLogWriter, ServedRow
from catimage.tables.table import aggregate, read_quality_table, split_prompts

log = logging.getLogger("closed_loop")

DATA = ROOT / "catimage" / "data"
POOL = DATA / "world_pool.yaml"
TABLE = DATA / "world_table.parquet"
DEMO_PROMPTS = DATA / "world_demo_prompts.txt"
JUDGE = "scene_score"
DECIDER = "decider"  # scene_score + noise, standing in for the learned scene_decider
TABLE_SEED, DEMO_SEED, DEV_SEED = 2027, 8, 99  # the seeds of the prompts this benchmark must not reuse
STREAM_SEED, EVAL_SEED = 1414, 1415
SLOTS = 4  # seed slots per prompt (plans of up to 4 attempts)


# --- the simulated world: draw, judge, decide --------------------------------------------------------


def decider_noise(prompt_id: str, candidate: str, slot: int) -> float:
    """A standard normal that is a fixed function of the draw (same draw, same noise, every run)."""
    digest = hashlib.sha256(f"{prompt_id}\x1f{candidate}\x1f{slot}".encode()).digest()
    return float(np.random.default_rng(int.from_bytes(digest[:8], "big")).standard_normal())


LEARNED = "scene_decider"  # the learned decider's metric (shipped weights)


class WorldSim:
    """Draws images with the world generators and scores them with the judge (and the learned decider
    when it decides); scores cached on disk, images never kept.

    A draw is (prompt, candidate, slot): the image of `generation_seed(prompt_id, slot)`, the seed a
    build gives seed index `slot`, so a stream draw and a table row of the same slot are alike.
    `decider`: "scene_decider" (the learned one) or "noisy" (scene_score + N(0, sigma), a fixed
    function of the draw).
    """

    def __init__(self, pool, cache: Path, decider: str, sigma: float, batch: int = 64) -> None:
        self.pool, self.decider, self.sigma, self.batch = pool, decider, sigma, batch
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.judge: dict[tuple[str, str, int], float] = {}
        self.learned: dict[tuple[str, str, int], float] = {}
        for f in sorted(cache.glob("scores-*.parquet")):
            t = pq.read_table(f).to_pydict()
            keys = list(zip(t["prompt_id"], t["candidate"], t["slot"], strict=True))
            self.judge.update(zip(keys, t[JUDGE], strict=True))
            if LEARNED in t:
                self.learned.update(zip(keys, t[LEARNED], strict=True))
        self.generators: dict = {}
        self.scorers: dict = {}
        self.drawn = 0
        self.seconds = 0.0

    def decision(self, key: tuple[str, str, int]) -> float:
        if self.decider == LEARNED:
            return self.learned[key]
        return self.judge[key] + self.sigma * decider_noise(*key)

    def _known(self, key: tuple[str, str, int]) -> bool:
        return key in self.judge and (self.decider != LEARNED or key in self.learned)

    def ensure(self, draws: list[tuple[str, str, str, int]]) -> None:
        """Generate and score every (prompt, prompt_id, candidate, slot) not in the cache yet."""
        missing = list({(pid, c, s): (p, pid, c, s) for p, pid, c, s in draws if not self._known((pid, c, s))}.values())
        for cand in sorted({c for _, _, c, _ in missing}):
            todo = [d for d in missing if d[2] == cand]
            for start in range(0, len(todo), self.batch):
                self._draw(cand, todo[start : start + self.batch])

    def _draw(self, cand: str, chunk: list[tuple[str, str, str, int]]) -> None:
        from catimage.generators import generation_seed, make_generator
        from catimage.metrics import make_scorer

        if cand not in self.generators:
            self.generators[cand] = make_generator(self.pool.get(cand).generator)
        metrics = [JUDGE] + ([LEARNED] if self.decider == LEARNED else [])
        for m in metrics:
            self.scorers.setdefault(m, make_scorer(m))
        start = time.perf_counter()
        prompts = [p for p, _, _, _ in chunk]
        images = self.generators[cand].generate(prompts, [generation_seed(pid, s) for _, pid, _, s in chunk])
        rows = {"prompt_id": [d[1] for d in chunk], "candidate": [cand] * len(chunk), "slot": [d[3] for d in chunk]}
        for m in metrics:
            rows[m] = [float(v) for v in self.scorers[m].score(prompts, images)]
        self.seconds += time.perf_counter() - start
        self.drawn += len(chunk)
        pq.write_table(pa.table(rows), self.cache / f"scores-{time.time_ns()}.parquet")
        keys = list(zip(rows["prompt_id"], rows["candidate"], rows["slot"], strict=True))
        self.judge.update(zip(keys, rows[JUDGE], strict=True))
        if LEARNED in rows:
            self.learned.update(zip(keys, rows[LEARNED], strict=True))


def with_decider(table: pa.Table, sim: WorldSim) -> pa.Table:
    """The shipped table plus the decider's column: the table's own scene_decider column when it has one
    (the shipped table does); else, with the learned decider, the table's images drawn again (same seeds)
    and scored, with the redrawn judge checked against the table's."""
    if sim.decider == LEARNED and LEARNED in table.column_names:
        return table.append_column(DECIDER, table.column(LEARNED))
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("candidate").to_pylist(),
                    [int(v) for v in table.column("seed").to_pylist()], strict=True))
    if sim.decider == LEARNED:
        prompts = table.column("prompt").to_pylist()
        sim.ensure([(p, pid, c, s) for p, (pid, c, s) in zip(prompts, keys, strict=True)])
        redrawn = np.array([sim.judge[k] for k in keys])
        gap = np.abs(redrawn - table.column(JUDGE).to_numpy())
        print(f"table redrawn: judge differs from the shipped table's by {gap.mean():.4f} on average "
              f"({(gap > 1e-6).mean():.1%} of {len(keys)} draws differ at all)")
    return table.append_column(DECIDER, pa.array([sim.decision(k) for k in keys]))


def eval_draws(sim: WorldSim, prompts: list[str], candidates: list[str]) -> Draws:
    """A fresh evaluation table as per-draw arrays: every candidate x SLOTS seeds of every prompt."""
    from catimage.tables.table import stable_prompt_id

    pids = [stable_prompt_id(p) for p in prompts]
    sim.ensure([(p, pid, c, s) for p, pid in zip(prompts, pids, strict=True) for c in candidates for s in range(SLOTS)])
    shape = (len(prompts), len(candidates), SLOTS)
    judge, decision = np.empty(shape), np.empty(shape)
    for i, pid in enumerate(pids):
        for j, c in enumerate(candidates):
            for s in range(SLOTS):
                judge[i, j, s] = sim.judge[(pid, c, s)]
                decision[i, j, s] = sim.decision((pid, c, s))
    return Draws(pids, prompts, candidates, decision, judge, np.broadcast_to(np.arange(SLOTS), shape).copy(),
                 DECIDER, JUDGE)


# --- fitting -----------------------------------------------------------------------------------------


def fit_policy(table: pa.Table, candidates: list[str], costs: np.ndarray, judge: str, args, embedder,
               options: CascadeOptions | None = None) -> CascadeModel:
    """THE fit pipeline (fit_cascade -> fit_router) on a table's rows; `judge` is what it learns to
    maximise (scene_score for the full-table policy, the decider itself for the closed loop)."""
    matrix = aggregate(table, metric=judge, candidates=candidates)
    draws = draws_from_table(table, candidates, DECIDER, judge)
    split = split_prompts(matrix.n_prompts, test_frac=0.0, calibration_frac=0.1, seed=0)
    return fit_cascade(matrix, draws, costs, "gflops", split.train, split.calibration, score_cost=args.score_cost,
                       options=options or CascadeOptions(max_attempts=SLOTS), estimator=args.estimator,
                       embedder=embedder)


# --- serving -----------------------------------------------------------------------------------------


@dataclass
class Served:
    """Per served request: what the judge says of the returned image, what the decider said, the cost."""

    judge: list[float] = field(default_factory=list)
    decision: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    explored: list[bool] = field(default_factory=list)


def _calibrated_lambda(model: CascadeModel, prompts: list[str], X: np.ndarray, budget: float) -> float:
    """The lambda at which `model`'s expected plan cost on `prompts` is the budget."""
    return model.lambda_for_budget(budget, model.predict_stats(prompts, X))


class Policy:
    """One policy serving the stream: plan per prompt at the controller's lambda, draw, stop, pay."""

    def __init__(self, name: str, model: CascadeModel, sim: WorldSim, costs: np.ndarray, args,
                 explore_cfg: ExplorationConfig | None = None, writer: ServedLogWriter | None = None) -> None:
        self.name, self.model, self.sim, self.costs, self.args = name, model, sim, costs, args
        self.explore_cfg, self.writer = explore_cfg, writer
        self.price = dict(zip(model.candidates, costs.tolist(), strict=True))
        self.rng = np.random.default_rng(args.seed)
        self.served = Served()
        self.version = 0
        self.controller = self._controller(model.lambda_for_budget(args.budget))

    def _controller(self, lam0: float) -> BudgetController:
        value, cost = self.model.plan_values(self.model.calibration_stats)
        return BudgetController(ControllerConfig(budget=self.args.budget, window=self.args.window), lam_offline=lam0,
                                scale=lambda_scale(value, cost))

    def swap(self, model: CascadeModel, recent: list[str], X_recent: np.ndarray) -> None:
        """A retrained model takes over. The controller keeps what it has learned of the live traffic and
        moves by the difference between the two models' calibrated lambdas on the most recently served
        prompts (`BudgetController.shift`): the old model's lambda means nothing to the new one's plan
        values, but the traffic's drift from calibration is the same for both."""
        old = _calibrated_lambda(self.model, recent, X_recent, self.args.budget)
        self.model, self.version = model, self.version + 1
        self.controller.shift(_calibrated_lambda(model, recent, X_recent, self.args.budget) - old)

    def serve(self, prompts: list[str], pids: list[str], X: np.ndarray, first: int) -> None:
        lam = self.controller.lam
        value, cost = self.model.plan_values(self.model.predict_stats(prompts, X))
        greedy = route(value, cost, lam)
        chosen, propensity = [], []
        for i in range(len(prompts)):
            plan, p, explored = self._choose(value[i], cost[i], int(greedy[i]), lam)
            chosen.append(plan)
            propensity.append(p)
            self.served.explored.append(explored)
        realised = self._execute(prompts, pids, chosen, propensity, lam, first)
        self.controller.observe(realised)

    def _choose(self, value: np.ndarray, cost: np.ndarray, greedy: int, lam: float) -> tuple[Plan, float, bool]:
        """The greedy plan, or (closed loop) an epsilon-greedy draw over it and the 7 route plans."""
        plans = self.model.plans
        if self.explore_cfg is None:
            return plans[greedy], 1.0, False
        options = list(dict.fromkeys([greedy, *range(len(self.model.candidates))]))  # route plans come first
        util = (value[options] - lam * cost[options])[None, :]
        ex = explore(util, cost[options][None, :], self.explore_cfg, self.rng)
        return plans[options[int(ex.choice[0])]], float(ex.propensity[0]), bool(ex.explored[0])

    def _execute(self, prompts, pids, plans: list[Plan], propensity, lam: float, first: int) -> list[float]:
        scores: list[list[float]] = [[] for _ in plans]
        open_ = [True] * len(plans)
        for j in range(SLOTS):
            todo = [i for i, pl in enumerate(plans) if open_[i] and j < len(pl.attempts)]
            self.sim.ensure([(prompts[i], pids[i], plans[i].attempts[j], j) for i in todo])
            for i in todo:
                d = self.sim.decision((pids[i], plans[i].attempts[j], j))
                scores[i].append(d)
                thr = plans[i].threshold
                open_[i] = not (thr is not None and d >= thr)
        return [self._account(prompts[i], pids[i], pl, scores[i], propensity[i], lam, first + i)
                for i, pl in enumerate(plans)]

    def _account(self, prompt, pid, plan: Plan, scores: list[float], propensity, lam, index: int) -> float:
        drawn, returned = executed_attempts(plan, scores)
        scored = self.writer is not None or not plan.is_route  # the closed loop scores every draw: its labels
        spent = sum(self.price[plan.attempts[j]] + (self.args.score_cost if scored else 0.0) for j in range(drawn))
        key = (pid, plan.attempts[returned], returned)
        self.served.judge.append(self.sim.judge[key])
        self.served.decision.append(scores[returned])
        self.served.cost.append(spent)
        self.served.attempts.append(drawn)
        if self.writer is not None:
            self._log(prompt, pid, plan, scores[:drawn], returned, propensity, lam, index)
        return spent

    def _log(self, prompt, pid, plan: Plan, scores, returned: int, propensity, lam, index: int) -> None:
        from catimage.generators import generation_seed

        when = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(seconds=5 * index)
        self.writer.append(
            ServedRow(prompt_id=pid, prompt=prompt, candidate=plan.attempts[j], seed=generation_seed(pid, j),
                      pool_cost=self.price[plan.attempts[j]], decision_cost=self.args.score_cost,
                      request_id=f"req-{index}", attempt=j, returned=j == returned, propensity=propensity,
                      policy="route" if plan.is_route else "cascade", plan=action_key(plan), lam=lam,
                      model_version=f"closed-loop-v{self.version}", scores={DECIDER: s}, time=when)
            for j, s in enumerate(scores)
        )


# --- figures -----------------------------------------------------------------------------------------


def policy_area(model: CascadeModel, draws: Draws, X: np.ndarray, costs: np.ndarray,
                bootstrap: int = 0) -> tuple[float, np.ndarray | None]:
    """THE area figure of a cascade policy on the evaluation draws, read on the judge; with `bootstrap`,
    its value on resampled evaluation prompts (the same resamples for every model: paired)."""
    from catimage.evaluation.cascade import evaluate_cascade_trial
    from catimage.evaluation.figures import BOOTSTRAP_FIGURES

    trial = evaluate_cascade_trial(model, draws, X, costs, bootstrap=bootstrap, seed=0, n_traces=0)
    samples = None if trial.boot is None else trial.boot[:, BOOTSTRAP_FIGURES.index("area_over_hull")]
    return float(trial.result.summary["area_over_hull"]), samples


class CrossFitted:
    """Cascades fitted on folds of the shipped table, each answering for the table prompts it did not
    see; one plan set (fixed thresholds). Duck-types what `evaluate_cascade_trial` reads, so the
    full-table policy is judged on 900 table prompts by the same evaluation path, out of sample."""

    def __init__(self, models: list[CascadeModel], fold: np.ndarray, reference: CascadeModel) -> None:
        self.models, self.fold, self.reference = models, fold, reference
        self.plans, self.score_cost = reference.plans, reference.score_cost

    def predict_stats(self, prompts, X, means=None):
        return [(k, np.flatnonzero(self.fold == k), m) for k, m in enumerate(self.models)], prompts, X

    def plan_values(self, parts):
        folds, prompts, X = parts
        value = np.empty((len(prompts), len(self.plans)))
        cost = np.empty_like(value)
        for _, idx, model in folds:
            if idx.size:
                value[idx], cost[idx] = model.plan_values(model.predict_stats([prompts[i] for i in idx], X[idx]))
        return value, cost

    def lambda_for_budget(self, budget: float) -> float:
        return self.reference.lambda_for_budget(budget)


def table_evaluation(table: pa.Table, start_ids: list[str], full: CascadeModel, candidates, costs, args, embedder,
                     folds: int = 10) -> tuple[Draws, np.ndarray, CrossFitted]:
    """The table prompts the closed loop never saw (all but its start prompts) as evaluation draws,
    and the full-table policy cross-fitted over `folds` folds of the table (each fold fitted on the
    rest, plan thresholds fixed to the full-table policy's)."""
    ids = list(dict.fromkeys(table.column("prompt_id").to_pylist()))
    fold_of = dict(zip(ids, np.random.default_rng(args.seed).permutation(len(ids)) % folds, strict=True))
    keep = [p for p in ids if p not in set(start_ids)]
    rows = table.filter(pc.is_in(table.column("prompt_id"), value_set=pa.array(keep)))
    draws = draws_from_table(rows, candidates, DECIDER, JUDGE)
    options = CascadeOptions(max_attempts=SLOTS, plan_thresholds=tuple(full.plan_thresholds.tolist()))
    models = []
    for k in range(folds):
        train = table.filter(pc.is_in(table.column("prompt_id"),
                                      value_set=pa.array([p for p in ids if fold_of[p] != k])))
        models.append(fit_policy(train, candidates, costs, JUDGE, args, embedder, options))
    fold = np.array([fold_of[p] for p in draws.prompt_ids])
    return draws, embedder.encode(draws.prompts), CrossFitted(models, fold, full)


def ope_check(log_dir: Path, router, budget: float, sim: WorldSim, prompts, pids) -> dict:
    """DR estimate of a fixed router on the logged traffic vs its true on-policy mean decision score."""
    from catimage.evaluation.offpolicy import evaluate_policy, logged_requests, router_target
    from catimage.tables.served_log import read_served_log

    logged = logged_requests(read_served_log(str(log_dir)), DECIDER)
    lam = router.lambda_for_budget(budget)
    result = evaluate_policy(logged, router_target(router, logged, lam, "fixed router"), lam, n_boot=1000)
    index = {pid: i for i, pid in enumerate(pids)}
    rows = [index[p] for p in logged.prompt_ids]
    choice = route(router.predict([prompts[i] for i in rows]), router.costs, lam)
    draws = [(prompts[i], pids[i], router.candidates[c], 0) for i, c in zip(rows, choice, strict=True)]
    sim.ensure(draws)
    truth = float(np.mean([sim.decision((pid, c, 0)) for _, pid, c, _ in draws]))
    dr = result.figures["dr"]["quality"]
    return {"lambda": lam, "truth": truth, "dr": dr.to_dict(), "ips": result.figures["ips"]["quality"].to_dict(),
            "error": abs(dr.value - truth), "covered": bool(dr.low <= truth <= dr.high),
            "effective_sample_size": result.effective_sample_size, "n_requests": logged.n}


def window_table(served: dict[str, Served], size: int, budget: float) -> list[dict]:
    rows = []
    n = len(next(iter(served.values())).cost)
    for start in range(0, n, size):
        row = {"window": f"{start}-{min(start + size, n)}"}
        for name, s in served.items():
            cost = np.asarray(s.cost[start : start + size])
            row[name] = {"judge": float(np.mean(s.judge[start : start + size])), "cost": float(cost.mean()),
                         "budget_error": float(cost.mean() / budget - 1),
                         "attempts": float(np.mean(s.attempts[start : start + size]))}
        rows.append(row)
    return rows


def plot(rows: list[dict], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (qa, ca) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    for name in (k for k in rows[0] if k != "window"):
        qa.plot(x, [r[name]["judge"] for r in rows], marker="o", label=name)
        ca.plot(x, [r[name]["cost"] for r in rows], marker="o", label=name)
    ca.axhline(budget, color="grey", ls="--", label="budget")
    for ax, title in ((qa, "realised judge (scene_score) per window"), (ca, "realised cost per window (GFLOPs)")):
        ax.set_xticks(x, [r["window"] for r in rows], rotation=45, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the run -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=5000, help="fresh world prompts served")
    p.add_argument("--retrain-every", type=int, default=1000)
    p.add_argument("--start-prompts", type=int, default=100, help="table prompts the closed loop starts from")
    p.add_argument("--eval-prompts", type=int, default=200, help="fresh prompts of the evaluation table")
    p.add_argument("--budget", type=float, default=2.5, help="average GFLOPs per request both policies hold")
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--decider", choices=(LEARNED, "noisy"), default=LEARNED,
                   help="the online decision score: the learned scene_decider, or scene_score + N(0, sigma)")
    p.add_argument("--sigma", type=float, default=0.1, help="noise of the `noisy` decider")
    p.add_argument("--score-cost", type=float, default=0.043, help="GFLOPs per image of the decision scorer "
                   "(scene_decider's model card: 0.0430)")
    p.add_argument("--estimator", default="twoway-ridge")
    p.add_argument("--batch", type=int, default=25, help="requests decided at one lambda")
    p.add_argument("--window", type=int, default=200, help="the controller's window")
    p.add_argument("--report-window", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=500, help="resamples of the evaluation prompts for the area ratio")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("CATIMAGE_CACHE", Path.home() / ".cache" / "catimage"))
                   / "closed_loop_scores")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "closed_loop")
    return p


def _prompt_sets(args) -> tuple[list[str], list[str]]:
    """Stream and evaluation prompts: held-out scenes disjoint from the table's, the demo's, the dev
    set's and each other's."""
    from catimage.world import heldout_prompts

    table = read_quality_table(TABLE)
    banned = list(dict.fromkeys(table.column("prompt").to_pylist()))
    banned += [p for p in DEMO_PROMPTS.read_text().splitlines() if p.strip()]
    banned += heldout_prompts(300, seed=DEV_SEED)
    evaluation = heldout_prompts(args.eval_prompts, seed=EVAL_SEED, exclude=banned)  # the same whatever the stream
    stream = heldout_prompts(args.prompts, seed=STREAM_SEED, exclude=banned + evaluation)
    return stream, evaluation


def _retrain(base: pa.Table, log_dir: Path, candidates, costs, args, embedder) -> CascadeModel:
    """Refit on the start prompts plus every logged draw: logged rows hold the decider's score alone,
    put on the judge's scale by the start prompts' per-candidate offsets (the one path jobs/retrain.py
    takes with --judge)."""
    from catimage.tables.judge_scale import fit_judge_scale, on_judge_scale

    cols = ["prompt_id", "prompt", "candidate", "seed", DECIDER]
    logged = read_quality_table(log_dir).select(cols)
    logged = logged.append_column(JUDGE, pa.nulls(logged.num_rows, pa.float64()))
    rows = pa.concat_tables([base.select([*cols, JUDGE]).cast(logged.schema), logged])
    return fit_policy(on_judge_scale(rows, fit_judge_scale(base, DECIDER, JUDGE)), candidates, costs, JUDGE, args,
                      embedder)


@dataclass
class Setup:
    """Everything the run shares: the pool, the two starting policies, the prompts, the world."""

    args: argparse.Namespace
    candidates: list[str]
    costs: np.ndarray
    embedder: object
    table: pa.Table
    start_ids: list[str]
    base: pa.Table
    full: CascadeModel
    start: CascadeModel
    sim: WorldSim
    stream: list[str]
    pids: list[str]
    X_stream: np.ndarray
    eval_set: Draws
    X_eval: np.ndarray


def _setup(args: argparse.Namespace) -> Setup:
    from catimage.features.cache import CachedEmbedder
    from catimage.features.registry import make_embedder
    from catimage.tables.pool import load_pool
    from catimage.tables.table import stable_prompt_id

    pool = load_pool(POOL)
    candidates, costs = pool.names, pool.cost_vector(pool.names)
    embedder = CachedEmbedder(make_embedder("minilm"))
    sim = WorldSim(pool, args.cache, args.decider, args.sigma)
    table = with_decider(read_quality_table(TABLE), sim)
    started = time.perf_counter()
    full = fit_policy(table, candidates, costs, JUDGE, args, embedder)
    ids = sorted(set(table.column("prompt_id").to_pylist()))
    start_ids = [str(p) for p in np.random.default_rng(args.seed).choice(ids, args.start_prompts, replace=False)]
    base = table.filter(pc.is_in(table.column("prompt_id"), value_set=pa.array(start_ids)))
    start = fit_policy(base, candidates, costs, JUDGE, args, embedder)
    print(f"fitted the full-table policy (1,000 prompts) and the start policy ({args.start_prompts} prompts) "
          f"in {time.perf_counter() - started:.0f} s; {len(full.plans)} plans")
    stream, evaluation = _prompt_sets(args)
    return Setup(args, candidates, costs, embedder, table, start_ids, base, full, start, sim, stream,
                 [stable_prompt_id(p) for p in stream], embedder.encode(stream), eval_draws(sim, evaluation, candidates),
                 embedder.encode(evaluation))


def _serve_stream(s: Setup) -> tuple[Policy, Policy, list[dict], Path]:
    """Both policies serve the stream; the closed loop logs, and refits every `retrain_every` prompts."""
    from tqdm import tqdm

    args = s.args
    log_dir = Path(tempfile.mkdtemp(prefix="served_log_", dir=args.out))
    writer = ServedLogWriter(LogConfig(uri=str(log_dir), metrics=(DECIDER,), flush_rows=500))
    loop = Policy("closed loop", s.start, s.sim, s.costs, args, ExplorationConfig(epsilon=args.epsilon), writer)
    ref = Policy("full table", s.full, s.sim, s.costs, args)
    areas = [{"served": 0, "closed_loop": policy_area(s.start, s.eval_set, s.X_eval, s.costs)[0]}]
    for first in tqdm(range(0, len(s.stream), args.batch), desc="serving", unit="batch"):
        sl = slice(first, first + args.batch)
        for policy in (loop, ref):
            policy.serve(s.stream[sl], s.pids[sl], s.X_stream[sl], first)
        served = min(first + args.batch, len(s.stream))
        if served % args.retrain_every == 0 or served == len(s.stream):
            writer.flush()
            recent = slice(max(0, served - args.retrain_every), served)
            loop.swap(_retrain(s.base, log_dir, s.candidates, s.costs, args, s.embedder), s.stream[recent],
                      s.X_stream[recent])
            areas.append({"served": served, "closed_loop": policy_area(loop.model, s.eval_set, s.X_eval, s.costs)[0]})
            print(f"after {served}: closed-loop area over hull {areas[-1]['closed_loop']:+.4f}")
    writer.close()
    return loop, ref, areas, log_dir


def main(argv=None) -> None:
    import torch

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    s = _setup(args)
    loop, ref, areas, log_dir = _serve_stream(s)
    n_boot = args.bootstrap
    fresh = {"closed_loop": policy_area(loop.model, s.eval_set, s.X_eval, s.costs, bootstrap=n_boot),
             "full_table": policy_area(s.full, s.eval_set, s.X_eval, s.costs, bootstrap=n_boot)}
    t_draws, t_X, crossfit = table_evaluation(s.table, s.start_ids, s.full, s.candidates, s.costs, args, s.embedder)
    on_table = {"closed_loop": policy_area(loop.model, t_draws, t_X, s.costs, bootstrap=n_boot),
                "start": policy_area(s.start, t_draws, t_X, s.costs, bootstrap=n_boot),
                "full_table": policy_area(crossfit, t_draws, t_X, s.costs, bootstrap=n_boot)}
    ope = ope_check(log_dir, s.full.router, args.budget, s.sim, s.stream, s.pids)
    report(s, loop, ref, areas, fresh, on_table, t_draws.n_prompts, ope, started)


def _ratio(a: tuple[float, np.ndarray | None], b: tuple[float, np.ndarray | None]) -> tuple[float, float, float]:
    """a / b with a 95 % paired bootstrap interval (the same resamples of the evaluation prompts)."""
    ratio = a[0] / b[0] if b[0] > 0 else float("nan")
    if a[1] is None or b[1] is None:
        return ratio, float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = np.nanquantile(a[1] / b[1], [0.025, 0.975])
    return ratio, float(low), float(high)


def _print_stream(args, loop: Policy, ref: Policy, rows: list[dict]) -> None:
    print(f"{'window':>11} | closed loop: judge  cost  (vs budget)  attempts | full table: judge  cost  (vs budget)")
    for r in rows:
        a, b = r["closed loop"], r["full table"]
        print(f"{r['window']:>11} | {a['judge']:.3f}  {a['cost']:.3f}  ({a['budget_error']:+.1%})  {a['attempts']:.2f} | "
              f"{b['judge']:.3f}  {b['cost']:.3f}  ({b['budget_error']:+.1%})")
    for name in ("closed loop", "full table"):
        errs = [abs(r[name]["budget_error"]) for r in rows]
        print(f"{name}: largest budget error per window of {args.report_window} {max(errs):.1%} "
              f"({sum(e <= 0.05 for e in errs)} of {len(errs)} windows within 5 %)")
    explored = np.asarray(loop.served.explored)
    judge = np.asarray(loop.served.judge)
    print(f"closed loop explored {explored.mean():.1%} of requests: judge {judge[explored].mean():.3f} there, "
          f"{judge[~explored].mean():.3f} on the others (full table {np.mean(ref.served.judge):.3f} on all)")


def report(s: Setup, loop: Policy, ref: Policy, areas, fresh, on_table, n_table: int, ope: dict, started) -> None:
    args = s.args
    rows = window_table({"closed loop": loop.served, "full table": ref.served}, args.report_window, args.budget)
    plot(rows, args.budget, args.out / "closed_loop.png")
    _print_stream(args, loop, ref, rows)
    for a in areas:
        print(f"area over hull after {a['served']:>5} served prompts: closed loop {a['closed_loop']:+.4f}  "
              f"(full table {fresh['full_table'][0]:+.4f})")
    decider = LEARNED if args.decider == LEARNED else f"scene_score + N(0, {args.sigma})"
    print(f"drew {s.sim.drawn} new images in {s.sim.seconds:.0f} s; decision metric: {decider}; judge: {JUDGE}")
    print(f"OPE of a fixed router (full-table router at lambda {ope['lambda']:.3g}) on {ope['n_requests']} logged requests: "
          f"DR {ope['dr']['value']:.4f} [{ope['dr']['low']:.4f}, {ope['dr']['high']:.4f}], IPS {ope['ips']['value']:.4f}; "
          f"true on-policy {ope['truth']:.4f}: {'inside' if ope['covered'] else 'OUTSIDE'} the interval")
    ratio = _ratio(fresh["closed_loop"], fresh["full_table"])
    print(f"area over hull on {args.eval_prompts} fresh evaluation prompts: closed loop {fresh['closed_loop'][0]:+.4f}, "
          f"full table {fresh['full_table'][0]:+.4f}; ratio {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] "
          "(95 % paired bootstrap over evaluation prompts)")
    table_ratio = _ratio(on_table["closed_loop"], on_table["full_table"])
    start_ratio = _ratio(on_table["start"], on_table["full_table"])
    print(f"area over hull on the {n_table} table prompts the closed loop never saw (full-table policy cross-fitted, "
          f"10 folds): closed loop {on_table['closed_loop'][0]:+.4f}, start policy {on_table['start'][0]:+.4f}, full "
          f"table {on_table['full_table'][0]:+.4f}; closed loop / full {table_ratio[0]:.3f} [{table_ratio[1]:.3f}, "
          f"{table_ratio[2]:.3f}], start / full {start_ratio[0]:.3f} [{start_ratio[1]:.3f}, {start_ratio[2]:.3f}]")
    (args.out / "closed_loop.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "windows": rows, "areas": areas,
         "fresh_evaluation": {k: v[0] for k, v in fresh.items()}, "ratio": ratio, "ope": ope,
         "table_evaluation": {k: v[0] for k, v in on_table.items()}, "table_ratio": table_ratio,
         "table_start_ratio": start_ratio, "seconds": time.perf_counter() - started}, indent=2))
    print(f"wrote {args.out / 'closed_loop.png'} and {args.out / 'closed_loop.json'}")
    print(f"closed loop: {ratio[0]:.3f} of the full-table router's area over hull after {len(s.stream)} served prompts; "
          f"OPE error {ope['error']:.4f}")


if __name__ == "__main__":
    main()
