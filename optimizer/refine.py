"""AIRTP-style iterative refinement (``--refine N`` / ``dvh:N``; Algorithm 1 of the AIRTP
paper). The scorecard mode (``--refine scorecard:N``, :mod:`atp.score_refine`) runs the
same loop (:func:`iterate`) over whole plans, with :func:`scorecard_terms`.

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

from atp.goals.metric import parse_metric
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


def iterate(start, *, rounds: int, step, score, accept=None):
    """The refinement loop both modes share: from ``start``, up to ``rounds`` times
    ``step(best)`` proposes a new state (None: nothing left to tighten, stop); a state is
    kept when ``score`` rises and ``accept(state)`` (default: always) allows it, and the
    loop stops at the first state not kept. Returns (best, scores, accepted): the score
    of the start and of every round run, and whether each round was kept."""
    best = start
    best_score = score(best)
    scores, accepted = [best_score], []
    for _ in range(rounds):
        new = step(best)
        if new is None:
            break
        s = score(new)
        scores.append(s)
        kept = s > best_score + 1e-9 * max(1.0, abs(best_score)) and (
            accept is None or bool(accept(new)))
        accepted.append(kept)
        if not kept:
            break
        best, best_score = new, s
    return best, scores, accepted


def refine(problem, backend, start, *, rounds: int, score=None, weight_rel: float = 0.5,
           **options) -> RefineOutcome:
    """Run up to ``rounds`` DVH-point refinement rounds from ``start`` (a Result); keep
    the best (:func:`iterate`).

    score: callable(fluence) -> float (higher better); default: :func:`goal_score` of the
    problem's dose-grid goal report.
    """
    if score is None:
        def score(w):
            return goal_score(problem.goal_report(w), problem.bindings)
    options.pop("hard_state", None)

    def step(best):
        extra = refinement_terms(problem, best.fluence, weight_rel=weight_rel)
        if not extra:
            return None
        res = optimize(problem.with_terms(list(problem.terms) + extra), backend,
                       best.fluence, hard_state=getattr(best, "hard_state", None), **options)
        res.objective = problem.objective(res.fluence)
        res.goal_report = problem.goal_report(res.fluence)
        return res

    best, scores, accepted = iterate(start, rounds=rounds, step=step,
                                     score=lambda r: score(r.fluence))
    return RefineOutcome(best, len(accepted), scores, accepted)


# --- the scorecard mode's objectives (atp.score_refine builds the specs) ----------------
def airtp_dvh_objective(dose_gy: float, volume_cc: float) -> tuple[float, float]:
    """(objective dose, priority) of an organ's DVH point after AIRTP's rule: tighten by
    5 %, at most 2 Gy (1 Gy above 63 Gy, where the organ meets the high-dose target);
    priority 80 for points above 63 Gy, below 10 Gy, or below 20 Gy on a small organ
    (< 50 cc), else 120."""
    if dose_gy > 63.0:
        return dose_gy - 1.0, 80.0
    ref = max(0.95 * dose_gy, dose_gy - 2.0)
    low = dose_gy < 10.0 or (dose_gy < 20.0 and volume_cc < 50.0)
    return ref, 80.0 if low else 120.0


def _structure_rows(problem) -> dict:
    """{structure: (rows, vw, optimised rows, optimised vw, largest soft goal weight,
    is organ)} over the problem's goals; an organ's optimised rows are its first goal
    term's (the organ less the targets it overlaps, for soft limits)."""
    out: dict = {}
    for b in problem.bindings:
        g = b.goal
        if g.kind not in ("organ", "target") or b.structure_rows.size == 0:
            continue
        rows, vw = b.structure_rows, b.structure_vw
        o_rows, o_vw = rows, vw
        if g.kind == "organ" and b.term_indices:
            t = problem.terms[b.term_indices[0]]
            o_rows, o_vw = t.rows, t.voxel_weight
        w = 0.0 if g.is_hard else g.weight
        prev = out.get(g.structure)
        if prev is not None:
            out[g.structure] = (*prev[:4], max(prev[4], w), prev[5])
        else:
            out[g.structure] = (rows, vw, o_rows, o_vw, w, g.kind == "organ")
    return out


