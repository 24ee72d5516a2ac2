"""Training data for the correction network: one npz per patient, two slider settings.

    python -m training.fastpath.gen_correction_data --data ../shared/data/openkbp \\
        --split train --out DIR [--limit N] [--arc-spacing 4] [--predictor resunet]

Per patient, exactly as ``atp plan --fast`` prepares it (goal list resolved with the
predicted dose, control structures, one full arc of ``--arc-spacing`` deg, dose grid / 3,
the shipped Bev2Fluence initial fluence when its weights exist, else the exact fallback):
for the zero slider setting and for one random OAR slider (seeded per patient, factor in
[0.05, 0.4]), the correction network's inputs at the initial fluence
(:func:`~atp.optimizer.fastpath.correction_net.correction_features`) and, as the target, the
exact fallback's corrected fluence (``FastPath.run`` with K unrolled steps) in units of
the initial fluence's mean. Both settings are stacked along the control-point axis (so a
patient is never split between training and validation). Same file layout as
:mod:`training.fastpath.gen_data` plus ``kind = 'correction'``; resumable, atomic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from atp.dose.arc import ARC_THRESHOLD, arc_influence
from atp.dose.geometry import arc_control_points
from atp.goals import resolve_goals, with_control_structures
from atp.io import load_patient
from atp.plans import StageTimer, patient_and_goal_list


def generate_one(path: Path, args, predictor) -> tuple[dict, dict]:
    # torch (heavy, optional): the fast path's modules are imported when a patient is made
    from atp.optimizer.fastpath.bev2fluence import default_weights_path, make_initial_fluence_fn
    from atp.optimizer.fastpath.chain import FastPath
    from atp.optimizer.fastpath.correction_net import CORRECTION, correction_record

    t0 = time.perf_counter()
    patient = load_patient(path)
    pred = np.asarray(predictor.predict(patient), np.float32)
    patient, gl = patient_and_goal_list(patient, "hn", None, None, StageTimer(False, total=1))
    resolved = resolve_goals(gl, patient, pred)
    patient_c = with_control_structures(patient, resolved)
    cps = arc_control_points(180.0, 180.0, args.arc_spacing)
    dij = arc_influence(patient, cps, dose_grid_factor=args.dose_grid_factor,
                        threshold=ARC_THRESHOLD)
    weights = default_weights_path()
    fn = make_initial_fluence_fn(weights) if weights is not None else None
    fp = FastPath(patient_c, dij, pred, resolved_goals=list(resolved),
                  initial_fluence_fn=fn).prepare()
    digits = "".join(c for c in path.stem if c.isdigit()) or "0"
    rng = np.random.default_rng(int(digits) * 7919 + args.seed)
    organs = [n for n, w in fp.oar_w.items() if float(w.sum()) > 0]
    settings = [{}]
    if organs:
        settings.append({organs[int(rng.integers(len(organs)))]:
                         round(float(rng.uniform(0.05, 0.4)), 3)})
    parts = []
    for sp in settings:
        target = fp.run(sp).fluence_mu
        parts.append(correction_record(fp, fp.w_init, sp, target))
    record = {k: np.concatenate([p[k] for p in parts], axis=0)
              for k in ("inputs", "target_mu", "mask")}
    record.update({"channels": np.array(CORRECTION.channels),
                   "feature_version": np.array(CORRECTION.feature_version),
                   "kind": np.array(CORRECTION.name),
                   "gantry_deg": np.tile(dij.beamlets.gantry_deg, len(settings))})
    meta = {"patient_id": patient.patient_id, "source": str(path), "split": args.split,
            "predictor": args.predictor, "feature_predictor": args.predictor,
            "arc_spacing_deg": args.arc_spacing, "control_points": len(cps),
            "dose_grid_factor": args.dose_grid_factor, "n_beamlets": dij.n_beamlets,
            "settings": settings, "initial_fluence": fp.initial_path,
            "correction_steps": fp.correction_steps,
            "seconds": time.perf_counter() - t0}
    return record, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fastpath.gen_correction_data",
                                 description=__doc__.split("\n")[0])
    from training.fastpath.gen_data import add_common_arguments, common_setup, write_patients

    add_common_arguments(ap, arc_spacing_deg=4.0)
    ap.add_argument("--seed", type=int, default=0, help="slider draws (0)")
    args = ap.parse_args(argv)
    src, out, predictor = common_setup(args)

    def make(path, dest):
        if dest.exists():
            return None
        record, meta = generate_one(path, args, predictor)
        return record, meta, f"settings {meta['settings']}"

    return write_patients(src, out, make)

if __name__ == "__main__":
    raise SystemExit(main())
