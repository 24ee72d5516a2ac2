"""The first-order fluence solvers, written once for NumPy and CuPy.

Two methods for ``min f(w) s.t. w >= 0``, both on ``xp`` arrays only:

``lbfgs`` (default): projected L-BFGS (two-loop recursion on the free variables, Armijo
backtracking along the projection arc); one scalar host transfer per line-search trial.

``apg``: accelerated projected gradient (FISTA), sync-free, with

* a fixed step ``1 / L`` where ``L`` bounds the curvature of the piecewise-quadratic
  objective (power iteration on ``A^T diag(h) A + rank-one mean terms + smoothness``,
  ``h`` = sum of each voxel's term curvatures), so no line search and no objective values
  are needed inside the loop;
* gradient-based adaptive restart of the momentum (O'Donoghue & Candes 2015), decided
  with ``xp.where`` on the device;
* a convergence check every ``check_every`` iterations: the only host transfer in the
  loop is that one scalar.

The cpu backend calls :func:`solve` with NumPy arrays, the gpu backend with CuPy arrays
(``DeviceProblem.from_problem(problem, cupy)``): the same lines run on both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from atp.optimizer.objectives import RANK_ONE, evaluate_terms, mu_backward, mu_forward
from atp.optimizer.rowop import InterpolatedRows, TailGrouped

from atp.progress import tick
from atp.xp import device_csr_pair, sparse_module


@dataclass(eq=False)
class DeviceProblem:
    """A :class:`~atp.optimizer.problem.Problem`'s arrays in one array module."""

    xp: object
    A: object  # CSR (n_rows, n_beamlets), or an InterpolatedRows on the device
    AT: object  # CSR (n_beamlets, n_rows), or that operator's transpose
    terms: list
    term_arrays: list  # per term (rows, vw, ref)
    D: object | None  # smoothness difference matrix (n_pairs, n_beamlets)
    DT: object | None
    smooth_scale: float  # weight / norm
    n_beamlets: int
    mu: tuple | None = None  # (D, DT, S, ST, beam_rows, tau) of the MU term
    mu_scale: float = 0.0
    leak: tuple | None = None  # (T, L, LT, mu mats) of Problem.leak, on the device

    @classmethod
    def from_problem(cls, problem, xp) -> DeviceProblem:
        sparse = sparse_module(xp)
        A = problem.A if getattr(problem, "fast", None) is None else problem.fast
        if isinstance(A, (InterpolatedRows, TailGrouped)):  # patient-grid rows: B once,
            A_d = A.on(xp)  # S B; the scatter tail grouped (Problem.fast)
            AT_d = A_d.T
        else:  # on a CPU, products in threads (bitwise the same): the hot loop
            A_d, AT_d = device_csr_pair(A if A.format == "csr" else A.tocsr(), xp)

        def arr(a, dtype):
            return xp.asarray(np.asarray(a, dtype=dtype))

        term_arrays = []
        for t in problem.terms:
            ref = t.ref_gy if np.isscalar(t.ref_gy) else arr(t.ref_gy, np.float32)
            term_arrays.append((arr(t.rows, np.int64), arr(t.voxel_weight, np.float32), ref))
        D = DT = None
        scale = 0.0
        if problem.smooth_weight > 0 and len(problem.smooth_pairs):
            Dm = problem.smoothness_matrix()
            DTm = Dm.T.tocsr()
            D, DT = (Dm, DTm) if xp is np else (sparse.csr_matrix(Dm), sparse.csr_matrix(DTm))
            scale = problem.smooth_weight / problem.smooth_norm
        mu = mu_mats = None
        if getattr(problem, "mu", None) is not None:
            m = problem.mu
            mats = [m.D, m.D.T.tocsr(), m.S, m.S.T.tocsr()]
            if xp is not np:
                mats = [sparse.csr_matrix(a) for a in mats]
            mu_mats = (*mats, m.beam_rows, m.tau)
            mu = mu_mats if problem.mu_scale > 0 else None
        leak = None
        if getattr(problem, "leak", None) is not None:
            t, L = problem.leak
            leak = (float(t), arr(L, np.float32), arr(np.ascontiguousarray(L.T), np.float32),
                    mu_mats)
        return cls(xp, A_d, AT_d, list(problem.terms), term_arrays, D, DT, scale,
                   problem.n_beamlets, mu, problem.mu_scale if mu else 0.0, leak)

    def _mu_mats(self):
        """The MU surrogate's matrices (the leakage model's or the MU term's; None)."""
        return self.leak[3] if self.leak is not None else self.mu

    def _dose_mu(self, w, with_mu: bool = True):
        """The optimised dose on the rows and the beams' MU forward pass
        (:func:`mu_forward`; None when neither leakage nor, with ``with_mu``, the MU term
        needs it), computed once per evaluation."""
        d = self.A @ w
        mats = self._mu_mats()
        if mats is None or (self.leak is None and not with_mu):
            return d, None
        D, _, S, _, beam_rows, tau = mats
        fwd = mu_forward(w, D, S, beam_rows, tau)
        if self.leak is not None:
            t, L = self.leak[0], self.leak[1]
            d = (1.0 - t) * d + t * (L @ fwd[0])
        return d, fwd

    def dose(self, w):
        """The optimised dose on the problem's rows (``Problem.dose_rows``)."""
        return self._dose_mu(w, with_mu=False)[0]

    def value_grad(self, w):
        """Objective (0-d array) and gradient w.r.t. fluence at ``w`` (no host transfer)."""
        d, fwd = self._dose_mu(w)
        total, g_d, _ = evaluate_terms(self.terms, self.term_arrays, d)
        g = self.AT @ g_d
        coef = None  # d(objective)/d(MU_b): leakage (d = (1 - T) A w + T L MU(w)), MU term
        if self.leak is not None:
            t, _, LT, _ = self.leak
            g = (1.0 - t) * g
            coef = t * (LT @ g_d)
        if self.mu is not None:
            total = total + self.mu_scale * self.xp.sum(fwd[0])
            coef = self.mu_scale + (0.0 if coef is None else coef)
        if coef is not None:
            _, DT, _, ST, beam_rows, _ = self._mu_mats()
            g = g + mu_backward(coef, fwd[1], fwd[2], DT, ST, beam_rows, w.dtype)
        if self.D is not None:
            Dw = self.D @ w
            total = total + self.smooth_scale * self.xp.sum(Dw * Dw)
            g = g + (2.0 * self.smooth_scale) * (self.DT @ Dw)
        return total, g

    def curvature_operator(self):
        """v -> H v for a matrix H bounding the objective's Hessian (PSD)."""
        xp = self.xp
        n_rows = self.A.shape[0]
        h = xp.zeros(n_rows, dtype=xp.float32)
        rank_one = []
        for t, (rows, vw, _) in zip(self.terms, self.term_arrays):
            s = 2.0 * t.weight / t.norm
            if t.kind in RANK_ONE:
                full = xp.zeros(n_rows, dtype=xp.float32)
                full[rows] = vw
                c = self.AT @ full
                rank_one.append((s / float(xp.sum(vw)), c))
            else:
                h[rows] += (s * vw).astype(xp.float32)

        def op(v):
            out = self.AT @ (h * (self.A @ v))
            for s, c in rank_one:
                out = out + (s * xp.dot(c, v)) * c
            if self.D is not None:
                out = out + (2.0 * self.smooth_scale) * (self.DT @ (self.D @ v))
            return out

        return op


