"""``atp replan PLAN_DIR --set "Parotid_L.Dmean.tolerance=-20" [--cold] [--out DIR]``

Re-optimises a saved plan after goal changes, reusing its stored dose-influence matrix
and predicted dose. ``--set GOAL.FIELD=VALUE`` (repeatable) with FIELD one of tolerance
(% on a predicted goal), value, weight, priority; GOAL is a goal id (the ``.pred``
suffix may be left off) or STRUCTURE.METRIC. Warm by default, like ``atp.replan``: it
starts from the saved fluence and hard-goal state; ``--cold`` starts afresh.

Writes a new plan folder and leaves PLAN_DIR as it was: ``--out DIR``, or by default the
next free ``PLAN_DIR-replan-N`` beside it (a re-plan of ``p-replan-1`` becomes
``p-replan-2``). ``--in-place`` replaces PLAN_DIR itself (atomically). Exit codes as for
``atp plan``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from atp.commands import plan as plan_cmd
from atp.commands.common import add_repeatable
from atp.errors import InputError, quote
from atp.goals.changes import format_changes
from atp.goals.schema import check_setting
from atp.outputs import check_output_dir


def register(sub) -> None:
    p = sub.add_parser("replan", help="re-optimise a saved plan after changing goals")
    p.add_argument("plan_dir", help="a plan directory written by `atp plan`")
    add_repeatable(p, "--set", "GOAL.FIELD=VALUE",
                   help="change a goal (repeatable), e.g. Parotid_L.Dmean.tolerance=-20")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--warm", dest="warm", action="store_true", default=True,
                   help="warm start from the saved fluence (the default, as atp.replan)")
    w.add_argument("--cold", dest="warm", action="store_false",
                   help="cold start from the uniform initial fluence")
    p.add_argument("--patient", default=None,
                   help="the patient (default: the source recorded in plan.json)")
    o = p.add_mutually_exclusive_group()
    o.add_argument("--out", default=None,
                   help="output plan directory (default: PLAN_DIR-replan-N, the next free N)")
    o.add_argument("--in-place", action="store_true",
                   help="replace PLAN_DIR itself instead of writing a new folder")
    plan_cmd.add_output_arguments(p)
    plan_cmd.add_optimiser_arguments(p)
    p.set_defaults(func=run, backend=None)


def parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected GOAL.FIELD=VALUE, got '{item}'", field="--set")
        key = key.strip()
        fld = key.rpartition(".")[2]
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"{quote(item)}: value must be a number",
                             field=f"--set {quote(key, 60, repr_=False)}") from None
        if fld in ("tolerance", "value", "weight", "priority"):  # before any loading
            check_setting(fld, number, where=f"--set {quote(key, 60, repr_=False)}")
        out[key] = number
    return out


def default_out(plan_dir) -> Path:
    """``PLAN-replan-N`` beside the plan, N the first free number (``P-replan-3`` ->
    ``P-replan-4`` and on)."""
    src = Path(os.path.abspath(plan_dir))
    m = re.fullmatch(r"(.+)-replan-(\d+)", src.name)
    stem, n = (m.group(1), int(m.group(2)) + 1) if m else (src.name, 1)
    while True:
        out = src.with_name(f"{stem}-replan-{n}")
        if not os.path.lexists(out):
            return out
        n += 1


def run(args) -> int:  # lazy: CLI start-up (the pipeline imports every stage)
    from atp import pipeline
    from atp.io import load_patient

    if args.in_place:
        out = Path(args.plan_dir)
    else:
        out = Path(args.out) if args.out else default_out(args.plan_dir)
    check_output_dir(out)  # before any work
    changes = parse_sets(args.set)
    patient = load_patient(args.patient) if args.patient else None
    old = pipeline.load_plan(args.plan_dir, patient=patient)
    progress = plan_cmd.progress_arg(args)
    new = pipeline.replan(old, set=changes, warm=args.warm, backend=args.backend,
                          refine=args.refine, progress=progress)
    new.save(out, report=not args.no_report, dicom=args.dicom, progress=progress)
    rc = plan_cmd.report(new, out, args)
    print_changes(new, args)
    return rc


def print_changes(plan, args) -> None:
    """The re-plan's before -> after table (also in plan.json 'changes' and report.html);
    to stderr with --json so stdout stays one JSON document."""
    stream = sys.stderr if args.json else sys.stdout
    for line in format_changes(plan.changes or []):
        print(line, file=stream)
