"""Warm re-plan after a tolerance tweak with 3, 1 or 0 goal-attainment rounds, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_warm_replan.py [--patients pt_202 ...]

Each patient is planned once (default predictor, cpu backend, sequenced); then the same
plan is re-planned warm with ``Parotid_L.Dmean.tolerance = -20`` for each number of
attainment rounds. Prints the re-plan wall time (s), the parotid mean before -> after
(Gy) and the standard head-and-neck criteria met (bench_optimizer.CRITERIA).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "openkbp" / "validation"


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_optimizer import criteria_met

    import atp
    from atp.io import load_patient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", nargs="+", default=["pt_202", "pt_204", "pt_206"])
    ap.add_argument("--rounds", nargs="+", type=int, default=[3, 1, 0])
    args = ap.parse_args(argv)

    def parotid(plan):
        return next(r.achieved for r in plan.results if r.goal.id.startswith("Parotid_L.Dmean"))

    print("| patient | attainment rounds | re-plan s | Parotid_L mean Gy | criteria met |")
    print("| --- | --- | --- | --- | --- |")
    for pid in args.patients:
        patient = load_patient(DATA / f"{pid}.npz")
        plan = atp.plan(patient, site="hn", backend="cpu", progress=False)
        base_opts = dict(plan.settings.get("optimizer_options") or {})
        for rounds in args.rounds:
            plan.settings["optimizer_options"] = dict(base_opts, attain_rounds=rounds,
                                                      hard_rounds=max(rounds, 1))
            t0 = time.perf_counter()
            new = atp.replan(plan, set={"Parotid_L.Dmean.tolerance": -20}, warm=True)
            dt = time.perf_counter() - t0
            met = criteria_met(patient, new.dose_gy)
            print(f"| {pid} | {rounds} | {dt:.2f} | {parotid(plan):.2f} -> {parotid(new):.2f} "
                  f"| {sum(met.values())}/{len(met)} |", flush=True)
        plan.settings["optimizer_options"] = base_opts
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
