"""Goal-list language: schema, YAML loading, institution overlays, resolution, evaluation.

Entry points::

    from atp.goals import load_goal_list, resolve_goals, evaluate_goals
    gl = load_goal_list(site="hn", institution="example_parotid_sparing")
    resolved = resolve_goals(gl, patient, predicted_dose_gy)
    results = evaluate_goals(resolved, patient, dose_gy)

Modules: ``model`` (data types), ``metric`` (metric grammar), ``yamlio`` (YAML with
line numbers), ``schema`` (goal-list validation, priority -> weight rule), ``overlay``
(institution overlays), ``loader`` (shipped files), ``controls`` (rings, body),
``resolve`` (values for one patient), ``evaluate`` (pass/fail on a dose).
"""

from atp.goals.model import Goal, GoalResult, Metric, ResolvedGoal

__all__ = ["Goal", "GoalList", "GoalResult", "Metric", "PriorityWeights", "ResolvedGoal",
           "ResolvedGoals", "evaluate_goals", "goal_mask", "list_institutions",
           "list_sites", "load_goal_list", "resolve_goals", "with_control_structures"]


def __getattr__(name):  # lazy: importing atp.goals.model stays cheap
    if name in ("GoalList", "PriorityWeights"):
        from atp.goals import schema

        return getattr(schema, name)
    if name in ("load_goal_list", "list_sites", "list_institutions"):
        from atp.goals import loader

        return getattr(loader, name)
    if name in ("resolve_goals", "ResolvedGoals"):
        from atp.goals import resolve

        return getattr(resolve, name)
    if name == "evaluate_goals":
        from atp.goals.evaluate import evaluate_goals

        return evaluate_goals
    if name in ("goal_mask", "with_control_structures"):
        from atp.goals import controls

        return getattr(controls, name)
    raise AttributeError(f"module 'atp.goals' has no attribute {name!r}")
