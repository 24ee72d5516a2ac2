"""Why a goal stops where it is: the terms that hold it, and the floor a target sets.

Two answers, both measured on the plan (nothing is guessed):

* **Opposing terms** (:func:`opposing_terms`). At the optimum of a weighted sum, the pull
  of a goal's term (its gradient with respect to the fluence) is balanced by the other
  terms' gradients on the beamlets that are free to move (the stationarity condition,
  restricted to beamlets above zero: those at zero are held by ``w >= 0``). Moving the
  fluence along the goal's descent direction ``-u`` changes term ``j`` at the rate
  ``-<grad_j, u>``; the terms that would *grow* are what hold the goal. Each gets its
  share of that growth (shares add up to 1). A failing goal whose term is inactive has
  its term probed just below its current value, so the direction is the one that would
  lower its reported metric.
* **Target floor** (:func:`target_floor`). An organ voxel inside a target cannot be
  colder than that target's own coverage goals allow. Assigning the organ's overlap
  voxels the lowest doses a target's lower-bound goals of higher priority permit (D_v >=
  x: all but (100 - v) % of the target at >= x; Dmin: all), and zero to the rest of the
  organ, gives the lowest value the goal's metric can take without breaking one of those
  goals: a hard lower bound, not an estimate.

:func:`explain_goal` puts both into one line.
"""

from __future__ import annotations

import numpy as np
from atp.optimizer.objectives import mu_value_grad, term_value_grad
from atp.optimizer.problem import UPPER_OPS, measure_metric
from atp.optimizer.solve import surrogate_value

AUTO_NAMES = {"auto:falloff": "the automatic dose fall-off term",
              "auto:global_max": "the automatic global-maximum term",
              "smoothness": "fluence smoothness", "mu": "the MU (leakage) term"}


def _grad_rows(term, d) -> np.ndarray:
    _, g = term_value_grad(term, d[term.rows], term.voxel_weight, term.ref_gy)
    out = np.zeros(d.shape, dtype=np.float64)
    out[term.rows] = np.asarray(g, dtype=np.float64)
    return out


def _iterated(problem):
    """The operator the solver iterated on (``Problem.fast``: the dij's grouped scatter
    tail, within 0.1 Gy of ``A``), else ``A``: the explanations weigh the gradients the
    solver saw, at a third of the exact products' cost."""
    fast = getattr(problem, "fast", None)
    return problem.A if fast is None else fast


class _Gradients:
    """Every term's gradient w.r.t. the fluence at one fluence, on the free beamlets
    (computed once, with one sparse product, for all the goals explained)."""

    def __init__(self, problem, fluence, free_frac: float):
        w = np.asarray(fluence, dtype=np.float32)
        self.w = w
        self.d = problem.dose_rows(w)  # the optimised dose (leakage included)
        top = float(w.max()) if w.size else 0.0
        self.free = w > free_frac * top if top > 0 else np.zeros(w.size, bool)
        cols = np.zeros((problem.n_rows, len(problem.terms)), dtype=np.float32)
        for i, t in enumerate(problem.terms):
            cols[:, i] = _grad_rows(t, self.d)
        self.G = np.asarray(_iterated(problem).T @ cols,
                            dtype=np.float64)[self.free]  # (free, terms)
        self.smooth = None
        if problem.smooth_weight > 0 and len(problem.smooth_pairs):
            D = problem.smoothness_matrix()
            gs = (2.0 * problem.smooth_weight / problem.smooth_norm) * (D.T @ (D @ w))
            self.smooth = np.asarray(gs, np.float64)[self.free]
        self.mu = None
        if getattr(problem, "mu", None) is not None and problem.mu_scale > 0:
            m = problem.mu
            _, gm = mu_value_grad(w, m.D, m.D.T.tocsr(), m.S, m.S.T.tocsr(), m.beam_rows,
                                  m.tau)
            self.mu = problem.mu_scale * np.asarray(gm, np.float64)[self.free]


