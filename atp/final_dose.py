"""Goals held on the final deliverable dose: per-beam MU re-weighting on the CT grid.

The optimiser works on the ideal fluence dose on the dose grid; the plan is judged on the
deliverable dose of the sequenced apertures (leaf leakage, tongue-and-groove, the whole jaw
field) on the patient (CT) grid. The correction rounds of :mod:`atp.pipeline` move the
optimiser's references by the sequencing loss, but a priority-1 goal can still end broken,
and hot spots (the global maximum, an organ's D0.1cc) are created by sequencing and by the
interpolation to the CT grid, where the optimiser does not see them.

This stage is the last one before evaluation. The dose of a sequenced beam is linear in its
MU (the leaves do not move; leakage and transmission scale with the MU too), so with
``D_b`` the reported dose of beam b at its sequenced MU, any per-beam scale ``s_b``
gives exactly the deliverable dose ``sum_b s_b D_b`` of the same apertures (a sliding
window's leaves keep their positions per control point; the dose rate follows the MU).
:func:`reweight_beams` chooses ``s`` (bounded, default 0.8-1.25) minimising, on the CT grid,

    sum_g w_g relu(v_g(s)) + sum_{g hard} w_g relu(v_g(s))^2 + reg * sum_b (s_b - 1)^2

over every goal with a dose metric (Dmean, Dmax, Dmin, D_v: the exact definitions of
:mod:`atp.dvh`), ``v_g`` the goal's shortfall relative to its value tightened by
``margin`` (``(achieved - aim) / |value|`` for upper limits, the other way for lower
bounds), ``w_g`` the goal's weight, priority-1 goals times ``hard_factor``. Soft goals pay
linearly, so the priorities arbitrate (a P3 parotid far above its limit does not outweigh
a P2 coverage goal by the size of its shortfall). The metrics are
piecewise linear in ``s`` (order statistics of a linear map), so the objective is
minimised by L-BFGS-B on its exact (almost everywhere) gradient; while a priority-1 goal
still misses its aim, its weight is raised (``hard_growth``) and the solve restarts warm
(``hard_rounds``). The result is kept only
when the goal list on the new dose is better: no priority-1 goal it met is broken, the
total priority-1 shortfall does not grow, the objective falls, and either priority-1
shortfall was removed or the weight of the goals met rose (a re-weighting that only
moves margins leaves the plan as sequenced).

A sliding-window sweep is timed at the dynamic dose rate, so its MU cannot fall below the
sequenced ones (:func:`scale_bounds`). When the re-weighting wants less
(``resequence``), :func:`atp.pipeline._final_dose_goals` scales the plan's fluence per
beam instead and sequences it again; that plan is kept only when, on its own reported
dose, it lowers the priority-1 shortfall, or breaks no priority-1 goal and meets more
goals by weight. ``resequence_for="goals"`` (the default) tries this whenever the
re-weighting meets more goals (the usual case: a hot spot in an organ inside a target
whose coverage has room, the mandible in PTV_70); ``"hard"`` only when a priority-1 goal
fails. Train patients: docs/experiments/plan-quality.md (fourteenth session).

Then :func:`normalise` (optional, ``normalise=True`` by default): if the primary target
(highest prescription) misses a coverage goal, all MU are scaled up uniformly to meet it
when the priority-1 upper limits allow (every dose metric scales with the MU), as a clinic
normalises a plan to its coverage goal, capped at ``max_normalise``; kept only when it
meets more goals by weight (not when it only trades a goal for another of the same
weight).

The metrics and the goals' masks are those of :func:`atp.goals.evaluate_goals`; the masks are
restricted to the voxels that can matter (a body maximum only needs the voxels that can
reach it under the scale bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize

from atp.dvh import voxels_for_volume
from atp.goals import evaluate_goals
from atp.goals.controls import goal_mask

UPPER = ("<=", "<")
KINDS = ("Dmean", "Dmax", "Dmin", "D")


@dataclass(frozen=True)
class FinalDoseOptions:
    """Knobs of the final-dose stage (:func:`reweight_beams`, :func:`normalise`)."""

    enabled: bool = True
    scale_min: float = 0.8  # per-beam MU scale bounds
    scale_max: float = 1.25
    margin: float = 0.005  # goals aim at their value tightened by this fraction
    hard_factor: float = 10.0  # weight multiplier of priority-1 goals
    reg: float = 1e-3  # x reference weight: pull towards the sequenced MU
    max_iter: int = 200
    penalty: str = "linear"  # soft goals: w * shortfall ("quadratic": w * shortfall^2)
    resequence: bool = True  # MU below a sweep's bounds: re-sequence the scaled fluence
    # when to try it: "hard" (only when a priority-1 goal fails) or "goals" (also when the
    # re-weighting meets more goals by weight: a hot spot above a covered target)
    resequence_for: str = "goals"
    hot_spots: str = "all"  # "organs": target and control upper limits not in the objective
    hard_rounds: int = 4  # priority-1 weights raised by hard_growth while one is missed
    hard_growth: float = 10.0
    normalise: bool = True  # scale up to the primary target's coverage goal (hard goals allow)
    max_normalise: float = 1.1

    def __post_init__(self):
        if self.resequence_for not in ("hard", "goals"):
            raise ValueError(f"resequence_for must be 'hard' or 'goals', got "
                             f"{self.resequence_for!r}")


@dataclass
class _GoalData:
    goal: object
    idx: np.ndarray  # flat voxel indices into the union
    kind: str
    q: float | None  # percentile (np.percentile's q) for D / Dmax / Dmin
    weight: float
    mean_grad: np.ndarray | None = None  # Dmean: its (constant) gradient, once computed


def _percentile_q(goal, n: int, voxel_cc: float) -> float | None:
    """np.percentile q of the goal's metric on ``n`` voxels (atp.dvh definitions)."""
    m = goal.metric
    if m.kind == "Dmax":
        return 100.0
    if m.kind == "Dmin":
        return 0.0
    if m.kind == "D":
        if m.volume_unit == "%":
            return 100.0 - float(np.clip(m.volume, 0.0, 100.0))
        k = voxels_for_volume(float(m.volume), voxel_cc)
        return max(0.0, 100.0 - 100.0 * k / n)
    return None


