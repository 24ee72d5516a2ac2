"""Where a TG-119 C-shape plan gains or loses its goals: the optimised fluence's dose on
the dose grid (what the optimiser sees), the same fluence on the CT grid, and the
deliverable dose, for an ``atp plan`` folder of the ``atp phantom tg119`` case.

    python benchmarks/tg119_stages.py CASE_DIR PLAN_DIR

CASE_DIR: the folder ``atp phantom tg119 --out`` wrote; PLAN_DIR: ``atp plan CASE_DIR
--site tg119_easy --out PLAN_DIR`` (it holds dij.npz, fluence.npz, ideal_dose.npy,
dose.npy). Dose-grid masks are the dose-grid voxels whose centre lies in the structure
(the analytic shapes of :data:`atp.phantom.TG119_GEOMETRY_MM`). Results:
docs/experiments/plan-quality.md, "TG-119 C-shape".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from atp.dose.influence import DoseInfluence
from atp.io.loader import load_patient
from atp.phantom import TG119_GEOMETRY_MM


def _masks_on(grid):
    g, eps = TG119_GEOMETRY_MM, 1e-6
    p = grid.voxel_centres_mm().reshape(*grid.shape, 3)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = np.hypot(x, y)
    target = ((r >= g["target_inner"] - eps) & (r <= g["target_outer"] + eps)
              & (y <= g["target_y_max"] + eps) & (np.abs(z) <= g["target_length"] / 2 + eps))
    core = (r <= g["core_radius"] + eps) & (np.abs(z) <= g["core_length"] / 2 + eps)
    return target, core


def _line(what: str, dose, target, core) -> str:
    return (f"{what:34s} D95 {np.percentile(dose[target], 5):6.2f}  "
            f"D10 {np.percentile(dose[target], 90):6.2f}  "
            f"Core D10 {np.percentile(dose[core], 90):6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("plan")
    a = ap.parse_args()
    plan = Path(a.plan)
    patient = load_patient(a.case)
    t, c = patient.mask("OuterTarget"), patient.mask("Core")
    dij = DoseInfluence.load(plan / "dij.npz")
    fluence = np.load(plan / "fluence.npz")["fluence"]
    on_dose_grid = np.asarray(dij.dose(fluence)).reshape(dij.dose_grid.shape)
    print(_line("fluence dose, dose grid", on_dose_grid, *_masks_on(dij.dose_grid)))
    print(_line("fluence dose, CT grid", np.load(plan / "ideal_dose.npy"), t, c))
    print(_line("deliverable dose, CT grid", np.load(plan / "dose.npy"), t, c))
    d = json.loads((plan / "plan.json").read_text())
    dl = d.get("delivery") or {}
    print(f"MU/fx {dl.get('mu_per_fraction')}, MU/cGy {dl.get('mu_per_cgy')}, beam-on "
          f"{dl.get('delivery_time_s_per_fraction')} s/fx; atp plan "
          f"{d['timings_s'].get('total', 0):.0f} s")


if __name__ == "__main__":
    main()
