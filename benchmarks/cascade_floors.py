"""Floors of the issue-23 cascade encodings: the reference dose itself passed through them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cascade_floors.py \
        [--data ../shared/data/openkbp] [--patients 1 5 9 14 22 31 40 58 77 96]

Scores (OpenKBP dose and DVH score, Gy; train-split patients) of (a) the reference dose
block-averaged on the Stage-1 grid and interpolated back (what a perfect Stage 1 hands
Stage 2) and (b) the same with the exact reference dose inside the Stage-2 window (what a
perfect Stage 2 would reach).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from atp.predictor.base import finalize_dose, reference_dose_gy
    from atp.predictor.encoding import decode, make_transform
    from atp.predictor.scoring import cohort_scores, score_patient
    from atp.predictor.train import coarse_reference_gy, make_config

    from atp.io.openkbp import load_openkbp_npz

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--patients", nargs="+", type=int,
                    default=[1, 5, 9, 14, 22, 31, 40, 58, 77, 96])
    args = ap.parse_args(argv)
    cfg = make_config(None, "okbp_stage2")
    coarse, window = [], []
    for pid in args.patients:
        p = load_openkbp_npz(Path(args.data) / "train" / f"pt_{pid}.npz")
        ref = reference_dose_gy(p)
        c = coarse_reference_gy(p, cfg.coarse_encoding)
        t = make_transform(p, cfg.encoding)
        inside = np.isfinite(decode(np.zeros(cfg.encoding.size, np.float32), t, fill=np.nan))
        coarse.append(score_patient(c, ref, p))
        window.append(score_patient(finalize_dose(np.where(inside, ref, c), p), ref, p))
    for name, per in (("Stage-1 grid", coarse), ("exact in the Stage-2 window", window)):
        s = cohort_scores(per)
        print(f"{name}: dose score {s['dose_score_gy']:.3f} Gy, DVH score "
              f"{s['dvh_score_gy']:.3f} Gy ({s['n_patients']} train patients)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
