"""The fit of :class:`~atp.dose.beam_model.PhotonBeamModel`.

The measurements (:mod:`atp.dose.measurements`, re-exported here: ``read_measurements``,
``Measurement``, ``DEFAULT_REFERENCE``) are water data in a documented CSV format.

:func:`fit_model` adjusts every model parameter (build-up, attenuation, primary and two
phantom-scatter Gaussians, head-scatter fraction, electron contamination, horns and
softening) by
bounded least squares on the ``fit`` rows: PDD points in % (build-up points above 1 cm at
half weight, 1-1.5 cm at 1, deeper than 1.5 cm (beyond d_max, where the 1-point goal
holds) at 2), output factors in % (weight 1.5), off-axis ratios in %, penumbrae in mm. The
``holdout`` rows are never seen by the fit; :mod:`atp.dose.commission` reports them.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from atp.dose import commission as cm
from atp.dose.beam_model import PhotonBeamModel
from atp.dose.measurements import DEFAULT_REFERENCE, Measurement, read_measurements

__all__ = ["DEFAULT_REFERENCE", "Measurement", "fit_model", "model_json", "read_measurements",
           "residuals"]

# --- the fit -------------------------------------------------------------------------
_NAMES = ("buildup_per_mm", "attenuation_per_mm", "depth_linear_per_mm", "surface_fraction",
          "ap", "bp", "c1", "e1", "q1", "a1", "b1", "c2", "e2", "q2", "a2", "b2",
          "head_fraction", "electron_surface", "electron_per_mm",
          "horn_per_mm2", "softening_per_mm3")
_LO = np.array([0.02, 0.001, -0.01, 0.0, 0.3, 0.0, 0.0, -0.003, -2e-5, 0.3, 0.0, 0.0,
                -0.003, -2e-5, 5.0, 0.0, 0.0, 0.0, 0.01, -2e-5, -1e-7])
_HI = np.array([3.0, 0.012, 0.01, 0.6, 6.0, 0.05, 0.6, 0.006, 2e-5, 30.0, 0.5, 0.6, 0.006,
                2e-5, 150.0, 1.0, 0.25, 0.6, 2.0, 2e-5, 2e-7])


def _vector(m: PhotonBeamModel) -> np.ndarray:
    sc = list(m.scatter) + [((0.05, 0.0005), (5.0, 0.05)), ((0.05, 0.0003), (40.0, 0.1))]
    (w1, (a1, b1)), (w2, (a2, b2)) = sc[0], sc[1]
    c1, e1, q1 = (*w1, 0.0)[:3]
    c2, e2, q2 = (*w2, 0.0)[:3]
    x = np.array([m.buildup_per_mm, m.attenuation_per_mm, m.depth_linear_per_mm,
                  m.surface_fraction, *m.sigma_primary_mm, c1, e1, q1, a1, b1, c2, e2, q2,
                  a2, b2, m.head_fraction, m.electron_surface,
                  m.electron_per_mm, m.horn_per_mm2, m.softening_per_mm3], dtype=float)
    return np.clip(x, _LO, _HI)


def _model(base: PhotonBeamModel, x) -> PhotonBeamModel:
    x = [float(v) for v in x]
    return base.with_parameters(
        buildup_per_mm=x[0], attenuation_per_mm=x[1], depth_linear_per_mm=x[2],
        surface_fraction=x[3], sigma_primary_mm=(x[4], x[5]),
        scatter=(((x[6], x[7], x[8]), (x[9], x[10])), ((x[11], x[12], x[13]),
                                                      (x[14], x[15]))),
        head_fraction=x[16], electron_surface=x[17], electron_per_mm=x[18],
        horn_per_mm2=x[19], softening_per_mm3=x[20])


def residuals(model: PhotonBeamModel, rows) -> np.ndarray:
    """Weighted residuals (model - measured) of ``rows``: % points, % and mm."""
    res = []
    pdd_rows: dict = {}
    for r in rows:
        if r.quantity == "pdd":
            pdd_rows.setdefault(r.field_key, []).append(r)
    for key, rs in pdd_rows.items():
        depth = np.array([r.depth_cm * 10.0 for r in rs])
        calc = cm.pdd_percent(model, depth, (key[0] * 10.0, key[1] * 10.0))
        w = np.where(depth < 10.0, 0.5, np.where(depth > 15.0, 2.0, 1.0))
        res.append(w * (calc - np.array([r.value for r in rs])))
    ofs = [r for r in rows if r.quantity == "output_factor"]
    if ofs:
        calc = np.array([cm.output_factor(model, (r.field_x_cm * 10, r.field_y_cm * 10),
                                          r.depth_cm * 10.0) for r in ofs])
        res.append(1.5 * 100.0 * (calc / np.array([r.value for r in ofs]) - 1.0))
    for r in rows:
        if r.quantity == "oar":
            calc = cm.off_axis_ratio(model, (r.field_x_cm * 10, r.field_y_cm * 10),
                                     r.depth_cm * 10, r.off_axis_cm * 10)
            res.append(np.atleast_1d(100.0 * (calc - r.value)))
        elif r.quantity == "penumbra_80_20_mm":
            calc = cm.penumbra_80_20_mm(model, r.depth_cm * 10,
                                        (r.field_x_cm * 10, r.field_y_cm * 10))
            res.append(np.atleast_1d(calc - r.value))
    return np.concatenate(res)


def fit_model(rows, base: PhotonBeamModel | None = None, *, max_nfev: int = 400):
    """(fitted model, summary) from the ``fit`` rows of ``rows``."""
    base = base or PhotonBeamModel.load()
    fit_rows = [r for r in rows if r.use == "fit"]

    def fun(x):
        return residuals(_model(base, x), fit_rows)

    x0 = _vector(base)
    sol = least_squares(fun, x0, bounds=(_LO, _HI), x_scale=np.maximum(np.abs(x0), 1e-3 *
                        (_HI - _LO)), max_nfev=max_nfev, diff_step=1e-4, ftol=1e-10,
                        xtol=1e-10)
    model = _model(base, sol.x)
    r = sol.fun
    return model, {"residuals": int(r.size), "parameters": len(_NAMES),
                   "rms_weighted": round(float(np.sqrt(np.mean(r * r))), 4),
                   "max_abs_weighted": round(float(np.max(np.abs(r))), 4),
                   "evaluations": int(sol.nfev), "status": int(sol.status)}


def model_json(model: PhotonBeamModel, summary: dict, data_source: str,
               description: str | None = None) -> dict:
    """The beam-model JSON document of a fitted model."""
    def rnd(v):
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [rnd(x) for x in v]
        return float(f"{v:.6g}") if isinstance(v, float) else v

    return {
        "name": model.name,
        "description": description or (
            "Finite-size pencil-beam model of a flattened 6 MV beam (atp/dose/beam_model.py),"
            " fitted by atp.dose.fit to the measurements named in 'fit'."),
        "sad_mm": model.sad_mm,
        "calibration": {"gy_per_mu": model.calibration_gy_per_mu,
                        "field_mm": model.calibration_field_mm,
                        "ssd_mm": model.calibration_ssd_mm,
                        "note": "10 x 10 cm2 field at SSD 100 cm in water: gy_per_mu at the "
                                "depth of maximum dose"},
        "parameters": rnd(model.to_dict()),
        "reference": model.reference,
        "fit": {"data": data_source, **summary},
    }
