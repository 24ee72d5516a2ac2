"""How faithfully a sequenced delivery reproduces the ideal (optimised-fluence) dose:
3 %/3 mm global gamma (10 % threshold) and per-structure DVH deltas."""

from __future__ import annotations

import numpy as np

from atp import dvh
from atp.gamma import gamma_index


def dvh_points(dose_gy: np.ndarray, mask: np.ndarray, name: str | None = None) -> dict:
    """Dmean, Dmax, D98%, D95%, D50%, D2% (Gy) inside ``mask`` ({} when it is empty),
    with the definitions of :mod:`atp.dvh`."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return {}
    dose = np.asarray(dose_gy)
    out = {"Dmean": dvh.mean_dose(dose, mask, name), "Dmax": dvh.max_dose(dose, mask, name)}
    for v in (98.0, 95.0, 50.0, 2.0):
        out[f"D{v:g}%"] = dvh.dose_at_volume_pct(dose, mask, v, name)
    return out


def fidelity(ideal_gy, delivered_gy, spacing_mm, structures: dict | None = None, *,
             dose_pct: float = 3.0, dta_mm: float = 3.0, threshold_pct: float = 10.0) -> dict:
    """Gamma pass rate (ideal = reference) and, per structure mask, delivered - ideal DVH
    points (Gy)."""
    g = gamma_index(ideal_gy, delivered_gy, spacing_mm, dose_pct=dose_pct, dta_mm=dta_mm,
                    threshold_pct=threshold_pct)
    out = {"gamma": {"criterion": f"{dose_pct:g}%/{dta_mm:g}mm global, "
                                  f"{threshold_pct:g}% threshold",
                     "pass_rate_pct": round(g.pass_rate_pct, 3), "n_voxels": g.n_scored,
                     "mean_gamma": round(float(g.gamma.mean()), 4) if g.n_scored else 0.0},
           "dvh_delta_gy": {}}
    for name, mask in (structures or {}).items():
        ideal = dvh_points(ideal_gy, mask, name)
        if not ideal:
            continue
        deliv = dvh_points(delivered_gy, mask, name)
        out["dvh_delta_gy"][name] = {k: round(deliv[k] - ideal[k], 4) for k in ideal}
    return out
