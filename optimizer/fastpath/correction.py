"""Fluence correction by K unrolled exact gradient steps (the non-learned fallback).

Each step is ``w <- max(0, w - step * A.T @ E(A w))`` where E is the error map of the
dose objective; the step size comes from a power-iteration estimate of the Lipschitz
constant of the quadratic part, so the loop needs no line search and no host round trip.
Used both as the correction module of the fast path and (with a dose-mimicking objective)
to build the initial fluence.
"""

from __future__ import annotations

from typing import Callable

import torch

from optimizer.fastpath.error_map import error_map
from optimizer.fastpath.torch_dose import TorchDose


def lipschitz_estimate(dose_op: TorchDose, voxel_weight: torch.Tensor, iters: int = 20,
                       seed: int = 0) -> float:
    """Largest eigenvalue of A.T diag(voxel_weight) A by power iteration (deterministic)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.rand(dose_op.shape[1], generator=gen, dtype=dose_op.dtype).to(dose_op.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        u = dose_op.transpose_apply(voxel_weight * dose_op(v))
        lam = float(u.norm())
        if lam == 0.0:
            return 0.0
        v = u / lam
    return lam


def unrolled_correction(w0: torch.Tensor, dose_op: TorchDose,
                        objective: Callable[[torch.Tensor], torch.Tensor],
                        steps: int, step_size: float, momentum: bool = True) -> torch.Tensor:
    """K projected-gradient steps on J(A w) from w0 (fluence >= 0); returns the new w.

    With ``momentum`` the steps are FISTA's (Nesterov extrapolation, fixed step 1/L),
    which converges much faster on these ill-conditioned problems; without it, plain
    projected gradient.
    """
    w = w0.clone()
    y = w
    t = 1.0
    for _ in range(int(steps)):
        e = error_map(dose_op(y), objective)
        w_next = torch.clamp_min(y - step_size * dose_op.transpose_apply(e), 0.0)
        if momentum:
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            y = w_next + ((t - 1.0) / t_next) * (w_next - w)
            t = t_next
        else:
            y = w_next
        w = w_next
    return w
