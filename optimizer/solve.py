"""``optimize(problem, backend)``: one solve plus the hard-goal loop of first-order paths.

Backends with ``hard_constraints`` (qp) make priority-1 goals exact constraints. For
the others (cpu, gpu), priority-1 goals start as penalties ``hard_weight_factor`` times
their weight (see :mod:`atp.optimizer.problem`); after each solve every violated hard goal
gets its weight multiplied by ``hard_growth`` and its reference moved past the target by
the violation (a multiplier-style shift), and the solve restarts warm. After
``hard_rounds`` rounds, goals still violated are listed in ``Result.messages`` and
``Result.unmet_hard`` with the achieved value and by how much they miss: never silent.

**Surrogate offsets.** A goal is optimised on a surrogate (its term's voxels on the dose
grid: an organ minus the targets it overlaps, coverage voxels counted whole, the ideal
fluence dose) but reported on the whole structure on the patient grid, after sequencing.
After every solve each goal's offset ``reported - surrogate`` is measured (the pipeline's
``goal_check`` measures what the plan is judged on) and the goal's term reference is
tightened by it (never loosened), so that the term is active exactly when the reported
value fails (to first order): what is optimised and what is reported agree. The offset is
re-measured every round (not accumulated; the deliverable-dose correction of Siebers et
al. 2002 applied to the surrogate), kept in ``Result.hard_state[goal]['offset']`` and
carried by warm re-plans. Goals of every priority get it; the attainment rounds (soft
goals of priority <= ``attain_max_priority``) and the hard-goal loop shift references on
top of it.
"""

from __future__ import annotations

import time

from atp.optimizer import registry
from atp.optimizer.backends.base import Result
from atp.optimizer.problem import UPPER_OPS, _rx_of, measure_metric

from atp.progress import tick

OFFSET_KINDS = ("Dmean", "Dmax", "Dmin", "D")  # metrics whose term reference is a dose


def _apply_hard_state(problem, state: dict):
    """The problem with each hard goal's terms re-weighted / shifted as in ``state``."""
    if not state:
        return problem
    terms = list(problem.terms)
    for b in problem.bindings:
        st = state.get(b.goal.id)
        if not st:
            continue
        for ti in b.term_indices:
            t = terms[ti].with_weight(terms[ti].weight * st.get("weight_factor", 1.0))
            shift = st.get("ref_shift", 0.0) + st.get("offset", 0.0)
            if isinstance(t.ref_gy, float) and shift:
                t = t.with_ref(max(0.0, t.ref_gy + shift))
            terms[ti] = t
    return problem.with_terms(terms)


def apply_state(problem, state: dict):
    """The problem as optimised with ``state`` (``Result.hard_state``): each goal's term
    re-weighted and its reference moved by the hard-goal / attainment shift and the
    surrogate offset."""
    return _apply_hard_state(problem, state or {})


def surrogate_value(problem, binding, dose_rows) -> float | None:
    """A goal's metric on its optimised surrogate: its (single) term's voxels and voxel
    weights on the dose grid (None: the goal has no such term)."""
    g = binding.goal
    if (len(binding.term_indices) != 1 or g.value is None
            or g.metric.kind not in OFFSET_KINDS):
        return None
    t = problem.terms[binding.term_indices[0]]
    if not isinstance(t.ref_gy, float) or t.rows.size == 0:
        return None

    return measure_metric(g.metric, dose_rows[t.rows], t.voxel_weight,
                          problem.voxel_volume_cc, _rx_of(g, problem.prescriptions))


def measure_offsets(problem, fluence, report, *, loosen: bool = False) -> dict:
    """Per goal id: the signed reference offset (Gy) that tightens its surrogate by the
    measured ``reported - surrogate`` (upper goals: <= 0; lower goals: >= 0); with
    ``loosen`` also the other way (the offset is ``surrogate - reported`` either way)."""
    d = problem.dose_rows(fluence)
    by_id = {r["id"]: r for r in report}
    out = {}
    for b in problem.bindings:
        r = by_id.get(b.goal.id)
        if r is None or r.get("achieved") is None:
            continue
        s = surrogate_value(problem, b, d)
        if s is None:
            continue
        diff = float(r["achieved"]) - s
        if loosen:
            out[b.goal.id] = -diff
        else:
            out[b.goal.id] = -max(0.0, diff) if b.goal.operator in UPPER_OPS \
                else max(0.0, -diff)
    return out


