"""Commissioning check: the kernel in water against the reference data it was fitted to.

A 10 x 10 cm^2 field at SSD 100 cm in water is computed with the same kernel the engine
uses for beamlets (a field of adjacent beamlets equals one rectangle in this model, see
:mod:`atp.dose.beam_model`): PDD at 1.5 / 5 / 10 / 20 cm, depth of maximum dose, and the
80-20 % penumbra of the cross-plane profile at 10 cm depth (profile normalised to the
central axis), next to the reference values and their sources from the beam-model file.
"""

from __future__ import annotations

import numpy as np

from atp.dose.beam_model import PhotonBeamModel

PDD_DEPTHS_CM = (1.5, 5.0, 10.0, 20.0)


def pdd_percent(model: PhotonBeamModel, depth_mm, field_mm=100.0, ssd_mm=1000.0):
    """Percent depth dose (normalised at the maximum of the curve)."""
    d = np.arange(0.0, 400.0, 0.05)
    curve = model.reference_depth_dose(d, field_mm, ssd_mm)
    return 100.0 * model.reference_depth_dose(np.asarray(depth_mm, float), field_mm,
                                              ssd_mm) / curve.max()


def penumbra_80_20_mm(model: PhotonBeamModel, depth_mm=100.0, field_mm=100.0,
                      ssd_mm=1000.0) -> float:
    """Distance (mm, at depth) between the 80 % and 20 % points of the field edge."""
    x_edge = field_mm / 2.0 * (ssd_mm + depth_mm) / model.sad_mm
    x = np.arange(x_edge - 30.0, x_edge + 30.0, 0.01)
    prof = model.reference_depth_dose(depth_mm, field_mm, ssd_mm, off_axis_mm=x)
    prof = prof / float(model.reference_depth_dose(depth_mm, field_mm, ssd_mm))
    # profile falls monotonically across the edge
    x80 = np.interp(-0.8, -prof, x)
    x20 = np.interp(-0.2, -prof, x)
    return float(x20 - x80)


def commission(model: PhotonBeamModel | None = None) -> dict:
    """Computed vs reference numbers for the 10 x 10 cm^2 SSD 100 cm field."""
    model = model or PhotonBeamModel.load()
    ref = model.reference
    ref_pdd = dict(zip(ref.get("pdd_depth_cm", []), ref.get("pdd_percent", [])))
    rows = []
    for dcm in PDD_DEPTHS_CM:
        calc = float(pdd_percent(model, dcm * 10.0))
        r = ref_pdd.get(dcm)
        rows.append({"depth_cm": dcm, "pdd_percent": round(calc, 2),
                     "reference_percent": r,
                     "difference_percent": None if r is None else round(calc - r, 2)})
    pen = penumbra_80_20_mm(model)
    ref_pen = ref.get("penumbra_80_20_mm_at_10cm")
    return {
        "beam_model": model.name,
        "setup": "10 x 10 cm2 field at SSD 100 cm, water",
        "calibration": f"{model.calibration_gy_per_mu} Gy/MU at d_max",
        "gy_per_mu_at_dmax": round(model.gy_per_mu_scale * float(
            model.reference_depth_dose(model.dmax_mm)), 6),
        "dmax_cm": round(model.dmax_mm / 10.0, 3),
        "reference_dmax_cm": ref.get("dmax_cm"),
        "pdd": rows,
        "penumbra_80_20_mm_at_10cm": round(pen, 2),
        "reference_penumbra_80_20_mm_at_10cm": ref_pen,
        "penumbra_difference_mm": None if ref_pen is None else round(pen - ref_pen, 2),
        "sources": ref.get("sources", []),
    }


def water_phantom(size_mm=(300.0, 300.0, 300.0), spacing_mm=(5.0, 5.0, 5.0),
                  target_half_mm: float = 40.0, hu: float = 0.0):
    """A water box (LPS axes x, y, z; anterior surface at y = 0, centred in x and z)
    with a cubic target of half-size ``target_half_mm`` centred 100 mm deep, and the
    isocentre convention of an SSD 100 cm set-up for gantry 0: iso at (0, 0, 0) on the
    surface. Returns a :class:`~atp.patient.Patient`."""
    from atp.grid import Grid
    from atp.patient import Patient, Prescription, Role, Structure

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