def opposing_terms(problem, fluence, goal_id: str, *, free_frac: float = 1e-3,
                   reported: float | None = None, cache: dict | None = None
                   ) -> list[tuple[str, float]]:
    """[(term label, share)] of the terms that oppose lowering ``goal_id``'s violation at
    ``fluence`` (``problem`` as optimised: :func:`atp.optimizer.solve.apply_state`), largest
    share first; shares of opposing terms sum to 1. Empty when nothing opposes it on the
    free beamlets (or the goal has no term). ``cache``: a dict kept between calls on the
    same problem and fluence (the term gradients are computed once)."""
    b = next((b for b in problem.bindings if b.goal.id == goal_id), None)
    if b is None or not b.term_indices:
        return []
    cache = {} if cache is None else cache
    if "grads" not in cache:
        cache["grads"] = _Gradients(problem, fluence, free_frac)
    gr = cache["grads"]
    if not gr.free.any():
        return []
    g = b.goal
    upper = g.operator in UPPER_OPS
    own = set(b.term_indices)
    rows = np.zeros(problem.n_rows, dtype=np.float64)
    s = surrogate_value(problem, b, gr.d)
    for ti in b.term_indices:
        t = problem.terms[ti]
        if s is not None and isinstance(t.ref_gy, float):
            # probe just past the current surrogate value so the term is active
            step = max(0.01 * abs(float(g.value)), 0.05)
            if reported is not None:
                step = max(step, abs(float(reported) - float(g.value)))
            t = t.with_ref(max(0.0, min(t.ref_gy, s - step)) if upper
                           else max(t.ref_gy, s + step))
        rows += _grad_rows(t, gr.d)
    u = np.asarray(_iterated(problem).T @ rows, dtype=np.float64)[gr.free]
    if not np.any(u):
        return []
    per_term = -(gr.G.T @ u)
    rates: dict[str, float] = {}
    for i, t in enumerate(problem.terms):
        if i in own or (t.goal_id is not None and t.goal_id == g.id):
            continue
        label = t.goal_id or t.name
        rates[label] = rates.get(label, 0.0) + float(per_term[i])
    if gr.smooth is not None:
        rates["smoothness"] = float(-(gr.smooth @ u))
    if gr.mu is not None:
        rates["mu"] = float(-(gr.mu @ u))
    pos = {k: v for k, v in rates.items() if v > 0}
    total = sum(pos.values())
    if total <= 0:
        return []
    return sorted(((k, v / total) for k, v in pos.items()), key=lambda kv: -kv[1])


def target_floor(goal, patient, resolved_goals) -> dict | None:
    """The lowest value ``goal`` (an upper limit on an organ) can reach without breaking a
    coverage goal of higher priority of a target it overlaps (module docstring).

    Returns ``{"floor": value, "overlaps": {target: fraction of the organ}, "goals":
    [ids of the coverage goals used]}``, or None when the organ overlaps no target that
    has such goals.
    """
    if goal.operator not in UPPER_OPS or goal.kind != "organ" or goal.value is None \
            or goal.metric.kind not in ("Dmean", "Dmax", "D"):
        return None
    try:
        organ = patient.mask(goal.structure)
    except Exception:  # noqa: BLE001 - a control structure: no floor
        return None
    n_org = int(organ.sum())
    if n_org == 0:
        return None
    rx = {p.target: p.dose_gy for p in patient.prescriptions}
    cover = {}
    for c in resolved_goals:
        is_cover = c.kind == "target" and c.operator not in UPPER_OPS and c.value is not None
        if is_cover and (c.priority < goal.priority or c.priority == goal.priority == 1):
            m = c.metric
            if m.kind == "Dmin":
                frac = 1.0
            elif m.kind == "D" and m.volume_unit == "%":
                frac = m.volume / 100.0
            else:
                continue
            cover.setdefault(c.structure, []).append((frac, float(c.value), c.id))
    floor = np.zeros(n_org, dtype=np.float64)
    counted = np.zeros(organ.shape, dtype=bool)
    overlaps, used, start = {}, [], 0
    for t in sorted(cover, key=lambda n: -rx.get(n, 0.0)):
        if t not in patient.structures:
            continue
        tm = patient.mask(t)
        n_t = int(tm.sum())
        ov = organ & tm & ~counted
        n_ov = int(ov.sum())
        if n_ov == 0 or n_t == 0:
            continue
        counted |= ov
        overlaps[t] = n_ov / n_org
        # the i-th coldest voxel of the target (i from 0) is >= x for every goal
        # "at least frac of the target >= x" with i >= n_t * (1 - frac)
        i = np.arange(n_ov, dtype=np.float64)
        low = np.zeros(n_ov, dtype=np.float64)
        for frac, x, gid in cover[t]:
            hit = i >= np.floor(n_t * (1.0 - frac))
            if hit.any():
                low[hit] = np.maximum(low[hit], x)
                used.append(gid)
        floor[start:start + n_ov] = low
        start += n_ov
    if not overlaps:
        return None
    vcc = patient.grid.voxel_volume_cc
    value = measure_metric(goal.metric, floor, np.ones(n_org), vcc,
                           goal.reference_rx_gy or max(rx.values(), default=1.0))
    return {"floor": float(value), "overlaps": overlaps, "goals": sorted(set(used))}


