"""Leaf-sequencing benchmark: speed, MU / segments per beam, fidelity (gamma, DVH deltas).

For each case (the embedded phantom; optionally an OpenKBP patient) the pencil-beam dose
engine builds the dij, the pipeline's optimiser (cpu backend, default predictor and goal
list) gives the ideal fluence, and each sequencer turns it into a delivery whose dose is
recomputed from the apertures (``atp.sequencer.deliverable``, MLC / jaw transmission and
tongue-and-groove included; ``*_no_leakage``: the same delivery with the open-area
fraction alone, i.e. the sequencing by itself). Gamma is 3 %/3 mm global with a 10 %
threshold on the patient grid, ideal dose (``dij @ fluence``, no leakage) as reference.

* IMRT: 9 equispaced fields; ``imrt-sns`` (Xia-Verhey, 10 levels) vs ``imrt-sliding``.
* Each rule-based result is also shown after MU re-weighting (``atp.sequencer.reweight``:
  least-squares MU of the fixed apertures against the ideal dose), except sliding window.
* VMAT: one full arc; fluence optimised on control points every ``--arc-spacing`` degrees
  and sequenced as two arcs (default, second = residual), one arc, and one arc with the
  plain AIRT rule (threshold relative to the control point maximum only);
  (default 4: a 2-degree arc dij is ~1 GB on the phantom). Sequencing time is also
  measured for 180 control points (each optimised map used for two 2-degree points).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_sequencer.py [--openkbp PATH.npz]
        [--openkbp-vmat] [--arc-spacing 4] [--repeat 5] [--json results/bench_sequencer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _best_ms(fn, repeat):
    best = np.inf
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return 1000.0 * best, out


def _plan_fluence(patient, beams):
    from atp.dose import registry
    from atp.pipeline import plan

    t = time.perf_counter()
    dij = registry.get("pencil-beam").influence(patient, beams)
    t_dij = time.perf_counter() - t
    t = time.perf_counter()
    pl = plan(patient, dij=dij, backend="cpu", progress=False)
    return dij, np.asarray(pl.fluence, dtype=np.float64), {"dij_s": t_dij,
                                                           "optimise_s": time.perf_counter() - t}


def _fidelity_row(patient, dij, ideal, d):
    from atp.sequencer import check_delivery
    from atp.sequencer.deliverable import delivered_weights
    from atp.sequencer.fidelity import fidelity

    from atp.dose.aperture import Transmission
    from atp.pipeline import patient_dose

    fx = d.fractions
    t = time.perf_counter()
    w = delivered_weights(d, dij.beamlets)
    t_dose = time.perf_counter() - t
    deliv = patient_dose(dij, w)
    names = [n for n in patient.targets + patient.organs if patient.structures[n].n_voxels]
    masks = {n: patient.mask(n) for n in names}
    fid = fidelity(ideal, deliv, patient.grid.spacing_mm, masks)
    # the same delivery without MLC / jaw transmission and T&G (open-area fraction only):
    # the sequencing alone, as this benchmark measured before the leakage physics
    bare = patient_dose(dij, delivered_weights(d, dij.beamlets, transmission=Transmission()))
    fid0 = fidelity(ideal, bare, patient.grid.spacing_mm, masks)
    return {
        "aperture_weights_ms": round(1000 * t_dose, 1),
        "control_points": int(sum(b.n_control_points for b in d.beams)),
        "mu_per_fraction": round(d.total_mu / fx, 1),
        "mu_per_beam_per_fraction": [round(b.mu / fx, 1) for b in d.beams],
        "segments_per_beam": [b.n_segments for b in d.beams],
        "delivery_time_s": round(d.delivery_time_s(), 1),
        "gamma_pass_pct": fid["gamma"]["pass_rate_pct"],
        "dvh_delta_gy": fid["dvh_delta_gy"], "violations": check_delivery(d),
        "gamma_pass_pct_no_leakage": fid0["gamma"]["pass_rate_pct"],
        "dvh_delta_gy_no_leakage": fid0["dvh_delta_gy"],
    }


def _evaluate(patient, dij, fluence, technique, repeat, **params):
    """Rule-based sequencing alone, then (step-and-shoot, VMAT) with MU re-weighting."""
    from atp.sequencer.reweight import reweight_mu

    from atp import sequencer
    from atp.pipeline import patient_dose

    fx = patient.fractions or 1
    ms, d = _best_ms(lambda: sequencer.sequence(fluence, dij, technique, fractions=fx,
                                                reweight=False, **params), repeat)
    ideal = patient_dose(dij, fluence)
    rows = [{"technique": technique, "params": params, "reweight": False,
             "sequence_ms": round(ms, 2), **_fidelity_row(patient, dij, ideal, d)}]
    if technique != "imrt-sliding":
        t = time.perf_counter()
        d2 = reweight_mu(d, dij, dij.dose(fluence))
        rw = time.perf_counter() - t
        rows.append({"technique": technique, "params": params, "reweight": True,
                     "reweight_s": round(rw, 2), **_fidelity_row(patient, dij, ideal, d2)})
    return rows


def _vmat_180_timing(dij, fluence, repeat, fractions):
    """Time the VMAT sequencer on 180 control points (2 degrees) built from the arc's
    optimised maps, each used for two neighbouring control points."""
    from atp.sequencer import load_machine
    from atp.sequencer.fluence import fluence_set
    from atp.sequencer.vmat import sequence_arc

    m = load_machine("millennium120")
    fs = fluence_set(fluence, dij.beamlets, m.leaf_edges_mm, fractions=fractions)
    lo = min(float(b.x_edges_mm[0]) for b in fs.beams)
    hi = max(float(b.x_edges_mm[-1]) for b in fs.beams)
    pix = fs.beams[0].pixel_mm
    nx = round((hi - lo) / pix)
    maps = np.zeros((len(fs.beams), m.n_pairs, nx))
    for k, b in enumerate(fs.beams):
        off = round((float(b.x_edges_mm[0]) - lo) / pix)
        maps[k, :, off:off + b.fluence_mu.shape[1]] = b.fluence_mu
    reps = max(1, round(180 / len(fs.beams)))
    maps = np.repeat(maps, reps, axis=0)[:180]
    gantry = (181.0 + 2.0 * np.arange(maps.shape[0])) % 360
    edges = lo + pix * np.arange(nx + 1)
    ms, _ = _best_ms(lambda: sequence_arc(maps, edges, gantry, m, fractions), repeat)
    return {"control_points": int(maps.shape[0]), "leaf_pairs": m.n_pairs,
            "columns": nx, "sequence_ms": round(ms, 2)}


def run_case(name, patient, arc_spacing, repeat, vmat=True):
    from atp.dose.geometry import arc_control_points, equispaced_beams

    out = {"case": name, "grid": list(patient.grid.shape)}
    dij, w, t = _plan_fluence(patient, equispaced_beams(9))
    out["imrt_setup"] = {k: round(v, 1) for k, v in t.items()}
    out["imrt"] = (_evaluate(patient, dij, w, "imrt-sns", repeat)
                   + _evaluate(patient, dij, w, "imrt-sliding", repeat))
    print(json.dumps(out["imrt"], indent=1), flush=True)
    del dij
    if not vmat:
        return out
    dij, w, t = _plan_fluence(patient, arc_control_points(181, 179, arc_spacing))
    out["vmat_setup"] = {k: round(v, 1) for k, v in t.items()}
    out["vmat_setup"]["control_points"] = int(dij.beamlets.n_beams)
    out["vmat"] = (_evaluate(patient, dij, w, "vmat", repeat)  # defaults: 2 passes
                   + _evaluate(patient, dij, w, "vmat", repeat, passes=1)
                   + _evaluate(patient, dij, w, "vmat", repeat, passes=1,
                               mu_relative_pass=False))
    out["vmat_180cp_timing"] = _vmat_180_timing(dij, w, repeat, patient.fractions or 1)
    print(json.dumps(out["vmat"], indent=1), json.dumps(out["vmat_180cp_timing"]), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--openkbp", help="also run an OpenKBP patient (.npz)")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--openkbp-vmat", action="store_true",
                    help="also run the VMAT arc on the OpenKBP patient (large dij)")
    ap.add_argument("--arc-spacing", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="results/bench_sequencer.json")
    args = ap.parse_args(argv)
    cases = []
    if not args.skip_phantom:
        from atp.phantom import head_neck_phantom

        cases.append(run_case("phantom", head_neck_phantom(), args.arc_spacing, args.repeat))
    if args.openkbp:
        from atp.io import load_patient

        p = load_patient(args.openkbp)
        cases.append(run_case(Path(args.openkbp).stem, p, args.arc_spacing, args.repeat,
                              vmat=args.openkbp_vmat))
    report = {"machine": platform.processor() or platform.machine(), "cases": cases}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