def _pct_value_grad(d: np.ndarray, B: np.ndarray, q: float, cols=None):
    """np.percentile(d, q) (linear) and its gradient w.r.t. the beam scales (B: beams x
    voxels, d = s @ B; with ``cols``, d = (s @ B)[cols]: d's voxel k is B's column
    cols[k])."""
    n = d.size
    pos = q / 100.0 * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    col = (lambda k: k) if cols is None else (lambda k: cols[k])
    if lo == hi:
        part = np.argpartition(d, lo)
        i = part[lo]
        return float(d[i]), B[:, col(i)].astype(np.float64)
    part = np.argpartition(d, (lo, hi))
    i, j = part[lo], part[hi]
    v = float(d[i]) + frac * float(d[j] - d[i])
    return v, (1.0 - frac) * B[:, col(i)] + frac * B[:, col(j)]


class _Model:
    """The goals' metrics on ``sum_b s_b D_b`` restricted to the voxels that matter."""

    def __init__(self, goals, patient, beam_doses: np.ndarray, opt: FinalDoseOptions,
                 wref: float):
        nb = beam_doses.shape[0]
        flat = beam_doses.reshape(nb, -1)
        total = flat.sum(axis=0)
        vcc = patient.grid.voxel_volume_cc
        masks: list[np.ndarray] = []
        pending = []
        for g in goals:
            if g.value is None or g.metric.kind not in KINDS:
                continue
            if opt.hot_spots == "organs" and g.kind != "organ" and g.operator in UPPER:
                continue  # target / control upper limits left to the optimiser
            m = goal_mask(g, patient).reshape(-1)
            vox = np.flatnonzero(m)
            if vox.size == 0:
                continue
            q = _percentile_q(g, vox.size, vcc)
            if g.metric.kind == "Dmax" and g.operator in UPPER:
                # only voxels that can reach the maximum under the scale bounds
                t = total[vox]
                keep = t >= (opt.scale_min / opt.scale_max) * float(t.max())
                vox, q = vox[keep], 100.0
            w = float(g.weight) * (opt.hard_factor if g.is_hard else 1.0)
            pending.append((g, vox, g.metric.kind, q, w))
            masks.append(vox)
        self.union = np.unique(np.concatenate(masks)) if masks else np.zeros(0, np.int64)
        self.B = np.ascontiguousarray(flat[:, self.union], dtype=np.float64)
        self.goals = [_GoalData(g, np.searchsorted(self.union, vox), kind, q, w)
                      for g, vox, kind, q, w in pending]
        self.opt = opt
        self.reg = opt.reg * wref
        self.nb = nb

    def metrics(self, s) -> list[tuple[float, np.ndarray]]:
        d = s @ self.B
        out = []
        for gd in self.goals:
            dg = d[gd.idx]
            if gd.kind == "Dmean":
                if gd.mean_grad is None:  # a constant: each beam's mean over the voxels
                    gd.mean_grad = self.B[:, gd.idx].mean(axis=1)
                out.append((float(dg.mean()), gd.mean_grad))
            else:  # reads the one or two columns it needs, not a copy of B[:, idx]
                out.append(_pct_value_grad(dg, self.B, gd.q, gd.idx))
        return out

    def shortfalls(self, s):
        """Per goal: (relative shortfall vs the aimed value, its gradient)."""
        out = []
        for gd, (v, gr) in zip(self.goals, self.metrics(s)):
            val = float(gd.goal.value)
            scale = max(abs(val), 1.0)
            if gd.goal.operator in UPPER:
                aim = val - self.opt.margin * abs(val)
                out.append(((v - aim) / scale, gr / scale))
            else:
                aim = val + self.opt.margin * abs(val)
                out.append(((aim - v) / scale, -gr / scale))
        return out

    def objective(self, s):
        s = np.asarray(s, dtype=np.float64)
        f = self.reg * float(np.sum((s - 1.0) ** 2))
        g = 2.0 * self.reg * (s - 1.0)
        quad = self.opt.penalty == "quadratic"
        for gd, (v, gr) in zip(self.goals, self.shortfalls(s)):
            if v <= 0:
                continue
            if quad or gd.goal.is_hard:
                f += gd.weight * v * v
                g = g + 2.0 * gd.weight * v * gr
            else:  # linear: priorities arbitrate, not the size of a shortfall
                f += gd.weight * v
                g = g + gd.weight * gr
        return f, g


