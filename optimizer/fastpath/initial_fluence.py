"""Exact non-learned initial fluence: predicted dose -> fluence per control point.

Back-projection through the dose-influence matrix (w0 = A.T v D_pred, scaled by the
least-squares factor), then K projected-gradient (FISTA) steps on the dose-mimicking
objective ``1/2 sum_i v_i (A w - D_pred)_i^2 / sum v`` with fluence >= 0, optionally
plus a fluence regulariser ``reg_weight * R(w)`` (the fast path's deliverability
smoothness, :mod:`atp.optimizer.fastpath.smoothness`). ``v`` weights voxels (targets and
OARs more than the rest of the body). Used when no trained Bev2Fluence weights are
present.
"""

from __future__ import annotations

import torch
from atp.optimizer.fastpath.correction import unrolled_correction
from atp.optimizer.fastpath.torch_dose import TorchDose


class DoseMimicking:
    """J(D) = 1/2 * sum v (D - D_pred)^2 / sum v (Gy^2)."""

    def __init__(self, predicted_gy: torch.Tensor, voxel_weight: torch.Tensor) -> None:
        self.predicted_gy = predicted_gy
        self.voxel_weight = voxel_weight
        self.norm = float(voxel_weight.sum().clamp_min(1.0))

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.voxel_weight * (dose - self.predicted_gy) ** 2).sum() / self.norm


def back_projection(dose_op: TorchDose, predicted_gy: torch.Tensor,
                    voxel_weight: torch.Tensor) -> torch.Tensor:
    """w0 = alpha * A.T (v * D_pred), alpha minimising sum v (A w0 - D_pred)^2."""
    w = dose_op.transpose_apply(voxel_weight * predicted_gy)
    d = dose_op(w)
    denom = (voxel_weight * d * d).sum()
    alpha = torch.where(denom > 0, (voxel_weight * d * predicted_gy).sum()
                        / denom.clamp_min(1e-30), torch.zeros_like(denom))
    return torch.clamp_min(alpha * w, 0.0)


def initial_fluence(dose_op: TorchDose, predicted_gy: torch.Tensor, voxel_weight: torch.Tensor,
                    steps: int, lipschitz: float | None = None, *, step=None,
                    regulariser=None, reg_weight: float = 0.0) -> torch.Tensor:
    """Back-projection then ``steps`` projected-gradient steps of dose mimicking (MU).

    The step: ``step`` (a float or a per-beamlet tensor, e.g. the diagonal step of
    :func:`atp.optimizer.fastpath.correction.diagonal_step` for this objective), else
    ``norm / lipschitz`` (Lipschitz constant of A.T diag(v) A)."""
    w0 = back_projection(dose_op, predicted_gy, voxel_weight)
    objective = DoseMimicking(predicted_gy, voxel_weight)
    if step is None:
        if steps <= 0 or not lipschitz or lipschitz <= 0:
            return w0
        step = objective.norm / lipschitz
    if steps <= 0:
        return w0
    return unrolled_correction(w0, dose_op, objective, steps, step,
                               regulariser=regulariser, reg_weight=reg_weight)
