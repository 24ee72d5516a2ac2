"""Fit the 6 MV pencil-beam kernel parameters to the reference water data.

    .venv/bin/python benchmarks/fit_beam_model.py [--write]

Least squares (scipy) on: PDD of the 10 x 10 cm2 SSD 100 cm field at the reference
depths (% points), the depth of maximum dose (weighted, cm -> % units x 10) and the
80-20 % penumbra at 10 cm depth (mm x 2). Bounds keep every parameter physical.
``--write`` stores the fitted parameters and residuals in atp/data/photon_6mv.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from atp.dose.beam_model import DEFAULT_MODEL, PhotonBeamModel
from atp.dose.commission import pdd_percent, penumbra_80_20_mm

NAMES = ["buildup_per_mm", "attenuation_per_mm", "a1", "b1", "a2", "b2", "w0", "w1", "gamma"]
LO = [0.05, 0.0035, 0.5, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0]
HI = [3.0, 0.008, 5.0, 0.05, 30.0, 0.1, 0.6, 0.01, 0.02]


def make(base: PhotonBeamModel, x) -> PhotonBeamModel:
    return base.with_parameters(buildup_per_mm=x[0], attenuation_per_mm=x[1],
                                sigma_primary_mm=(x[2], x[3]), sigma_scatter_mm=(x[4], x[5]),
                                scatter_weight=(x[6], x[7]), depth_linear_per_mm=x[8])


def residuals(x, base):
    m = make(base, x)
    ref = base.reference
    depths = np.array(ref["pdd_depth_cm"]) * 10.0
    r = list(pdd_percent(m, depths) - np.array(ref["pdd_percent"]))
    r.append(10.0 * (m.dmax_mm / 10.0 - ref["dmax_cm"]))
    r.append(2.0 * (penumbra_80_20_mm(m) - ref["penumbra_80_20_mm_at_10cm"]))
    return np.array(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    base = PhotonBeamModel.load()
    x0 = [base.buildup_per_mm, base.attenuation_per_mm, *base.sigma_primary_mm,
          *base.sigma_scatter_mm, *base.scatter_weight, base.depth_linear_per_mm]
    x0 = np.clip(x0, LO, HI)
    fit = least_squares(residuals, x0, bounds=(LO, HI), args=(base,), diff_step=1e-3)
    m = make(base, fit.x)
    res = residuals(fit.x, base)
    print(dict(zip(NAMES, np.round(fit.x, 6))))
    print("residuals (PDD %, 10*dmax cm, 2*penumbra mm):", np.round(res, 3))
    print("dmax", m.dmax_mm, "penumbra", penumbra_80_20_mm(m))
    if args.write:
        data = json.loads(Path(DEFAULT_MODEL).read_text())
        data["parameters"] = {
            "buildup_per_mm": round(float(fit.x[0]), 6),
            "attenuation_per_mm": round(float(fit.x[1]), 6),
            "sigma_primary_mm": [round(float(fit.x[2]), 5), round(float(fit.x[3]), 6)],
            "sigma_scatter_mm": [round(float(fit.x[4]), 5), round(float(fit.x[5]), 6)],
            "scatter_weight": [round(float(fit.x[6]), 6), round(float(fit.x[7]), 7)],
            "depth_linear_per_mm": round(float(fit.x[8]), 7),
        }
        npdd = len(base.reference["pdd_depth_cm"])
        data["fit"] = {"script": "benchmarks/fit_beam_model.py --write",
                       "rms_pdd_percent": round(float(np.sqrt(np.mean(res[:npdd] ** 2))), 3),
                       "max_abs_pdd_percent": round(float(np.max(np.abs(res[:npdd]))), 3)}
        Path(DEFAULT_MODEL).write_text(json.dumps(data, indent=2) + "\n")
        print("written", DEFAULT_MODEL)


if __name__ == "__main__":
    main()