def lipschitz_bound(dp: DeviceProblem, iterations: int = 40, seed: int = 0) -> float:
    """Largest eigenvalue of the curvature bound, by power iteration (x 1.05 margin)."""
    xp = dp.xp
    op = dp.curvature_operator()
    rng = np.random.default_rng(seed)
    v = xp.asarray(rng.random(dp.n_beamlets).astype(np.float32) + 0.5)
    v = v / xp.linalg.norm(v)
    lam = xp.zeros((), dtype=xp.float32)
    for _ in range(iterations):
        u = op(v)
        lam = xp.linalg.norm(u)
        v = u / xp.maximum(lam, 1e-30)
    return 1.05 * float(lam) + 1e-12


@dataclass
class FirstOrderOutput:
    fluence: object  # xp array
    objective: float
    iterations: int
    history: list  # (iteration, objective)
    status: str  # 'converged' | 'max_iter'
    lipschitz: float
    seconds: float


METHODS = ("lbfgs", "apg")


def solve(dp: DeviceProblem, x0, *, method: str = "lbfgs", max_iter: int = 600,
          tol: float = 1e-5, check_every: int = 20, lipschitz: float | None = None,
          memory: int = 10) -> FirstOrderOutput:
    """Minimise the problem over fluence >= 0 with ``method`` ('lbfgs' or 'apg')."""
    if method == "lbfgs":
        return solve_lbfgs(dp, x0, max_iter=max_iter, tol=tol, memory=memory)
    if method == "apg":
        return solve_apg(dp, x0, max_iter=max_iter, tol=tol, check_every=check_every,
                         lipschitz=lipschitz)
    raise ValueError(f"unknown first-order method '{method}'; one of {METHODS}")


