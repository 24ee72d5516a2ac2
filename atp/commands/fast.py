"""``atp plan PATIENT --fast [--spare OAR=FACTOR ...] [--arc-spacing DEG] [--preset
airt|coverage] [--device auto|cpu|cuda] --out DIR``: the AIRT-style fast path (see :mod:`atp.fastplan`).

Helpers of ``atp plan`` (not a subcommand of its own): the fast-path flags, their checks
(bad ``--spare`` -> exit 2 with one line, before any work) and the run.
"""

from __future__ import annotations

import sys

from atp.commands import argtypes
from atp.errors import InputError

# optimiser-only flags of `atp plan` (dest, flag, value when not given)
_NOT_FAST = (("beams", "--beams", None), ("beam_template", "--beam-template", None),
             ("refine", "--refine", None), ("max_iter", "--max-iter", None),
             ("backend", "--backend", "auto"))


def add_fast_arguments(p) -> None:
    p.add_argument("--fast", action="store_true",
                   help="AIRT-style fast path instead of the optimiser: one full arc, "
                        "predicted dose -> fluence by differentiable dose feedback, VMAT "
                        "sequencing (see --spare, --arc-spacing, --device)")
    p.add_argument("--spare", action="append", default=[], metavar="OAR=FACTOR",
                   help="--fast: OAR sparing slider, factor in [0, 1): aim the OAR's dose "
                        "below (1 - FACTOR) x the initial fluence's (repeatable)")
    p.add_argument("--arc-spacing", type=argtypes.ARC_SPACING_DEG, default=None, metavar="DEG",
                   help="--fast: degrees between arc control points (default 4)")
    p.add_argument("--initial-fluence", default=None, metavar="auto|network|fallback",
                   help="--fast: initial fluence from the trained Bev2Fluence network or "
                        "the exact fallback (default auto: the network when its weights "
                        "exist)")
    p.add_argument("--weights", default=None, metavar="PT",
                   help="--fast: Bev2Fluence weights file (default: the shipped one)")
    p.add_argument("--correction", default=None, metavar="auto|network|exact",
                   help="--fast: fluence correction by the trained correction network or "
                        "exact unrolled gradient steps (default auto: the network when "
                        "its weights exist)")
    p.add_argument("--correction-weights", default=None, metavar="PT",
                   help="--fast: correction-network weights file (default: the shipped "
                        "one)")
    p.add_argument("--aperture-iterations", type=argtypes.ITERATIONS, default=None, metavar="N",
                   help="--fast: L-BFGS-B iterations per round of direct aperture "
                        "refinement after sequencing (leaf tips and control-point MU "
                        "moved to lower the plan objective within the machine limits; "
                        "0: off, control-point MU only; default: the fast path's)")
    p.add_argument("--preset", default=None, metavar="airt|coverage",
                   help="--fast: named settings (default airt: rule-based arcs; coverage: "
                        "sliding-window arc sectors and a coverage-first objective -- "
                        "PTV homogeneity level with the optimiser's, OAR means higher, "
                        "longer beam-on; flags given explicitly win)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda",
                   help="--fast: torch device (default auto: cuda when available, else "
                        "cpu; cuda without a GPU is an error)")


def reject_fast_only(args) -> None:
    """Without --fast, the fast-path flags are an input error (not silently ignored)."""
    for dest, flag in (("spare", "--spare"), ("arc_spacing", "--arc-spacing"),
                       ("device", "--device"), ("initial_fluence", "--initial-fluence"),
                       ("weights", "--weights"), ("correction", "--correction"),
                       ("correction_weights", "--correction-weights"),
                       ("aperture_iterations", "--aperture-iterations"),
                       ("preset", "--preset")):
        if getattr(args, dest, None) is not None and getattr(args, dest) != []:
            raise InputError(f"{flag} needs --fast", field=flag)


