"""What a re-plan changed: a before -> after table of goals.

:func:`goal_changes` compares two evaluations of the same goal list (the plan before and
after a re-plan): a row for every goal whose definition was changed (value, tolerance,
priority, weight: "touched") and for every goal whose pass/fail flipped.
:func:`format_changes` renders the rows as terminal lines; plan.json keeps the rows.
"""

from __future__ import annotations

FIELDS = ("value", "tolerance_pct", "priority", "weight")


def _num(v):
    return None if v is None else float(v)


def goal_changes(before, after, *, why: dict | None = None) -> list[dict]:
    """Rows for touched and flipped goals (``before`` / ``after``: GoalResult lists of the
    same goals, matched by id). ``why``: {goal id: one-line reason} for goals that still
    fail (what holds them)."""
    old = {r.goal.id: r for r in before}
    rows = []
    for r in after:
        b = old.get(r.goal.id)
        if b is None:
            continue
        g0, g1 = b.goal, r.goal
        changed = [f for f in FIELDS if _num(getattr(g0, f)) != _num(getattr(g1, f))]
        flipped = b.passed != r.passed
        if not changed and not flipped:
            continue
        row = {"id": g1.id, "structure": g1.structure, "metric": g1.metric.text,
               "operator": g1.operator, "unit": g1.metric.result_unit,
               "touched": changed, "flipped": flipped,
               "value": [_num(g0.value), _num(g1.value)],
               "tolerance_pct": [_num(g0.tolerance_pct), _num(g1.tolerance_pct)],
               "priority": [g0.priority, g1.priority],
               "achieved": [_num(b.achieved), _num(r.achieved)],
               "passed": [b.passed, r.passed]}
        if row["achieved"][0] is not None and row["achieved"][1] is not None:
            row["delta"] = row["achieved"][1] - row["achieved"][0]
        if why and r.passed is False and g1.id in why:
            row["why"] = why[g1.id]
        rows.append(row)
    rows.sort(key=lambda x: (not x["touched"], x["id"]))
    return rows


def _f(v, unit="") -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}{(' ' + unit) if unit else ''}"


def _word(p) -> str:
    return "pass" if p is True else "FAIL" if p is False else "n/a"


def format_changes(rows) -> list[str]:
    """Terminal lines: one per row (goal, limit, achieved, pass/fail, before -> after),
    and an indented 'why' line for a touched goal that still fails."""
    if not rows:
        return ["changes: no goal touched or flipped"]
    out = ["changes (before -> after):"]
    w = max(len(r["id"]) for r in rows)
    for r in rows:
        u = r["unit"]
        v0, v1 = r["value"]
        limit = (f"{r['operator']} {_f(v0, u)}" if v0 == v1 else
                 f"{r['operator']} {_f(v0, u)} -> {_f(v1, u)}")
        t0, t1 = r["tolerance_pct"]
        if r["touched"] and "tolerance_pct" in r["touched"]:
            limit += f" (tolerance {t0:+g} % -> {t1:+g} %)"
        p0, p1 = r["priority"]
        if p0 != p1:
            limit += f" (priority {p0} -> {p1})"
        a0, a1 = r["achieved"]
        delta = r.get("delta")
        moved = f" ({delta:+.3g})" if delta is not None else ""
        mark = "set " if r["touched"] else "    "
        out.append(f"  {mark}{r['id']:<{w}}  {r['metric']} {limit}: achieved "
                   f"{_f(a0, u)} -> {_f(a1, u)}{moved}  "
                   f"{_word(r['passed'][0])} -> {_word(r['passed'][1])}")
        if r.get("why"):
            out.append(f"       why: {r['why']}")
    return out
