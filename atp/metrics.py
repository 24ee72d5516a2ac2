"""Plan-quality indices (conformity, homogeneity, gradient) and the standard metric table.

Volumes are voxel counts (whole voxels, see :mod:`atp.dvh`); the voxel volume cancels
in every ratio. "Receiving the reference dose" means ``dose >= reference`` (Gy). When a
``body_mask`` is given, isodose volumes are counted inside it only (dose outside the
body is not tissue); otherwise over the whole dose grid.

* **RTOG conformity index** ``CI = V_RI / TV``: volume inside the reference isodose
  (the prescription) over the target volume. 1 is ideal; > 1 spills, < 1 under-covers.
* **Paddick conformity index** ``CI_P = TV_PIV^2 / (TV * PIV)``: TV_PIV = target volume
  inside the prescription isodose, PIV = prescription isodose volume. In [0, 1], 1 ideal.
* **ICRU-83 homogeneity index** ``HI = (D2% - D98%) / D50%`` of the target (D x% as in
  :func:`atp.dvh.dose_at_volume_pct`). 0 is perfectly homogeneous.
* **Gradient index** ``GI = V_50%Rx / V_100%Rx``: volume of the half-prescription
  isodose over that of the prescription isodose (smaller = steeper fall-off);
  ``inf`` when nothing reaches the prescription.

For a patient with several dose levels (OpenKBP PTV_70/63/56), the indices of a target
with prescription R use as "target volume" the union of all targets prescribed >= R,
since the R isodose is meant to cover every one of them (:func:`target_volume_mask`).
"""

from __future__ import annotations

import numpy as np

from atp.dvh import (
    dose_at_volume_cc,
    dose_at_volume_pct,
    max_dose,
    mean_dose,
    min_dose,
    roi_dose,
    volume_at_dose_pct,
)
from atp.errors import GridMismatchError, InputError, StructureError


def _count(a) -> int:
    s = a.sum()
    return int(s.item() if hasattr(s, "item") else s)


def _isodose(dose_gy, level_gy: float, body_mask=None):
    if not (np.isfinite(level_gy) and level_gy > 0):
        raise InputError(f"reference dose must be > 0 Gy, got {level_gy}", field="rx_gy")
    iso = dose_gy >= float(level_gy)
    if body_mask is not None:
        if tuple(body_mask.shape) != tuple(dose_gy.shape):
            raise GridMismatchError("body mask shape differs from the dose", field="body_mask")
        iso = iso & body_mask
    return iso


def _target(dose_gy, target_mask, name):
    roi_dose(dose_gy, target_mask, name)  # shape + emptiness checks
    return target_mask if target_mask.dtype == bool else target_mask != 0


def rtog_ci(dose_gy, target_mask, rx_gy: float, body_mask=None,
            name: str | None = None) -> float:
    """RTOG conformity index V_RI / TV (reference isodose = rx_gy)."""
    t = _target(dose_gy, target_mask, name)
    return _count(_isodose(dose_gy, rx_gy, body_mask)) / _count(t)


def paddick_ci(dose_gy, target_mask, rx_gy: float, body_mask=None,
               name: str | None = None) -> float:
    """Paddick conformity index TV_PIV^2 / (TV * PIV); 0 when nothing reaches rx_gy."""
    t = _target(dose_gy, target_mask, name)
    iso = _isodose(dose_gy, rx_gy, body_mask)
    piv = _count(iso)
    if piv == 0:
        return 0.0
    tv_piv = _count(iso & t)
    return tv_piv * tv_piv / (_count(t) * piv)


def homogeneity_index(dose_gy, target_mask, name: str | None = None) -> float:
    """ICRU-83 HI = (D2% - D98%) / D50% of the target."""
    d50 = dose_at_volume_pct(dose_gy, target_mask, 50.0, name)
    if d50 <= 0:
        raise StructureError(f"D50% of '{name or '?'}' is {d50} Gy; HI is undefined",
                             field=name or "mask")
    d2 = dose_at_volume_pct(dose_gy, target_mask, 2.0, name)
    d98 = dose_at_volume_pct(dose_gy, target_mask, 98.0, name)
    return (d2 - d98) / d50


