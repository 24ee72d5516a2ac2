"""Commissioning check: the beam model in water against measured/reference data.

Square fields of 2, 3, 5, 10, 20, 30 and 40 cm and the held-back fields (not fitted:
7 x 7, 15 x 15, 5 x 20 cm in the shipped data) are computed with the same kernel the
engine uses for beamlets (a field of adjacent beamlets equals one rectangle in this
model, see :mod:`atp.dose.beam_model`; the off-axis factor is taken per 5 mm strip
here, per 5 mm beamlet in the engine):

* PDD at SSD 100 cm (normalised at the curve's maximum), d_max;
* output factor: dose per MU at 10 cm depth with the isocentre at that depth (SSD 90 cm),
  relative to 10 x 10 cm^2 (the set-up of the IROC/RPC reference data);
* 80-20 % penumbra of the x profile at 10 cm depth, SSD 100 cm;

each beside its reference value (``atp/data/photon_6mv_reference.csv`` by default, or
a clinic's own file in the same format) and the difference.
"""

from __future__ import annotations

import numpy as np

from atp.dose.beam_model import PhotonBeamModel
from atp.dose.measurements import DEFAULT_REFERENCE, read_measurements
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure

PDD_DEPTHS_CM = (1.5, 5.0, 10.0, 20.0)
FIELD_PDD_DEPTHS_CM = (5.0, 10.0, 20.0)
SQUARE_FIELDS_CM = (2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 40.0)
OF_DEPTH_MM = 100.0
_DMAX_GRID = np.arange(0.0, 45.0, 0.5)


def _sides(field_mm):
    return (float(field_mm), float(field_mm)) if np.ndim(field_mm) == 0 else \
        (float(field_mm[0]), float(field_mm[1]))


def pdd_percent(model: PhotonBeamModel, depth_mm, field_mm=100.0, ssd_mm=1000.0):
    """Percent depth dose (normalised at the maximum of the curve)."""
    f = _sides(field_mm)
    curve = model.reference_depth_dose(_DMAX_GRID, f, ssd_mm)
    return 100.0 * model.reference_depth_dose(np.asarray(depth_mm, float), f,
                                              ssd_mm) / curve.max()


def dmax_mm(model: PhotonBeamModel, field_mm=100.0, ssd_mm=1000.0) -> float:
    d = np.arange(0.0, 60.0, 0.1)
    return float(d[np.argmax(model.reference_depth_dose(d, _sides(field_mm), ssd_mm))])


def output_factor(model: PhotonBeamModel, field_mm, depth_mm=OF_DEPTH_MM) -> float:
    """Dose per MU at ``depth_mm`` on the axis, isocentre at that depth, relative to the
    10 x 10 cm^2 field in the same set-up."""
    ssd = model.sad_mm - depth_mm
    return float(model.reference_depth_dose(depth_mm, _sides(field_mm), ssd)
                 / model.reference_depth_dose(depth_mm, (100.0, 100.0), ssd))


def off_axis_ratio(model: PhotonBeamModel, field_mm, depth_mm, off_axis_mm,
                   ssd_mm=1000.0) -> np.ndarray:
    f = _sides(field_mm)
    return (model.reference_depth_dose(depth_mm, f, ssd_mm, off_axis_mm=off_axis_mm)
            / model.reference_depth_dose(depth_mm, f, ssd_mm))


def penumbra_80_20_mm(model: PhotonBeamModel, depth_mm=100.0, field_mm=100.0,
                      ssd_mm=1000.0) -> float:
    """Distance (mm, at depth) between the 80 % and 20 % points of the x field edge
    (profile normalised to the central axis)."""
    fx, fy = _sides(field_mm)
    x_edge = fx / 2.0 * (ssd_mm + depth_mm) / model.sad_mm
    x = np.arange(x_edge - 15.0, x_edge + 15.0, 0.1)
    prof = off_axis_ratio(model, (fx, fy), depth_mm, x, ssd_mm)
    x80 = np.interp(-0.8, -prof, x)
    x20 = np.interp(-0.2, -prof, x)
    return float(x20 - x80)


