"""Warm re-plan after a tolerance tweak: wall time per re-plan, side by side.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_warm_replan.py \
        --data ../shared/data/openkbp/train --patients pt_10 pt_20 pt_31 --repeat 2

Each patient is planned once with the defaults (``atp.plan(patient, site="hn")``: the
default predictor, sequenced, the final-dose stage); then the plan is re-planned warm
(``atp.replan``, in-process, as a TPS embedding atp or a physicist's session does) with
each ``--set`` in turn, ``--repeat`` times over (every re-plan starts from the same
plan, so repeats measure the same work). Prints the plan's and each re-plan's wall time, its stages
(plan.json ``timings_s``), the changed goal before -> after and the standard
head-and-neck criteria met, then the median over all re-plans. ``--rounds N``: the
goal-attainment rounds of the re-plans (and ``hard_rounds = max(N, 1)``) instead of the
pipeline's defaults, to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "openkbp" / "validation"


def _setting(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    return key, float(value)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_optimizer import criteria_met

    import atp
    from atp.io import load_patient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--patients", nargs="+", default=["pt_202", "pt_204", "pt_206"])
    ap.add_argument("--set", nargs="+", type=_setting, dest="sets",
                    default=[("Parotid_L.Dmean.pred.tolerance", -20.0),
                             ("Parotid_L.Dmean.pred.tolerance", -30.0)])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)

    def achieved(plan, key):
        gid = key.rsplit(".", 1)[0]
        return next((r.achieved for r in plan.results if r.goal.id == gid), float("nan"))

    times = []
    print("| patient | set | re-plan s | stages s | goal Gy before -> after | criteria met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pid in args.patients:
        patient = load_patient(args.data / f"{pid}.npz")
        t0 = time.perf_counter()
        plan = atp.plan(patient, site="hn", progress=False)
        print(f"| {pid} | (the plan) | {time.perf_counter() - t0:.2f} | | | |", flush=True)
        if args.rounds is not None:
            plan.settings["optimizer_options"] = dict(
                plan.settings.get("optimizer_options") or {}, attain_rounds=args.rounds,
                hard_rounds=max(args.rounds, 1))
        for _ in range(args.repeat):
            for key, value in args.sets:
                t0 = time.perf_counter()
                new = atp.replan(plan, set={key: value}, warm=True)
                dt = time.perf_counter() - t0
                times.append(dt)
                met = criteria_met(patient, new.dose_gy)
                stages = ", ".join(f"{k} {v:.2f}" for k, v in new.timings_s.items()
                                   if k != "replan")
                print(f"| {pid} | {key}={value:g} | {dt:.2f} | {stages} | "
                      f"{achieved(plan, key):.2f} -> {achieved(new, key):.2f} "
                      f"| {sum(met.values())}/{len(met)} |", flush=True)
    print(f"\nre-plans: {len(times)}, median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
