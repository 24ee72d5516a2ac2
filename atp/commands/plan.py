"""``atp plan PATIENT --site hn [--institution X] [--predictor NAME]
[--backend auto|cpu|gpu|qp] [--beams 9 | --beam-template NAME]
[--refine N|dvh:N|scorecard[:N] [--scorecard NAME|FILE]] --out DIR``

Runs the whole pipeline (predict -> resolve goals -> dose influence -> optimise ->
evaluate) and writes the plan directory atomically (see :mod:`atp.pipeline`). Progress
goes to stderr (``--quiet`` silences it); ``--json`` prints the plan summary as JSON.

``--fast [--spare OAR=FACTOR ...] [--arc-spacing DEG] [--device auto|cpu|cuda]``: the
AIRT-style fast path instead of the optimiser (:mod:`atp.commands.fast`,
:mod:`atp.fastplan`).

Exit codes: 0 plan written and every priority-1 goal met; 3 plan written but some
priority-1 goals cannot be met (each listed with the amount it misses by); 2 bad input
or an unavailable backend (e.g. ``--backend gpu`` without a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atp.commands import argtypes
from atp.commands.common import (
    add_patient_arguments,
    add_repeatable,
    load_patient_from_args,
    print_json,
)
from atp.commands.evaluate import load_dose_npy
from atp.commands.fast import add_fast_arguments, fast_options, reject_fast_only
from atp.errors import InputError
from atp.outputs import check_output_dir

# CLI start-up: the CLI imports every command to build its parser, so the pipeline, the
# dose engines and the sequencer (every stage) load inside the functions that plan
# (marked "lazy: CLI start-up")

EXIT_HARD_UNMET = 3


def add_optimiser_arguments(p) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu", "qp"],
                   help="optimiser backend (auto: gpu when a GPU is present, else cpu)")
    p.add_argument("--refine", type=argtypes.refine_spec, default=None,
                   metavar="N|dvh:N|scorecard[:N]",
                   help="AIRTP-style refinement: N (= dvh:N) DVH-point rounds, or "
                        "scorecard[:N] (default 3) rounds of DVH points and scorecard items "
                        "kept while the scorecard total improves (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print the plan summary as JSON")


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan a patient: predict, resolve goals, optimise, "
                                    "evaluate")
    add_patient_arguments(p)
    add_plan_arguments(p)
    p.add_argument("--out", required=True,
                   help="plan directory to write (new, empty, or a plan folder atp wrote)")
    p.add_argument("--scorecard", default=None, metavar="NAME|FILE",
                   help="the scorecard --refine scorecard raises (default: the site's "
                        "shipped scorecard)")
    p.set_defaults(func=run)


def add_plan_arguments(p) -> None:
    """Every ``atp plan`` option except the patient and ``--out`` (``atp batch`` applies
    them to every patient of a cohort)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--site", default=None, help="shipped goal list by site (default hn)")
    g.add_argument("--goal-list", metavar="FILE", help="a goal-list YAML file")
    p.add_argument("--institution", metavar="NAME|FILE", help="institution overlay")
    p.add_argument("--predictor", default=None,
                   help="dose predictor name (default: the best installed)")
    p.add_argument("--predicted-dose", metavar="PRED.npy",
                   help="use this predicted dose (Gy, patient grid) instead of predicting")
    p.add_argument("--dose-engine", default="pencil-beam", help="dose engine name")
    p.add_argument("--dij", metavar="DIJ.npz",
                   help="use this dose-influence matrix (atp-dij-1 .npz) instead of the "
                        "engine")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--beams", type=argtypes.BEAMS, default=None, help="number of equispaced beams "
                                                           "(default: the goal list's, else 9)")
    b.add_argument("--beam-template", default=None, help="named beam arrangement")
    p.add_argument("--dose-grid-factor", type=argtypes.DOSE_GRID_FACTOR, default=None,
                   help="dose grid = CT grid downsampled by this factor (default 2; "
                        "--fast: 3)")
    p.add_argument("--max-iter", type=argtypes.MAX_ITER, default=None,
                   help="first-order iteration limit per solve")
    sq = p.add_mutually_exclusive_group()
    sq.add_argument("--sequencer", default="auto", metavar="NAME",
                    help="leaf sequencer: imrt-sliding | imrt-sns | vmat | vmat-sliding | "
                         "auto (default: sliding window for static beams, vmat for arcs; "
                         "--fast: vmat or vmat-sliding); the plan's dose, "
                         "DVH and goals are then the deliverable dose of the apertures")
    sq.add_argument("--sequence", nargs="?", const="auto", dest="sequencer",
                    metavar="TECHNIQUE", help=argparse.SUPPRESS)
    sq.add_argument("--no-sequence", action="store_const", const=None, dest="sequencer",
                    help="skip sequencing: report the ideal fluence dose (not deliverable)")
    p.add_argument("--machine", default="millennium120",
                   help="linac/MLC model for sequencing (millennium120 | hd120 | a YAML)")
    p.add_argument("--technique", choices=("vmat",), default=None,
                   help="vmat: one full arc of 20-deg sectors, each sector's fluence "
                        "optimised as a static field and delivered by one leaf sweep while "
                        "the gantry turns through it (--vmat method=dmpo: two arcs, arc "
                        "sequencing, then direct machine-parameter optimisation of leaves "
                        "and MU on the goal list; atp.vmatplan)")
    add_repeatable(p, "--vmat", "KEY=VALUE",
                   help="VMAT option (method, arcs, sector_deg, cps_per_sector, "
                        "collimator_deg, jaw_tracking; dmpo: spacing_deg, sector_cps, "
                        "dmpo_rounds, dmpo.iterations, dmpo.mu_weight, ...); repeatable")
    add_output_arguments(p)
    add_optimiser_arguments(p)
    add_fast_arguments(p)


