"""``atp scorecard PLAN_DIR [--scorecard hn|FILE] [--json]``: score a plan.

Prints each item's metric value and score and the total, and saves them as
``PLAN_DIR/scorecard-<name>.json`` (added to the plan folder's list of atp's files).
See :mod:`atp.scorecard` for the file format.
"""

from __future__ import annotations

import json
from pathlib import Path

from atp.commands.common import print_json
from atp.commands.evaluate import load_dose_npy
from atp.errors import InputError
from atp.outputs import MARKER, write_json


def register(sub) -> None:
    p = sub.add_parser("scorecard", help="score a plan with a scorecard (piecewise-linear "
                                         "DVH metric scores)")
    p.add_argument("plan_dir", metavar="PLAN_DIR", help="a plan folder written by atp plan")
    p.add_argument("--scorecard", default="hn", metavar="NAME|FILE",
                   help="shipped scorecard name (default hn) or a YAML file")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=run)


def _add_to_marker(plan_dir: Path, name: str) -> None:
    """The plan folder's marker lists the files atp wrote; add ``name`` so the folder
    stays atp's (a later atp plan --out may replace it)."""
    marker = plan_dir / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and isinstance(data.get("entries"), list) and \
            name not in data["entries"]:
        data["entries"].append(name)
        write_json(marker, data)


def run(args) -> int:  # lazy: CLI start-up
    # (atp.scorecard loads the goal metrics, ~40 ms; atp.io imports pydicom, ~1-2 s;
    # every command is imported to build the parser)
    from atp.io import load_patient
    from atp.scorecard import format_scores, load_scorecard

    card = load_scorecard(args.scorecard)
    plan_dir = Path(args.plan_dir)
    pj = plan_dir / "plan.json"
    if not pj.is_file():
        raise InputError("not a plan directory (no plan.json)", file=plan_dir)
    try:
        data = json.loads(pj.read_text(encoding="utf-8"))
        src = data["patient"]["source"]
    except (ValueError, OSError, KeyError, TypeError):
        raise InputError("malformed plan.json: no patient source", file=pj,
                         field="patient.source") from None
    patient = load_patient("phantom" if str(src).startswith("<embedded") else src)
    dose = load_dose_npy(plan_dir / "dose.npy", patient)
    result = card.evaluate(patient, dose)
    result["plan"] = str(plan_dir)
    name = f"scorecard-{card.name}.json"
    write_json(plan_dir / name, result)
    _add_to_marker(plan_dir, name)
    if args.json:
        print_json(result)
    else:
        print(f"scorecard {card.name} for {plan_dir} ({card.title})")
        print("\n".join(format_scores(result)))
        print(f"saved to {plan_dir / name}")
    return 0
