"""The engine's sparse dose-influence matrix against the beam model it samples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_vs_model.py [--threshold 1e-4] [--fields 30,100,200]

Square fields (mm) of 5 mm beamlets in a 40 x 30 x 40 cm water box (5 mm voxels), gantry
0: (a) SSD 100 cm: central-axis ``dij @ aperture weights`` divided by the model's dose
(:meth:`PhotonBeamModel.reference_depth_dose`) at 1.5 / 5 / 10 / 20 cm; (b) isocentre at
10 cm depth: the engine's output factor (relative to 10 x 10) beside the model's. The
difference is what the matrix drops: kernel tails below ``threshold`` x the beam's peak
and beyond the 60 mm lateral window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from atp.dose.beam_model import PhotonBeamModel
from atp.dose.commission import output_factor, water_phantom
from atp.dose.geometry import Beam
from atp.dose.pencil_beam import PencilBeamEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from square_field import square_field_cax  # tests/square_field.py


def cax(model, side, threshold, iso_depth_mm):
    p = water_phantom((400.0, 300.0, 400.0), (5.0, 5.0, 5.0), target_half_mm=10.0)
    half = side / 2
    dij = PencilBeamEngine(model=model).influence(
        p, [Beam(0, isocenter_mm=(0.0, iso_depth_mm, 0.0))], dose_grid_factor=1,
        margin_mm=half, beamlet_size_mm=5.0, threshold=threshold)
    y, cax_gy, _ = square_field_cax(dij, half)
    return y, cax_gy


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--fields", default="30,50,100,150,200")
    args = ap.parse_args()
    m = PhotonBeamModel.load()
    sides = [float(s) for s in args.fields.split(",")]
    at_iso = {}
    for side in sides:
        y, c = cax(m, side, args.threshold, 0.0)
        ref = m.gy_per_mu_scale * m.reference_depth_dose(y, side)
        j = [int(np.argmin(np.abs(y - d))) for d in (15.0, 50.0, 100.0, 200.0)]
        print(f"{side / 10:g} cm: engine/model at " + ", ".join(
            f"{y[i] / 10:.2f} cm {c[i] / ref[i]:.4f}" for i in j), flush=True)
        y2, c2 = cax(m, side, args.threshold, 100.0)
        at_iso[side] = float(np.interp(100.0, y2, c2))
    if 100.0 in at_iso:
        for side in sides:
            print(f"{side / 10:g} cm: OF at 10 cm engine {at_iso[side] / at_iso[100.0]:.4f}"
                  f" model {output_factor(m, side):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