def _limit_shift(value, shift: float, limits) -> float:
    """``shift`` reduced so that ``value + shift`` stays within ``limits`` (lo, hi; None
    open); never reversed (a value already past a limit keeps no shift)."""
    if not limits:
        return shift
    lo, hi = limits
    ref = float(value) + shift
    if hi is not None and shift > 0.0:
        ref = min(ref, max(float(value), hi))
    if lo is not None and shift < 0.0:
        ref = max(ref, min(float(value), lo))
    return ref - float(value)


def _margin_shift(goal, margin: float, limits) -> float:
    """A by-weight goal's reference shift: its value tightened by ``margin`` (a fraction
    of it), within ``limits``."""
    sign = -1.0 if goal.operator in UPPER_OPS else 1.0
    return _limit_shift(goal.value, sign * margin * abs(float(goal.value)), limits)


def _weight_goal_shifts(problem, state: dict, ids, margin: float, limits) -> None:
    """A carried state (a warm re-plan of a plan made with reference shifts) keeps no
    larger shift on a soft goal now pursued by weight than the margin's."""
    for b in problem.bindings:
        st, g = state.get(b.goal.id), b.goal
        if not st or g.id not in ids or g.is_hard or g.value is None:
            continue
        aim = _margin_shift(g, margin, (limits or {}).get(g.id))
        if abs(st.get("ref_shift", 0.0)) > abs(aim):
            st["ref_shift"] = aim