def add_output_arguments(p) -> None:
    p.add_argument("--dicom", action="store_true",
                   help="also export RT Plan / RT Dose / RT Struct into DIR/dicom")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")


def progress_arg(args):
    return not args.quiet and not args.json


def report(plan, out, args) -> int:
    """Print the outcome; exit code 3 when priority-1 goals are unmet."""
    unmet = plan.unmet_hard
    if args.json:
        summary = plan.summary()
        summary.update(out=str(out), backend=plan.backend, timings_s=plan.timings_s,
                       optimizer_status=plan.optimizer.get("status"))
        if plan.delivery is not None:
            d = plan.delivery.summary()
            summary.update(mu_per_fraction=d["mu_per_fraction"],
                           mu_per_cgy=d.get("mu_per_cgy"))
        print_json(summary)
    else:
        s = plan.summary()
        print(f"plan written to {out.resolve()}  (backend {plan.backend}, "
              f"{plan.timings_s.get('total', plan.timings_s.get('replan', 0.0)):.1f} s)")
        print(f"goals met: {s['goals_passed']}/{s['goals_total']}")
        if plan.delivery is not None:
            d = plan.delivery.summary()
            mu_cgy = f", {d['mu_per_cgy']} MU/cGy" if d.get("mu_per_cgy") else ""
            print(f"delivery: {d['technique']}, {d['mu_per_fraction']:.0f} MU per fraction"
                  f"{mu_cgy}")
        for r in plan.results:
            if r.passed is False:
                g = r.goal
                print(f"  not met: {g.id} ({g.structure} {g.metric.text} {g.operator} "
                      f"{g.value:.4g}): {r.achieved:.4g}")
    if unmet:  # one headline, then one line per goal (exit 3, with or without --fast)
        print(f"atp: plan written, but {len(unmet)} priority-1 goal"
              f"{'s' if len(unmet) > 1 else ''} not met ({', '.join(u['id'] for u in unmet)})"
              f"; exit {EXIT_HARD_UNMET}", file=sys.stderr)
    for u in unmet:
        print(f"atp: priority-1 goal {u['id']} cannot be met: {u['metric']} "
              f"{u['operator']} {u['value']:.4g} {u['unit']}, achieved {u['achieved']:.4g} "
              f"(misses by {u['misses_by']:.3g} {u['unit']})", file=sys.stderr)
    return EXIT_HARD_UNMET if unmet else 0


def sequence_arg(name):  # lazy: CLI start-up
    """CLI --sequencer value -> pipeline ``sequence=`` (None: no sequencing)."""
    from atp.sequencer.registry import names as sequencer_names

    if name is None:
        return False
    if name == "auto":
        return True
    if name not in sequencer_names():
        raise InputError(f"unknown sequencer '{name}'; installed: "
                         f"{', '.join(sorted(sequencer_names()))}, auto", field="--sequencer")
    return name


