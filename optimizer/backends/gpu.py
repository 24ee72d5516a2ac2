"""``gpu`` backend: the same first-order lines as ``cpu``, on CuPy / cupyx.scipy.sparse.

The dij and every term array are uploaded once (``DeviceProblem.from_problem``); the loop
runs on the device with one scalar transfer per convergence check. Without CuPy or a CUDA
device, ``solve`` raises :class:`~atp.errors.BackendUnavailableError` saying so.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
from atp.optimizer import firstorder
from atp.optimizer.backends.base import Backend, Result

from atp.errors import BackendUnavailableError
from atp.xp import cupy_or_none, gpu_available


class GpuBackend(Backend):
    name = "gpu"
    description = "accelerated projected gradient on CuPy (CUDA GPU)"
    first_order = True
    device = "gpu"
    install_hint = "pip install 'atp[gpu]' (cupy-cuda12x) on a machine with a CUDA GPU"

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("cupy") is not None

    @classmethod
    def available(cls) -> bool:
        return cls.is_installed() and gpu_available()

    def solve(self, problem, x0=None, *, method: str = "lbfgs", max_iter: int = 300,
              tol: float = 1e-4, check_every: int = 20, **_) -> Result:
        cp = cupy_or_none()
        if cp is None:
            why = "CuPy is not installed" if not self.is_installed() else \
                "no CUDA device is visible"
            raise BackendUnavailableError(
                f"backend 'gpu' cannot run: {why}. Use --backend cpu, or --backend auto "
                f"to fall back to the CPU; to enable it: {self.install_hint}")
        t0 = time.perf_counter()
        dp = firstorder.DeviceProblem.from_problem(problem, cp)
        start = problem.x0 if x0 is None else x0
        x0_d = cp.asarray(np.asarray(start, dtype=np.float32))
        cp.cuda.Stream.null.synchronize()
        t1 = time.perf_counter()
        out = firstorder.solve(dp, x0_d, method=method, max_iter=max_iter, tol=tol,
                               check_every=check_every)
        w = cp.asnumpy(out.fluence).astype(np.float32)
        t2 = time.perf_counter()
        status = "optimal" if out.status == "converged" else "max_iter"
        return Result(w, problem.objective(w), status, self.name, out.iterations,
                      out.history, {"upload": t1 - t0, "solve": t2 - t1},
                      solver=f"{method}-cupy", goal_report=problem.goal_report(w))
