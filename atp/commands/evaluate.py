"""``atp evaluate PATIENT --dose DOSE.npy [--site S (default hn) [--institution X] |
--goal-list F] [--predicted-dose PRED.npy] [--json]``: every goal with its achieved value
and pass/fail,
plus the standard DVH metrics per structure (and CI/HI/GI per prescribed target).

The dose (and predicted dose) must be a .npy array in Gy on the patient grid. A goal
with value 'predicted' and no --predicted-dose is reported with its achieved value and
pass = null, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atp.commands import common
from atp.commands.goals import add_goal_list_arguments, goal_list_from_args
from atp.errors import GridMismatchError, InputError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a dose against a goal list and DVH metrics")
    common.add_patient_arguments(p)
    p.add_argument("--dose", required=True, metavar="DOSE.npy",
                   help="dose in Gy on the patient grid (.npy)")
    add_goal_list_arguments(p)
    p.add_argument("--predicted-dose", metavar="PRED.npy",
                   help="predicted dose (Gy, .npy) for goals with value 'predicted'")
    common.add_hidden_alias(p, "--predicted", "--predicted-dose")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def load_dose_npy(path, patient, what: str = "dose") -> np.ndarray:
    """Read a dose array (Gy) and check it against the patient grid and for NaN/inf."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such dose file", file=path, field=what)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # not an npy, truncated, pickled
        raise InputError(f"cannot read {what} array: {exc}", file=path, field=what) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise InputError(f"{what} must be a numeric .npy array", file=path, field=what)
    if tuple(arr.shape) != patient.grid.shape:
        raise GridMismatchError(f"{what} shape {tuple(arr.shape)} does not match the patient "
                                f"grid {patient.grid.shape}", file=path, field="shape")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN/inf values", file=path, field=what)
    return arr


def evaluate_report(patient, dose, goal_list, predicted=None, *,  # lazy: CLI start-up
                    dose_file=None) -> dict:
    """Plain-data report: goals (achieved, pass), skipped goals, metrics, summary."""
    from atp.goals.evaluate import evaluate_goals, summarize
    from atp.goals.resolve import resolve_goals
    from atp.metrics import structure_metrics

    resolved = resolve_goals(goal_list, patient, predicted, missing_predicted="keep")
    results = evaluate_goals(resolved, patient, dose, dose_file=dose_file)
    return {
        "patient_id": patient.patient_id, "source": patient.source,
        "dose_file": None if dose_file is None else str(dose_file),
        "site": goal_list.site, "institution": goal_list.institution,
        "goals": [r.to_dict() for r in results],
        "skipped": resolved.skipped,
        "summary": summarize(results),
        "metrics": structure_metrics(patient, dose),
    }


def _fmt(x, unit="") -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" + (f" {unit}" if unit else "")


def run(args) -> int:
    patient = common.load_patient_from_args(args)
    goal_list = goal_list_from_args(args)
    dose = load_dose_npy(args.dose, patient)
    predicted = load_dose_npy(args.predicted_dose, patient, "predicted dose") \
        if args.predicted_dose else None
    report = evaluate_report(patient, dose, goal_list, predicted, dose_file=args.dose)
    if args.json:
        common.print_json(report)
        return 0
    print(f"patient {report['patient_id']}  dose {args.dose}  goals: {goal_list.site}"
          + (f" + {goal_list.institution}" if goal_list.institution else ""))
    print(f"{'P':>2} {'goal':<30}{'structure':<28}{'op':<3}{'value':>10}{'achieved':>10}"
          f"  result")
    for g in report["goals"]:
        state = {True: "pass", False: "FAIL", None: "n/a"}[g["passed"]]
        print(f"{g['priority']:>2} {g['id']:<30}{g['structure']:<28}{g['operator']:<3}"
              f"{_fmt(g['value']):>10}{_fmt(g['achieved']):>10}  {state}"
              + (" (value 'predicted': give --predicted-dose)" if g.get("reason") else ""))
    for s in report["skipped"]:
        print(f"   skipped {s['id']}: {s['reason']}")
    a, h = report["summary"]["all"], report["summary"]["hard"]
    print(f"goals passed {a['passed']}/{a['total']} (unknown {a['unknown']}); "
          f"priority-1 passed {h['passed']}/{h['total']}")
    cols = ["D99%", "D95%", "D2%", "D1%", "D0.1cc", "Dmean", "Dmax"]
    print(f"\n{'structure':<16}" + "".join(f"{c:>9}" for c in cols)
          + f"{'CI':>7}{'CIpad':>7}{'HI':>7}{'GI':>7}")
    for name, row in report["metrics"].items():
        idx = "".join(f"{row[k]:>7.2f}" if k in row and np.isfinite(row[k]) else f"{'':>7}"
                      for k in ("CI", "CIpaddick", "HI", "GI"))
        print(f"{name:<16}" + "".join(f"{row[c]:>9.2f}" for c in cols) + idx)
    return 0
