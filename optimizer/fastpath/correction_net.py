"""The learned fluence correction: error map (in BEV) + initial fluence -> corrected fluence.

AIRT's correction module, trained with our own data: per arc control point, a 2-D U-Net
(the same architecture as :class:`~atp.optimizer.fastpath.bev2fluence.Bev2FluenceNet`) reads
the BEV maps of (:data:`CORRECTION_CHANNELS`)

* ``fluence``: the fluence w0 to correct, divided by its mean over the beamlets;
* ``gradient``: the error map back-projected onto the beamlets,
  g = A.T E(A w0) + mu * grad R(w0) (E = grad_D J for the slider setting, R the fluence
  smoothness), divided by its mean absolute value;
* ``step``: the exact first correction step P g (P the diagonal step) in units of the
  mean fluence -- where and how far the exact fallback would move first;
* ``beamlet_mask``, ``sin_gantry``, ``cos_gantry``;

and predicts the corrected fluence in units of w0's mean (Softplus >= 0). Its training
target is the exact fallback's result (K unrolled steps, :mod:`.correction`) from the
same w0 and slider setting (``python -m training.fastpath.gen_correction_data``), so it
learns to take the K steps at once; the fast path can follow it with a few exact steps
(``correction_refine_steps``). The OAR sliders reach the network through the gradient
channel (the error map includes their hinges).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from atp.optimizer.fastpath.bev2fluence import WEIGHTS_DIR, BEVLayout, NetKind, load_weights
from atp.optimizer.fastpath.correction import unrolled_correction
from atp.optimizer.fastpath.error_map import error_map

from atp.errors import InputError

CORRECTION_CHANNELS = ("fluence", "gradient", "step", "beamlet_mask", "sin_gantry",
                       "cos_gantry")
CORRECTION = NetKind("correction", CORRECTION_CHANNELS, 1, "atp-fluence-correction-1",
                     "fluence")
#: exact correction steps after the network
CORRECTION_REFINE_STEPS = 10


def default_correction_weights_path() -> Path | None:
    """``optimizer/fastpath/weights/correction.pt`` if it exists, else None."""
    path = WEIGHTS_DIR / "correction.pt"
    return path if path.is_file() else None


def _layout(fp) -> BEVLayout:
    if getattr(fp, "_bev_layout", None) is None:
        fp._bev_layout = BEVLayout.from_beamlets(fp.dij.beamlets)
    return fp._bev_layout


def correction_features(fp, w0: torch.Tensor, sparing: Mapping[str, float], *,
                        objective=None, step=None):
    """(features (n_cp, len(CORRECTION_CHANNELS), n_v, n_u), layout, scale MU) of a
    prepared FastPath at fluence ``w0`` for the slider setting ``sparing``; ``objective``
    / ``step``: that setting's ``fp.objective`` and ``fp._step_size`` when the caller
    has them (else built here)."""
    layout = _layout(fp)
    obj = fp.objective(dict(sparing)) if objective is None else objective
    step = fp._step_size(dict(sparing)) if step is None else step
    with torch.no_grad():
        op = fp.operator_for(obj)  # A on the rows J reads
        g = op.transpose_apply(error_map(op(w0), obj))
        if fp.mu > 0:
            g = g + fp.mu * fp.smooth.grad(w0)
    scale = float(w0.mean().clamp_min(1e-12))
    gn = g / g.abs().mean().clamp_min(1e-30)
    st = step * g / scale
    b = fp.dij.beamlets
    mask = torch.from_numpy(layout.mask()).to(device=fp.device, dtype=torch.float32)
    ang = torch.from_numpy(np.radians(b.gantry_deg).astype(np.float32)).to(fp.device)
    ones = torch.ones(layout.shape[1:], device=fp.device)
    maps = [layout.scatter((w0 / scale).to(torch.float32)),
            layout.scatter(gn.to(torch.float32)), layout.scatter(st.to(torch.float32)),
            mask, ang.sin()[:, None, None] * ones, ang.cos()[:, None, None] * ones]
    return torch.stack(maps, dim=1).contiguous(), layout, scale


def correction_record(fp, w0: torch.Tensor, sparing: Mapping[str, float],
                      w_target) -> dict:
    """Training arrays of one (patient, slider setting): inputs, target fluence in units
    of w0's mean, mask (see :mod:`training.fastpath.gen_data` for the layout)."""
    feats, layout, scale = correction_features(fp, w0, sparing)
    target = np.asarray(torch.as_tensor(w_target).cpu(), np.float32).reshape(-1) / scale
    return {"inputs": feats.cpu().numpy().astype(np.float32),
            "target_mu": layout.scatter(target), "mask": layout.mask()}


def make_correction_fn(weights_path, device="cpu",
                       refine_steps: int = CORRECTION_REFINE_STEPS) -> Callable:
    """``fn(fastpath, w0, sparing, objective=None, step=None) -> (n_beamlets,) MU``: the
    network's corrected fluence, then ``refine_steps`` exact correction steps (FISTA, the
    fast path's diagonal step and smoothness) on the same objective (``objective`` /
    ``step``: the slider setting's, when the caller has built them)."""
    if weights_path is None or not Path(weights_path).is_file():
        raise InputError(f"no correction-network weights at {weights_path}",
                         field="weights")
    model = load_weights(weights_path, device, kind=CORRECTION)

    def correction_fn(fp, w0: torch.Tensor, sparing: Mapping[str, float], *,
                      objective=None, step=None) -> torch.Tensor:
        net = model.to(fp.device)
        obj = fp.objective(dict(sparing)) if objective is None else objective
        step = fp._step_size(dict(sparing)) if step is None else step
        feats, layout, scale = correction_features(fp, w0, sparing, objective=obj,
                                                   step=step)
        with torch.no_grad():
            w = (scale * layout.gather(net(feats)).clamp_min(0.0)).to(torch.float32)
            w = w.contiguous()
        if refine_steps > 0:
            w = unrolled_correction(w, fp.operator_for(obj), obj, refine_steps, step,
                                    regulariser=fp.smooth, reg_weight=fp.mu)
        return w.detach()

    correction_fn.refine_steps = int(refine_steps)
    correction_fn.weights = str(weights_path)
    return correction_fn
