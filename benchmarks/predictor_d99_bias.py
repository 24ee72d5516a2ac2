"""PTV D99 bias of predictors (issue 23: within +-1.5 Gy): mean signed error of each
target's D99 (1st percentile of its dose, OpenKBP's definition) against the reference plan.

    .venv/bin/python benchmarks/predictor_d99_bias.py --held-out-of training/runs/okbp_stage1g \
        --models predictor/weights/cascade.pt predictor/weights/resunet.pt

``--held-out-of RUN``: the training patients a recipe run held out for selection (its
run.json), so that the validation split stays for the scores reported once per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "openkbp"


def main() -> None:
    import torch
    from atp.predictor.base import reference_dose_gy
    from atp.predictor.cnn import CNNPredictor

    from atp.io.openkbp import load_openkbp_npz

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out-of", required=True, help="a recipe run folder (run.json)")
    ap.add_argument("--models", nargs="+", required=True, help="checkpoints (.pt)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = json.loads((Path(args.held_out_of) / "run.json").read_text())
    files = [Path(args.data) / "train" / f["file"] for f in run["selection_files"]]
    preds = {Path(m).stem: CNNPredictor.from_checkpoint(m) for m in args.models}
    errs: dict = {k: {} for k in preds}
    for f in files:
        p = load_openkbp_npz(f)
        ref = reference_dose_gy(p)
        for k, pr in preds.items():
            d = pr.predict(p)
            for rx in p.prescriptions:
                m = p.mask(rx.target)
                errs[k].setdefault(rx.target, []).append(
                    float(np.percentile(d[m], 1) - np.percentile(ref[m], 1)))
    print(f"{len(files)} held-out training patients of {args.held_out_of}")
    print("| predictor | mean D99 error, all PTVs (Gy) | mean abs | PTV_70 | PTV_63 | PTV_56 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, per in errs.items():
        allv = [e for v in per.values() for e in v]
        cols = [f"{np.mean(per[t]):+.2f}" if t in per else "" for t in
                ("PTV_70", "PTV_63", "PTV_56")]
        print(f"| {k} | {np.mean(allv):+.2f} (n = {len(allv)}) | {np.mean(np.abs(allv)):.2f} | "
              + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
