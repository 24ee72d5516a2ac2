"""OpenKBP scores of a predicted dose against the reference dose (both Gy, same grid).

Definitions follow the OpenKBP challenge (Babier et al. 2021):

* dose score: mean absolute difference over the possible-dose (body) voxels, Gy;
* DVH score: mean absolute difference of DVH points -- targets: D99, D95, D1 (dose, Gy,
  received by at least 99 / 95 / 1 % of the volume); organs: D0.1cc (dose to the
  hottest 0.1 cc) and Dmean. Over a cohort both scores are averaged over patients (the
  DVH score over every (patient, structure, metric) difference, as OpenKBP does).
"""

from __future__ import annotations

import numpy as np

from atp.patient import Patient, Role


def dose_score_gy(pred_gy: np.ndarray, ref_gy: np.ndarray, body: np.ndarray) -> float:
    body = np.asarray(body, dtype=bool)
    return float(np.abs(pred_gy[body].astype(np.float64) - ref_gy[body]).sum() / body.sum())


def dvh_points_gy(dose_gy: np.ndarray, patient: Patient) -> dict[tuple[str, str], float]:
    """The OpenKBP DVH points of one dose for every target and organ of ``patient``."""
    out: dict[tuple[str, str], float] = {}
    voxel_mm3 = float(np.prod(patient.grid.spacing_mm))
    for name, s in patient.structures.items():
        d = dose_gy[s.mask].astype(np.float64)
        if d.size == 0:
            continue
        if s.role == Role.TARGET:
            out[(name, "D99")] = float(np.percentile(d, 1))
            out[(name, "D95")] = float(np.percentile(d, 5))
            out[(name, "D1")] = float(np.percentile(d, 99))
        elif s.role == Role.ORGAN:
            n_tenth_cc = max(1.0, round(100.0 / voxel_mm3))
            q = 100.0 - n_tenth_cc / d.size * 100.0
            out[(name, "D0.1cc")] = float(np.percentile(d, max(q, 0.0)))
            out[(name, "Dmean")] = float(d.mean())
    return out


def dvh_differences_gy(pred_gy: np.ndarray, ref_gy: np.ndarray, patient: Patient
                       ) -> list[float]:
    a, b = dvh_points_gy(pred_gy, patient), dvh_points_gy(ref_gy, patient)
    return [abs(a[k] - b[k]) for k in b]


def score_patient(pred_gy: np.ndarray, ref_gy: np.ndarray, patient: Patient) -> dict:
    diffs = dvh_differences_gy(pred_gy, ref_gy, patient)
    return {"dose_score_gy": dose_score_gy(pred_gy, ref_gy, patient.body_mask),
            "dvh_differences_gy": diffs,
            "dvh_score_gy": float(np.mean(diffs)) if diffs else float("nan")}


def cohort_scores(per_patient: list[dict]) -> dict:
    """Mean dose score and the OpenKBP DVH score (mean of all DVH differences)."""
    diffs = [d for p in per_patient for d in p["dvh_differences_gy"]]
    return {"n_patients": len(per_patient),
            "dose_score_gy": float(np.mean([p["dose_score_gy"] for p in per_patient])),
            "dvh_score_gy": float(np.mean(diffs)) if diffs else float("nan")}
