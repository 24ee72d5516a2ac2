"""Fast-path benchmark on OpenKBP validation patients (issue 7, AIRT-style table).

Per patient, on this machine:

1. speed: ``atp.plan(patient, fast=True)`` end to end (one full arc, a control point
   every ``--arc-spacing`` deg, dose grid factor 3, VMAT sequencing, deliverable dose,
   evaluation, export = ``Plan.save`` without report) run twice, the second reported per
   module (steady state: imports and allocator warm); then once more with the arc dij
   given (``dij=``), i.e. without the dose-influence computation;
2. quality vs the full optimiser pipeline (``atp.plan`` with 9 equispaced beams, cpu
   backend, sequenced by default) on the same patient and predictor: share of the
   standard H&N criteria met (``bench_optimizer.CRITERIA`` / ``criteria_met``), PTV_70
   HI = (D2 - D98) / D50, OAR mean doses (Gy), all on the plans' final (deliverable) dose;
   for the fast path also on its ideal (fluence) dose, and the 3 %/3 mm gamma pass rate of
   the deliverable against the ideal dose (``Plan.fidelity``);
3. slider monotonicity: each parotid's sparing factor 0, 0.1, 0.2, 0.3 (``respare``, no
   new prediction or matrix) -> that parotid's mean dose (ideal fluence dose and
   deliverable dose) must decrease monotonically; reports the fraction of patients where
   it does.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_fastpath.py \
        --patients 2 --json benchmarks/results/fastpath.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import CRITERIA, DATA, criteria_met, patient_files

SLIDERS = (0.0, 0.1, 0.2, 0.3)
WHO = ("fast", "fast_ideal", "optimiser", "optimiser_arc", "optimiser_arc_ideal", "reference")
PAROTIDS = ("Parotid_L", "Parotid_R")


def quality(patient, dose_gy) -> dict:
    """Criteria met, PTV_70 HI and OAR mean doses (Gy) of a dose on the patient grid."""
    from atp import dvh
    from atp.metrics import homogeneity_index

    crit = criteria_met(patient, dose_gy)
    out = {"criteria": crit, "criteria_met": sum(crit.values()), "criteria_n": len(crit)}
    if "PTV_70" in patient.structures and patient.mask("PTV_70").any():
        out["ptv70_hi"] = float(homogeneity_index(dose_gy, patient.mask("PTV_70"), "PTV_70"))
        out["ptv70_d95_gy"] = float(dvh.dose_at_volume_pct(dose_gy, patient.mask("PTV_70"),
                                                           95))
    out["oar_mean_gy"] = {n: float(dvh.mean_dose(dose_gy, patient.mask(n)))
                          for n in patient.organs if patient.mask(n).any()}
    return out


def fast_timings(plan, tmp: Path) -> dict:
    t = dict(plan.timings_s)
    plan.save(tmp / "plan", report=False)
    t["export"] = plan.timings_s["export"]
    return t


def sliders(plan, patient) -> dict:
    from atp.fastplan import respare

    out = {}
    for name in PAROTIDS:
        if name not in patient.organs or not patient.mask(name).any():
            continue
        m = patient.mask(name)
        ideal, deliv, secs = [], [], []
        for s in SLIDERS:
            t0 = time.perf_counter()
            p = respare(plan, {name: s})
            secs.append(time.perf_counter() - t0)
            ideal.append(float(p.ideal_dose_gy[m].mean()))
            deliv.append(float(p.dose_gy[m].mean()))
        out[name] = {"factors": list(SLIDERS), "ideal_mean_gy": ideal,
                     "deliverable_mean_gy": deliv, "respare_s": secs,
                     "monotone_ideal": bool(np.all(np.diff(ideal) < 0)),
                     "monotone_deliverable": bool(np.all(np.diff(deliv) < 0))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="validation")
    ap.add_argument("--patients", type=int, default=5)
    ap.add_argument("--start", type=int, default=0,
                    help="skip the first START patients (to split a run over processes)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no warm-up run per patient (quality runs; the first timing of "
                         "each patient then includes allocator warm-up)")
    ap.add_argument("--initial-fluence", default="auto",
                    help="auto | network | fallback (fast path's initial fluence)")
    ap.add_argument("--predictor", default=None,
                    help="predictor name (default: the registry's default)")
    ap.add_argument("--arc-spacing", type=float, default=4.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fastpath-options", default=None, metavar="JSON",
                    help='FastPath options for every fast plan, e.g. '
                         '\'{"aperture_iterations": 10}\' (default: the shipped defaults)')
    ap.add_argument("--plan-options", default=None, metavar="JSON",
                    help='fast_plan keywords for every fast plan, e.g. '
                         '\'{"vmat_sequencer": "vmat-sliding"}\' (default: the defaults)')
    ap.add_argument("--no-optimiser", action="store_true",
                    help="skip the full-optimiser comparison (part 2)")
    ap.add_argument("--no-optimiser-arc", action="store_true",
                    help="skip the optimiser on the fast path's own arc dij (VMAT)")
    ap.add_argument("--no-sliders", action="store_true",
                    help="skip the slider sweep (quality runs of fast-path options)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--optimiser-from", nargs="+", default=None, metavar="JSON",
                    help="with --no-optimiser --no-optimiser-arc: take the optimiser "
                         "columns of each patient from earlier --json reports (same "
                         "patients, predictor and optimiser code)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no planning: merge the patients of earlier --json reports (runs "
                         "split with --start) and print the tables")
    args = ap.parse_args(argv)
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge]
        report = {k: v for k, v in reports[0].items() if k not in ("patients", "summary")}
        report["patients"] = [r for rep in reports for r in rep["patients"]]
        report["merged_from"] = list(args.merge)
        report["summary"] = summarise(report["patients"])
        print_tables(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        return 0

    import torch
    from atp.predictor import registry as predictors

    import atp
    from atp.io import load_patient

    files = patient_files(args.split, args.start + args.patients)[args.start:]
    if not files:
        print(f"no patients under {DATA / args.split}", file=sys.stderr)
        return 2
    predictor = args.predictor or predictors.default_predictor_name()
    fast_opts = {"arc_spacing_deg": args.arc_spacing, "device": args.device,
                 "initial_fluence": args.initial_fluence}
    if args.fastpath_options:
        fast_opts["fastpath_options"] = json.loads(args.fastpath_options)
    if args.plan_options:
        fast_opts.update(json.loads(args.plan_options))
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "predictor": predictor, "arc_spacing_deg": args.arc_spacing,
              "fastpath_options": fast_opts.get("fastpath_options", {}),
              "plan_options": json.loads(args.plan_options or "{}"),
              "criteria": [c[0] + " [" + c[1] + "]" for c in CRITERIA], "patients": []}
    for f in files:
        t0 = time.perf_counter()
        patient = load_patient(f)
        load_s = time.perf_counter() - t0
        row = {"patient": f.stem, "load_s": load_s}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if not args.no_warmup:
                atp.plan(patient, predictor=predictor, fast=True, progress=False,
                         fast_options=fast_opts)  # warm-up
            fast = atp.plan(patient, predictor=predictor, fast=True, progress=False,
                            fast_options=fast_opts)
            row["fast_with_dij_s"] = fast_timings(fast, tmp)
            no_dij = atp.plan(patient, predictor=predictor, fast=True, dij=fast.dij,
                              progress=False, fast_options=fast_opts)
            row["fast_without_dij_s"] = fast_timings(no_dij, tmp)
        row["n_beamlets"] = int(fast.dij.n_beamlets)
        row["nnz"] = int(fast.dij.matrix.nnz)
        row["control_points"] = fast.settings["arc"]["control_points"]
        row["initial_fluence_path"] = fast.settings["initial_fluence_path"]
        row["device"] = fast.settings["device"]
        row["fast_quality"] = quality(patient, fast.dose_gy)
        row["fast_ideal_quality"] = quality(patient, fast.ideal_dose_gy)
        row["fast_gamma_ideal_vs_deliverable_pct"] = float(
            fast.fidelity["gamma"]["pass_rate_pct"])
        row["fast_goals_met"] = [fast.summary()["goals_passed"], len(fast.results)]
        row["fast_beam_on_s"] = float(fast.delivery.delivery_time_s())
        row["sliders"] = {} if args.no_sliders else sliders(fast, patient)
        if not args.no_optimiser:
            t0 = time.perf_counter()
            full = atp.plan(patient, site="hn", predictor=predictor, backend="cpu", beams=9,
                            progress=False)
            row["optimiser_total_s"] = time.perf_counter() - t0
            row["optimiser_timings_s"] = full.timings_s
            row["optimiser_technique"] = full.delivery.technique if full.delivery else None
            row["optimiser_quality"] = quality(patient, full.dose_gy)
            row["optimiser_goals_met"] = [full.summary()["goals_passed"], len(full.results)]
        if not args.no_optimiser_arc:  # same arc, same delivery technique as the fast path
            t0 = time.perf_counter()
            arc = atp.plan(patient, site="hn", predicted_dose=fast.predicted_dose_gy,
                           dij=fast.dij, backend="cpu", progress=False)
            row["optimiser_arc_total_s"] = time.perf_counter() - t0
            row["optimiser_arc_technique"] = arc.delivery.technique if arc.delivery else None
            row["optimiser_arc_quality"] = quality(patient, arc.dose_gy)
            row["optimiser_arc_ideal_quality"] = quality(patient, arc.ideal_dose_gy)
        ref = patient.metadata.get("reference_dose_gy")
        if ref is not None:
            row["reference_quality"] = quality(patient, np.asarray(ref))
        report["patients"].append(row)
        print(json.dumps({k: row[k] for k in ("patient", "fast_with_dij_s",
                                              "fast_without_dij_s")}), flush=True)
        del fast, no_dij
    if args.optimiser_from:
        earlier = {r["patient"]: r for f in args.optimiser_from
                   for r in json.loads(Path(f).read_text())["patients"]}
        for row in report["patients"]:
            old = earlier.get(row["patient"], {})
            row.update({k: v for k, v in old.items() if k.startswith("optimiser")})
        report["optimiser_from"] = list(args.optimiser_from)
    report["summary"] = summarise(report["patients"])
    print_tables(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def _share(rows, key):
    met = [v for r in rows if key in r for v in r[key]["criteria"].values()]
    return float(np.mean(met)) if met else None


#: the issue's timed span: "from loaded patient arrays to sequenced plan and deliverable
#: dose", i.e. the plan's total without the evaluation that follows the deliverable dose
TO_DELIVERABLE = "total to deliverable dose (no evaluation)"


def _with_span(t: dict) -> dict:
    out = dict(t)
    if "total" in out:
        out[TO_DELIVERABLE] = out["total"] - out.get("evaluation", 0.0)
    return out


def summarise(rows) -> dict:
    stages = list(_with_span(rows[0]["fast_with_dij_s"]))
    with_dij = [_with_span(r["fast_with_dij_s"]) for r in rows]
    without = [_with_span(r["fast_without_dij_s"]) for r in rows]
    s = {"fast_with_dij_median_s": {k: float(np.median([t[k] for t in with_dij]))
                                    for k in stages},
         "fast_without_dij_median_s": {k: float(np.median([t.get(k, 0) for t in without]))
                                       for k in stages},
         "fast_without_dij_max_s": {k: float(np.max([t.get(k, 0) for t in without]))
                                    for k in stages}}
    s["fast_gamma_ideal_vs_deliverable_pct_mean"] = float(np.mean(
        [r["fast_gamma_ideal_vs_deliverable_pct"] for r in rows]))
    beam_on = [r["fast_beam_on_s"] for r in rows if "fast_beam_on_s" in r]
    s["fast_beam_on_s_median"] = float(np.median(beam_on)) if beam_on else None
    for who in WHO:
        key = f"{who}_quality"
        if any(key in r for r in rows):
            q = [r[key] for r in rows if key in r]
            s[who] = {"criteria_share": _share(rows, key),
                      "ptv70_hi_mean": float(np.mean([x["ptv70_hi"] for x in q
                                                      if "ptv70_hi" in x])),
                      "oar_mean_gy": {n: float(np.mean([x["oar_mean_gy"][n] for x in q
                                                        if n in x["oar_mean_gy"]]))
                                      for n in q[0]["oar_mean_gy"]}}
    mono = {}
    for kind in ("ideal", "deliverable"):
        flags = [all(v[f"monotone_{kind}"] for v in r["sliders"].values()) for r in rows
                 if r["sliders"]]
        mono[f"fraction_patients_monotone_{kind}"] = float(np.mean(flags)) if flags else None
    s["sliders"] = mono
    respare = [t for r in rows for v in r["sliders"].values() for t in v["respare_s"]]
    s["respare_median_s"] = float(np.median(respare)) if respare else None
    return s


def print_tables(report) -> None:
    s = report["summary"]
    print("\nFast path, seconds per module (median over patients, steady state):")
    print("| module | with arc dij | dij given |")
    print("| --- | --- | --- |")
    for k, v in s["fast_with_dij_median_s"].items():
        print(f"| {k} | {v:.2f} | {s['fast_without_dij_median_s'][k]:.2f} |")
    if s["respare_median_s"] is not None:
        print(f"\nrespare (slider change, whole plan) median: {s['respare_median_s']:.2f} s")
    print("\nQuality (deliverable dose):")
    print("| plan | criteria met | PTV_70 HI | " + " | ".join(
        f"{n} mean Gy" for n in s["fast"]["oar_mean_gy"]) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in s["fast"]["oar_mean_gy"]) + " |")
    for who in WHO:
        if who in s:
            q = s[who]
            print(f"| {who} | {q['criteria_share']:.1%} | {q['ptv70_hi_mean']:.3f} | "
                  + " | ".join(f"{q['oar_mean_gy'].get(n, float('nan')):.1f}"
                               for n in s["fast"]["oar_mean_gy"]) + " |")
    print("(fast_ideal: the fast path's fluence dose before sequencing; optimiser: 9 beams, "
          "sliding window; optimiser_arc: the optimiser on the fast path's arc dij, VMAT; "
          "_ideal: before sequencing)")
    print(f"3%/3mm gamma, ideal vs deliverable (mean over patients): "
          f"{s['fast_gamma_ideal_vs_deliverable_pct_mean']:.1f} %")
    if s.get("fast_beam_on_s_median") is not None:
        print(f"beam-on time per fraction (fast path, median): "
              f"{s['fast_beam_on_s_median']:.0f} s")
    print(f"\nSlider monotonicity (parotid sparing {SLIDERS}): {s['sliders']}")


if __name__ == "__main__":
    sys.exit(main())