def _hard_violation(results) -> tuple[float, set]:
    """(total relative shortfall of priority-1 goals, ids of those met)."""
    total, met = 0.0, set()
    for r in results:
        if not r.goal.is_hard or r.passed is None:
            continue
        if r.passed:
            met.add(r.goal.id)
        else:
            total += max(0.0, -(r.margin or 0.0)) / max(abs(float(r.goal.value)), 1.0)
    return total, met


def reweight_beams(goals, patient, beam_doses, options: FinalDoseOptions | None = None,
                   wref: float = 10.0, bounds=None):
    """Per-beam MU scales for the final dose (module docstring): (scales, info).

    beam_doses: (n_beams, *patient grid) Gy, each beam's reported dose at its sequenced MU
    (their sum is the plan's dose). bounds: per-beam (low, high) scale
    (:func:`scale_bounds`; default the options' range). Returns ones when the re-weighted
    dose is not better.
    """
    opt = options or FinalDoseOptions()
    beam_doses = np.asarray(beam_doses, dtype=np.float32)
    nb = beam_doses.shape[0]
    ones = np.ones(nb)
    model = _Model(goals, patient, beam_doses, opt, wref)
    if not model.goals:
        return ones, {"kept": False, "why": "no goal with a dose metric"}
    f0, _ = model.objective(ones)
    s, nit = ones, 0
    hard = [gd for gd in model.goals if gd.goal.is_hard]
    for _ in range(opt.hard_rounds):
        res = minimize(model.objective, s, jac=True, method="L-BFGS-B",
                       bounds=bounds or [(opt.scale_min, opt.scale_max)] * nb,
                       options={"maxiter": opt.max_iter})
        s, nit = np.asarray(res.x, dtype=np.float64), nit + int(res.nit)
        short = dict(zip(map(id, model.goals), model.shortfalls(s)))
        late = [gd for gd in hard if short[id(gd)][0] > 0]
        if not late:
            break
        for gd in late:  # a priority-1 penalty that lost the trade: raise it, re-solve
            gd.weight *= opt.hard_growth
    f0 = model.objective(ones)[0]  # the same (escalated) function at the start
    f1, _ = model.objective(s)
    info = {"objective": [float(f0), float(f1)], "iterations": nit,
            "scales": [round(float(x), 4) for x in s]}
    if not f1 < f0 - 1e-9 * max(1.0, abs(f0)):
        return ones, dict(info, kept=False, why="the objective did not fall")
    before = evaluate_goals(goals, patient, beam_doses.sum(axis=0))
    after = evaluate_goals(goals, patient, np.tensordot(s.astype(np.float32), beam_doses, 1))
    hv0, met0 = _hard_violation(before)
    hv1, met1 = _hard_violation(after)
    broke = sorted(met0 - met1)
    if broke or hv1 > hv0 + 1e-9:
        return ones, dict(info, kept=False, why="a priority-1 goal got worse"
                          + (f" ({', '.join(broke)})" if broke else ""))
    w0, w1 = _weighted_met(before), _weighted_met(after)
    info["weighted_met"] = [w0, w1]
    if hv1 >= hv0 - 1e-9 and w1 <= w0 + 1e-9:
        return ones, dict(info, kept=False, why="no more goals met (by weight) and no "
                          "priority-1 shortfall removed")
    return s, dict(info, kept=True)