def _cmp(calc, ref, nd=2):
    calc = round(float(calc), nd)
    return {"value": calc, "reference": ref,
            "difference": None if ref is None else round(calc - ref, nd)}


def _label(fx, fy):
    g = "{:g}".format
    return f"{g(fx)}x{g(fy)}"


def field_report(model: PhotonBeamModel, fx_cm: float, fy_cm: float, rows=()) -> dict:
    """Computed vs reference numbers of one field (``rows``: its Measurement rows)."""
    f = (fx_cm * 10.0, fy_cm * 10.0)
    pdd_ref = {r.depth_cm: r.value for r in rows if r.quantity == "pdd"}
    of_ref = next((r.value for r in rows if r.quantity == "output_factor"
                   and abs(r.depth_cm * 10 - OF_DEPTH_MM) < 1e-6), None)
    pen_ref = next((r.value for r in rows if r.quantity == "penumbra_80_20_mm"
                    and abs(r.depth_cm - 10.0) < 1e-6), None)
    dm = dmax_mm(model, f)
    ref_dm = None
    if pdd_ref:
        ref_dm = max(pdd_ref, key=pdd_ref.get)
    pdd = []
    for dcm in FIELD_PDD_DEPTHS_CM:
        calc = round(float(pdd_percent(model, dcm * 10.0, f)), 2)
        r = pdd_ref.get(dcm)
        pdd.append({"depth_cm": dcm, "pdd_percent": calc, "reference_percent": r,
                    "difference_percent": None if r is None else round(calc - r, 2)})
    beyond = sorted(d for d in pdd_ref if ref_dm is not None and d > ref_dm)
    worst = None
    if beyond:
        calc = pdd_percent(model, np.array(beyond) * 10.0, f)
        diff = calc - np.array([pdd_ref[d] for d in beyond])
        k = int(np.argmax(np.abs(diff)))
        worst = {"depth_cm": beyond[k], "difference_percent": round(float(diff[k]), 2)}
    of = output_factor(model, f)
    uses = sorted({r.use for r in rows})
    return {
        "size_cm": [fx_cm, fy_cm], "label": _label(fx_cm, fy_cm),
        "use": uses[0] if len(uses) == 1 else ("+".join(uses) if uses else "no reference"),
        "dmax_cm": _cmp(dm / 10.0, ref_dm, 2),
        "pdd": pdd,
        "pdd_worst_beyond_dmax": worst,
        "output_factor": {**_cmp(of, of_ref, 4), "depth_cm": OF_DEPTH_MM / 10.0,
                          "difference_percent": None if of_ref is None else
                          round(100.0 * (of / of_ref - 1.0), 2)},
        "penumbra_80_20_mm_at_10cm": _cmp(penumbra_80_20_mm(model, 100.0, f), pen_ref, 2),
    }


