"""Fast path: PTV coverage vs the dose-grid target threshold, side by side on the same dij.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fastpath_targets.py \
        [--patients pt_201 pt_203 pt_204] [--fractions 0.5 0.25 0.05]

A dose-grid voxel is a target voxel when more than ``target_min_fraction`` of it lies in
the PTV (``optimizer.fastpath.chain.TARGET_MIN_FRACTION``). Per patient the arc dij and
the prediction are computed once; each threshold then plans on them. Prints criteria met
(bench_optimizer.CRITERIA), PTV_70 D99 / D2 and the Parotid_L mean (Gy, deliverable dose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_optimizer import DATA, criteria_met

    import atp
    from atp import dvh
    from atp.io import load_patient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", nargs="+", default=["pt_201", "pt_203", "pt_204"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.05])
    args = ap.parse_args(argv)
    print("| patient | target_min_fraction | criteria met | PTV_70 D99 Gy | PTV_70 D2 Gy | "
          "Parotid_L mean Gy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pid in args.patients:
        patient = load_patient(DATA / "validation" / f"{pid}.npz")
        first = atp.plan(patient, fast=True, progress=False)
        ptv = patient.mask("PTV_70")
        for frac in args.fractions:
            plan = atp.plan(patient, fast=True, progress=False, dij=first.dij,
                            predicted_dose=first.predicted_dose_gy,
                            fast_options={"fastpath_options": {"target_min_fraction": frac}})
            met = criteria_met(patient, plan.dose_gy)
            par = (f"{float(plan.dose_gy[patient.mask('Parotid_L')].mean()):.1f}"
                   if "Parotid_L" in patient.structures else "-")
            print(f"| {pid} | {frac} | {sum(met.values())}/{len(met)} | "
                  f"{dvh.dose_at_volume_pct(plan.dose_gy, ptv, 99):.1f} | "
                  f"{dvh.dose_at_volume_pct(plan.dose_gy, ptv, 2):.1f} | {par} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