def _weighted_met(results) -> float:
    """Sum of the weights of the goals met (no reward for surplus margin)."""
    return float(sum(r.goal.weight for r in results if r.passed is True))


def normalise(goals, patient, dose, options: FinalDoseOptions | None = None,
              max_scale: float | None = None):
    """Uniform MU scale (>= 1) that meets the primary target's failing coverage goals
    while every priority-1 upper limit stays met (module docstring): (scale, info).
    Kept only when the scaled dose meets more goals by weight, as the re-weighting's
    result: a scale that trades a met goal for one of the same weight (the mandible's
    near-max, priority 2, for PTV_70 D95, priority 2) leaves the plan as it is.
    max_scale: a further cap (the machine limits of the beams)."""
    opt = options or FinalDoseOptions()
    rx = {p.target: p.dose_gy for p in patient.prescriptions}
    if not rx or not opt.normalise:
        return 1.0, {"normalised": False}
    primary = max(rx, key=rx.get)
    rs = evaluate_goals(goals, patient, dose)
    need = 1.0
    for r in rs:
        g = r.goal
        if (g.structure == primary and g.kind == "target" and g.operator not in UPPER
                and g.metric.kind in KINDS and r.passed is False and r.achieved):
            need = max(need, float(g.value) * (1.0 + opt.margin) / float(r.achieved))
    if need <= 1.0:
        return 1.0, {"normalised": False, "why": "the primary target's coverage is met"}
    cap = opt.max_normalise if max_scale is None else min(opt.max_normalise, max_scale)
    for r in rs:
        g = r.goal
        if g.is_hard and g.operator in UPPER and g.metric.kind in KINDS and r.achieved:
            cap = min(cap, float(g.value) * (1.0 - opt.margin) / float(r.achieved))
    c = float(min(need, cap))
    if c <= 1.0:
        return 1.0, {"normalised": False, "why": "a priority-1 limit leaves no room"}
    w0 = _weighted_met(rs)
    w1 = _weighted_met(evaluate_goals(goals, patient, dose * np.float32(c)))
    if w1 <= w0 + 1e-9:  # a trade between goals of the same weight: the plan as it is
        return 1.0, {"normalised": False, "scale_tried": round(c, 4),
                     "why": f"{'no more' if w1 >= w0 - 1e-9 else 'fewer'} goals met "
                            f"(by weight: {w0:g} -> {w1:g})"}
    return c, {"normalised": True, "scale": round(c, 4), "needed": round(need, 4)}


def mu_units(delivery) -> list[tuple[int, int | None]]:
    """The delivery's independently scalable MU: (beam, None) for a whole beam, or (beam,
    sector) for each MU group of a sliding-window arc (``BeamDelivery.mu_group``: a
    sector's leaf timing is fixed relative to its own MU, so each sector scales as a
    whole)."""
    out: list[tuple[int, int | None]] = []
    for i, b in enumerate(delivery.beams):
        if b.mu_group is None:
            out.append((i, None))
        else:
            out += [(i, int(g)) for g in np.unique(b.mu_group)]
    return out


