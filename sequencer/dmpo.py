"""Direct machine-parameter optimisation (DMPO) of VMAT arcs.

The leaf tips of every arc control point and the control-point MU are the variables of the
plan objective itself, evaluated on the *deliverable* dose (SmartArc's final stage,
Bzdusek et al., Med Phys 36 (2009) 2328; the direct-aperture step of the methods reviewed
by Unkelbach et al., Med Phys 42 (2015) 6321)::

    min_{a, b, v}  J(w(a, b, v)) + mu_weight * J_0 * MU(v) / MU_0
    s.t.  (a, b, v) in C (the machine)

w(a, b, v): the beamlet weights (MU) of the delivery exactly as
:func:`atp.sequencer.deliverable.delivered_weights` computes them -- every interval between
control points split into ``n_sub`` equal-MU sub-apertures at linearly interpolated tips,
the delivered fraction of :func:`atp.dose.aperture.delivered_fraction` with the machine's
leaf/jaw transmission and tongue and groove (the same code path as the deliverable dose);
its vector-Jacobian product in closed form is
:class:`atp.sequencer.arc_model.ArcModel`'s. J and dJ/dw come from the caller as a
plain callable (``weight_value_grad``), so this stage knows nothing of goals: the planning
floor passes the full goal-list objective (every term, the hard goals with the weights and
references the hard-goal loop left them at) as ``w -> (J(A w), A^T dJ/dD)``.

C, the machine limits, per arc (jaws fixed as sequenced):

* leaf travel between neighbouring control points ``|x[k+1] - x[k]| <= s_k``, with
  ``s_k = travel_per_deg_mm x |gantry step|`` (default: the machine's travel per degree at
  full gantry speed, :attr:`Machine.max_leaf_travel_per_deg_mm`, so the arc never has to
  slow its gantry for the leaves);
* opposing tips at least the minimum gap apart, tips inside the leaf range;
* MU per control point within the MU/degree limits times the degrees it covers
  (dose rate x gantry speed), i.e. a box;
* bank span (most- minus least-extended leaf of a bank at a control point): a fifth set
  of the alternating projection, ``SPAN_MARGIN_MM`` inside the limit (the repair after it
  may move a leaf by Dykstra's residual); a step that still breaks the limit is refused.

The method is projected quasi-Newton: an L-BFGS direction in scaled variables (leaves /
``leaf_scale_mm``, MU / mean MU), a trial point projected onto C, Armijo backtracking on
the projected step (a failed search restarts from the steepest-descent direction with the
memory cleared). The projection onto the leaf polytope is Dykstra's alternating projection
(Boyle & Dykstra 1986) onto five sets with closed-form projections -- even-indexed and
odd-indexed travel constraints (disjoint pairs of control points), the opposing-tip gap,
the leaf range, the bank span -- followed by an exact repair (range, gap, then a forward and a backward
travel clamp, which keeps the gap and the range), so every iterate is deliverable whatever
the number of Dykstra sweeps. Every returned delivery passes
:func:`atp.sequencer.check_delivery`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from atp.sequencer.arc_model import ArcModel, arc_value_grad
from atp.sequencer.delivery import Delivery, check_delivery
from atp.sequencer.machine import Machine
from atp.sequencer.vmat import limit_travel

from atp.dose.influence import BeamletInfo
from atp.errors import InputError


@dataclass(frozen=True)
class DmpoOptions:
    """Knobs of :func:`optimise_machine_parameters`.

    iterations: quasi-Newton iterations (each one objective + gradient at least).
    memory: L-BFGS pairs kept. n_sub: equal-MU sub-apertures per control-point interval
    (as the deliverable dose). leaf_scale_mm: leaf variables are scaled by this (one unit
    of leaf = this many mm against one unit of MU = the mean control-point MU).
    travel_per_deg_mm: leaf travel per gantry degree allowed (None: the machine's at full
    gantry speed). dykstra_sweeps: alternating-projection sweeps per projection.
    mu_weight: the MU penalty, as a fraction of the starting objective per 100 % of the
    starting total MU (0: none). rel_tol: stop when a step lowers J by less than this
    fraction of J. armijo: sufficient-decrease constant. max_backtracks: step halvings per
    line search."""

    iterations: int = 60
    memory: int = 8
    n_sub: int = 4
    leaf_scale_mm: float = 5.0
    travel_per_deg_mm: float | None = None
    dykstra_sweeps: int = 20
    mu_weight: float = 0.0
    rel_tol: float = 1e-6
    armijo: float = 1e-4
    max_backtracks: int = 10

    def __post_init__(self) -> None:
        for name in ("iterations", "memory", "n_sub", "max_backtracks"):
            v = getattr(self, name)
            if int(v) != v or v < (0 if name == "iterations" else 1):
                raise InputError(f"dmpo {name} must be a positive integer, got {v!r}",
                                 field=f"dmpo.{name}")
        for name in ("leaf_scale_mm",):
            if not getattr(self, name) > 0:
                raise InputError(f"dmpo {name} must be > 0", field=f"dmpo.{name}")
        if self.travel_per_deg_mm is not None and not self.travel_per_deg_mm > 0:
            raise InputError("dmpo travel_per_deg_mm must be > 0", field="dmpo.travel_per_deg_mm")
        if not self.mu_weight >= 0:
            raise InputError("dmpo mu_weight must be >= 0", field="dmpo.mu_weight")


#: the span set of the projection lies this far inside the machine's bank-span limit
SPAN_MARGIN_MM = 0.5


# --- the machine polytope -------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LeafLimits:
    """Leaf constraints of one arc: per-interval travel ``step`` (n_cp - 1,) mm, the
    minimum gap, the leaf range and the bank span."""

    step: np.ndarray
    min_gap: float
    lo: float
    hi: float
    span: float

    @classmethod
    def of(cls, gantry_deg, machine: Machine, travel_per_deg_mm: float | None = None):
        dg = np.abs((np.diff(np.asarray(gantry_deg, np.float64)) + 180.0) % 360.0 - 180.0)
        per_deg = (machine.max_leaf_travel_per_deg_mm if travel_per_deg_mm is None
                   else float(travel_per_deg_mm))
        lo, hi = machine.leaf_position_range_mm
        return cls(per_deg * dg, float(machine.min_leaf_gap_mm), float(lo), float(hi),
                   float(machine.max_leaf_span_mm))

    def violation(self, a, b) -> float:
        """Largest violation (mm) of any constraint (0: feasible)."""
        v = [0.0, float((self.min_gap - (b - a)).max()), self.lo - float(min(a.min(), b.min())),
             float(max(a.max(), b.max())) - self.hi]
        if a.shape[0] > 1:
            v.append(float((np.abs(np.diff(a, axis=0)) - self.step[:, None]).max()))
            v.append(float((np.abs(np.diff(b, axis=0)) - self.step[:, None]).max()))
        for x in (a, b):
            v.append(float((x.max(axis=1) - x.min(axis=1)).max()) - self.span)
        return max(v)


def _pair_project(x, step, parity):
    """Project x (n_cp, n_pairs) onto {|x[k+1] - x[k]| <= step[k]} for k of one parity
    (disjoint pairs of rows): both ends move half the excess towards each other."""
    k = np.arange(parity, x.shape[0] - 1, 2)
    if k.size == 0:
        return x
    d = x[k + 1] - x[k]
    s = step[k][:, None]
    excess = np.sign(d) * np.maximum(np.abs(d) - s, 0.0) / 2
    out = x.copy()
    out[k] += excess
    out[k + 1] -= excess
    return out


def _span_project(x, span: float, iterations: int = 50):
    """Project every row of x (n_cp, n_pairs) onto {max - min <= span}: the row clipped
    to [l, l + span], l where the mass below it balances the mass above l + span (the
    derivative of the squared distance; found by bisection)."""
    lo_x, hi_x = x.min(axis=1), x.max(axis=1)
    bad = hi_x - lo_x > span
    if not bad.any():
        return x
    r = x[bad]
    lo, hi = lo_x[bad], hi_x[bad] - span
    for _ in range(int(iterations)):
        mid = 0.5 * (lo + hi)
        g = (np.maximum(mid[:, None] - r, 0.0).sum(axis=1)
             - np.maximum(r - mid[:, None] - span, 0.0).sum(axis=1))
        lo = np.where(g < 0, mid, lo)
        hi = np.where(g < 0, hi, mid)
    l_ = 0.5 * (lo + hi)[:, None]
    out = x.copy()
    out[bad] = np.clip(r, l_, l_ + span)
    return out


def _gap_project(a, b, g):
    """Project (a, b) onto {b - a >= g} elementwise."""
    short = np.maximum(g - (b - a), 0.0) / 2
    return a - short, b + short


def repair(a, b, lim: LeafLimits):
    """A feasible (a, b) near the given one (not the projection): range, gap, then the
    forward and backward travel clamp (monotone and shift-equivariant, so it keeps the gap
    and the range: both banks use the same steps)."""
    a = np.clip(a, lim.lo, lim.hi - lim.min_gap)
    b = np.clip(np.maximum(b, a + lim.min_gap), lim.lo + lim.min_gap, lim.hi)
    return limit_travel(a, lim.step), limit_travel(b, lim.step)


def project_leaves(a, b, lim: LeafLimits, sweeps: int = 20):
    """(a, b) projected onto the leaf polytope (travel, gap, range) by ``sweeps`` of
    Dykstra's alternating projection, then :func:`repair` so the result is feasible
    exactly; the bank span is a set of the projection, ``SPAN_MARGIN_MM`` inside the
    limit, but not of the repair: see the module docstring)."""
    x = [np.asarray(a, np.float64).copy(), np.asarray(b, np.float64).copy()]
    n_sets = 5
    span = max(lim.span - SPAN_MARGIN_MM, lim.min_gap)
    incr = [[np.zeros_like(x[0]), np.zeros_like(x[1])] for _ in range(n_sets)]

    def proj(i, y):
        if i in (0, 1):
            return [_pair_project(y[0], lim.step, i), _pair_project(y[1], lim.step, i)]
        if i == 2:
            return list(_gap_project(y[0], y[1], lim.min_gap))
        if i == 4:
            return [_span_project(y[0], span), _span_project(y[1], span)]
        return [np.clip(y[0], lim.lo, lim.hi), np.clip(y[1], lim.lo, lim.hi)]

    for _ in range(int(sweeps)):
        moved = 0.0
        for i in range(n_sets):
            y = [x[0] + incr[i][0], x[1] + incr[i][1]]
            p = proj(i, y)
            incr[i] = [y[0] - p[0], y[1] - p[1]]
            moved = max(moved, float(np.abs(p[0] - x[0]).max()),
                        float(np.abs(p[1] - x[1]).max()))
            x = p
        if moved < 1e-9:
            break
    return repair(x[0], x[1], lim)


# --- the optimiser ----------------------------------------------------------------------
class _Variables:
    """All arcs' (a, b, v) as one scaled vector, with the projection onto C."""

    def __init__(self, models, limits, leaf_scale_mm, mu_scale, sweeps):
        self.models, self.limits = models, limits
        self.ls, self.ms, self.sweeps = float(leaf_scale_mm), float(mu_scale), int(sweeps)
        self.sizes = [2 * md.n_cp * md.n_pairs + md.n_cp for md in models]

    def split(self, z):
        out, i = [], 0
        for md in self.models:
            n = md.n_cp * md.n_pairs
            a = z[i:i + n].reshape(md.n_cp, md.n_pairs) * self.ls
            b = z[i + n:i + 2 * n].reshape(md.n_cp, md.n_pairs) * self.ls
            v = z[i + 2 * n:i + 2 * n + md.n_cp] * self.ms
            i += 2 * n + md.n_cp
            out.append((a, b, v))
        return out

    def pack(self, parts, grad=False):
        f_l = self.ls if grad else 1.0 / self.ls
        f_m = self.ms if grad else 1.0 / self.ms
        return np.concatenate([np.concatenate([a.ravel() * f_l, b.ravel() * f_l, v * f_m])
                               for a, b, v in parts])

    def project(self, z):
        parts = []
        for md, lim, (a, b, v) in zip(self.models, self.limits, self.split(z)):
            a, b = project_leaves(a, b, lim, self.sweeps)
            parts.append((a, b, np.clip(v, md.mu_lo, md.mu_hi)))
        return self.pack(parts)

    def span_ok(self, z) -> bool:
        return all(max(float((x.max(axis=1) - x.min(axis=1)).max()) for x in (a, b))
                   <= lim.span + 1e-9 for lim, (a, b, _) in zip(self.limits, self.split(z)))


