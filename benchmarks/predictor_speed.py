"""Predict time of a predictor on a few training patients (median of 3 after a warm-up).

    .venv/bin/python benchmarks/predictor_speed.py --model predictor/weights/cascade.pt --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "openkbp"


def main() -> None:
    import torch
    from atp.predictor.cnn import CNNPredictor

    from atp.io.openkbp import load_openkbp_npz

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patients", nargs="+", default=["pt_2", "pt_3", "pt_10", "pt_100",
                                                      "pt_160"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pred = CNNPredictor.from_checkpoint(args.model)
    per = []
    for name in args.patients:
        p = load_openkbp_npz(DATA / "train" / f"{name}.npz")
        pred.predict(p)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            pred.predict(p)
            ts.append(time.perf_counter() - t)
        per.append(statistics.median(ts))
        print(f"{name}: {per[-1]:.2f} s")
    print(f"median over {len(per)} patients: {statistics.median(per):.2f} s "
          f"({args.threads} torch threads)")


if __name__ == "__main__":
    main()