def commission(model: PhotonBeamModel | None = None, data=None) -> dict:
    """Computed vs reference numbers: the 10 x 10 cm^2 summary (``pdd``, ``dmax_cm``,
    penumbra) and ``fields``: one dict per square field and per held-back field.
    ``data``: measurement rows or a CSV path (default: the shipped reference table)."""
    model = model or PhotonBeamModel.load()
    source = str(data) if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") \
        else ("given rows" if data is not None else str(DEFAULT_REFERENCE))
    rows = read_measurements(data) if data is None or isinstance(data, (str, bytes)) \
        or hasattr(data, "__fspath__") else list(data)
    by_field: dict = {}
    for r in rows:
        by_field.setdefault(r.field_key, []).append(r)
    keys = [(s, s) for s in SQUARE_FIELDS_CM]
    keys += sorted(k for k, rs in by_field.items() if k not in keys
                   and any(r.use == "holdout" for r in rs))
    fields = [field_report(model, fx, fy, by_field.get((fx, fy), ())) for fx, fy in keys]

    ref10 = by_field.get((10.0, 10.0), [])
    ref_pdd = {r.depth_cm: r.value for r in ref10 if r.quantity == "pdd"}
    rows10 = []
    for dcm in PDD_DEPTHS_CM:
        calc = float(pdd_percent(model, dcm * 10.0))
        r = ref_pdd.get(dcm)
        rows10.append({"depth_cm": dcm, "pdd_percent": round(calc, 2),
                       "reference_percent": r,
                       "difference_percent": None if r is None else round(calc - r, 2)})
    pen = penumbra_80_20_mm(model)
    ref_pen = next((r.value for r in ref10 if r.quantity == "penumbra_80_20_mm"
                    and r.depth_cm == 10.0), model.reference.get("penumbra_80_20_mm_at_10cm"))

    def worst(use, key):
        vals = []
        for f in fields:
            if f["use"] != use:
                continue
            if key == "pdd" and f["pdd_worst_beyond_dmax"]:
                vals.append(abs(f["pdd_worst_beyond_dmax"]["difference_percent"]))
            if key == "of" and f["output_factor"]["difference_percent"] is not None:
                vals.append(abs(f["output_factor"]["difference_percent"]))
        return max(vals) if vals else None

    return {
        "beam_model": model.name,
        "setup": "water; PDD and profiles at SSD 100 cm; output factors at 10 cm depth "
                 "with the isocentre at that depth (SSD 90 cm), relative to 10 x 10 cm2",
        "calibration": f"{model.calibration_gy_per_mu} Gy/MU at d_max",
        "gy_per_mu_at_dmax": round(model.gy_per_mu_scale * float(
            model.reference_depth_dose(model.dmax_mm)), 6),
        "dmax_cm": round(model.dmax_mm / 10.0, 3),
        "reference_dmax_cm": max(ref_pdd, key=ref_pdd.get) if ref_pdd else
        model.reference.get("dmax_cm"),
        "pdd": rows10,
        "penumbra_80_20_mm_at_10cm": round(pen, 2),
        "reference_penumbra_80_20_mm_at_10cm": ref_pen,
        "penumbra_difference_mm": None if ref_pen is None else round(pen - ref_pen, 2),
        "reference_data": source,
        "fields": fields,
        "summary": {
            "fitted_max_abs_pdd_difference_beyond_dmax_percent": worst("fit", "pdd"),
            "fitted_max_abs_output_factor_difference_percent": worst("fit", "of"),
            "holdout_max_abs_pdd_difference_beyond_dmax_percent": worst("holdout", "pdd"),
            "holdout_max_abs_output_factor_difference_percent": worst("holdout", "of"),
        },
        "sources": model.reference.get("sources", []),
    }


def water_phantom(size_mm=(300.0, 300.0, 300.0), spacing_mm=(5.0, 5.0, 5.0),
                  target_half_mm: float = 40.0, hu: float = 0.0):
    """A water box (LPS axes x, y, z; anterior surface at y = 0, centred in x and z)
    with a cubic target of half-size ``target_half_mm`` centred 100 mm deep, and the
    isocentre convention of an SSD 100 cm set-up for gantry 0: iso at (0, 0, 0) on the
    surface. Returns a :class:`~atp.patient.Patient`."""
    sp_mm = np.asarray(spacing_mm, dtype=float)
    shape = tuple(round(s / d) for s, d in zip(size_mm, sp_mm))
    origin = np.array([-(shape[0] - 1) / 2 * sp_mm[0], sp_mm[1] / 2,
                       -(shape[2] - 1) / 2 * sp_mm[2]])
    grid = Grid(shape, sp_mm, origin)
    pts = grid.voxel_centres_mm().reshape(*shape, 3)
    target = ((np.abs(pts[..., 0]) <= target_half_mm) & (np.abs(pts[..., 1] - 100.0)
              <= target_half_mm) & (np.abs(pts[..., 2]) <= target_half_mm))
    ct = np.full(shape, hu, dtype=np.float32)
    structures = {"External": Structure("External", np.ones(shape, bool), Role.EXTERNAL),
                  "PTV": Structure("PTV", target, Role.TARGET)}
    return Patient(ct, grid, structures, (Prescription("PTV", 60.0, 30),),
                   patient_id="water-box", source="<water phantom>")