def gradient_index(dose_gy, rx_gy: float, body_mask=None) -> float:
    """GI = V(dose >= 0.5 rx) / V(dose >= rx); inf when V(dose >= rx) is 0."""
    v100 = _count(_isodose(dose_gy, rx_gy, body_mask))
    v50 = _count(_isodose(dose_gy, 0.5 * rx_gy, body_mask))
    return float("inf") if v100 == 0 else v50 / v100


def target_volume_mask(patient, target: str) -> np.ndarray:
    """Union of ``target`` and every target prescribed at least as high as it."""
    rx = patient.prescription_for(target)
    mask = np.array(patient.mask(target), copy=True)
    if rx is None:
        return mask
    for p in patient.prescriptions:
        if p.dose_gy >= rx.dose_gy:
            mask |= patient.mask(p.target)
    return mask


def plan_index(name: str, patient, dose_gy, target: str, body_mask=None) -> float:
    """One of 'CI' (RTOG), 'CIpaddick', 'HI', 'GI' for a prescribed target of a patient."""
    if name == "HI":
        return homogeneity_index(dose_gy, patient.mask(target), target)
    rx = patient.prescription_for(target)
    if rx is None:
        raise StructureError(f"'{name}' needs a prescription for '{target}'; prescribed "
                             f"targets: {[p.target for p in patient.prescriptions]}",
                             file=patient.source, field=target)
    body = patient.body_mask if body_mask is None else body_mask
    tv = target_volume_mask(patient, target)
    if name == "CI":
        return rtog_ci(dose_gy, tv, rx.dose_gy, body, target)
    if name == "CIpaddick":
        return paddick_ci(dose_gy, tv, rx.dose_gy, body, target)
    if name == "GI":
        return gradient_index(dose_gy, rx.dose_gy, body)
    raise InputError(f"unknown plan index '{name}' (CI, CIpaddick, HI, GI)", field="metric")


STANDARD_PCT = (99.0, 98.0, 95.0, 50.0, 2.0, 1.0)


def structure_metrics(patient, dose_gy) -> dict[str, dict[str, float]]:
    """The standard table: per structure D99/D98/D95/D50/D2/D1 (%), D0.1cc, D0.03cc,
    Dmean, Dmax, Dmin (Gy) and volume (cc); per prescribed target also Rx (Gy),
    V95%Rx and V100%Rx (% of the target), CI (RTOG), CIpaddick, HI, GI.

    Structures with an empty mask are left out (OpenKBP: a missing ROI has no voxels).
    """
    grid = patient.grid
    if tuple(dose_gy.shape) != grid.shape:
        grid.check_array(dose_gy, field="dose")
    vcc = grid.voxel_volume_cc
    out: dict[str, dict[str, float]] = {}
    for name, s in patient.structures.items():
        if s.n_voxels == 0:
            continue
        m = s.mask
        row = {"volume_cc": s.volume_cc(grid)}
        for pct in STANDARD_PCT:
            row[f"D{pct:g}%"] = dose_at_volume_pct(dose_gy, m, pct, name)
        row["D0.1cc"] = dose_at_volume_cc(dose_gy, m, 0.1, vcc, name)
        row["D0.03cc"] = dose_at_volume_cc(dose_gy, m, 0.03, vcc, name)
        row["Dmean"] = mean_dose(dose_gy, m, name)
        row["Dmax"] = max_dose(dose_gy, m, name)
        row["Dmin"] = min_dose(dose_gy, m, name)
        rx = patient.prescription_for(name)
        if rx is not None:
            row["Rx_gy"] = rx.dose_gy
            row["V95%Rx"] = volume_at_dose_pct(dose_gy, m, 0.95 * rx.dose_gy, name)
            row["V100%Rx"] = volume_at_dose_pct(dose_gy, m, rx.dose_gy, name)
            for idx in ("CI", "CIpaddick", "HI", "GI"):
                row[idx] = plan_index(idx, patient, dose_gy, name)
        out[name] = row
    return out
