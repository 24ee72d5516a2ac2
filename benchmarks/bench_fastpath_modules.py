"""Per-module fast-path time of given OpenKBP patients, arc dij given (for A/B timing).

For each patient: load, read (or build and cache, ``tune_fastpath.cached_inputs``) the
arc dij, plan once to warm up and once more; print one JSON line {patient: the second
plan's ``timings_s``}. Meant to be run alternately at two commits (A B A B ...) so a
comparison holds while a shared machine's speed drifts; BENCHMARKS.md says how.

With ``--config NAME=JSON`` (repeatable; ``fast_options`` of ``atp.plan``, e.g.
``'{"vmat_sequencer": "vmat-sliding", "fastpath_options": {...}}'``) the configurations
are planned alternately in the same process (A B A B, ``--repeats`` rounds after one
warm-up each) and the line is {patient: {config: [timings_s of each round]}}.

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
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import atp
    from atp.io import load_patient

    fast = {"initial_fluence": "auto", "correction": "auto", "device": "cpu"}
    configs = {}
    for item in args.config:
        name, _, text = item.partition("=")
        configs[name] = {**fast, **json.loads(text)}
    out = {}
    for pt in args.patients:
        patient = load_patient(DATA / args.split / f"{pt}.npz")
        dij, _ = cached_inputs(patient, pt, Path(args.cache), None, 4.0)

        def plan(opts, patient=patient, dij=dij):
            return atp.plan(patient, fast=True, dij=dij, progress=False, fast_options=opts)

        if not configs:
            plan(fast)  # warm-up
            out[pt] = plan(fast).timings_s
            continue
        for opts in configs.values():
            plan(opts)  # warm-up
        rounds = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, opts in configs.items():
                rounds[name].append(plan(opts).timings_s)
        out[pt] = rounds
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