def check_weights_file(path, flag: str) -> None:
    """Before any work: ``path`` must load as the network weights ``flag`` names (a
    torch file of plain data, weights_only=True); else InputError naming the file."""
    from atp.optimizer.fastpath.bev2fluence import BEV2FLUENCE, load_weights
    from atp.optimizer.fastpath.correction_net import CORRECTION

    try:
        load_weights(path, "cpu", kind=CORRECTION if "correction" in flag else BEV2FLUENCE)
    except InputError as exc:
        raise InputError(exc.message, file=exc.file or path, field=flag) from None


def fast_options(args) -> tuple[dict, dict]:
    """(spare, fast_options) from the CLI flags; raises InputError on bad input."""
    from atp.fastplan import parse_spare_args

    for dest, flag, unset in _NOT_FAST:
        if getattr(args, dest, unset) != unset:
            raise InputError(f"{flag} does not apply to --fast (one arc; see "
                             "--arc-spacing)", field=flag)
    seq = getattr(args, "sequencer", "auto")
    if seq not in ("auto", "vmat", "vmat-sliding"):
        raise InputError("--fast always sequences a VMAT arc (--sequencer vmat or "
                         "vmat-sliding)", field="--sequencer")
    spare = parse_spare_args(args.spare)
    from atp.sequencer.machine import load_machine

    load_machine(args.machine)  # a bad machine file fails before any work
    for dest, flag, exact in (("initial_fluence", "--initial-fluence", "fallback"),
                              ("correction", "--correction", "exact")):
        choice = getattr(args, dest, None)
        if choice is not None and choice not in ("auto", "network", exact):
            raise InputError(f"{dest} must be auto, network or {exact}, got "
                             f"'{str(choice)[:40]}'", field=flag)
    opts = {"machine": args.machine}
    if seq != "auto":
        opts["vmat_sequencer"] = seq
    for dest, key in (("arc_spacing", "arc_spacing_deg"),
                      ("dose_grid_factor", "dose_grid_factor"), ("device", "device"),
                      ("initial_fluence", "initial_fluence"), ("weights", "weights"),
                      ("correction", "correction"),
                      ("correction_weights", "correction_weights"),
                      ("preset", "preset")):
        if getattr(args, dest) is not None:
            opts[key] = getattr(args, dest)
    for dest, flag in (("weights", "--weights"),
                       ("correction_weights", "--correction-weights")):
        if getattr(args, dest, None) is not None:
            check_weights_file(getattr(args, dest), flag)
    n = getattr(args, "aperture_iterations", None)
    if n is not None:
        if n < 0:
            raise InputError(f"--aperture-iterations must be >= 0, got {n}",
                             field="--aperture-iterations")
        opts["fastpath_options"] = {"aperture_iterations": n}
    return spare, opts


def run_fast(args) -> int:
    from pathlib import Path

    from atp.commands.common import load_patient_from_args
    from atp.commands.plan import progress_arg, report
    from atp.fastplan import check_spare, correction_message, path_message
    from atp.pipeline import plan as run_plan

    spare, opts = fast_options(args)
    patient = load_patient_from_args(args)
    check_spare(spare, patient)
    predicted = dij = None
    if args.predicted_dose:
        from atp.commands.evaluate import load_dose_npy

        predicted = load_dose_npy(args.predicted_dose, patient, what="predicted dose")
    if args.dij:
        from atp.dose.influence import DoseInfluence

        dij = DoseInfluence.load(args.dij)
    site = args.site if args.site or args.goal_list else "hn"
    plan = run_plan(patient, site=site, institution=args.institution,
                    goal_list=args.goal_list, predictor=args.predictor,
                    predicted_dose=predicted, dose_engine=args.dose_engine, dij=dij,
                    progress=progress_arg(args), fast=True, spare=spare,
                    fast_options=opts)
    stream = sys.stderr if args.json else sys.stdout
    print(f"fast path: {path_message(plan.settings['initial_fluence_path'])}; "
          f"{correction_message(plan.settings['correction_path'])}; device "
          f"{plan.settings['device']}", file=stream)
    out = Path(args.out)
    plan.save(out, report=not args.no_report, dicom=args.dicom, progress=progress_arg(args))
    return report(plan, out, args)
