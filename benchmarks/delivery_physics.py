"""Delivery-physics benchmarks of issue 20 (items 3-5): run one of

  plan PATIENT.npz OUT_DIR SMOOTHNESS   `atp plan` defaults except the fluence-smoothness
                                        weight (optimizer.problem.ProblemOptions
                                        .smoothness_weight_rel, default 0.02): how far
                                        MU/cGy fall when modulation costs more (train only)
  roundtrip PLAN_DIR PATIENT.npz OUT    the plan's final delivery (its saved fluence
                                        sequenced again: deterministic) exported as an RT
                                        Plan and recomputed by `atp dose`; the difference
                                        from the plan's dose.npy in % of its maximum
  jaws PLAN_DIR PATIENT.npz             organ means of the plan's delivery without
                                        leakage, with leakage (jaws static) and with jaw
                                        tracking, on the jaw-field dij (atp.forward)

Commands and figures: BENCHMARKS.md, "Delivery physics".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def plan(patient, out, smoothness):
    import atp.optimizer.problem as op

    @dataclass(frozen=True)
    class Opts(op.ProblemOptions):
        smoothness_weight_rel: float = float(smoothness)

    op.ProblemOptions = Opts
    from atp.cli import main

    return main(["plan", patient, "--out", out, "--quiet", "--no-report", "--json"])


def _delivery(p, patient):
    from atp import sequencer

    if p.delivery is not None:
        return p.delivery
    return sequencer.sequence(p.fluence, p.dij, None, machine=p.settings["machine"],
                              fractions=patient.fractions)


def roundtrip(plan_dir, patient_path, out):
    from atp.io import load_patient
    from atp.io.dicom_export import export_plan_set
    from atp.pipeline import load_plan

    out = Path(out)
    patient = load_patient(patient_path)
    p = load_plan(plan_dir, patient)
    written = export_plan_set(out / "dicom", p.patient, p.dose_gy, _delivery(p, patient))
    t = time.time()
    with open(out / "fwd.json", "w") as fh:
        rc = subprocess.call([sys.executable, "-m", "atp.cli", "dose", written["RTPLAN"],
                              "--patient", patient_path, "--out", str(out / "fwd"),
                              "--json"], stdout=fh)
    fwd = np.load(out / "fwd" / "dose.npy")
    ref = np.load(Path(plan_dir) / "dose.npy")
    d = np.abs(fwd - ref)
    print(json.dumps({"rc": rc, "seconds": round(time.time() - t, 1),
                      "max_gy": float(ref.max()),
                      "max_abs_diff_pct_of_max": round(100 * float(d.max() / ref.max()), 4)}))
    return rc


def jaws(plan_dir, patient_path):
    from atp.sequencer.apertures import track_jaws
    from atp.sequencer.deliverable import deliverable_dose

    from atp.dose.aperture import Transmission
    from atp.dose.geometry import Beam
    from atp.forward import field_influence
    from atp.io import load_patient
    from atp.pipeline import load_plan

    pat = load_patient(patient_path)
    p = load_plan(plan_dir, pat)
    d = _delivery(p, pat)
    b = p.dij.beamlets
    beams = [Beam(float(g), float(c), float(t), tuple(i)) for g, c, t, i in
             zip(b.gantry_deg, b.collimator_deg, b.couch_deg, b.isocenter_mm)]
    f = field_influence(pat, d, beams, dose_grid_factor=int(p.dij.meta["dose_grid_factor"]),
                        threshold=p.dij.meta.get("threshold"))
    doses = {"no leakage": deliverable_dose(d, f, transmission=Transmission()),
             "leakage, jaws static": deliverable_dose(d, f),
             "leakage, jaw tracking": deliverable_dose(track_jaws(d), f)}
    out = {"mu_per_fraction": round(d.total_mu / d.fractions, 1)}
    for k, v in doses.items():
        g = f.to_patient_grid(v)
        out[k] = {n: round(float(g[pat.mask(n)].mean()), 2) for n in pat.organs}
        out[k]["max"] = round(float(g.max()), 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    sys.exit({"plan": plan, "roundtrip": roundtrip, "jaws": jaws}[cmd](*rest))