def optimize(problem, backend="auto", x0=None, *, hard_rounds: int = 4,
             hard_growth: float = 2.0, goal_check=None, hard_state: dict | None = None,
             attain_rounds: int = 0, attain_max_priority: int = 3,
             attain_max_shift: float = 0.25, attain_margin: float = 0.01,
             hard_max_factor: float = 64.0, hard_max_shift: float = 0.5,
             surrogate_offsets: bool = True, attain_ids=(), attain_release: bool = False,
             attain_limits=None, attain_weight_ids=(), attain_growth: float = 2.0,
             attain_max_factor: float = 16.0, **options) -> Result:
    """Solve ``problem`` with ``backend`` (name or object), warm from ``x0`` if given.

    goal_check: optional callable(fluence) -> list of per-goal dicts (id, achieved, met,
    violation, hard) used to decide which hard goals are violated; the pipeline passes
    one that measures on the patient grid (what the plan is judged on). Default: the
    problem's own dose-grid report.
    hard_state: ``Result.hard_state`` of an earlier solve of a similar problem (warm
    re-plans): its hard-goal weight factors and reference shifts are applied first.
    hard_max_factor / hard_max_shift: caps on a hard goal's total weight factor and on its
    total reference shift (a fraction of its value), also across warm re-plans and
    deliverable-correction rounds; a goal still violated at the caps is infeasible with
    the others and is reported, instead of driving the problem ill-conditioned (an
    unbounded escalation once made one warm re-plan take minutes).
    attain_rounds: goal-attainment rounds for *soft* goals of priority <=
    ``attain_max_priority`` (first-order backends only; default 0: off). A quadratic
    penalty at the goal's value leaves every competing goal slightly violated at the
    optimum; in each round every such goal still violated has its reference moved past
    its value by the violation (the multiplier-style shift of the hard-goal loop, weight
    unchanged, so priorities still arbitrate conflicts; goals in ``attain_weight_ids``
    are raised by weight instead, below), capped in total at
    ``attain_max_shift`` x the goal's value, and the solve restarts warm. Goals aim at
    their value tightened by ``attain_margin`` (a fraction of it), so that a goal met
    only at its edge on the optimised dose stays met after small dose changes
    (sequencing, interpolation).
    surrogate_offsets: tighten every goal's term reference by its measured ``reported -
    surrogate`` offset after each solve (module docstring); a round is re-solved while a
    failing goal's offset moves by more than max(0.1 Gy, 1 % of its value). ``"both"``:
    also loosen a reference whose surrogate is stricter than what is reported (an
    experiment, off by default; BENCHMARKS, issue 19 section).
    attain_ids: goal ids the attainment rounds steer whatever their priority (a re-plan
    passes the goals the user changed, so a tightened priority-4 goal is pursued like a
    protocol goal; priorities still arbitrate through the weights).
    attain_release: two-sided attainment: a goal met by more than twice
    ``attain_margin`` gives back that much of its shift (never past its own value), so
    a reference pushed while the goal was short (before the deliverable-dose correction,
    say) does not keep over-driving it once met (the pipeline turns it on).
    attain_limits: {goal id: (lo, hi)} bounds (Gy, None: open) on a soft goal's shifted
    reference (value + shift); see :func:`atp.pipeline.attain_limits`.
    attain_weight_ids: goal ids the attainment rounds pursue by weight instead of by
    reference shift (see :func:`atp.pipeline.attain_weight_ids`): the reference moves once by
    the margin (the goal's value tightened by ``attain_margin``) and each round a goal
    is still short multiplies its weight by ``attain_growth``, up to
    ``attain_max_factor``; with ``attain_release`` an over-met goal divides it back. A
    min- or max-dose term penalises only the voxels on the wrong side of its reference:
    a shifted reference widens that set (a D99 coverage reference pushed to 1.2 Rx
    presses on the whole target, against an organ's max term shifted below the Rx in
    the overlap), a heavier weight does not. A goal raised to ``attain_max_factor`` can
    out-weigh goals of the priority above it (a priority-3 ring at x16 weighs more than
    a priority-2 limit at x1 with hn's base of 10): priorities then arbitrate only up to
    that factor.
    """
    be = registry.resolve(backend)
    t0 = time.perf_counter()
    check = goal_check or problem.goal_report
    first_order = not getattr(be, "hard_constraints", False)
    state = {k: dict(v) for k, v in (hard_state or {}).items()} if first_order else {}
    _weight_goal_shifts(problem, state, attain_weight_ids, attain_margin, attain_limits)
    current = _apply_hard_state(problem, state)
    res = be.solve(current, x0, **options)
    iterations, history = res.iterations, list(res.history)
    rounds = 0
    if first_order:
        by_id = {b.goal.id: b for b in problem.bindings}

        def soft_shortfall(r):
            """How far a soft goal is from its value tightened by ``attain_margin``
            (0: met with the margin, or not a goal the attainment rounds steer)."""
            b = by_id.get(r["id"])
            if (b is None or r.get("hard") or r.get("achieved") is None
                    or not b.term_indices
                    or (b.goal.priority > attain_max_priority and r["id"] not in attain_ids)
                    or b.goal.metric.kind == "V" or b.goal.value is None):
                return 0.0
            v, a = float(b.goal.value), float(r["achieved"])
            if b.goal.operator in UPPER_OPS:
                return max(0.0, a - (v - attain_margin * abs(v)))
            return max(0.0, (v + attain_margin * abs(v)) - a)

        def over_attained(r):
            """How far a soft goal with an attainment shift in force is past its value
            tightened by twice ``attain_margin`` (0: not past it, or no shift)."""
            b = by_id.get(r["id"])
            st = state.get(r["id"])
            pushed = st is not None and (st.get("weight_factor", 1.0) > 1.0
                                         if r["id"] in attain_weight_ids else st.get("ref_shift"))
            if (not attain_release or not pushed or r.get("hard")
                    or r.get("achieved") is None or b is None
                    or b.goal.value is None or b.goal.metric.kind == "V"):
                return 0.0
            v, a = float(b.goal.value), float(r["achieved"])
            m = 2.0 * attain_margin * abs(v)
            return max(0.0, (v - m) - a) if b.goal.operator in UPPER_OPS \
                else max(0.0, a - (v + m))

        def update_offsets(fluence, rep) -> list:
            """Re-measure the surrogate offsets; ids of failing goals whose offset moved."""
            if not surrogate_offsets:
                return []
            met = {r["id"]: r.get("met") for r in rep}
            moved = []
            for gid, off in measure_offsets(problem, fluence, rep,
                                            loosen=surrogate_offsets == "both").items():
                st = state.setdefault(gid, {"weight_factor": 1.0, "ref_shift": 0.0})
                before = st.get("offset", 0.0)
                st["offset"] = off
                tol = max(0.1, 0.01 * abs(float(by_id[gid].goal.value)))
                if met.get(gid) is False and abs(off - before) > tol:
                    moved.append(gid)
            return moved

        report = check(res.fluence) if goal_check else res.goal_report
        for rounds in range(1, max(hard_rounds, attain_rounds) + 1):
            tick(round=rounds)
            violated = [r for r in report if r.get("hard") and r.get("met") is False] \
                if rounds <= hard_rounds else []
            soft = [dict(r, violation=soft_shortfall(r)) for r in report] \
                if rounds <= attain_rounds else []
            soft = [r for r in soft if r["violation"] > 0.0]
            released = [(r["id"], over_attained(r)) for r in report] \
                if rounds <= attain_rounds else []
            released = [(gid, x) for gid, x in released if x > 0.0]
            moved = update_offsets(res.fluence, report)
            if not violated and not soft and not moved and not released:
                rounds -= 1
                break
            escalated = False
            for r in violated:
                b = by_id[r["id"]]
                st = state.setdefault(r["id"], {"weight_factor": 1.0, "ref_shift": 0.0})
                before = (st["weight_factor"], st["ref_shift"])
                st["weight_factor"] = min(st["weight_factor"] * hard_growth, hard_max_factor)
                if b.goal.metric.kind != "V" and b.goal.value is not None:
                    sign = -1.0 if b.goal.operator in UPPER_OPS else 1.0
                    cap = hard_max_shift * abs(float(b.goal.value))
                    st["ref_shift"] = sign * min(abs(st["ref_shift"]) + r["violation"], cap)
                escalated |= (st["weight_factor"], st["ref_shift"]) != before
            if violated and not escalated and not soft and not moved and not released:
                rounds -= 1  # every violated hard goal is at its caps: nothing to try
                break
            for r in soft:
                g = by_id[r["id"]].goal
                st = state.setdefault(r["id"], {"weight_factor": 1.0, "ref_shift": 0.0})
                cap = attain_max_shift * abs(float(g.value))
                sign = -1.0 if g.operator in UPPER_OPS else 1.0
                if r["id"] in attain_weight_ids:
                    st["ref_shift"] = _margin_shift(g, attain_margin,
                                                    (attain_limits or {}).get(g.id))
                    st["weight_factor"] = max(st["weight_factor"], min(
                        st["weight_factor"] * attain_growth, attain_max_factor))
                    continue
                shift = sign * min(abs(st["ref_shift"]) + r["violation"], cap)
                st["ref_shift"] = _limit_shift(g.value, shift, (attain_limits or {}).get(g.id))
            for gid, x in released:  # an over-met goal gives back the shift it needs not
                st = state[gid]
                if gid in attain_weight_ids:
                    st["weight_factor"] = max(1.0, st["weight_factor"] / attain_growth)
                    continue
                sign = 1.0 if st["ref_shift"] > 0 else -1.0
                st["ref_shift"] = sign * max(0.0, abs(st["ref_shift"]) - x)
            current = _apply_hard_state(problem, state)
            warm_opts = dict(options)
            # warm re-solves need fewer iterations
            warm_opts["max_iter"] = max(20, int(options.get("max_iter", 300)) // 3)
            res = be.solve(current, res.fluence, **warm_opts)
            iterations += res.iterations
            history.extend(res.history)
            report = check(res.fluence) if goal_check else problem.goal_report(res.fluence)
        update_offsets(res.fluence, report)  # kept for warm re-plans and the plan's terms
        res.objective = problem.objective(res.fluence)
        res.goal_report = problem.goal_report(res.fluence)
        if goal_check:  # the caller's measurement decides what is met
            override = {r["id"]: r for r in report}
            res.goal_report = [override.get(r["id"], r) for r in res.goal_report]
    res.hard_state = state
    res.iterations = iterations
    res.history = history
    res.timings_s = dict(res.timings_s, total=time.perf_counter() - t0)
    res.messages = list(res.messages) + [
        f"hard goal {g['id']} not met: achieved {g['achieved']:.3g}, misses by "
        f"{g['violation']:.3g}" + (f" after {rounds} hard-goal rounds" if rounds else "")
        for g in res.unmet_hard]
    if res.status == "infeasible":
        res.messages.append("the priority-1 goals cannot all be met together "
                            "(the QP constraints are infeasible)")
    return res