def unit_delivery(delivery, unit):
    """The delivery of one MU unit (:func:`mu_units`) alone: its beam, or for an arc
    sector the sector's control points (cumulative MU from 0); the units' doses add up
    to the delivery's."""
    i, g = unit
    b = delivery.beams[i]
    if g is None:
        return replace(delivery, beams=(b,))
    k = np.flatnonzero(b.mu_group == g)
    cps = np.arange(k[0], k[-1] + 2)
    cum = b.cumulative_mu[cps] - b.cumulative_mu[cps[0]]
    sub = replace(b, gantry_deg=b.gantry_deg[cps], leaf_a_mm=b.leaf_a_mm[cps],
                  leaf_b_mm=b.leaf_b_mm[cps], jaw_x_mm=b.jaw_x_mm[cps],
                  jaw_y_mm=b.jaw_y_mm[cps], cumulative_mu=cum, dij_beam=b.dij_beam[cps],
                  n_segments=cps.size, mu_group=b.mu_group[k])
    return replace(delivery, beams=(sub,))


def scale_bounds(delivery, options: FinalDoseOptions | None = None) -> list[tuple]:
    """Per MU unit (:func:`mu_units`: a beam, or a sliding-window arc's sector) the MU
    scale bounds that keep every control point within the machine limits
    (:func:`atp.sequencer.delivery.check_delivery`): a sliding-window beam's leaves are
    timed at the dynamic dose rate, so fewer MU would need faster leaves; an arc keeps its
    MU per degree in range (its leaves' travel per degree does not change); step-and-shoot
    segments take any scale."""
    opt = options or FinalDoseOptions()
    m = delivery.machine
    out = []
    for i, g in mu_units(delivery):
        b = delivery.beams[i]
        lo, hi = opt.scale_min, opt.scale_max
        dmu = np.diff(b.cumulative_mu)
        mine = np.ones(dmu.size, bool) if g is None else b.mu_group == g
        on = (dmu > 1e-12) & mine
        if b.n_control_points >= 2 and on.any():
            travel = np.maximum(np.abs(np.diff(b.leaf_a_mm, axis=0)),
                                np.abs(np.diff(b.leaf_b_mm, axis=0)))
            travel = np.nan_to_num(travel, nan=0.0).max(axis=1)
            if b.kind == "dynamic":
                need = travel[on] / (m.mm_per_mu(delivery.fractions) * dmu[on])
                lo = max(lo, float(need.max()) * (1.0 + 1e-6))
            elif b.kind == "arc":
                dg = np.abs((np.diff(b.gantry_deg) + 180.0) % 360.0 - 180.0)
                mu_deg = (dmu / delivery.fractions / np.maximum(dg, 1e-9))[mine]
                lo = max(lo, m.min_mu_per_deg / max(float(mu_deg.min()), 1e-12) * (1 + 1e-6))
                hi = min(hi, m.max_mu_per_deg / max(float(mu_deg.max()), 1e-12) * (1 - 1e-6))
        if hi < lo:
            lo = hi = 1.0
        out.append((min(lo, 1.0), max(hi, 1.0)))
    return out


def scale_beams(delivery, scales):
    """The delivery with each MU unit's MU (:func:`mu_units`: every control point's
    cumulative MU of a beam, or the intervals of an arc's sector) scaled."""
    factor = [np.ones(max(b.n_control_points - 1, 0)) for b in delivery.beams]
    whole = [1.0] * len(delivery.beams)
    for (i, g), x in zip(mu_units(delivery), scales):
        if g is None:
            whole[i] = float(x)
        else:
            factor[i][delivery.beams[i].mu_group == g] = float(x)
    beams = []
    for b, f, x in zip(delivery.beams, factor, whole):
        if b.mu_group is None:
            beams.append(b if x == 1.0 else replace(b, cumulative_mu=b.cumulative_mu * x))
        elif np.all(f == 1.0):
            beams.append(b)
        else:
            dmu = np.diff(b.cumulative_mu) * f
            beams.append(replace(b, cumulative_mu=np.concatenate([[0.0], np.cumsum(dmu)])))
    return replace(delivery, beams=tuple(beams))
