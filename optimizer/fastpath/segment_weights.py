"""Control-point MU optimisation of a sequenced plan against the fast path's objective.

After leaf sequencing the leaves are fixed but each control point's MU is still free.
The sequencer's own re-weighting (:func:`sequencer.reweight.reweight_mu`) fits the MU by
least squares to the ideal dose, which treats a hot spot like a cold spot. Here the MU
minimise the plan's objective J itself (the error map's J: PTV hot spots costing more
than cold spots, OAR sliders, goal-list terms) on the deliverable dose, within the
machine's MU/degree limits (segment-weight optimisation, as the weight step of direct
aperture optimisation):

    min_v  J(D_now + B (v - v0))   s.t.  lo <= v <= hi

with B the dose per MU of every control point on the dose-grid voxels that receive at
least ``threshold`` x the maximum dose (:func:`sequencer.reweight.mu_basis`; other voxels
keep their dose), solved by L-BFGS-B on the few hundred MU with J and its gradient from
torch (B on the fast path's device). The leaves do not move, so every MLC constraint
still holds; the returned delivery's dose is recomputed from what is delivered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize


def optimise_mu(delivery, dij, objective: Callable[[torch.Tensor], torch.Tensor], *,
                device: str | torch.device = "cpu", threshold: float = 0.1,
                max_rows: int = 60000, max_iter: int = 40):
    """(new delivery, info dict). ``objective``: J(dose) on the flattened dose grid."""
    import sequencer
    from sequencer.reweight import mu_basis, with_mu

    dev = torch.device(device)
    now = np.asarray(sequencer.deliverable_dose(delivery, dij), np.float32).reshape(-1)
    top = float(now.max())
    if top <= 0:
        return delivery, {"iterations": 0, "objective_before": None, "objective_after": None}
    rows = np.flatnonzero(now >= threshold * top)
    if rows.size > max_rows:
        rows = rows[:: int(np.ceil(rows.size / max_rows))]
    B, v0, lo, hi = mu_basis(delivery, dij, rows)
    b_t = torch.from_numpy(B.astype(np.float32)).to(dev)
    base = torch.from_numpy(now).to(dev)
    rows_t = torch.from_numpy(rows).to(dev)
    v0_t = torch.from_numpy(v0.astype(np.float32)).to(dev)

    def value_grad(v):
        vt = torch.from_numpy(v.astype(np.float32)).to(dev).requires_grad_(True)
        dose = base.index_add(0, rows_t, b_t @ (vt - v0_t))
        with torch.enable_grad():
            j = objective(dose)
            (g,) = torch.autograd.grad(j, vt)
        return float(j.detach()), g.detach().cpu().numpy().astype(np.float64)

    start = np.clip(v0, lo, hi)
    j0, _ = value_grad(start)
    res = minimize(value_grad, start, jac=True, method="L-BFGS-B",
                   bounds=list(zip(lo, np.where(np.isfinite(hi), hi, None))),
                   options={"maxiter": int(max_iter)})
    v = np.clip(res.x, lo, hi)
    if not res.fun < j0:
        return delivery, {"iterations": int(res.nit), "objective_before": j0,
                          "objective_after": j0, "kept": False}
    out = with_mu(delivery, v)
    return out, {"iterations": int(res.nit), "objective_before": j0,
                 "objective_after": float(res.fun), "kept": True}
