"""Optimiser and ``atp plan`` benchmark on OpenKBP patients (9 equispaced coplanar beams).

Measures, side by side in one run on this machine:

1. ``cpu`` (and ``gpu`` when present) vs ``qp`` on the convex formulation
   (``Problem.convex_surrogate``: dose-volume terms replaced by min/max-dose terms,
   priority-1 goals as penalties so every backend minimises the same function), on a
   reduced problem (10 mm beamlets, dose grid 4x coarser) that the QP can solve:
   objective values and wall times;
2. ``atp plan`` end to end per patient (pencil-beam dij, the ``baseline`` predictor unless
   ``--predictor``), with the dij stage excluded and included;
3. a warm re-plan after a tolerance tweak (Parotid_L.Dmean.tolerance = -20, or
   Parotid_R when the patient has no left parotid);
4. plan quality: share of the standard head-and-neck criteria met by our plan and by the
   patient's reference (clinical-quality) plan, on the same patients.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_optimizer.py --split validation \
        --patients 5 --qp-patients 2 --json benchmarks/results/optimizer.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "openkbp"

CRITERIA = [  # (label, structure, kind, threshold) kind: D99rx (>=), D0.1cc / mean (<=)
    ("PTV D99 >= 95% Rx", "PTV_70", "D99rx", 0.95),
    ("PTV D99 >= 95% Rx", "PTV_63", "D99rx", 0.95),
    ("PTV D99 >= 95% Rx", "PTV_56", "D99rx", 0.95),
    ("cord D0.1cc <= 45 Gy", "SpinalCord", "D0.1cc", 45.0),
    ("brainstem D0.1cc <= 50 Gy", "Brainstem", "D0.1cc", 50.0),
    ("parotid mean <= 26 Gy", "Parotid_L", "mean", 26.0),
    ("parotid mean <= 26 Gy", "Parotid_R", "mean", 26.0),
    ("larynx mean <= 45 Gy", "Larynx", "mean", 45.0),
    ("esophagus mean <= 45 Gy", "Esophagus", "mean", 45.0),
    ("mandible D0.1cc <= 73.5 Gy", "Bone_Mandible", "D0.1cc", 73.5),
]


def criterion_measures(patient, dose_gy):
    """(key, kind, threshold, value Gy, Rx Gy or None) for each standard H&N criterion the
    patient has structures for; value: D99 (D99rx), D0.1cc or the mean dose."""
    from atp import dvh

    out = []
    for label, name, kind, thr in CRITERIA:
        if name not in patient.structures or not patient.mask(name).any():
            continue
        m = patient.mask(name)
        rx = None
        if kind == "D99rx":
            presc = patient.prescription_for(name)
            if presc is None:
                continue
            rx = presc.dose_gy
            v = dvh.dose_at_volume_pct(dose_gy, m, 99)
        elif kind == "D0.1cc":
            v = dvh.dose_at_volume_cc(dose_gy, m, 0.1, patient.grid.voxel_volume_cc)
        else:
            v = dvh.mean_dose(dose_gy, m)
        out.append((f"{label} [{name}]", kind, thr, v, rx))
    return out


def criteria_met(patient, dose_gy) -> dict[str, bool]:
    """Each standard H&N criterion the patient has structures for: met or not."""
    return {key: bool(v >= thr * rx if kind == "D99rx" else v <= thr)
            for key, kind, thr, v, rx in criterion_measures(patient, dose_gy)}


def patient_files(split: str, n: int) -> list[Path]:
    """The first ``n`` OpenKBP patients of ``split`` in patient-number order."""
    return sorted((DATA / split).glob("pt_*.npz"),
                  key=lambda p: int(p.stem.split("_")[1]))[:n]


def convex_comparison(patient, predictor, backends, *, beamlet_mm, factor, max_iter,
                      qp_solver=None):
    """cpu / gpu vs qp on the convex formulation of one patient's problem."""
    from atp.optimizer.problem import build_problem
    from atp.optimizer.solve import optimize
    from atp.predictor import registry as predictors

    from atp.dose import registry as engines
    from atp.dose.geometry import equispaced_beams
    from atp.goals import load_goal_list, resolve_goals, with_control_structures

    pred = predictors.get(predictor).predict(patient)
    resolved = resolve_goals(load_goal_list(site="hn"), patient, pred)
    pc = with_control_structures(patient, resolved)
    dij = engines.get("pencil-beam").influence(pc, equispaced_beams(9),
                                               beamlet_size_mm=beamlet_mm,
                                               dose_grid_factor=factor)
    prob = build_problem(list(resolved), pc, dij)
    cp = prob.convex_surrogate()
    rows = {"n_beamlets": cp.n_beamlets, "n_rows": cp.n_rows, "nnz": int(cp.A.nnz),
            "n_terms": len(cp.terms), "dose_grid_factor": factor, "beamlet_mm": beamlet_mm}
    for name in backends:
        opts = {"max_iter": max_iter, "tol": 1e-7} if name in ("cpu", "gpu") else (
            {"solver": qp_solver} if qp_solver else {})
        t0 = time.perf_counter()
        res = optimize(cp, name, **opts)
        rows[name] = {"objective": res.objective, "status": res.status,
                      "wall_s": time.perf_counter() - t0, "iterations": res.iterations}
    if "qp" in rows:
        ref = rows["qp"]["objective"]
        for name in backends:
            if name != "qp":
                rows[name]["rel_diff_vs_qp"] = (rows[name]["objective"] - ref) / ref
                rows[name]["speedup_vs_qp"] = rows["qp"]["wall_s"] / rows[name]["wall_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="validation")
    ap.add_argument("--patients", type=int, default=5)
    ap.add_argument("--qp-patients", type=int, default=2)
    ap.add_argument("--qp-beamlet-mm", type=float, default=10.0)
    ap.add_argument("--qp-dose-grid-factor", type=int, default=4)
    ap.add_argument("--predictor", default="baseline")
    ap.add_argument("--qp-solver", default=None, help="OSQP or CLARABEL (default: first)")
    ap.add_argument("--qp-only", action="store_true",
                    help="only the cpu/gpu vs qp comparison (no end-to-end plans)")
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from atp.optimizer import registry

    import atp
    from atp.io import load_patient

    files = patient_files(args.split, args.patients)
    if not files:
        print(f"no patients under {DATA / args.split}", file=sys.stderr)
        return 2
    backends = ["cpu"] + (["gpu"] if registry.get("gpu").available() else [])
    if registry.get("qp").is_installed():
        backends.append("qp")
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         "see BENCHMARKS.md", "gpu": registry.get("gpu").available(),
              "predictor": args.predictor, "patients": [], "convex": []}
    opts = {"max_iter": args.max_iter} if args.max_iter else {}
    def compare_backends(i, patient, f):
        if i < args.qp_patients and "qp" in backends:
            conv = convex_comparison(patient, args.predictor, backends,
                                     beamlet_mm=args.qp_beamlet_mm,
                                     factor=args.qp_dose_grid_factor, max_iter=3000,
                                     qp_solver=args.qp_solver)
            conv["patient"] = f.stem
            report["convex"].append(conv)
            print(json.dumps(conv), flush=True)

    for i, f in enumerate(files):
        patient = load_patient(f)
        if args.qp_only:
            compare_backends(i, patient, f)
            continue
        t0 = time.perf_counter()
        plan = atp.plan(patient, site="hn", predictor=args.predictor, backend="cpu", beams=9,
                        progress=False, optimizer_options=opts)
        total = time.perf_counter() - t0
        dij_s = plan.timings_s.get("dose influence", 0.0)
        ids = {g.id for g in plan.resolved_goals}
        tweak = next((g for g in ("Parotid_L.Dmean", "Parotid_R.Dmean")
                      if g in ids or f"{g}.pred" in ids), None)
        t1 = time.perf_counter()
        re = atp.replan(plan, set={f"{tweak}.tolerance": -20}, warm=True) if tweak else plan
        warm_s = time.perf_counter() - t1 if tweak else float("nan")
        ours = criteria_met(patient, plan.dose_gy)
        ref = criteria_met(patient, np.asarray(patient.metadata["reference_dose_gy"]))
        par = [r for r in plan.results if r.goal.id in (tweak, f"{tweak}.pred")]
        par2 = [r for r in re.results if r.goal.id in (tweak, f"{tweak}.pred")]
        row = {"patient": f.stem, "n_beamlets": plan.dij.n_beamlets,
               "plan_s_with_dij": total, "plan_s_without_dij": total - dij_s,
               "dij_s": dij_s, "optimise_s": plan.timings_s.get("optimise (cpu)"),
               "warm_replan_s": warm_s, "warm_replan_stages_s": re.timings_s,
               "iterations": plan.optimizer["iterations"],
               "goals_met": plan.summary()["goals_passed"], "goals": len(plan.results),
               "hard_unmet": [u["id"] for u in plan.unmet_hard],
               "tweaked_goal": tweak,
               "tweaked_mean_gy": [par[0].achieved if par else None,
                                     par2[0].achieved if par2 else None],
               "criteria_ours": ours, "criteria_reference": ref}
        report["patients"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("criteria")}),
              flush=True)
        print(f"  criteria met: ours {sum(ours.values())}/{len(ours)}, reference "
              f"{sum(ref.values())}/{len(ref)}", flush=True)
        compare_backends(i, patient, f)
    if args.qp_only:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        return 0
    ours = [v for p in report["patients"] for v in p["criteria_ours"].values()]
    ref = [v for p in report["patients"] for v in p["criteria_reference"].values()]
    report["summary"] = {
        "criteria_share_ours": float(np.mean(ours)), "criteria_share_reference":
        float(np.mean(ref)), "n_criteria": len(ours),
        "plan_s_with_dij_median": float(np.median([p["plan_s_with_dij"]
                                                   for p in report["patients"]])),
        "plan_s_without_dij_median": float(np.median([p["plan_s_without_dij"]
                                                      for p in report["patients"]])),
        "warm_replan_s_median": float(np.nanmedian([p["warm_replan_s"]
                                                    for p in report["patients"]])),
    }
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
