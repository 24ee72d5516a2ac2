"""Fast-path tuning harness: fast-path option sets side by side on training patients.

For each OpenKBP *training* patient (tune on training patients only; the validation split
is the benchmark): load, predict (``--predictor``, default the registry's default),
build the fast path's arc dij (one full arc, ``--arc-spacing`` deg, dose grid / 3; cached
under ``--cache`` with the prediction), then plan with every ``--config`` (a name and a
JSON dict of ``fastpath_options``, plus ``device``, ``initial_fluence`` -- default
'fallback' --, ``weights``, ``correction`` -- default 'exact' --,
``correction_weights``, ``vmat_passes``, ``vmat_sequencer``, ``sector_deg`` and ``preset``) through ``atp.plan(..., fast=True, dij=...,
predicted_dose=...)``, and print the share of the standard H&N criteria met
(``bench_optimizer.CRITERIA``) on the deliverable dose, PTV_70 D99 and HI, the mean
parotid dose and the time per plan; the reference plan's criteria for comparison.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_fastpath.py \
        --config base='{}' --config cov='{"coverage_weight": 4.0}' --json /tmp/tune_fp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import DATA
from tune_plan_quality import DEFAULT_PATIENTS


def cached_inputs(patient, name: str, cache: Path, predictor: str | None,
                  arc_spacing: float, dose_grid_factor: int = 3):
    """(arc dij, predicted dose Gy) for ``patient``, computed once and cached."""
    from atp.predictor import registry as predictors

    from atp.dose import arc as arcs
    from atp.dose.geometry import arc_control_points
    from atp.dose.influence import DoseInfluence

    pname = predictor or predictors.default_predictor_name()
    dij_path = cache / (f"{name}_arc{arc_spacing:g}.npz" if dose_grid_factor == 3 else
                        f"{name}_arc{arc_spacing:g}_f{dose_grid_factor}.npz")
    pred_path = cache / f"{name}_{pname}.npy"
    cache.mkdir(parents=True, exist_ok=True)
    if dij_path.is_file():
        dij = DoseInfluence.load(dij_path)
    else:
        cps = arc_control_points(180.0, 180.0, arc_spacing)
        dij = arcs.arc_influence(patient, cps, engine="pencil-beam", dose_grid_factor=dose_grid_factor,
                                 beamlet_size_mm=5.0)
        dij.save(dij_path)
    if pred_path.is_file():
        pred = np.load(pred_path)
    else:
        pred = np.asarray(predictors.get(pname).predict(patient), np.float32)
        np.save(pred_path, pred)
    return dij, pred


def summary(patient, dose_gy) -> dict:
    """``bench_fastpath.quality`` (criteria, PTV_70 HI, OAR means) plus PTV_70 D99 / D2
    and the mean of the parotid mean doses (Gy)."""
    from bench_fastpath import quality

    from atp import dvh

    q = quality(patient, dose_gy)
    out = {"met": q["criteria_met"], "n": q["criteria_n"], "criteria": q["criteria"]}
    if "ptv70_hi" in q:
        m = patient.mask("PTV_70")
        out["ptv70_d99_gy"] = float(dvh.dose_at_volume_pct(dose_gy, m, 99))
        out["ptv70_hi"] = q["ptv70_hi"]
        out["ptv70_d2_gy"] = float(dvh.dose_at_volume_pct(dose_gy, m, 2))
    par = [v for n, v in q["oar_mean_gy"].items() if n in ("Parotid_L", "Parotid_R")]
    out["parotid_mean_gy"] = float(np.mean(par)) if par else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train")
    ap.add_argument("--patients", nargs="*", default=DEFAULT_PATIENTS[:5])
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=JSON fastpath_options (repeatable)")
    ap.add_argument("--predictor", default=None)
    ap.add_argument("--arc-spacing", type=float, default=4.0)
    ap.add_argument("--dose-grid-factor", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/atp_tune_arc")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.split != "train":
        print("warning: tune on training patients only", file=sys.stderr)
    configs = {}
    for item in args.config or ["default={}"]:
        name, _, js = item.partition("=")
        configs[name] = json.loads(js or "{}")

    import atp
    from atp.io import load_patient

    rows = []
    for pt in args.patients:
        patient = load_patient(DATA / args.split / f"{pt}.npz")
        dij, pred = cached_inputs(patient, pt, Path(args.cache), args.predictor,
                                  args.arc_spacing, args.dose_grid_factor)
        row = {"patient": pt}
        ref = patient.metadata.get("reference_dose_gy")
        if ref is not None:
            row["reference"] = summary(patient, np.asarray(ref))
        for name, opts in configs.items():
            opts = dict(opts)
            fast = {"device": opts.pop("device", "cpu"),
                    "initial_fluence": opts.pop("initial_fluence", "fallback")}
            fast["correction"] = opts.pop("correction", "exact")
            fast["vmat_passes"] = opts.pop("vmat_passes", 2)
            for key in ("vmat_sequencer", "sector_deg", "preset"):
                if key in opts:
                    fast[key] = opts.pop(key)
            for key in ("weights", "correction_weights"):
                if key in opts:
                    fast[key] = opts.pop(key)
            t0 = time.perf_counter()
            plan = atp.plan(patient, fast=True, dij=dij, predicted_dose=pred, progress=False,
                            fast_options={**fast, "fastpath_options": opts})
            secs = time.perf_counter() - t0
            row[name] = {**summary(patient, plan.dose_gy), "seconds": secs,
                         "beam_on_s": plan.delivery.delivery_time_s(),
                         "ideal": summary(patient, plan.ideal_dose_gy)}
            r = row[name]
            print(f"{pt} {name:>12}: {r['met']}/{r['n']} (ideal {r['ideal']['met']}, D99 "
                  f"{r['ideal'].get('ptv70_d99_gy', float('nan')):.1f}, D2 "
                  f"{r['ideal'].get('ptv70_d2_gy', float('nan')):.1f}) D2 "
                  f"{r.get('ptv70_d2_gy', float('nan')):.1f} "
                  f"D99 {r.get('ptv70_d99_gy', float('nan')):.1f} "
                  f"HI {r.get('ptv70_hi', float('nan')):.3f} parotid "
                  f"{r['parotid_mean_gy'] or float('nan'):.1f} Gy, {secs:.1f} s, beam-on "
                  f"{r['beam_on_s']:.0f} s; fails "
                  f"{[k for k, ok in r['criteria'].items() if not ok]}", flush=True)
        rows.append(row)
    print("\nconfig         criteria met   PTV_70 D99 Gy   HI     parotid mean Gy   s/plan"
          "   beam-on s")
    for name in ["reference", *configs]:
        rs = [r[name] for r in rows if name in r]
        met = sum(r["met"] for r in rs)
        n = sum(r["n"] for r in rs)
        def mean(k, rs=rs):
            return np.nanmean([r.get(k) if r.get(k) is not None else np.nan for r in rs])
        secs = mean("seconds") if name != "reference" else float("nan")
        print(f"{name:>12}   {met:3d}/{n:<3d} {100 * met / max(n, 1):5.1f} %   "
              f"{mean('ptv70_d99_gy'):6.1f}        {mean('ptv70_hi'):.3f}   "
              f"{mean('parotid_mean_gy'):6.1f}          {secs:5.1f}   "
              f"{mean('beam_on_s') if name != 'reference' else float('nan'):7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"configs": configs, "rows": rows}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