def run(args) -> int:  # lazy: CLI start-up
    from atp import pipeline
    from atp.dose import registry as dose_engines
    from atp.dose.geometry import BEAM_TEMPLATES
    from atp.sequencer.machine import load_machine

    check_output_dir(args.out)  # before any work: never replace what atp did not write
    if args.fast and (args.technique or args.vmat):
        raise InputError("--technique / --vmat plan with the optimiser, not --fast",
                         field="--technique")
    if args.fast:
        return run_fast(args)
    reject_fast_only(args)
    if args.sequencer is not None:
        load_machine(args.machine)  # a bad machine file fails before any work
    if args.beam_template is not None and args.beam_template not in BEAM_TEMPLATES:
        raise InputError(f"unknown beam template '{args.beam_template[:40]}'; known: "
                         f"{', '.join(sorted(BEAM_TEMPLATES))}", field="--beam-template")
    if not args.dij:
        dose_engines.get(args.dose_engine)  # an unknown engine fails before any work
    vmat_options = vmat_args(args.vmat) if args.vmat else None
    if vmat_options and args.technique != "vmat":
        raise InputError("--vmat needs --technique vmat", field="--vmat")
    if args.technique == "vmat":
        from atp.vmatplan import VmatOptions

        VmatOptions.from_dict(vmat_options)  # bad options fail before any work
    patient, predicted, dij = plan_inputs(args)
    opts = {}
    if args.max_iter:
        opts["max_iter"] = args.max_iter
    plan = pipeline.plan(patient, site=site_arg(args), institution=args.institution,
                         goal_list=args.goal_list, predictor=args.predictor,
                         predicted_dose=predicted, dose_engine=args.dose_engine, dij=dij,
                         backend=args.backend, beams=args.beams,
                         beam_template=args.beam_template, refine=args.refine or 0,
                         progress=progress_arg(args),
                         dose_grid_factor=args.dose_grid_factor,
                         sequence=sequence_arg(args.sequencer),
                         machine=args.machine, optimizer_options=opts,
                         technique=args.technique, vmat_options=vmat_options,
                         scorecard=getattr(args, "scorecard", None))
    return save_and_report(plan, args)


def vmat_args(items) -> dict:
    """``--vmat KEY=VALUE`` items -> VmatOptions keywords (``dmpo.KEY`` / ``cg.KEY`` -> the
    dmpo / cg dict);
    values are YAML scalars."""
    import yaml  # lazy: CLI start-up

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--vmat expects KEY=VALUE, got {item[:40]!r}", field="--vmat")
        try:
            val = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"--vmat {key}: not a value: {value[:40]!r}",
                             field="--vmat") from None
        if key.startswith(("dmpo.", "cg.")):
            group, _, sub = key.partition(".")
            out.setdefault(group, {})[sub] = val
        else:
            out[key] = val
    return out


def run_fast(args) -> int:  # lazy: CLI start-up
    """``atp plan --fast``: the fast path (:func:`atp.fastplan.fast_plan`)."""
    from atp import fastplan, pipeline

    spare, options = fast_options(args)
    patient, predicted, dij = plan_inputs(args)
    fastplan.check_spare(spare, patient)
    plan = pipeline.plan(patient, site=site_arg(args), institution=args.institution,
                         goal_list=args.goal_list, predictor=args.predictor,
                         predicted_dose=predicted, dose_engine=args.dose_engine, dij=dij,
                         progress=progress_arg(args), fast=True, spare=spare,
                         options=options)
    stream = sys.stderr if args.json else sys.stdout
    print(f"fast path: {fastplan.path_message(plan.settings['initial_fluence_path'])}; "
          f"{fastplan.correction_message(plan.settings['correction_path'])}; device "
          f"{plan.settings['device']}", file=stream)
    return save_and_report(plan, args)


def site_arg(args) -> str | None:
    return args.site if args.site or args.goal_list else "hn"


def plan_inputs(args):  # lazy: CLI start-up
    """(patient, predicted dose or None, dij or None) from the CLI arguments."""
    from atp.dose.influence import DoseInfluence

    patient = load_patient_from_args(args)
    predicted = None
    if args.predicted_dose:
        predicted = load_dose_npy(args.predicted_dose, patient, what="predicted dose")
    dij = DoseInfluence.load(args.dij) if args.dij else None
    return patient, predicted, dij


def save_and_report(plan, args) -> int:
    out = Path(args.out)
    plan.save(out, report=not args.no_report, dicom=args.dicom, progress=progress_arg(args))
    return report(plan, out, args)
