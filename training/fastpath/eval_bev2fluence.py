"""Dose-domain check of Bev2Fluence weights against the exact fallback initial fluence.

    python -m training.fastpath.eval_bev2fluence --weights W.pt --data ../shared/data/openkbp \\
        [--split validation] [--limit 2] [--arc-spacing 6] [--dose-grid-factor 3]

Per patient (predictor "baseline", one full arc): the fast path's dose-mimicking objective
``1/2 sum v (A w - D_pred)^2 / sum v`` (Gy^2) and the time of the initial fluence made by
(a) the network + least-squares scale, (a') the same + ``--network-steps`` FISTA steps,
(b) back-projection only (0 steps), (c) the fallback (back-projection + ``--init-steps``
projected-gradient steps); and the hot/cold objective after the fast path's correction
steps from each but (b). Prints one JSON
line per patient and the means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def mimic_objective(fp, w: torch.Tensor) -> float:
    """1/2 sum v (A w - D_pred)^2 / sum v on the dose grid (Gy^2)."""
    v = fp.mimic_w
    return float(0.5 * (v * (fp.op(w) - fp.pred) ** 2).sum() / v.sum().clamp_min(1.0))


def evaluate_patient(path: Path, fns, args, predictor) -> dict:
    from atp.optimizer.fastpath.chain import FastPath

    from atp.dose.arc import arc_influence
    from atp.dose.geometry import arc_control_points
    from atp.io import load_patient

    patient = load_patient(path)
    pred = predictor.predict(patient)
    dij = arc_influence(patient, arc_control_points(180.0, 180.0, args.arc_spacing),
                        dose_grid_factor=args.dose_grid_factor)
    row = {"patient": patient.patient_id, "n_beamlets": dij.n_beamlets}
    runs = [("network", {"initial_fluence_fn": fns[0]})]
    if args.network_steps:
        runs.append((f"network+{args.network_steps}", {"initial_fluence_fn": fns[1]}))
    runs += [("backprojection", {"init_steps": 0}),
             ("fallback", {"init_steps": args.init_steps})]
    for name, kw in runs:
        fp = FastPath(patient, dij, pred, **kw).prepare()
        row[f"{name}_mimic_gy2"] = mimic_objective(fp, fp.w_init)
        row[f"{name}_seconds"] = fp.timings_s["initial_fluence"]
        if name != "backprojection":
            row[f"{name}_corrected_objective"] = fp.run().objective
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fastpath.eval_bev2fluence",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True, help="OpenKBP root")
    ap.add_argument("--split", default="validation", choices=("train", "validation"))
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--arc-spacing", type=float, default=6.0)
    ap.add_argument("--dose-grid-factor", type=int, default=3)
    ap.add_argument("--init-steps", type=int, default=60, help="fallback steps (60)")
    ap.add_argument("--network-steps", type=int, default=10,
                    help="also rate the network + this many FISTA steps (10; 0 = skip)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from atp.optimizer.fastpath.bev2fluence import make_initial_fluence_fn
    from atp.predictor import registry as predictors

    from training.fastpath.gen_data import _patient_key

    torch.set_num_threads(args.threads)
    fns = (make_initial_fluence_fn(args.weights),
           make_initial_fluence_fn(args.weights, refine_steps=args.network_steps))
    predictor = predictors.get("baseline")
    paths = sorted(Path(args.data, args.split).glob("*.npz"), key=_patient_key)[:args.limit]
    rows = []
    for p in paths:
        t0 = time.perf_counter()
        rows.append(evaluate_patient(p, fns, args, predictor))
        rows[-1]["total_seconds"] = time.perf_counter() - t0
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        keys = [k for k in rows[0] if k not in ("patient", "n_beamlets")]
        print(json.dumps({"mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
                          "patients": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
