"""The goal-list objective as a differentiable J(D) for the fast path's error map.

The fast path's error map E = grad_D J(D) takes any differentiable dose objective
(:mod:`atp.optimizer.fastpath.error_map`). :class:`GoalListObjective` is the optimiser's own
objective: the terms that :func:`atp.optimizer.problem.build_problem` makes from the
resolved clinical goals (coverage, near-min/near-max dose-volume terms, OAR means and
maxima with their predicted-dose values and tolerances, rings, the distance-to-target
fall-off, the 106 % global max), each normalised as in :mod:`atp.optimizer.objectives`.

Written once: value and gradient come from :func:`atp.optimizer.objectives.evaluate_terms`
on the array module of the dose (NumPy for a CPU tensor, zero-copy; CuPy through DLPack
for a CUDA tensor), wrapped in a :class:`torch.autograd.Function`, so autograd (and
therefore :func:`~atp.optimizer.fastpath.error_map.error_map`) sees the same maths the
optimiser's cpu and gpu backends run. The dose is the full dose-grid dose (flattened,
Gy); a term looks at its dose-grid voxel indices (``Problem.rows[term.rows]``).

Curvature: :meth:`GoalListObjective.curvature_weights` gives a per-voxel bound ``c`` and
a mean-term vector ``m`` such that the row sums of the objective's Gauss-Newton bound
A.T diag(c) A + sum_mean s/W A.T vw vw.T A are ``A.T (c * A1 + m)`` -- one transpose
product, for the fast path's diagonal step.
"""

from __future__ import annotations

import numpy as np
import torch
from atp.optimizer.objectives import RANK_ONE, evaluate_terms


def _to_xp(t: torch.Tensor):
    """A torch tensor as a NumPy array (CPU, shared memory) or CuPy array (CUDA, DLPack;
    without CuPy installed, a host copy: the same numbers, computed on the CPU)."""
    if t.device.type == "cpu":
        return t.detach().numpy()
    from atp.xp import cupy_or_none

    cupy = cupy_or_none()
    if cupy is None:
        return t.detach().cpu().numpy()
    return cupy.from_dlpack(t.detach())


def _to_torch(a, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype)
    return torch.from_dlpack(a).to(like.device, like.dtype)


class _TermsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dose, objective):
        value, grad = objective.value_grad(dose)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None


class GoalListObjective:
    """J(D) = sum of a Problem's goal terms (dimensionless) on the full dose-grid dose.

    problem: an :class:`atp.optimizer.problem.Problem` built on the same dij (its rows are
    dose-grid voxel indices). device / dtype: where J is evaluated (the dose's device).
    scale: a constant factor on J (and its gradient).
    """

    def __init__(self, problem, device: str | torch.device = "cpu", *,
                 dtype: torch.dtype = torch.float32, scale: float = 1.0) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale = float(scale)
        self.terms = list(problem.terms)
        self.n_terms = len(self.terms)
        rows = np.asarray(problem.rows, dtype=np.int64)
        # each term on dose-grid voxel indices (not on the problem's restricted rows)
        self._voxels = [rows[t.rows] for t in self.terms]
        self._host = [(v, np.asarray(t.voxel_weight, np.float32),
                       t.ref_gy if np.isscalar(t.ref_gy) else np.asarray(t.ref_gy,
                                                                         np.float32))
                      for v, t in zip(self._voxels, self.terms)]
        self._arrays = {}  # xp module name -> term arrays in that module

    def _term_arrays(self, xp):
        key = xp.__name__
        if key not in self._arrays:
            self._arrays[key] = [
                (xp.asarray(v), xp.asarray(vw), ref if np.isscalar(ref) else xp.asarray(ref))
                for v, vw, ref in self._host]
        return self._arrays[key]

    def value_grad(self, dose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J, dJ/dD) at ``dose`` (full dose grid, flattened), as torch tensors."""
        d = _to_xp(dose)
        from atp.xp import array_module

        xp = array_module(d)
        total, grad, _ = evaluate_terms(self.terms, self._term_arrays(xp), d)
        value = torch.as_tensor(float(total) * self.scale, dtype=dose.dtype,
                                device=dose.device)
        return value, _to_torch(grad, dose) * self.scale

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        return _TermsFunction.apply(dose, self)

    def curvature_weights(self, n_voxels: int, dose_of_ones: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, m), both (n_voxels,): per-voxel curvature bound of the voxel terms and the
        mean terms' contribution, so the beamlet row sums of the curvature bound are
        ``A.T (c * A1 + m)`` (``dose_of_ones`` = A1 on this device)."""
        c = np.zeros(n_voxels, np.float64)
        m = np.zeros(n_voxels, np.float64)
        a1 = dose_of_ones.detach().cpu().numpy().astype(np.float64)
        for t, (vox, vw, _) in zip(self.terms, self._host):
            s = 2.0 * t.weight / t.norm * self.scale
            if t.kind in RANK_ONE:
                w_sum = float(vw.sum())
                if w_sum > 0:
                    m[vox] += s / w_sum * float(vw @ a1[vox]) * vw
            else:
                np.add.at(c, vox, s * vw)
        as_t = lambda a: torch.from_numpy(a.astype(np.float32)).to(self.device)
        return as_t(c), as_t(m)
