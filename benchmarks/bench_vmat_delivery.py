"""How well each VMAT sequencing delivers the same fast-path fluence, side by side.

For one OpenKBP patient (arc dij and prediction cached as in ``tune_fastpath.py``): the
fast path's corrected fluence (defaults, exact fallbacks), then each delivery of it:
rule-based ``vmat`` with 1 / 2 / 4 / 6 arcs (MU re-fitted to the ideal dose) and
``vmat-sliding`` with 8 / 12 / 20 deg sectors (2 arcs, MU re-fitted). Printed per
delivery: mean |deliverable - ideal| over voxels above 20 % of the ideal maximum
(relative to their mean), PTV_70 D99 / D2 on the CT grid (Gy), the beam-on time per
fraction (``Delivery.delivery_time_s``) and the sequencing time.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_vmat_delivery.py pt_190
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import DATA
from tune_fastpath import cached_inputs

DELIVERIES = ([("vmat", {"passes": p}) for p in (1, 2, 4, 6)]
              + [("vmat-sliding", {"sector_deg": s}) for s in (8.0, 12.0, 20.0)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patient")
    ap.add_argument("--split", default="train")
    ap.add_argument("--cache", default="/tmp/atp_tune_arc")
    args = ap.parse_args(argv)

    from atp.optimizer.fastpath.chain import FastPath

    from atp import dvh, sequencer
    from atp.io import load_patient

    patient = load_patient(DATA / args.split / f"{args.patient}.npz")
    dij, pred = cached_inputs(patient, args.patient, Path(args.cache), None, 4.0)
    w = FastPath(patient, dij, pred).prepare().run({}).fluence_mu
    ideal = np.asarray(dij.dose(w)).reshape(-1)
    high = ideal > 0.2 * ideal.max()
    ptv = patient.mask("PTV_70")

    def row(name, grid_dose, extra):
        x = np.asarray(grid_dose).reshape(-1)
        dose = dij.to_patient_grid(x.reshape(dij.dose_grid.shape))
        err = np.abs(x - ideal)[high].mean() / ideal[high].mean()
        print(f"| {name} | {100 * err:.1f} % | {dvh.dose_at_volume_pct(dose, ptv, 99):.1f} | "
              f"{dvh.dose_at_volume_pct(dose, ptv, 2):.1f} | {extra} |", flush=True)

    print("| delivery | error | PTV_70 D99 Gy | D2 Gy | beam-on s / sequencing s |")
    print("| --- | --- | --- | --- | --- |")
    row("ideal", ideal, "--")
    for technique, params in DELIVERIES:
        t0 = time.perf_counter()
        d = sequencer.sequence(w, dij, technique, fractions=patient.fractions, **params)
        secs = time.perf_counter() - t0
        assert not sequencer.check_delivery(d), sequencer.check_delivery(d)[:2]
        row(f"{technique} {params}", sequencer.deliverable_dose(d, dij),
            f"{d.delivery_time_s():.0f} / {secs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
