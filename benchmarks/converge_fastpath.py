"""Fast-path objective at convergence: J and the ideal dose's criteria after K exact steps.

For each OpenKBP *training* patient (tune on training patients only): the fast path's
arc dij and prediction (cached as by ``tune_fastpath.py``), a ``FastPath`` with the given
options prepared with the exact fallback initial fluence, then the exact correction
(FISTA, the fast path's diagonal step and smoothness) continued to each step count of
``--steps``. Prints J (the correction objective), the smoothness term's part of the
total (mu R), the standard H&N criteria met by the ideal (unsequenced) dose, PTV_70 D99 /
D2 / HI, the mean parotid dose and each criterion's value -- whether the plan is held
back by the number of steps or by the objective's optimum.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/converge_fastpath.py \
        --patients pt_190 pt_192 --steps 30 300 2000 --options '{"smoothness": 0.1}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import DATA
from tune_fastpath import cached_inputs, summary
from tune_plan_quality import criteria_values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train")
    ap.add_argument("--patients", nargs="+", default=["pt_190", "pt_192"])
    ap.add_argument("--steps", nargs="+", type=int, default=[30, 300, 2000])
    ap.add_argument("--options", default="{}", help="JSON FastPath options")
    ap.add_argument("--cache", default="/tmp/atp_tune_arc")
    args = ap.parse_args(argv)
    if args.split != "train":
        print("warning: tune on training patients only", file=sys.stderr)
    opts = json.loads(args.options)

    from atp.optimizer.fastpath.chain import FastPath
    from atp.optimizer.fastpath.correction import unrolled_correction

    from atp.goals import load_goal_list, resolve_goals, with_control_structures
    from atp.io import load_patient

    for pt in args.patients:
        patient = load_patient(DATA / args.split / f"{pt}.npz")
        dij, pred = cached_inputs(patient, pt, Path(args.cache), None, 4.0, 3)
        resolved = resolve_goals(load_goal_list(site="hn"), patient, pred)
        fp = FastPath(with_control_structures(patient, resolved), dij, pred,
                      resolved_goals=list(resolved), **opts).prepare()
        obj = fp.objective({})
        op, step = fp.operator_for(obj), fp._step_size({})
        w, done = fp.w_init, 0
        for k in sorted(args.steps):
            t0 = time.perf_counter()
            w = unrolled_correction(w, op, obj, k - done, step, regulariser=fp.smooth,
                                    reg_weight=fp.mu)
            done = k
            grid_dose = fp.op(w)
            dose = dij.to_patient_grid(grid_dose.cpu().numpy().reshape(dij.dose_grid.shape))
            s = summary(patient, dose)
            values = {key.split(" [")[1][:-1]: round(v, 1)
                      for key, v in criteria_values(patient, dose).items()}
            print(f"{pt} steps {k}: J {float(obj(grid_dose)):.4g} mu R "
                  f"{float(fp.mu * fp.smooth(w)):.4g} met {s['met']}/{s['n']} PTV_70 D99 "
                  f"{s['ptv70_d99_gy']:.1f} D2 {s['ptv70_d2_gy']:.1f} HI {s['ptv70_hi']:.3f} "
                  f"parotid {s['parotid_mean_gy'] or float('nan'):.1f} Gy "
                  f"({time.perf_counter() - t0:.1f} s); values {values}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
