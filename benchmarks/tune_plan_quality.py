"""Plan-quality tuning harness: criteria met by ``atp plan`` vs the reference plan.

Plans K OpenKBP *training* patients with the main pipeline (9 equispaced coplanar
beams, pencil-beam dij, ``baseline`` predictor, cpu backend, sequenced) and prints, per
patient and per standard head-and-neck criterion (``CRITERIA`` of
``bench_optimizer.py``), pass/fail for our plan, our ideal (unsequenced) fluence dose and
the patient's reference plan, plus the plan's failing goals and the ideal-vs-deliverable
gap. Tune on training patients only: the validation split is the benchmark.

The dij of each patient is cached under ``--cache`` (default /tmp/atp_tune_dij) so that
repeated runs skip the dose engine.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/tune_plan_quality.py \
        --patients pt_1 pt_10 pt_100 --json /tmp/tune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import CRITERIA, DATA, criteria_met, criterion_measures

DEFAULT_PATIENTS = ["pt_1", "pt_10", "pt_101", "pt_103", "pt_104", "pt_105", "pt_106",
                    "pt_108"]


def _dij(patient, path: Path, dose_grid_factor: int):
    from atp.dose import registry as engines
    from atp.dose.influence import DoseInfluence
    from atp.pipeline import make_beams

    if path.is_file():
        return DoseInfluence.load(path)
    dij = engines.get("pencil-beam").influence(patient, make_beams(9, None),
                                               beamlet_size_mm=5.0,
                                               dose_grid_factor=dose_grid_factor)
    path.parent.mkdir(parents=True, exist_ok=True)
    dij.save(path)
    return dij


def criteria_values(patient, dose_gy) -> dict[str, float]:
    """The value behind each criterion of :func:`criteria_met` (Gy; D99 in % of Rx)."""
    return {key: float(100.0 * v / rx if kind == "D99rx" else v)
            for key, kind, _, v, rx in criterion_measures(patient, dose_gy)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train")
    ap.add_argument("--patients", nargs="*", default=DEFAULT_PATIENTS)
    ap.add_argument("--cache", default="/tmp/atp_tune_dij")
    ap.add_argument("--dose-grid-factor", type=int, default=2)
    ap.add_argument("--no-sequence", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.split != "train":
        print("warning: tune on training patients only", file=sys.stderr)

    import atp
    from atp.errors import InputError
    from atp.io import load_patient

    labels = sorted({f"{lab} [{s}]" for lab, s, _, _ in CRITERIA},
                    key=lambda k: [f"{lab} [{s}]" for lab, s, _, _ in CRITERIA].index(k))
    tally = {k: {"ours": [0, 0], "ideal": [0, 0], "ref": [0, 0]} for k in labels}
    rows = []
    for name in args.patients:
        patient = load_patient(DATA / args.split / f"{name}.npz")
        try:
            dij = _dij(patient, Path(args.cache) / f"{name}_f{args.dose_grid_factor}.npz",
                       args.dose_grid_factor)
        except InputError as exc:  # e.g. a CT not in HU: atp plan refuses it too
            print(f"\n== {name}: skipped ({exc})")
            continue
        t0 = time.perf_counter()
        plan = atp.plan(patient, site="hn", predictor="baseline", backend="cpu", beams=9,
                        progress=False, dij=dij, sequence=not args.no_sequence)
        secs = time.perf_counter() - t0
        ours = criteria_met(patient, plan.dose_gy)
        ideal = criteria_met(patient, plan.ideal_dose_gy if plan.ideal_dose_gy is not None
                             else plan.dose_gy)
        ref = criteria_met(patient, np.asarray(patient.metadata["reference_dose_gy"]))
        for k in ours:
            for which, d in (("ours", ours), ("ideal", ideal), ("ref", ref)):
                tally[k][which][0] += int(d[k])
                tally[k][which][1] += 1
        failing = [(r.goal.id, r.goal.priority, r.goal.value, r.achieved)
                   for r in plan.results if r.passed is False]
        print(f"\n== {name}: {secs:.1f} s ({plan.optimizer.get('iterations')} it, "
              f"status {plan.optimizer.get('status')}); met ours {sum(ours.values())}/"
              f"{len(ours)}, ideal {sum(ideal.values())}/{len(ideal)}, "
              f"ref {sum(ref.values())}/{len(ref)}")
        vals = {w: criteria_values(patient, d) for w, d in (
            ("ours", plan.dose_gy), ("ideal", plan.ideal_dose_gy if plan.ideal_dose_gy
                                     is not None else plan.dose_gy),
            ("ref", np.asarray(patient.metadata["reference_dose_gy"])))}
        for k in ours:
            print(f"  {k:42s} ours {'ok ' if ours[k] else 'NO '}{vals['ours'][k]:6.1f}"
                  f"  ideal {'ok ' if ideal[k] else 'NO '}{vals['ideal'][k]:6.1f}"
                  f"  ref {'ok ' if ref[k] else 'NO '}{vals['ref'][k]:6.1f}")
        print("  failing goals:", ", ".join(
            f"{i}(P{p}) {v:.3g}->{a:.3g}" for i, p, v, a in failing if a is not None))
        if plan.fidelity:
            print(f"  fidelity: gamma 3%/3mm pass "
                  f"{plan.fidelity['gamma']['pass_rate_pct']:.1f} %")
        rows.append({"patient": name, "seconds": secs, "ours": ours, "ideal": ideal,
                     "ref": ref, "failing": failing})

    def share(which):
        m = sum(v[which][0] for v in tally.values())
        n = sum(v[which][1] for v in tally.values())
        return m / max(n, 1), m, n

    print("\n== per criterion (met / applicable): ours | ideal | reference")
    for k, v in tally.items():
        if v["ours"][1]:
            print(f"  {k:42s} {v['ours'][0]}/{v['ours'][1]} | {v['ideal'][0]}/"
                  f"{v['ideal'][1]} | {v['ref'][0]}/{v['ref'][1]}")
    for which in ("ours", "ideal", "ref"):
        s, m, n = share(which)
        print(f"  {which:6s} {m}/{n} = {100 * s:.1f} %")
    print(f"  mean seconds per plan (dij cached): "
          f"{np.mean([r['seconds'] for r in rows]):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tally": tally}, indent=1,
                                              default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
