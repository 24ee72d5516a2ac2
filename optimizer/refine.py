"""AIRTP-style iterative refinement (``--refine N``; Algorithm 1 of the AIRTP paper).

After an optimisation, read the plan's DVH of every organ at risk that the goal list
names, at the volume points {1, 10, 20, 30, 40, 60, 80} %; each point with dose ``d``
becomes a tighter upper dose-volume objective ``D_v <= d - max(5 % of d, 2 Gy)``
(:func:`tightened_dose`; points below ``min_dose_gy`` are skipped), weighted
``weight_rel`` times the organ's smallest goal weight. The problem is re-optimised warm
with these objectives added to the goal-list terms. Rounds continue while the goal-list
score (:func:`goal_score`, or the caller's) improves; the best plan is kept, so
refinement never returns a plan that scores worse than the one it started from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from atp.optimizer.objectives import make_term
from atp.optimizer.problem import measure_metric
from atp.optimizer.solve import optimize

from atp.goals.model import Metric

VOLUME_POINTS_PCT = (1, 10, 20, 30, 40, 60, 80)
MARGIN_FRACTION = 0.05
MARGIN_MIN_GY = 2.0


def tightened_dose(dose_gy: float) -> float:
    """The margin rule: ``d - max(5 % of d, 2 Gy)`` (never below 0 Gy)."""
    return max(0.0, dose_gy - max(MARGIN_FRACTION * dose_gy, MARGIN_MIN_GY))


def goal_score(report: list[dict], bindings) -> float:
    """Goal-list score of a per-goal report (higher is better).

    Each measurable goal adds its weight when met, plus a tie-break of 0.1 x weight x its
    relative margin clipped to [-1, 1] (so sparing beyond the goal counts a little).
    """
    by_id = {b.goal.id: b.goal for b in bindings}
    score = 0.0
    for r in report:
        g = by_id.get(r["id"])
        if g is None or r.get("achieved") is None or g.value is None:
            continue
        margin = (g.value - r["achieved"]) if g.operator in ("<=", "<") else \
            (r["achieved"] - g.value)
        rel = float(np.clip(margin / max(abs(g.value), 1.0), -1.0, 1.0))
        score += g.weight * ((1.0 if r["met"] else 0.0) + 0.1 * rel)
    return score


def refinement_terms(problem, fluence, *, weight_rel: float = 0.5,
                     min_dose_gy: float = 3.0) -> list:
    """Tighter DVH-point objectives for every organ the goal list names (see module)."""
    d = problem.dose_rows(fluence)
    organs: dict[str, tuple] = {}
    for b in problem.bindings:
        g = b.goal
        if g.kind != "organ" or b.structure_rows.size == 0:
            continue
        prev = organs.get(g.structure)
        w = g.weight if prev is None else min(prev[2], g.weight)
        organs[g.structure] = (b.structure_rows, b.structure_vw, w)
    terms = []
    for name, (rows, vw, w) in organs.items():
        for v in VOLUME_POINTS_PCT:
            m = Metric("D", f"D{v}%", "Gy", float(v), "%")
            dv = measure_metric(m, d[rows], vw, problem.voxel_volume_cc, 1.0)
            if dv is None or dv < min_dose_gy:
                continue
            ref = tightened_dose(dv)
            terms.append(make_term("dv_max", rows, vw, ref, weight_rel * w,
                                   volume=v / 100.0, name=f"refine:{name}.D{v}%",
                                   meta={"dvh_point_gy": dv}))
    return terms


@dataclass
class RefineOutcome:
    result: object  # the best Result
    rounds_run: int
    scores: list = field(default_factory=list)  # score after each round (index 0: start)
    accepted: list = field(default_factory=list)  # whether each round was kept


def refine(problem, backend, start, *, rounds: int, score=None, weight_rel: float = 0.5,
           **options) -> RefineOutcome:
    """Run up to ``rounds`` refinement rounds from ``start`` (a Result); keep the best.

    score: callable(fluence) -> float (higher better); default: :func:`goal_score` of the
    problem's dose-grid goal report.
    """
    if score is None:
        def score(w):
            return goal_score(problem.goal_report(w), problem.bindings)
    best = start
    best_score = score(best.fluence)
    out = RefineOutcome(best, 0, [best_score], [])
    for _ in range(rounds):
        extra = refinement_terms(problem, best.fluence, weight_rel=weight_rel)
        if not extra:
            break
        options.pop("hard_state", None)
        res = optimize(problem.with_terms(list(problem.terms) + extra), backend,
                       best.fluence, hard_state=getattr(best, "hard_state", None), **options)
        res.objective = problem.objective(res.fluence)
        res.goal_report = problem.goal_report(res.fluence)
        s = score(res.fluence)
        out.rounds_run += 1
        out.scores.append(s)
        improved = s > best_score + 1e-9 * max(1.0, abs(best_score))
        out.accepted.append(improved)
        if not improved:
            break
        best, best_score = res, s
    out.result = best
    return out
