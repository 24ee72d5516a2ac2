"""The same fluence, sequenced by this tree's sliding-window sequencer: run

  python benchmarks/resequence_fluence.py SPLIT PLAN_DIR [PLAN_DIR ...]

Each PLAN_DIR is an `atp plan` output of an OpenKBP patient (its ``fluence.npz`` and
``dij.npz``; the patient ``pt_N`` is the folder's name, read from
``../shared/data/openkbp/SPLIT/pt_N.npz``). The plan's final fluence is sequenced again
(`imrt-sliding`, Millennium 120, 35 fractions) and its deliverable dose computed on the
planning dij with the machine's transmission (not the jaw-field dose of the plan itself,
so the figures compare sequencers, not plans). One JSON line per plan: MU per fraction,
delivered / planned fluence, body maximum, PTV D99, cord / brainstem / mandible D0.1cc and
the other organs' means (Gy). Run it from two trees (e.g. a `git worktree` of the older
commit, with that tree on ``PYTHONPATH``) to compare sequencers on the same fluence.
Figures: BENCHMARKS.md, "Sequencing and delivery".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from atp.sequencer import delivered_weights, fluence_set, load_machine
from atp.sequencer.imrt import sequence_sliding_window

from atp.dose.influence import DoseInfluence

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "openkbp"
NEAR_MAX = ("SpinalCord", "Brainstem", "Mandible")


def metrics(split: str, plan_dir: Path) -> dict:
    dij = DoseInfluence.load(plan_dir / "dij.npz")
    w = np.load(plan_dir / "fluence.npz")["fluence"].astype(np.float64)
    m = load_machine("millennium120")
    delivery = sequence_sliding_window(fluence_set(w, dij.beamlets, m.leaf_edges_mm,
                                                   fractions=35), m)
    wd = delivered_weights(delivery, dij.beamlets)
    dose = dij.to_patient_grid(dij.dose(wd.astype(np.float32)))
    z = np.load(DATA / split / f"{plan_dir.name}.npz")
    rois, masks = list(z["rois"]), z["masks"]
    k = max(1, round(0.1 / (float(np.prod(z["voxel_mm"])) / 1000.0)))  # 0.1 cc
    out = {"mu_per_fraction": round(delivery.total_mu / 35, 1),
           "delivered_over_planned": round(float(wd.sum() / w.sum()), 4),
           "body_max": round(float(dose.max()), 2)}
    for name in rois:
        mask = ((masks >> rois.index(name)) & 1) > 0
        if not mask.any():
            continue
        x = dose[mask]
        if name.startswith("PTV"):
            out[f"{name} D99"] = round(float(np.percentile(x, 1)), 2)
        elif name in NEAR_MAX:
            out[f"{name} D0.1cc"] = round(float(np.sort(x)[::-1][k - 1]), 2)
        else:
            out[f"{name} mean"] = round(float(x.mean()), 2)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    split = argv[0]
    for d in argv[1:]:
        print(Path(d).name, json.dumps(metrics(split, Path(d))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
