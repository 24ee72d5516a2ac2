"""Direct aperture refinement of a sequenced VMAT delivery (the leaf step of direct
aperture optimisation).

Rule-based sequencing gives one aperture per control point and arc pass; it cannot
reproduce a modulated fluence exactly. Here the leaf tips of every arc control point and
the control-point MU are moved together to lower a plan objective J of the *deliverable*
dose itself, within the machine's limits:

    min_{a, b, v}  J(D(w(a, b, v)))

w(a, b, v): beamlet weights (MU) of the delivery, exactly as
:func:`atp.sequencer.deliverable.delivered_weights` computes them (each interval between
control points split into ``n_sub`` equal-MU sub-apertures at linearly interpolated tips,
the delivered fraction of each beamlet rectangle with the machine's transmission, jaws
fixed). That map is piecewise linear in the tips, so its vector-Jacobian product is
written out in closed form (:class:`atp.sequencer.arc_model.ArcModel`); J and dJ/dw
come from the caller (``weight_value_grad``), so any objective can drive it --
:func:`atp.sequencer.far_tail.dose_objective` makes one of a dose objective on the
reported dose (D = A w + far(w), dJ/dw = A^T g + far^T g). The weights and the MU derivative are exact, transmission included; the tip
derivative is that of the opening inside the jaws times (1 - leaf transmission): it
leaves out the tongue-and-groove strips and tips moving outside the jaws (a fraction of
a percent of the dose; L-BFGS-B still descends and a round is kept only when the exact J
falls).

Feasibility is kept by construction: each round solves a box-constrained problem
(L-BFGS-B) whose boxes are cut from the current delivery's slack -- each leaf may take
at most half of the slack of every constraint it shares (leaf travel to the neighbouring
control points at full gantry speed, the minimum gap to its opposing leaf, the bank span,
the leaf range) and the MU stay within the MU/degree limits -- so every point inside the
boxes is deliverable. Several rounds let leaves travel further than one round's slack.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from atp.sequencer.arc_model import ArcModel, arc_value_grad
from atp.sequencer.delivery import Delivery
from atp.sequencer.machine import Machine
from scipy.optimize import minimize

from atp.dose.influence import BeamletInfo


def _travel_box(x, step):
    """Per-element (lower, upper) move of x (n_cp, n_pairs) keeping |x[k+1]-x[k]| <=
    step[k] whatever its neighbours do inside their own boxes (half the slack each)."""
    lo = np.full_like(x, -np.inf)
    hi = np.full_like(x, np.inf)
    d = np.diff(x, axis=0)
    s = step[:, None]
    up = np.maximum(s - d, 0.0) / 2  # room before x[k+1] - x[k] reaches +step
    down = np.maximum(s + d, 0.0) / 2  # room before it reaches -step
    hi[1:] = np.minimum(hi[1:], up)
    lo[:-1] = np.maximum(lo[:-1], -up)
    lo[1:] = np.maximum(lo[1:], -down)
    hi[:-1] = np.minimum(hi[:-1], down)
    return lo, hi


def leaf_boxes(a, b, gantry_deg, machine: Machine):
    """Bounds (a_lo, a_hi, b_lo, b_hi), each (n_cp, n_pairs) mm, inside which every
    choice of tips keeps the arc deliverable given the current tips a, b (feasible)."""
    m = machine
    dg = np.abs((np.diff(gantry_deg) + 180.0) % 360.0 - 180.0)
    step = m.max_leaf_travel_per_deg_mm * dg
    la, ha = _travel_box(a, step)
    lb, hb = _travel_box(b, step)
    slack = np.maximum(b - a - m.min_leaf_gap_mm, 0.0) / 2  # opposing tips
    ha = np.minimum(ha, slack)
    lb = np.maximum(lb, -slack)
    for x, lo, hi in ((a, la, ha), (b, lb, hb)):  # bank span per control point
        room = np.maximum(m.max_leaf_span_mm - (x.max(axis=1) - x.min(axis=1)), 0.0) / 2
        lo[:] = np.maximum(lo, (x.min(axis=1) - room)[:, None] - x)
        hi[:] = np.minimum(hi, (x.max(axis=1) + room)[:, None] - x)
    r_lo, r_hi = m.leaf_position_range_mm
    la = np.maximum(la, r_lo - a)
    ha = np.minimum(ha, r_hi - a)
    lb = np.maximum(lb, r_lo - b)
    hb = np.minimum(hb, r_hi - b)
    # numerical safety: a box never excludes the current point
    return (a + np.minimum(la, 0), a + np.maximum(ha, 0), b + np.minimum(lb, 0),
            b + np.maximum(hb, 0))



def refine_apertures(delivery: Delivery, beamlets: BeamletInfo, weight_value_grad, *,
                     rounds: int = 3, iterations: int = 10, n_sub: int = 4,
                     leaf_scale_mm: float = 5.0) -> tuple[Delivery, dict]:
    """Move the arc leaf tips and control-point MU of a VMAT ``delivery`` to lower J.

    weight_value_grad(w): J and dJ/dw for beamlet weights w (MU, ``beamlets`` order,
    NumPy float64). rounds x iterations: L-BFGS-B rounds (boxes re-cut from the slack
    before each) and iterations per round. Returns (delivery, info); the input delivery
    when J does not decrease. Every result passes :func:`atp.sequencer.check_delivery`.
    """
    if delivery.technique != "vmat":
        raise ValueError(f"aperture refinement handles VMAT deliveries, got "
                         f"{delivery.technique!r}")
    m = delivery.machine
    models = [ArcModel(b, beamlets, m, delivery.fractions, n_sub) for b in delivery.beams]
    if not models:
        return delivery, {"rounds": 0, "kept": False}
    sizes = [(md.n_cp, md.n_pairs) for md in models]
    n_leaf = [2 * c * p for c, p in sizes]
    mu_scale = max(float(np.mean(np.concatenate([md.v0 for md in models]))), 1e-9)
    n_w = beamlets.n_beamlets

    def split(z):
        out, i = [], 0
        for md, nl in zip(models, n_leaf):
            ab = z[i:i + nl].reshape(2, md.n_cp, md.n_pairs) * leaf_scale_mm
            i += nl
            v = z[i:i + md.n_cp] * mu_scale
            i += md.n_cp
            out.append((ab[0], ab[1], v))
        return out

    def pack(parts):
        return np.concatenate([np.concatenate([a.ravel() / leaf_scale_mm,
                                               b.ravel() / leaf_scale_mm, v / mu_scale])
                               for a, b, v in parts])

    def fun(z):
        j, raw = arc_value_grad(models, split(z), n_w, weight_value_grad)
        grads = [(ga * leaf_scale_mm, gb * leaf_scale_mm, gv * mu_scale) for ga, gb, gv in raw]
        return j, np.concatenate([np.concatenate([ga.ravel(), gb.ravel(), gv])
                                  for ga, gb, gv in grads])

    parts = [(md.a0, md.b0, np.clip(md.v0, md.mu_lo, md.mu_hi)) for md in models]
    z = pack(parts)
    j0, _ = fun(z)
    j_best, z_best, done = j0, z, 0
    for _ in range(int(rounds)):
        bounds_lo, bounds_hi = [], []
        for md, (a, b, v) in zip(models, split(z_best)):
            a_lo, a_hi, b_lo, b_hi = leaf_boxes(a, b, md.beam.gantry_deg[1:-1], m)
            bounds_lo.append(np.concatenate([a_lo.ravel() / leaf_scale_mm,
                                             b_lo.ravel() / leaf_scale_mm,
                                             md.mu_lo / mu_scale]))
            bounds_hi.append(np.concatenate([a_hi.ravel() / leaf_scale_mm,
                                             b_hi.ravel() / leaf_scale_mm,
                                             md.mu_hi / mu_scale]))
        lo, hi = np.concatenate(bounds_lo), np.concatenate(bounds_hi)
        res = minimize(fun, np.clip(z_best, lo, hi), jac=True, method="L-BFGS-B",
                       bounds=np.stack([lo, hi], axis=1),
                       options={"maxiter": int(iterations)})
        done += int(res.nit)
        if not res.fun < j_best:
            break
        j_best, z_best = float(res.fun), np.clip(res.x, lo, hi)
    info = {"iterations": done, "objective_before": float(j0), "objective_after": j_best,
            "kept": bool(j_best < j0)}
    if not j_best < j0:
        return delivery, info
    beams = tuple(md.beam_with(a, b, v) for md, (a, b, v) in zip(models, split(z_best)))
    meta = dict(delivery.meta)
    meta["apertures_refined"] = True
    return replace(delivery, beams=beams, meta=meta), info
