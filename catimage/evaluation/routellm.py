"""APGR and CPT as RouteLLM defines them, read off any policy's deferral curve.

RouteLLM (Ong et al., 2024) routes between a weak and a strong model. PGR(x) = (q(x) - q_weak) /
(q_strong - q_weak) is the share of the quality gap a router recovers when a share x of calls goes
to the strong model; APGR is the average of PGR over x in [0, 1] (the area under the PGR curve), and
CPT(p) the smallest share of strong calls at which PGR reaches p. With M candidates and costs, the
share of strong calls becomes the position between the weak and the strong model's costs,
x = (c - c_weak) / (c_strong - c_weak) (with two candidates and routing, exactly the share of calls
to the strong one). weak = the cheapest candidate (best quality among equally cheap ones), strong =
the best fixed candidate (highest mean judge quality on the test prompts; ties: the cheaper). Curves
are read by linear interpolation, as every other figure; CPT above 1 means the policy needs more
than the strong model's cost, None that it never recovers that share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from catimage.errors import CatimageError
from catimage.policy.routing import area_between, cost_to_reach

__all__ = ["ROUTELLM_FIGURES", "routellm_figures"]

ROUTELLM_FIGURES = ("apgr", "cpt_50", "cpt_80")


def routellm_figures(curve: Sequence[Any], fixed_quality: Any, costs: Any) -> dict[str, Any]:
    """{apgr, cpt_50, cpt_80, weak, strong} of a curve (CurvePoints, dicts or (costs, qualities))."""
    fixed_q, costs = np.asarray(fixed_quality, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    weak = min(range(costs.size), key=lambda j: (costs[j], -fixed_q[j], j))
    strong = min(range(costs.size), key=lambda j: (-fixed_q[j], costs[j], j))
    out: dict[str, Any] = {"weak_index": int(weak), "strong_index": int(strong), "apgr": None, "cpt_50": None, "cpt_80": None}
    c_w, c_s, q_w, q_s = float(costs[weak]), float(costs[strong]), float(fixed_q[weak]), float(fixed_q[strong])
    gap, span = q_s - q_w, c_s - c_w
    if gap <= 1e-12 or span <= 0:
        return out  # the cheapest is also the best: no gap to recover
    flat = (np.array([c_w, c_s]), np.array([q_w, q_w]))
    try:
        out["apgr"] = area_between(curve, flat, c_w, c_s) / gap
    except CatimageError:  # the curve does not reach down to the weak model's cost
        out["apgr"] = None
    for share, key in ((0.5, "cpt_50"), (0.8, "cpt_80")):
        reach = cost_to_reach(curve, q_w + share * gap)
        out[key] = None if reach is None else max((reach - c_w) / span, 0.0)
    return out