def optimise_machine_parameters(delivery: Delivery, beamlets: BeamletInfo,
                                weight_value_grad, options: DmpoOptions | None = None,
                                *, callback=None) -> tuple[Delivery, dict]:
    """DMPO of a sequenced VMAT ``delivery`` (see the module docstring).

    weight_value_grad(w): (J, dJ/dw) for beamlet weights w (MU, ``beamlets`` order, NumPy
    float64; total course). callback(iteration, J): called after every accepted step.
    Returns (delivery, info); info has the objective history, iterations, evaluations and
    the total MU before/after. The input delivery when no step lowered J. The start must
    be deliverable within the DMPO travel limit (the rule-based sequencer's arcs are).
    """
    opt = options or DmpoOptions()
    if delivery.technique != "vmat":
        raise ValueError(f"DMPO handles VMAT deliveries, got {delivery.technique!r}")
    m = delivery.machine
    models = [ArcModel(b, beamlets, m, delivery.fractions, opt.n_sub)
              for b in delivery.beams]
    if not models:
        return delivery, {"iterations": 0, "kept": False}
    limits = [LeafLimits.of(md.beam.gantry_deg[1:-1], m, opt.travel_per_deg_mm)
              for md in models]
    for lim, md in zip(limits, models):
        if lim.violation(md.a0, md.b0) > 1e-6:
            raise ValueError(f"{md.beam.name}: the start delivery breaks the DMPO leaf "
                             f"limits by {lim.violation(md.a0, md.b0):.3g} mm")
    v_all = np.concatenate([md.v0 for md in models])
    mu_scale = max(float(np.mean(v_all)), 1e-9)
    var = _Variables(models, limits, opt.leaf_scale_mm, mu_scale, opt.dykstra_sweeps)
    n_w = beamlets.n_beamlets
    n_eval = [0]
    mu0 = max(float(v_all.sum()), 1e-9)  # sum of control-point MU == total MU
    mu_coef = [0.0]  # set after J0 is known

    def fun(z):
        n_eval[0] += 1
        parts = var.split(z)
        j, raw = arc_value_grad(models, parts, n_w, weight_value_grad)
        grads = [(ga, gb, gv + mu_coef[0]) for ga, gb, gv in raw]
        mu_total = sum(float(v.sum()) for _, _, v in parts)
        return j + mu_coef[0] * mu_total, var.pack(grads, grad=True), j

    z = var.project(var.pack([(md.a0, md.b0, md.v0) for md in models]))
    f, g, j_plan = fun(z)
    if opt.mu_weight > 0:
        mu_coef[0] = opt.mu_weight * j_plan / mu0
        f, g, j_plan = fun(z)
    f0, jp0 = f, j_plan
    history = [f]
    s_mem: list[np.ndarray] = []
    y_mem: list[np.ndarray] = []
    it = 0
    gnorm0 = float(np.linalg.norm(g)) or 1.0
    t_sd = 1.0 / gnorm0  # steepest-descent step: one scaled unit at the start gradient
    stop = "iterations"
    for it in range(1, int(opt.iterations) + 1):
        accepted = False
        for use_memory in ((True, False) if s_mem else (False,)):
            d = _two_loop(g, s_mem, y_mem) if use_memory else -g * t_sd
            t = 1.0
            for _ in range(int(opt.max_backtracks)):
                zt = var.project(z + t * d)
                step = zt - z
                decrease = float(g @ step)
                if decrease < 0 and var.span_ok(zt):
                    ft, gt, jt = fun(zt)
                    if ft <= f + opt.armijo * decrease:
                        accepted = True
                        break
                t *= 0.5
            if accepted:
                break
            s_mem.clear()
            y_mem.clear()
        if not accepted:
            stop = "line search"
            it -= 1
            break
        s, y = zt - z, gt - g
        if float(s @ y) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y) + 1e-30):
            s_mem.append(s)
            y_mem.append(y)
            if len(s_mem) > opt.memory:
                s_mem.pop(0)
                y_mem.pop(0)
        if not use_memory:  # learn the steepest-descent scale from the accepted step
            t_sd *= max(t, 1e-3) * 2.0
        gain = f - ft
        z, f, g, j_plan = zt, ft, gt, jt
        history.append(f)
        if callback is not None:
            callback(it, f)
        if gain <= opt.rel_tol * max(abs(f), 1e-30):
            stop = "converged"
            break
    info = {"iterations": it, "evaluations": n_eval[0], "objective_before": f0,
            "objective_after": f, "plan_objective_before": jp0,
            "plan_objective_after": j_plan, "history": history, "stop": stop,
            "mu_before": mu0, "kept": bool(f < f0)}
    if not f < f0:
        info["mu_after"] = mu0
        return delivery, info
    beams = tuple(md.beam_with(a, b, v) for md, (a, b, v) in zip(models, var.split(z)))
    meta = dict(delivery.meta)
    meta["dmpo"] = {"iterations": it, "objective_before": round(f0, 6),
                    "objective_after": round(f, 6)}
    out = replace(delivery, beams=beams, meta=meta)
    info["mu_after"] = out.total_mu
    bad = check_delivery(out)
    if bad:  # cannot happen by construction; never hand back an undeliverable arc
        raise RuntimeError("DMPO produced an undeliverable arc: " + "; ".join(bad))
    return out, info