def scorecard_terms(problem, fluence, organs, items, *, weight_rel: float = 0.5,
                    min_dose_gy: float = 3.0):
    """(terms, records) of one scorecard round on ``problem`` at ``fluence``.

    organs: structures whose DVH points {1, 10, ..., 80} % (on the organ's optimised
    rows, dose grid) become upper dose-volume objectives after
    :func:`airtp_dvh_objective`; items: objective specs of scorecard items (dicts of
    :func:`atp.scorecard.item_objective`: structure, kind, volume, dose_gy, priority,
    source) on the structure's rows. Each term weighs ``weight_rel x priority / 100`` x
    the structure's largest soft (not priority-1) goal weight. A structure no goal of the problem names has
    no rows: its record says it was skipped. Records are plain dicts for plan.json."""
    rows_of = _structure_rows(problem)
    d = problem.dose_rows(fluence)
    terms, recs = [], []
    for name in organs:
        if name not in rows_of or not rows_of[name][5]:
            recs.append({"source": "dvh", "structure": name, "skipped": "no organ goal"})
            continue
        _, _, rows, vw, w, _ = rows_of[name]
        if w <= 0:
            recs.append({"source": "dvh", "structure": name, "skipped": "no soft goal"})
            continue
        vol_cc = float(np.sum(vw)) * problem.voxel_volume_cc
        for v in VOLUME_POINTS_PCT:
            m = Metric("D", f"D{v}%", "Gy", float(v), "%")
            dv = measure_metric(m, d[rows], vw, problem.voxel_volume_cc, 1.0)
            if dv is None or dv < min_dose_gy:
                continue
            ref, prio = airtp_dvh_objective(float(dv), vol_cc)
            terms.append(make_term("dv_max", rows, vw, ref, weight_rel * prio / 100 * w,
                                   volume=v / 100.0, name=f"refine:{name}.D{v}%"))
            recs.append({"source": "dvh", "structure": name, "kind": "dv_max",
                         "volume": v / 100.0, "dose_gy": round(ref, 3), "priority": prio,
                         "value": round(float(dv), 3)})
    for spec in items:
        name = spec["structure"]
        if name not in rows_of:
            recs.append({**spec, "skipped": "no goal on the structure"})
            continue
        rows, vw, _, _, w, _ = rows_of[name]
        if w <= 0:
            recs.append({**spec, "skipped": "no soft goal on the structure"})
            continue
        ref = spec["dose_gy"] + _surrogate_offset(problem, spec, d[rows], vw)
        if ref <= 0:
            recs.append({**spec, "skipped": "no dose left to aim at on the dose grid"})
            continue
        terms.append(make_term(spec["kind"], rows, vw, ref,
                               weight_rel * spec["priority"] / 100 * w,
                               volume=spec["volume"], name=f"refine:{spec['source']}"))
        recs.append({**spec, "optimised_gy": round(ref, 3)})
    return terms, recs


def _surrogate_offset(problem, spec, d, vw) -> float:
    """What the optimiser sees minus what the plan reports for a scorecard item: its
    metric on the structure's dose-grid rows at the start fluence (the ideal dose) less
    the item's value on the reported dose (patient grid, deliverable); the objective's
    dose is moved by it, as the goal terms' surrogate offsets are. 0 when the metric
    cannot be measured on the rows."""
    metric = spec.get("metric")
    if not metric or spec.get("value") is None:
        return 0.0
    seen = measure_metric(parse_metric(metric), d, vw, problem.voxel_volume_cc, 1.0)
    return 0.0 if seen is None else float(seen) - float(spec["value"])
