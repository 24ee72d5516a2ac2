"""``atp demo [--out DIR]``: the main job on the embedded default case.

Plans the embedded head-and-neck phantom with the real pipeline (predict -> resolve the
shipped ``hn`` goal list -> pencil-beam dose influence -> optimise -> sequence into MLC
apertures -> deliverable dose -> evaluate) and writes the plan directory (plan.json,
dose.npy, ideal_dose.npy, predicted_dose.npy, fluence.npz, dij.npz, report.html,
dicom/, patient.json) to DIR, then prints where it is.
"""

from __future__ import annotations

from pathlib import Path

from atp.commands.plan import EXIT_HARD_UNMET
from atp.outputs import check_output_dir, write_json


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default case")
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu", "qp"],
                   help="optimiser backend (default auto)")
    p.add_argument("--predictor", default=None, help="dose predictor (default: the best "
                                                     "installed)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-sequence", action="store_true",
                   help="skip MLC sequencing (report the ideal fluence dose)")
    p.add_argument("--no-dicom", action="store_true", help="skip the DICOM export")
    p.set_defaults(func=run)


def run(args) -> int:  # lazy: CLI start-up (the pipeline imports every stage)
    from atp import phantom, pipeline

    check_output_dir(args.out)  # before any work
    patient = phantom.head_neck_phantom()
    plan = pipeline.plan(patient, site="hn", predictor=args.predictor, backend=args.backend,
                         progress=not args.quiet, sequence=not args.no_sequence)
    out = Path(args.out)

    def extra(tmp, p):
        write_json(tmp / "patient.json", patient.summary())

    plan.save(out, dicom=not args.no_dicom, extra=extra, progress=not args.quiet)
    s = plan.summary()
    print(f"demo plan: {s['goals_passed']}/{s['goals_total']} goals met, backend "
          f"{plan.backend}, {plan.timings_s.get('total', 0.0):.1f} s")
    for u in plan.unmet_hard:
        print(f"  priority-1 goal {u['id']} not met: achieved {u['achieved']:.4g} "
              f"(misses by {u['misses_by']:.3g} {u['unit']})")
    print(f"demo results written to {out.resolve()}")
    return EXIT_HARD_UNMET if plan.unmet_hard else 0
