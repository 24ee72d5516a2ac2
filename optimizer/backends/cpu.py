"""``cpu`` backend: the shared first-order algorithm on NumPy / scipy.sparse."""

from __future__ import annotations

import time

import numpy as np
from atp.optimizer import firstorder
from atp.optimizer.backends.base import Backend, Result


class CpuBackend(Backend):
    name = "cpu"
    description = "accelerated projected gradient on NumPy/SciPy sparse (fluence >= 0)"
    first_order = True
    device = "cpu"

    @classmethod
    def is_installed(cls) -> bool:
        return True  # numpy and scipy are core dependencies

    def solve(self, problem, x0=None, *, method: str = "lbfgs", max_iter: int = 300,
              tol: float = 1e-4, check_every: int = 20, **_) -> Result:
        t0 = time.perf_counter()
        dp = firstorder.DeviceProblem.from_problem(problem, np)
        t1 = time.perf_counter()
        start = problem.x0 if x0 is None else x0
        out = firstorder.solve(dp, np.asarray(start, dtype=np.float32), method=method,
                               max_iter=max_iter, tol=tol, check_every=check_every)
        w = np.asarray(out.fluence, dtype=np.float32)
        t2 = time.perf_counter()
        status = "optimal" if out.status == "converged" else "max_iter"
        return Result(w, problem.objective(w), status, self.name, out.iterations,
                      out.history, {"setup": t1 - t0, "solve": t2 - t1},
                      solver=method, goal_report=problem.goal_report(w))