def solve_lbfgs(dp: DeviceProblem, x0, *, max_iter: int = 600, tol: float = 1e-5,
                memory: int = 10, armijo: float = 1e-4, max_backtracks: int = 30,
                stall_iterations: int = 5) -> FirstOrderOutput:
    """Projected L-BFGS with an Armijo backtracking search along the projection arc.

    The quasi-Newton direction is computed by the two-loop recursion restricted to the
    free variables (those not held at 0 by a positive gradient); steps are projected
    onto fluence >= 0. The line search compares objective values, so each trial costs
    one scalar transfer to the host (the only one per trial). Stops when the relative
    objective decrease stays below ``tol`` for ``stall_iterations`` iterations.
    """
    xp = dp.xp
    t0 = time.perf_counter()
    x = xp.maximum(xp.asarray(x0, dtype=xp.float32), 0.0)
    f, g = dp.value_grad(x)
    f = float(f)
    S, Y, R = [], [], []
    history = [(0, f)]
    status = "max_iter"
    stall = 0
    it = 0
    for it in range(1, max_iter + 1):
        free = (x > 0) | (g < 0)
        q = xp.where(free, g, 0.0)
        alphas = []
        for s_k, y_k, r_k in zip(reversed(S), reversed(Y), reversed(R)):
            a = r_k * xp.dot(s_k, q)
            q = q - a * y_k
            alphas.append(a)
        if S:
            gamma = xp.dot(S[-1], Y[-1]) / xp.dot(Y[-1], Y[-1])
        else:
            gamma = 1.0 / xp.maximum(xp.linalg.norm(q), 1e-30) * xp.maximum(
                xp.linalg.norm(x), 1.0)
        r = gamma * q
        for (s_k, y_k, r_k), a in zip(zip(S, Y, R), reversed(alphas)):
            b = r_k * xp.dot(y_k, r)
            r = r + (a - b) * s_k
        p = -xp.where(free, r, 0.0)
        descent = xp.dot(p, g) < 0
        p = xp.where(descent, p, -xp.where(free, g, 0.0))
        step = 1.0
        accepted = False
        for _ in range(max_backtracks):
            x_new = xp.maximum(x + step * p, 0.0)
            f_new, g_new = dp.value_grad(x_new)
            f_new = float(f_new)
            if f_new <= f + armijo * float(xp.dot(g, x_new - x)):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            S, Y, R = [], [], []  # reset the memory and try steepest descent next
            if len(history) and history[-1][0] == it - 1 and stall >= stall_iterations:
                status = "converged"
                break
            stall += 1
            continue
        s_vec = x_new - x
        y_vec = g_new - g
        sy = float(xp.dot(s_vec, y_vec))
        if sy > 1e-12 * float(xp.dot(y_vec, y_vec)) and sy > 0:
            S.append(s_vec)
            Y.append(y_vec)
            R.append(1.0 / sy)
            if len(S) > memory:
                S.pop(0)
                Y.pop(0)
                R.pop(0)
        rel = (f - f_new) / max(abs(f_new), 1e-30)
        x, f, g = x_new, f_new, g_new
        history.append((it, f))
        if it % 10 == 0:
            tick(iteration=it)
        stall = stall + 1 if rel < tol else 0
        if stall >= stall_iterations:
            status = "converged"
            break
    return FirstOrderOutput(x, f, it, history, status, float("nan"),
                            time.perf_counter() - t0)


def solve_apg(dp: DeviceProblem, x0, *, max_iter: int = 600, tol: float = 1e-5,
              check_every: int = 20, lipschitz: float | None = None) -> FirstOrderOutput:
    """Accelerated projected gradient with adaptive restart (see module docstring).

    Stops when the objective at two successive checks differs by less than ``tol``
    (relative), or after ``max_iter`` iterations.
    """
    xp = dp.xp
    t0 = time.perf_counter()
    L = lipschitz if lipschitz is not None else lipschitz_bound(dp)
    step = 1.0 / L
    x = xp.maximum(xp.asarray(x0, dtype=xp.float32), 0.0)
    y = x.copy()
    t = xp.ones((), dtype=xp.float32)
    history = []
    last = math.inf
    status = "max_iter"
    it = 0
    for it in range(1, max_iter + 1):
        f_y, g = dp.value_grad(y)
        x_new = xp.maximum(y - step * g, 0.0)
        restart = xp.sum(g * (x_new - x)) > 0
        t_new = 0.5 * (1.0 + xp.sqrt(1.0 + 4.0 * t * t))
        beta = xp.where(restart, 0.0, (t - 1.0) / t_new)
        t = xp.where(restart, xp.ones((), dtype=xp.float32), t_new)
        y = x_new + beta * (x_new - x)
        x = x_new
        if it % check_every == 0:
            f = float(f_y)  # the one host transfer, every check_every iterations
            history.append((it, f))
            if abs(last - f) <= tol * max(abs(f), 1e-12):
                status = "converged"
                break
            last = f
    f_x, _ = dp.value_grad(x)
    f_final = float(f_x)
    history.append((it, f_final))
    return FirstOrderOutput(x, f_final, it, history, status, L, time.perf_counter() - t0)
