"""Scorecard refinement (``atp plan ... --refine scorecard[:N]``): AIRTP's iterative loop.

Start from the goal-list plan. Each round reads the current plan: every scorecard organ's
DVH points {1, 10, 20, 30, 40, 60, 80} % become tighter upper dose-volume objectives
(:func:`atp.optimizer.refine.airtp_dvh_objective`), and every scorecard item short of its
full score becomes an objective aimed at its next better score point
(:func:`atp.scorecard.item_objective`). They are added to the goal list's objective and
the plan is re-optimised warm (``replan(plan, warm=True, objectives=...)``: the public
re-plan, from the plan's fluence, hard-goal state and sequencing loss), sequenced and
scored again on its reported dose. A round is kept when the scorecard total rises and
no priority-1 goal the goal-list plan met is broken; the loop stops at the first round
not kept (:func:`atp.optimizer.refine.iterate`), so the plan returned never scores below
the goal-list plan. Every round (objectives added, total, per-item scores, broken
priority-1 goals, seconds) is recorded in ``plan.optimizer["refine"]`` (plan.json) and
shown in the report.
"""

from __future__ import annotations

import time

from atp.optimizer.refine import iterate, scorecard_terms
from atp.progress import tick
from atp.scorecard import item_objective, load_scorecard


def _item_specs(card, evaluation) -> list[dict]:
    """The objective specs of every scored item short of its full score."""
    out = []
    for it, row in zip(card.items, evaluation["items"]):
        if row["value"] is None:
            continue
        spec = item_objective(it, row["value"])
        if spec is not None:
            out.append(spec)
    return out


def _organs(card, patient) -> list[str]:
    """The scorecard's organs the patient has (each once, card order)."""
    organs = set(patient.organs)
    return list(dict.fromkeys(it.structure for it in card.items if it.structure in organs))


def _scores(evaluation) -> dict:
    return {r["id"]: (None if r["score"] is None else round(r["score"], 4))
            for r in evaluation["items"]}


def _broken(start_plan, plan) -> list[str]:
    """Priority-1 goals the goal-list plan met and ``plan`` does not."""
    met = {r.goal.id for r in start_plan.results if r.goal.priority == 1 and r.passed}
    return [r.goal.id for r in plan.results if r.goal.id in met and r.passed is False]


def refine_plan(plan, rounds: int, scorecard, *, replan):
    """Up to ``rounds`` scorecard-refinement rounds from ``plan`` (see the module);
    ``scorecard``: a shipped name or YAML file; ``replan``: :func:`atp.pipeline.replan`
    (passed in: the pipeline calls this module). Returns the best plan, its settings,
    timings and notes those of ``plan`` plus the loop's record."""
    t0 = time.perf_counter()
    card = load_scorecard(scorecard)
    organs = _organs(card, plan.patient)
    first = card.evaluate(plan.patient, plan.dose_gy)
    log = [{"round": 0, "total": round(first["total"], 4), "scores": _scores(first),
            "objectives": [], "kept": True, "broke_p1": [], "seconds": 0.0}]

    def step(state):
        current, evaluation = state
        items = _item_specs(card, evaluation)
        recs: list = []

        def objectives(problem, fluence):
            terms, r = scorecard_terms(problem, fluence, organs, items)
            recs.extend(r)
            return terms

        tick(refine_round=f"{len(log)}/{rounds}")
        t = time.perf_counter()
        new = replan(current, warm=True, refine=0, objectives=objectives)
        ev = card.evaluate(new.patient, new.dose_gy)
        log.append({"round": len(log), "total": round(ev["total"], 4),
                    "scores": _scores(ev), "objectives": recs,
                    "n_objectives": sum("skipped" not in r for r in recs),
                    "broke_p1": _broken(plan, new),
                    "seconds": round(time.perf_counter() - t, 3)})
        return new, ev

    def accept(state):
        return not _broken(plan, state[0])

    (best, best_ev), scores, kept = iterate((plan, first), rounds=rounds, step=step,
                                            score=lambda s: s[1]["total"], accept=accept)
    for rec, k in zip(log[1:], kept):
        rec["kept"] = k
    return _finish(plan, best, best_ev, card, log, scores, kept, rounds,
                   time.perf_counter() - t0)


def _stopped(log, kept, rounds) -> str:
    if kept and not kept[-1]:
        return ("a round broke a priority-1 goal" if log[-1]["broke_p1"]
                else "the total stopped improving")
    return "rounds done" if len(kept) >= rounds else "nothing left to tighten"


def _finish(plan, best, best_ev, card, log, scores, kept, rounds, seconds):
    """The best plan with ``plan``'s settings, notes and changes, its timings plus the
    loop's (``refine_scorecard``), and the loop's record in ``optimizer["refine"]``."""
    best.settings = dict(plan.settings)
    best.notes = list(plan.notes)
    best.changes = plan.changes
    best.timings_s = {**plan.timings_s, "refine_scorecard": seconds}
    best.optimizer = dict(best.optimizer)
    best.optimizer["refine"] = {
        "mode": "scorecard", "scorecard": card.name, "scorecard_file": card.file,
        "total": round(best_ev["total"], 4), "max_total": best_ev["max_total"],
        "stopped": _stopped(log, kept, rounds), "rounds_run": len(kept), "scores": [round(s, 4) for s in scores],
        "accepted": kept, "seconds": round(seconds, 3),
        "rounds": log}
    return best
