"""``qp`` backend: the convex part of the problem in cvxpy, solved by OSQP or Clarabel.

The reference optimum for the first-order backends. Convex terms (max / min / uniform /
mean dose, fall-off, global max, smoothness) are written exactly. Dose-volume terms are
not convex: they are convexified with the voxel selection of the start fluence (the
voxels the voxel-selection penalty picks at ``x0`` keep a one-sided quadratic), which
is exact when ``x0`` is the optimum and is noted in ``Result.messages``.

Hard (priority-1) goals become constraints: ``max`` -> d_i <= ref, ``min`` -> d_i >= ref,
``mean_*`` -> a linear constraint on the mean; hard dose-volume goals stay penalties.
When the constraints cannot hold together the status is ``infeasible``.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
from atp.optimizer.backends.base import Backend, Result
from atp.optimizer.objectives import dose_at_volume

from atp.errors import BackendUnavailableError, InputError

_STATUS = {
    "optimal": "optimal",
    "optimal_inaccurate": "inaccurate",
    "infeasible": "infeasible",
    "infeasible_inaccurate": "infeasible",
    "unbounded": "error",
    "unbounded_inaccurate": "error",
    "user_limit": "max_iter",
    "solver_error": "error",
}



EXP_CONE = ("CLARABEL", "SCS", "ECOS")  # solvers of the MU term's log-sum-exp

class QpBackend(Backend):
    name = "qp"
    description = "convex formulation in cvxpy, solved by OSQP (or Clarabel)"
    hard_constraints = True
    device = "cpu"
    install_hint = "pip install 'atp[qp]' (cvxpy, osqp, clarabel)"

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("cvxpy") is not None and bool(cls.solvers())

    @staticmethod
    def solvers() -> list[str]:
        out = []
        if importlib.util.find_spec("osqp") is not None:
            out.append("OSQP")
        if importlib.util.find_spec("clarabel") is not None:
            out.append("CLARABEL")
        return out

    def solve(self, problem, x0=None, *, solver: str | None = None, eps: float = 1e-6,
              osqp_max_iter: int = 200000, verbose: bool = False, **_) -> Result:
        if not self.is_installed():
            raise BackendUnavailableError(
                f"backend 'qp' is not installed; {self.install_hint}")
        import cvxpy as cp  # optional heavy dependency (atp[qp])

        if getattr(problem, "leak", None) is not None:
            raise InputError("the QP backend does not model leaf leakage in the dose "
                             "(ProblemOptions.leaf_transmission); use the cpu or gpu "
                             "backend, or build the problem without it",
                             field="leaf_transmission")
        has_mu = getattr(problem, "mu", None) is not None and problem.mu_scale > 0
        if solver is None and has_mu:  # the MU term's log-sum-exp needs exponential cones
            solver = next((s for s in self.solvers() if s in EXP_CONE), None)
        solver = (solver or self.solvers()[0]).upper()
        if solver not in self.solvers():
            raise BackendUnavailableError(
                f"QP solver '{solver}' is not installed; installed: {self.solvers()}")
        t0 = time.perf_counter()
        messages = []
        A = problem.A.tocsr()
        n = problem.n_beamlets
        w = cp.Variable(n, nonneg=True)
        start = np.asarray(problem.x0 if x0 is None else x0, dtype=np.float32)
        d0 = A @ start
        objective = 0
        constraints = []
        for t in problem.terms:
            rows, vw = t.rows, t.voxel_weight.astype(np.float64)
            ref = t.ref_gy if np.isscalar(t.ref_gy) else np.asarray(t.ref_gy, np.float64)
            scale = t.weight / t.norm
            Ak = A[rows, :]
            dk = Ak @ w
            if t.hard and t.kind in ("max", "min", "mean_max", "mean_min"):
                if t.kind == "max":
                    constraints.append(dk <= ref)
                elif t.kind == "min":
                    constraints.append(dk >= ref)
                else:
                    c = (vw @ Ak) / vw.sum()
                    constraints.append(c @ w <= ref if t.kind == "mean_max" else c @ w >= ref)
                continue
            sq = np.sqrt(vw)
            if t.kind == "max":
                objective += scale * cp.sum_squares(cp.multiply(sq, cp.pos(dk - ref)))
            elif t.kind == "min":
                objective += scale * cp.sum_squares(cp.multiply(sq, cp.pos(ref - dk)))
            elif t.kind == "uniform":
                objective += scale * cp.sum_squares(cp.multiply(sq, dk - ref))
            elif t.kind in ("mean_max", "mean_min"):
                W = vw.sum()
                c = (vw @ Ak) / W
                dev = c @ w - ref
                objective += scale * W * cp.square(cp.pos(dev if t.kind == "mean_max"
                                                          else -dev))
            elif t.kind in ("dv_max", "dv_min"):
                d_t = d0[rows]
                d_v = float(dose_at_volume(d_t, t.voxel_weight, t.volume))
                if t.kind == "dv_max":
                    sel = (d_t > ref) & (d_t <= d_v)
                else:
                    sel = (d_t < ref) & (d_t >= d_v)
                messages.append(f"{t.name}: dose-volume term convexified with the voxel "
                                f"selection at the start fluence ({int(sel.sum())} voxels)")
                if not sel.any():
                    continue
                e = Ak[np.flatnonzero(sel), :] @ w - ref
                e = cp.pos(e) if t.kind == "dv_max" else cp.pos(-e)
                objective += scale * cp.sum_squares(cp.multiply(sq[sel], e))
            else:  # pragma: no cover - kinds are checked in make_term
                raise ValueError(t.kind)
        if problem.smooth_weight > 0 and len(problem.smooth_pairs):
            D = problem.smoothness_matrix()
            objective += problem.smooth_weight / problem.smooth_norm * cp.sum_squares(D @ w)
        if has_mu:
            m = problem.mu
            row_mu = m.S @ cp.pos(m.D @ w)
            if solver in EXP_CONE:  # the same smooth maximum as the first-order backends
                objective += problem.mu_scale * sum(
                    m.tau * cp.log_sum_exp(row_mu[a:b] / m.tau) for a, b in m.beam_rows)
            else:  # a QP solver: the hard maximum over leaf rows
                objective += problem.mu_scale * sum(cp.max(row_mu[a:b])
                                                    for a, b in m.beam_rows)
                messages.append(f"MU term: {solver} takes the largest leaf row per beam (the "
                                "first-order backends a log-sum-exp, up to tau*log(rows) "
                                "above it)")
        prob = cp.Problem(cp.Minimize(objective), constraints)
        t1 = time.perf_counter()
        kwargs = {}
        if solver == "OSQP":
            kwargs = {"eps_abs": eps, "eps_rel": eps, "max_iter": osqp_max_iter,
                      "polishing": True}
        elif solver == "CLARABEL":
            kwargs = {"tol_gap_abs": eps, "tol_gap_rel": eps, "tol_feas": eps}
        try:
            prob.solve(solver=solver, verbose=verbose, **kwargs)
            status = _STATUS.get(str(prob.status), "error")
        except cp.error.SolverError as exc:
            status = "error"
            messages.append(f"{solver}: {exc}")
        t2 = time.perf_counter()
        if w.value is None:
            wv = start.copy()
            messages.append(f"{solver} returned no solution (status {prob.status})")
        else:
            wv = np.maximum(np.asarray(w.value, dtype=np.float32), 0.0)
        return Result(wv, problem.objective(wv), status, self.name,
                      int(getattr(prob.solver_stats, "num_iters", 0) or 0)
                      if prob.solver_stats else 0, [],
                      {"build": t1 - t0, "solve": t2 - t1}, solver=solver,
                      goal_report=problem.goal_report(wv), messages=messages)
