"""Scorecard refinement from a saved goal-list plan (docs/experiments/plan-quality.md,
"Scorecard refinement"): the loop ``atp plan ... --refine scorecard:N`` runs after its
goal-list plan, on the plan read back from disk, so one goal-list plan serves as the
"before" and the start of the "after".

    OMP_NUM_THREADS=1 python benchmarks/score_refine.py BASE_PLAN_DIR OUT_DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from atp import pipeline
from atp.score_refine import refine_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scorecard", default="hn")
    a = ap.parse_args()
    plan = pipeline.load_plan(a.base)
    t = time.perf_counter()
    new = refine_plan(plan, a.rounds, a.scorecard, replan=pipeline.replan)
    dt = time.perf_counter() - t
    new.settings.update(refine=f"scorecard:{a.rounds}", scorecard=a.scorecard)
    new.save(a.out, report=True)
    r = new.optimizer["refine"]
    print(json.dumps({"base": a.base, "loop_s": round(dt, 1), "load": os.getloadavg()[0],
                      "scores": r["scores"], "accepted": r["accepted"],
                      "stopped": r["stopped"],
                      "round_s": [x["seconds"] for x in r["rounds"]]}))


if __name__ == "__main__":
    main()
