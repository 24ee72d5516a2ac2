"""``atp batch INPUT --out DIR [--workers N | --ray ADDRESS|auto|local] [--threads T]
[--max-retries K] [--scorecard NAME|FILE|none] [every atp plan option]``

Plans a cohort (a folder of patients or a CSV manifest) into ``DIR/<patient>/`` plan
folders with ``DIR/summary.csv`` and ``DIR/cohort.html``; resumable (the same command
after an interruption plans only what is missing). See :mod:`atp.batch`.

Exit codes: 0 every patient planned with its priority-1 goals met; 3 every patient
planned, some priority-1 goals unmet; 4 some patients failed (each with its one-line
error and exit code in summary.csv; the others are planned); 2 bad input for the whole
batch (INPUT, the manifest, an option, the scorecard).
"""

from __future__ import annotations

import os

from atp.commands import argtypes
from atp.commands.common import add_patient_arguments, print_json
from atp.commands.plan import add_plan_arguments
from atp.outputs import check_output_dir

WORKERS = argtypes.int_range(1, 1024)
THREADS = argtypes.int_range(1, 1024)
RETRIES = argtypes.int_range(0, 20)


def register(sub) -> None:
    p = sub.add_parser("batch", help="plan a cohort (a folder of patients or a CSV "
                                     "manifest) with local workers or on a Ray cluster")
    add_patient_arguments(p)
    positional = next(a for a in p._actions if a.dest == "patient")
    positional.metavar = "INPUT"
    positional.help = ("a folder of patients (OpenKBP .npz files, OpenKBP CSV folders, DICOM "
                       "folders) or a CSV manifest (columns patient[,name,site,institution,"
                       "prescription,fractions])")
    add_plan_arguments(p)
    p.add_argument("--out", required=True,
                   help="batch folder: DIR/<patient>/ plans, summary.csv, cohort.html "
                        "(new, empty, or one atp batch wrote: then only what is missing "
                        "is planned)")
    p.add_argument("--workers", type=WORKERS, default=None, metavar="N",
                   help="local worker processes (default: the cores)")
    p.add_argument("--threads", type=THREADS, default=None, metavar="T",
                   help="BLAS/OpenMP/torch threads per worker (default: cores // workers, "
                        "at least 1)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the patients as Ray tasks: a cluster address, 'auto' (the "
                        "running cluster) or 'local' (a new one on this machine); needs "
                        "pip install 'atp[cluster]' and INPUT/DIR at the same paths on "
                        "every node")
    p.add_argument("--max-retries", type=RETRIES, default=2, metavar="K",
                   help="re-runs of a patient whose worker died (default 2)")
    p.add_argument("--scorecard", default=None, metavar="NAME|FILE",
                   help="score every plan (default: the site's shipped scorecard when there "
                        "is one; 'none': no scores)")
    p.set_defaults(func=run)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_scorecard(args) -> str | None:
    from atp.scorecard import list_scorecards  # lazy: CLI start-up (the goal metrics)

    if args.scorecard is not None:
        return None if args.scorecard.lower() == "none" else args.scorecard
    site = args.site if args.site or args.goal_list else "hn"
    return site if site and site in list_scorecards() else None


def run(args) -> int:
    # lazy: CLI start-up (atp.batch loads the cohort report, the goal metrics and
    # atp plan's code; every command is imported to build the parser)
    from atp.batch import FILE_OPTIONS, BatchOptions, discover, run_batch

    check_output_dir(args.out, replace=False, kind="batch")
    entries = discover(args.patient)
    cores = _cores()
    workers = args.workers or cores
    threads = args.threads or max(1, cores // workers)
    plan_args = {k: v for k, v in vars(args).items()}
    plan_args.pop("patient", None)
    plan_args.pop("func", None)
    if plan_args.get("refine") is not None:  # JSON for the workers: N or 'scorecard:N'
        plan_args["refine"] = plan_args["refine"].setting
    for k in FILE_OPTIONS:  # workers (and Ray nodes) may run elsewhere: absolute paths
        v = plan_args.get(k)
        if isinstance(v, str) and os.path.isfile(v):
            plan_args[k] = os.path.abspath(v)
    opts = BatchOptions(out=args.out, workers=workers, threads=threads, ray=args.ray,
                        max_retries=args.max_retries, scorecard=default_scorecard(args),
                        progress=not args.quiet and not args.json, plan_args=plan_args)
    result = run_batch(entries, opts)
    c = result.counts
    if args.json:
        print_json({"out": str(result.out), "patients": len(entries), "counts": c,
                    "resumed": result.resumed, "wall_s": round(result.wall_s, 3),
                    "files": result.files, "exit_code": result.exit_code})
    else:
        print(f"batch written to {result.out}: {c['ok']} planned, {c['p1_unmet']} with "
              f"priority-1 goals unmet, {c['failed'] + c['missing']} failed "
              f"({len(result.resumed)} kept from an earlier run; {result.wall_s:.1f} s)")
        for name in (n for n, r in result.records.items() if r and r["status"] == "failed"):
            r = result.records[name]
            print(f"  failed: {name} (exit {r['exit_code']}): {r.get('error', '')}")
    return result.exit_code