def _label(name: str, goals_by_id: dict) -> str:
    g = goals_by_id.get(name)
    if g is not None:
        return f"{name} (P{g.priority})"
    if name.startswith("auto:") and name not in AUTO_NAMES:
        return f"the automatic term {name[5:]}"
    return AUTO_NAMES.get(name, name)


def explain_goal(problem, fluence, result, patient, resolved_goals, *,
                 top: int = 3, min_share: float = 0.05, cache: dict | None = None
                 ) -> dict | None:
    """One line saying what holds a failing goal (``result``: its GoalResult on the
    plan's dose), with the opposing terms and the target floor it rests on. ``cache``:
    see :func:`opposing_terms` (pass one dict when explaining several goals)."""
    g = result.goal
    if result.passed is not False:
        return None
    by_id = {x.id: x for x in resolved_goals}
    unit = "%" if g.metric.result_unit == "%" else g.metric.result_unit
    head = (f"{g.id}: {g.metric.text} {g.operator} {g.value:.4g} {unit} not reached "
            f"({result.achieved:.4g} {unit})")
    parts = []
    floor = target_floor(g, patient, resolved_goals)
    if floor is not None:
        where = ", ".join(f"{100 * f:.0f} % in {t}" for t, f in floor["overlaps"].items())
        blocked = floor["floor"] >= g.value
        if floor["goals"] and floor["floor"] > 0:
            parts.append(f"{g.structure} lies {where}: its {g.metric.text} cannot fall "
                         f"below {floor['floor']:.4g} {unit} without breaking "
                         f"{', '.join(floor['goals'])}"
                         + (" -- the goal is infeasible" if blocked else ""))
        else:  # the overlap fits in the cold part the coverage goals allow: no floor
            parts.append(f"{g.structure} lies {where}")
    shares = opposing_terms(problem, fluence, g.id, reported=result.achieved, cache=cache)
    shown = [(k, s) for k, s in shares if s >= min_share][:top]
    if shown:
        parts.append("held by " + ", ".join(f"{_label(k, by_id)} {100 * s:.0f} %"
                                            for k, s in shown))
    elif problem is not None and not any(b.goal.id == g.id and b.term_indices
                                         for b in problem.bindings):
        parts.append("not optimised (no objective term)")
    else:
        parts.append("no other term opposes it on the open beamlets: sequencing or "
                     "the dose grid hold it")
    return {"id": g.id, "line": head + "; " + "; ".join(parts),
            "opposing": [{"term": k, "share": s} for k, s in shares[:8]],
            "floor": floor}