def _two_loop(g, s_mem, y_mem):
    """L-BFGS search direction -H g (two-loop recursion)."""
    q = g.copy()
    alphas = []
    for s, y in zip(reversed(s_mem), reversed(y_mem)):
        rho = 1.0 / float(y @ s)
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append((rho, alpha, s, y))
    s, y = s_mem[-1], y_mem[-1]
    q *= float(s @ y) / float(y @ y)
    for rho, alpha, s, y in reversed(alphas):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return -q


def machine_limit_report(delivery: Delivery, travel_per_deg_mm: float | None = None) -> dict:
    """Per arc the largest leaf travel per degree, the smallest gap, the MU/degree range
    and the limits they are held to (for tests and reports)."""
    m = delivery.machine
    out = {}
    for b in delivery.beams:
        dg = np.abs((np.diff(b.gantry_deg) + 180.0) % 360.0 - 180.0)
        travel = np.maximum(np.abs(np.diff(b.leaf_a_mm, axis=0)),
                            np.abs(np.diff(b.leaf_b_mm, axis=0))).max(axis=1)
        ok = dg > 1e-9
        mu_deg = np.diff(b.cumulative_mu)[ok] / delivery.fractions / dg[ok]
        out[b.name] = {
            "max_travel_per_deg_mm": float((travel[ok] / dg[ok]).max()) if ok.any() else 0.0,
            "travel_limit_per_deg_mm": float(m.max_leaf_travel_per_deg_mm
                                             if travel_per_deg_mm is None
                                             else travel_per_deg_mm),
            "min_gap_mm": float((b.leaf_b_mm - b.leaf_a_mm).min()),
            "mu_per_deg_min": float(mu_deg.min()) if mu_deg.size else 0.0,
            "mu_per_deg_max": float(mu_deg.max()) if mu_deg.size else 0.0,
        }
    return out
