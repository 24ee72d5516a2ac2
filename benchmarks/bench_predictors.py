"""OpenKBP dose / DVH scores and CPU inference time of every predictor on the validation split.

    nice -n 10 .venv/bin/python benchmarks/bench_predictors.py \
        --data ../shared/data/openkbp [--models baseline mean-dose cadunet] [--limit N]
        [--held-out-of runs/okbp_stage1]   # that run's held-out training patients instead

All predictors are run side by side on the same patients in one process; the scores
use the OpenKBP definitions (predictor.scoring) against the reference plan dose on the
patient grid. Inference time is the wall time of ``predict(patient)`` (patient already
loaded), median over patients. Prints a Markdown table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from atp.predictor import registry
    from atp.predictor.data import split_files
    from atp.predictor.scoring import cohort_scores, score_patient

    from atp.io.openkbp import load_openkbp_npz

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--split", default="validation", choices=["validation", "train"])
    ap.add_argument("--models", nargs="+", default=None,
                    help="registered names or .pt checkpoints (default: all registered)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--held-out-of", help="a recipe run folder: score its held-out training "
                                          "patients (run.json selection_files)")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    names = args.models or registry.available()
    preds = {}
    for n in names:
        if n.endswith(".pt"):
            from atp.predictor.cnn import CNNPredictor

            key = Path(n).stem
            if key in preds:  # a second checkpoint of that name: its folder tells them apart
                key = f"{Path(n).parent.name}/{key}"
            if key in preds:
                ap.error(f"--models: two checkpoints named '{key}'")
            preds[key] = CNNPredictor.from_checkpoint(n, name=key)
        else:
            preds[n] = registry.get(n)
    files = split_files(args.data, args.split)
    if args.held_out_of:
        import json

        held = {f["file"] for f in json.loads(
            (Path(args.held_out_of) / "run.json").read_text())["selection_files"]}
        files = [f for f in split_files(args.data, "train") if f.name in held]
        args.split = f"held-out train ({args.held_out_of})"
    files = files[:args.limit] if args.limit else files
    per = {n: [] for n in preds}
    times = {n: [] for n in preds}
    for f in files:
        p = load_openkbp_npz(f)
        ref = p.metadata["reference_dose_gy"]
        for n, pr in preds.items():
            t0 = time.perf_counter()
            d = pr.predict(p)
            times[n].append(time.perf_counter() - t0)
            per[n].append(score_patient(d, ref, p))
        print(f"{f.stem}: " + ", ".join(f"{n} {per[n][-1]['dose_score_gy']:.2f}"
                                          for n in preds), file=sys.stderr, flush=True)
    rows = {}
    for n in preds:
        c = cohort_scores(per[n])
        c["median_predict_s"] = float(np.median(times[n]))
        rows[n] = c
    print(f"\n{args.split} split, {len(files)} patients; machine: {platform.machine()}, "
          f"{platform.processor() or 'cpu'}, torch threads {args.threads}\n")
    print("| predictor | dose score (Gy) | DVH score (Gy) | CPU predict time / patient (s) |")
    print("|---|---|---|---|")
    for n, c in sorted(rows.items(), key=lambda kv: kv[1]["dose_score_gy"]):
        print(f"| {n} | {c['dose_score_gy']:.3f} | {c['dvh_score_gy']:.3f} | "
              f"{c['median_predict_s']:.2f} |")
    if args.json:
        from atp.outputs import write_json

        write_json(args.json, {"split": args.split, "n_patients": len(files), "results": rows,
                               "per_patient": {n: [{k: v for k, v in r.items()
                                                    if k != "dvh_differences_gy"}
                                                   for r in per[n]] for n in per}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
