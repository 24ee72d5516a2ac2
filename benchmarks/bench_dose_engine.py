"""Benchmark of the pencil-beam dose engine (numbers for BENCHMARKS.md).

    nice -n 10 .venv/bin/python benchmarks/bench_dose_engine.py [--patient PATH] [--quick]

Cases, each in a fresh subprocess so that its peak RSS is its own:

* ``imrt-f2``: 9 equispaced beams, dose grid = CT down-sampled x2 (OpenKBP: 7.8 x 7.8 x
  5 mm), default threshold 1e-4;
* ``imrt-f1``: the same on the CT grid;
* ``arc``: a full 180-control-point arc (2 deg) at the arc defaults (dose grid x3,
  threshold 3e-4);
* ``threshold``: integral and maximum dose lost by the threshold (9 beams, x2 grid,
  uniform weights) against a near-lossless reference (threshold 1e-6, 100 mm cutoff);

plus the commissioning numbers (``atp commission``). Times: wall clock and process CPU
time of ``engine.influence`` (patient loading excluded), best of ``--repeat`` runs.
Prints one JSON object per case and a Markdown summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATIENT = REPO.parent / "shared" / "data" / "openkbp" / "train" / "pt_1.npz"


def _matrix_mb(m) -> float:
    return round((m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 2**20, 1)


def run_case(case: str, patient_path: str, repeat: int) -> dict:
    import numpy as np

    from atp.dose.arc import arc_influence
    from atp.dose.geometry import arc_control_points, equispaced_beams
    from atp.dose.pencil_beam import PencilBeamEngine
    from atp.io import load_patient

    patient = load_patient(patient_path)
    out = {"case": case, "patient": patient.patient_id}
    best = None
    if case in ("imrt-f2", "imrt-f1"):
        factor = 2 if case == "imrt-f2" else 1
        dij = None
        for _ in range(repeat):
            dij = None  # free the previous result so peak RSS is one run's
            t, c = time.perf_counter(), time.process_time()
            dij = PencilBeamEngine().influence(patient, equispaced_beams(9),
                                               dose_grid_factor=factor)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if best is None or wall < best[0]:
                best = (wall, cpu)
        out.update(beams=9, dose_grid_factor=factor)
    elif case == "arc":
        cps = arc_control_points(180.0, 180.0, 2.0)
        t, c = time.perf_counter(), time.process_time()
        dij = arc_influence(patient, cps)
        best = (time.perf_counter() - t, time.process_time() - c)
        out.update(control_points=len(cps), dose_grid_factor=dij.meta["dose_grid_factor"],
                   threshold=dij.meta["threshold"])
    elif case == "threshold":
        beams = equispaced_beams(9)
        ref = PencilBeamEngine(lateral_cutoff_mm=100.0).influence(patient, beams,
                                                                  threshold=1e-6)
        rows = []
        dref = ref.dose(np.ones(ref.n_beamlets))
        for thr in (1e-4, 3e-4, 1e-3):
            d = PencilBeamEngine().influence(patient, beams, threshold=thr)
            dd = d.dose(np.ones(d.n_beamlets))
            rows.append({"threshold": thr, "nnz": int(d.matrix.nnz),
                         "integral_dose_lost_percent":
                             round(100 * float(dref.sum() - dd.sum()) / float(dref.sum()), 2),
                         "max_abs_diff_percent_of_max":
                             round(100 * float(np.abs(dref - dd).max() / dref.max()), 2)})
        out.update(reference_nnz=int(ref.matrix.nnz), rows=rows)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return out
    out.update(wall_s=round(best[0], 2), cpu_s=round(best[1], 2), beamlets=dij.n_beamlets,
               nnz=int(dij.matrix.nnz), matrix_mb=_matrix_mb(dij.matrix),
               far_nnz=0 if dij.far is None else dij.far.nnz,
               far_mb=0 if dij.far is None else round(dij.far.nbytes / 2**20, 1),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patient", default=str(DEFAULT_PATIENT))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the CT-grid and arc cases")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.patient, args.repeat)))
        return
    cases = ["imrt-f2", "threshold"] if args.quick else ["imrt-f2", "imrt-f1", "arc",
                                                         "threshold"]
    results = []
    env = dict(os.environ)
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--patient", args.patient,
               "--repeat", str(args.repeat if case.startswith("imrt") else 1)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(res))
        results.append(res)
    from atp.dose.commission import commission

    com = commission()
    com.pop("sources")
    print(json.dumps(com))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"no GPU used")
    print("| case | beamlets | nnz | matrix MB | wall s | CPU s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "wall_s" in r:
            print(f"| {r['case']} | {r['beamlets']} | {r['nnz']} | {r['matrix_mb']} | "
                  f"{r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']} |")
    for r in results:
        if r["case"] == "threshold":
            print("\n| threshold | nnz | integral dose lost % | max diff % of max |")
            print("| --- | --- | --- | --- |")
            print(f"| 1e-6 (reference, 100 mm cutoff) | {r['reference_nnz']} | 0 | 0 |")
            for row in r["rows"]:
                print(f"| {row['threshold']} | {row['nnz']} | "
                      f"{row['integral_dose_lost_percent']} | "
                      f"{row['max_abs_diff_percent_of_max']} |")


if __name__ == "__main__":
    main()
