"""Volume-weighted mean squared error (the CAD-UNet training loss) and its targets.

Regions of interest on the network grid, from the input channel stack
(see :mod:`atp.predictor.encoding`): the PTV (PTV channel > 0), each OAR (occupancy >= 0.5),
the rest of the body (body >= 0.5, in no other ROI) and everything outside the body.
Each ROI gets the weight ``V / n_roi`` -- the reciprocal of its volume fraction -- and a
voxel in several ROIs takes the largest of their weights (its smallest ROI). The loss
is the weighted mean ``sum(w * (pred - target)^2) / sum(w)``: normalising by the
weight sum keeps its scale independent of the ROI sizes, so every ROI contributes about
equally, whatever its volume.

Target inside the PTV: with ``ptv_target="prescription"`` (CAD-UNet, after the hybrid
ATP paper) every PTV voxel's target is its highest prescription (the PTV channel times
the normalisation dose), elsewhere the reference dose; with ``"reference"`` (ResUNet)
the reference dose everywhere. All doses are in units of the normalisation dose.
"""

from __future__ import annotations

import torch
from atp.predictor.encoding import BODY_CHANNEL, FIRST_OAR_CHANNEL, PTV_CHANNEL


def training_target(stack: torch.Tensor, dose: torch.Tensor, ptv_target: str
                    ) -> torch.Tensor:
    """Target dose (B,1,...) in normalised units from the stack (B,C,...) and dose (B,1,...)."""
    if ptv_target == "reference":
        return dose
    if ptv_target != "prescription":
        raise ValueError(f"ptv_target must be 'prescription' or 'reference', got {ptv_target!r}")
    ptv = stack[:, PTV_CHANNEL:PTV_CHANNEL + 1]
    return torch.where(ptv > 0, ptv, dose)


def roi_weights(stack: torch.Tensor, n_oars: int | None = None) -> torch.Tensor:
    """Per-voxel weights (B,1,...): reciprocal volume fraction of the voxel's smallest ROI.

    n_oars: the OAR channels (default: every channel after the PTV one)."""
    b = stack.shape[0]
    spatial = stack.shape[2:]
    v = float(torch.tensor(spatial).prod())
    rois = [stack[:, PTV_CHANNEL] > 0]
    last = stack.shape[1] if n_oars is None else FIRST_OAR_CHANNEL + n_oars
    rois += [stack[:, c] >= 0.5 for c in range(FIRST_OAR_CHANNEL, last)]
    body = stack[:, BODY_CHANNEL] >= 0.5
    anyroi = torch.stack(rois, 0).any(0)
    rois += [body & ~anyroi, ~body & ~anyroi]
    w = torch.zeros((b, *spatial), dtype=stack.dtype, device=stack.device)
    for m in rois:
        n = m.flatten(1).sum(1).clamp(min=1).to(stack.dtype)
        wm = (v / n).view(b, *([1] * len(spatial)))
        w = torch.where(m, torch.maximum(w, wm), w)
    return w.unsqueeze(1)


def volume_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
                        ) -> torch.Tensor:
    w = weights.to(pred.dtype)
    return (w * (pred - target) ** 2).sum() / w.sum().clamp(min=1e-12)


def body_l1(pred: torch.Tensor, target: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Mean absolute error inside the body (possible-dose mask), each voxel weighted by
    its body occupancy: the OpenKBP dose score on the network grid."""
    w = stack[:, BODY_CHANNEL:BODY_CHANNEL + 1].to(pred.dtype)
    return (w * (pred - target).abs()).sum() / w.sum().clamp(min=1e-12)


def dvh_point_loss(pred: torch.Tensor, target: torch.Tensor, targets: list, organs: list,
                   hot_voxels: int = 3) -> torch.Tensor:
    """Mean absolute difference of differentiable DVH points (a batch of one sample).

    targets: boolean masks (spatial) -> D99, D95, D1 (``torch.quantile``, whose gradient
    reaches the voxels it interpolates); organs: boolean masks -> mean dose and the mean
    of the ``hot_voxels`` hottest voxels (a smooth D0.1cc: 0.1 cc is 2.6 OpenKBP voxels).
    Empty masks are skipped; no points -> 0."""
    p, t = pred[0, 0], target[0, 0]
    diffs = []
    for m in targets:
        if m.any():
            q = torch.tensor([0.01, 0.05, 0.99], dtype=p.dtype, device=p.device)
            diffs.append((torch.quantile(p[m], q) - torch.quantile(t[m], q)).abs())
    for m in organs:
        if m.any():
            a, b = p[m], t[m]
            k = max(1, min(int(hot_voxels), a.numel()))
            diffs.append((a.mean() - b.mean()).abs().view(1))
            diffs.append((torch.topk(a, k).values.mean() - torch.topk(b, k).values.mean())
                         .abs().view(1))
    if not diffs:
        return pred.sum() * 0.0
    return torch.cat(diffs).mean()
