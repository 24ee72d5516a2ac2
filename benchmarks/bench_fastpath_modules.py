"""Per-module fast-path time of given OpenKBP patients, arc dij given (for A/B timing).

For each patient: load, read (or build and cache, ``tune_fastpath.cached_inputs``) the
arc dij, plan once to warm up and once more; print one JSON line {patient: the second
plan's ``timings_s``}. Meant to be run alternately at two commits (A B A B ...) so a
comparison holds while a shared machine's speed drifts; BENCHMARKS.md says how.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_fastpath_modules.py pt_201 pt_203
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import DATA
from tune_fastpath import cached_inputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patients", nargs="+")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--cache", default="/tmp/atp_val_arc")
    args = ap.parse_args(argv)

    import atp
    from atp.io import load_patient

    fast = {"initial_fluence": "auto", "correction": "auto", "device": "cpu"}
    out = {}
    for pt in args.patients:
        patient = load_patient(DATA / args.split / f"{pt}.npz")
        dij, _ = cached_inputs(patient, pt, Path(args.cache), None, 4.0)
        atp.plan(patient, fast=True, dij=dij, progress=False, fast_options=fast)  # warm-up
        plan = atp.plan(patient, fast=True, dij=dij, progress=False, fast_options=fast)
        out[pt] = plan.timings_s
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
