"""Measure a dose against resolved goals: achieved value, pass/fail, margin.

``passed`` is None (never guessed) when a goal has no numeric value -- a 'predicted'
goal resolved without a predicted dose -- and ``reason`` says why.
"""

from __future__ import annotations

from atp.goals.model import GoalResult, ResolvedGoal
from atp.goals.resolve import check_dose, measure_goal

NO_PREDICTION = ("value is 'predicted' but no predicted dose was given (pass --predicted-dose "
                 "PRED.npy); achieved value reported only")


def evaluate_goals(resolved: list[ResolvedGoal], patient, dose_gy, *,
                   dose_file=None) -> list[GoalResult]:
    """One GoalResult per resolved goal, in order. The dose must be on the patient grid
    (GridMismatchError naming ``dose_file`` and 'shape') and finite."""
    check_dose(dose_gy, patient, file=dose_file)
    out = []
    for g in resolved:
        achieved = measure_goal(g, patient, dose_gy)
        reason = NO_PREDICTION if g.value is None else ""
        out.append(GoalResult(g, achieved, g.met_by(achieved), g.margin_of(achieved), reason))
    return out


def summarize(results: list[GoalResult]) -> dict:
    """Counts of passed / failed / unknown goals, overall and for priority-1 goals."""
    def count(rs):
        return {"passed": sum(r.passed is True for r in rs),
                "failed": sum(r.passed is False for r in rs),
                "unknown": sum(r.passed is None for r in rs), "total": len(rs)}

    return {"all": count(results), "hard": count([r for r in results if r.goal.is_hard])}
