"""Slab phantoms: central-axis dose behind air (3 cm) and lung (rho 0.25) slabs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/slab_heterogeneity.py [--json OUT]

A water box (2.5 mm voxels, SSD 100 cm, gantry 0) with a slab from 3 to 6 cm depth
(air: -1000 HU, relative electron density 0.001; lung: -740 HU = 0.25 on atp's HU table)
is computed with the pencil-beam engine (dij of the field's 5 mm beamlets, threshold 1e-4,
the default 60 mm lateral cutoff), for square fields of 2, 3, 5 and 10 cm. Printed per depth: the dose with the slab
divided by the water dose at the same *radiological* depth, corrected for the inverse
square of the geometric shift (so attenuation and distance cancel and what remains is the
lateral-transport effect), with the density-scaled widths (the
model) and with the scaling switched off (``max_lateral_scale=1``: widths from
radiological depth only, the behaviour before issue 20).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from atp.dose.beam_model import PhotonBeamModel
from atp.dose.commission import water_phantom
from atp.dose.geometry import Beam
from atp.dose.pencil_beam import PencilBeamEngine
from atp.patient import Patient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from square_field import square_field_cax  # tests/square_field.py

SLAB_MM = (30.0, 60.0)
SPACING = (2.5, 2.5, 2.5)
SIZE = (120.0, 200.0, 120.0)


def _box(hu_slab=None):
    p = water_phantom(SIZE, SPACING, target_half_mm=10.0)
    ct = p.ct_hu.copy()
    if hu_slab is not None:
        y = p.grid.voxel_centres_mm().reshape(*p.grid.shape, 3)[..., 1]
        ct[(y > SLAB_MM[0]) & (y < SLAB_MM[1])] = hu_slab
    return Patient(ct, p.grid, p.structures, p.prescriptions, p.patient_id, {}, p.source)


def cax_dose(patient, half_mm: float, model):
    eng = PencilBeamEngine(model=model)
    dij = eng.influence(patient, [Beam(0, isocenter_mm=(0.0, 0.0, 0.0))], dose_grid_factor=1,
                        margin_mm=half_mm + 5.0,
                        beamlet_size_mm=5.0)
    y, cax, _ = square_field_cax(dij, half_mm, leaf_mm=2.5, mu=100.0)
    return y, cax


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    model = PhotonBeamModel.load()
    flat = model.with_parameters(max_lateral_scale=1.0)
    out = {"slab_mm": SLAB_MM, "fields": {}}
    water = _box()
    for name, hu, rho in (("air", -1000.0, 0.001), ("lung", -740.0, 0.25)):
        slab = _box(hu)
        for side in (20.0, 30.0, 50.0, 100.0):
            res = {}
            for label, m in (("scaled", model), ("unscaled", flat)):
                y, dw = cax_dose(water, side / 2, m)
                _, ds = cax_dose(slab, side / 2, m)
                # water dose at the same radiological depth: interpolate the water curve
                rad = np.where(y < SLAB_MM[0], y, np.where(y < SLAB_MM[1], SLAB_MM[0] + rho *
                               (y - SLAB_MM[0]), y - (1 - rho) * (SLAB_MM[1] - SLAB_MM[0])))
                ref = np.interp(rad, y, dw) * ((1000.0 + rad) / (1000.0 + y)) ** 2
                res[label] = (ds / np.maximum(ref, 1e-12))
            rows = []
            for dcm in (2.0, 3.5, 4.5, 5.5, 6.5, 7.0, 7.5, 8.0, 9.0, 10.0, 12.0, 15.0):
                j = int(np.argmin(np.abs(y - dcm * 10)))
                rows.append({"depth_cm": round(float(y[j]) / 10, 3),
                             "ratio_scaled": round(float(res["scaled"][j]), 3),
                             "ratio_unscaled": round(float(res["unscaled"][j]), 3)})
            out["fields"][f"{name}_{side / 10:g}cm"] = rows
            print(name, f"{side / 10:g} cm", " ".join(f"{r['depth_cm']}:{r['ratio_scaled']}"
                                                      f"/{r['ratio_unscaled']}" for r in rows),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
