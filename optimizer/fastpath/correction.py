"""Fluence correction by K unrolled exact gradient steps (the non-learned fallback).

Each step is ``w <- max(0, w - P (A.T @ E(A w) + mu * L w))`` (FISTA momentum on top),
where E is the error map of the dose objective, ``mu * L w`` the gradient of an optional
fluence regulariser (:class:`atp.optimizer.fastpath.smoothness.FluenceSmoothness`) and P a
fixed step: a scalar 1/L (power-iteration Lipschitz estimate, :func:`lipschitz_estimate`)
or, by default in the fast path, the diagonal row-sum ("Jacobi") step of
:func:`diagonal_step`, P_jj = 1 / sum_k |H_jk| for the objective's curvature bound H =
A.T diag(c) A + mu L. For A, c >= 0 that row sum is ``A.T (c * (A 1))`` -- ONE transpose
product, no power iteration -- and ||P H||_inf <= 1 guarantees convergence; it also gives
low-dose beamlets proportionally larger steps, which converges much faster than 1/L.
The loop needs no line search and no host round trip. Used both as the correction module
of the fast path and (with a dose-mimicking objective) to build the initial fluence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from atp.optimizer.fastpath.error_map import error_map
from atp.optimizer.fastpath.torch_dose import TorchDose

from atp.progress import tick


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


def curvature_row_sums(dose_op: TorchDose, curvature_weight: torch.Tensor,
                       dose_of_ones: torch.Tensor | None = None) -> torch.Tensor:
    """(n_beamlets,) row sums of A.T diag(c) A = A.T (c * A 1) (all entries >= 0).

    ``dose_of_ones``: A @ 1, when already known (saves one product)."""
    a1 = dose_op(torch.ones(dose_op.shape[1], device=dose_op.device, dtype=dose_op.dtype)) \
        if dose_of_ones is None else dose_of_ones
    return dose_op.transpose_apply(curvature_weight * a1)


def diagonal_step(data_row_sums: torch.Tensor, regulariser=None, reg_weight: float = 0.0,
                  floor: float = 1e-6) -> torch.Tensor:
    """P = 1 / (row sums of the data curvature + reg_weight x the regulariser's |L| row
    sums), floored at ``floor`` x the largest row sum (beamlets the objective does not see
    have zero gradient, so their step does not matter)."""
    r = data_row_sums
    if regulariser is not None and reg_weight > 0:
        r = r + reg_weight * regulariser.row_abs_sum().to(r.dtype)
    return 1.0 / r.clamp_min(floor * r.max().clamp_min(1e-30))


def balanced_weight(data_row_sums: torch.Tensor, regulariser, strength: float) -> float:
    """Regulariser weight mu such that mu x mean |L| row sum = ``strength`` x the mean data
    curvature row sum (over beamlets the data term sees): a scale-free strength."""
    if regulariser is None or strength <= 0:
        return 0.0
    seen = data_row_sums > 0
    reg = regulariser.row_abs_sum().to(data_row_sums.dtype)
    den = float(reg[seen].mean()) if bool(seen.any()) else 0.0
    return float(strength) * float(data_row_sums[seen].mean()) / den if den > 0 else 0.0


def unrolled_correction(w0: torch.Tensor, dose_op: TorchDose,
                        objective: Callable[[torch.Tensor], torch.Tensor],
                        steps: int, step_size, momentum: bool = True, *,
                        regulariser=None, reg_weight: float = 0.0) -> torch.Tensor:
    """K projected-gradient steps on J(A w) + reg_weight R(w) from w0 (fluence >= 0).

    step_size: a float (1/L) or a (n_beamlets,) tensor (diagonal step,
    :func:`diagonal_step`). With ``momentum`` the steps are FISTA's (Nesterov
    extrapolation), which converges much faster on these ill-conditioned problems;
    without it, plain projected gradient. Returns the new w.
    """
    w = w0.clone()
    y = w
    t = 1.0
    use_reg = regulariser is not None and reg_weight > 0
    for k in range(int(steps)):
        if k % 10 == 0:
            tick(step=f"gradient step {k + 1}/{int(steps)}")
        g = dose_op.transpose_apply(error_map(dose_op(y), objective))
        if use_reg:
            g = g + reg_weight * regulariser.grad(y)
        w_next = torch.clamp_min(y - step_size * g, 0.0)
        if momentum:
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            y = w_next + ((t - 1.0) / t_next) * (w_next - w)
            t = t_next
        else:
            y = w_next
        w = w_next
    return w
