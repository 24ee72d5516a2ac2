"""Compare atp's pencil-beam dose with pyRadPlan's on the TG119 phantom (gamma 3 %/3 mm).

    nice -n 10 .venv/bin/python benchmarks/compare_pyradplan.py EXPORT.npz \
        [--pyradplan-python /tmp/pyrp/bin/python]

With ``--pyradplan-python`` the export is (re)computed first by that interpreter, so
both engines are timed in the same run, one after the other.

``EXPORT.npz`` comes from ``benchmarks/pyradplan_export.py`` run in a throw-away
pyRadPlan environment. The same fluence is given to both engines: every pyRadPlan bixel
(a 5 mm square at the isocentre plane around its ray) at unit weight, mapped onto atp's
beamlet grid by exact area overlap (atp's beamlet edges sit on multiples of 5 mm,
pyRadPlan's ray centres do, so each of its bixels spreads over 2 x 2 atp beamlets and
the field edge is blurred by at most 2.5 mm). The engines' absolute calibrations differ
(MU vs matRad's bixel weight), so atp's dose is scaled by one factor (mean dose in the
target). Gamma: global 3 % of the pyRadPlan maximum, 3 mm, over voxels where pyRadPlan
gives >= 10 % of its maximum; atp's dose interpolated trilinearly at 1 mm offsets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import map_coordinates

from atp.dose.geometry import Beam
from atp.dose.pencil_beam import PencilBeamEngine
from atp.grid import Grid
from atp.patient import Patient, Role, Structure


def gamma_pass_rate(ref, ev, spacing_mm, *, dd=0.03, dta_mm=3.0, cutoff=0.10, step_mm=1.0):
    """Global gamma pass rate (%) of ``ev`` against ``ref`` on the same grid."""
    dmax = float(ref.max())
    idx = np.argwhere(ref >= cutoff * dmax).astype(np.float64)
    rv = ref[ref >= cutoff * dmax].astype(np.float64)
    r = np.arange(-dta_mm, dta_mm + 1e-9, step_mm)
    offs = np.array([(a, b, c) for a in r for b in r for c in r
                     if a * a + b * b + c * c <= dta_mm ** 2 + 1e-9])
    best = np.full(rv.shape, np.inf)
    for o in offs:
        coords = (idx + o / np.asarray(spacing_mm)).T
        e = map_coordinates(ev, coords, order=1, mode="nearest")
        g2 = (o @ o) / dta_mm ** 2 + ((e - rv) / (dd * dmax)) ** 2
        np.minimum(best, g2, out=best)
    return 100.0 * float(np.mean(best <= 1.0)), int(rv.size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--dose-grid-factor", type=int, default=2)
    ap.add_argument("--depth-method", choices=("voxel", "fan"), default="voxel")
    ap.add_argument("--pyradplan-python", help="python of a throw-away pyRadPlan venv: "
                                               "run benchmarks/pyradplan_export.py first")
    args = ap.parse_args()
    if args.pyradplan_python:
        import subprocess
        from pathlib import Path

        script = Path(__file__).with_name("pyradplan_export.py")
        subprocess.run([args.pyradplan_python, str(script), args.export], check=True,
                       stderr=subprocess.DEVNULL)
    d = np.load(args.export)
    spacing_xyz = d["spacing_mm"]
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # z, y, x
    sitk_dir = d["direction"]
    if not np.allclose(sitk_dir, np.eye(3)):
        raise SystemExit("expected an axis-aligned SimpleITK image")
    grid = Grid(d["ct_hu"].shape, spacing_xyz[::-1], d["origin_mm"], direction)
    structures = {}
    for key in d.files:
        if key.startswith("mask_"):
            _, vtype, name = key.split("_", 2)
            role = (Role.TARGET if vtype == "TARGET" else
                    Role.EXTERNAL if name.upper() == "BODY" else Role.ORGAN)
            structures[name] = Structure(name, d[key], role)
    patient = Patient(np.clip(d["ct_hu"], -1024, 3071), grid, structures,
                      patient_id="TG119", source=args.export)
    targets = [n for n, s in structures.items() if s.role == Role.TARGET]

    beams = []
    for g, c, iso, src in zip(d["gantry_deg"], d["couch_deg"], d["iso_mm"], d["source_mm"]):
        b = Beam(float(g) % 360.0, 0.0, float(c) % 360.0, tuple(iso))
        ours = b.frame().source_mm
        print(f"gantry {g:6.1f}: pyRadPlan source {np.round(src, 1)}, atp source "
              f"{np.round(ours, 1)}")
        beams.append(b)
    t, c = time.perf_counter(), time.process_time()
    engine = PencilBeamEngine(depth_method=args.depth_method)
    dij = engine.influence(patient, beams, dose_grid_factor=args.dose_grid_factor,
                                       margin_mm=10.0, targets=targets)
    wall, cpu = time.perf_counter() - t, time.process_time() - c

    # pyRadPlan bixels -> atp beamlet weights (exact area overlap at the isocentre plane)
    w = np.zeros(dij.n_beamlets)
    info = dij.beamlets
    half = 2.5
    covered = 0.0
    for b, beam in enumerate(beams):
        frame = beam.frame()
        pos = d["ray_pos_mm"][d["ray_beam"] == b]
        cand = [pos, pos + np.asarray(beam.isocenter_mm)]  # relative or absolute
        u = v = None
        for p in cand:
            uu, vv, ss = frame.project(p)
            if np.allclose(ss, frame.sad_mm, atol=1e-3):
                u, v = uu, vv
                break
        if u is None:
            raise SystemExit("pyRadPlan ray positions are not on the isocentre plane")
        cols = info.columns_of_beam(b)
        bx, by = info.bev_x_mm[cols][:, None], info.bev_y_mm[cols][:, None]
        ox = np.clip(np.minimum(bx + half, u[None] + half) - np.maximum(bx - half, u[None] - half),
                     0, None)
        oy = np.clip(np.minimum(by + half, v[None] + half) - np.maximum(by - half, v[None] - half),
                     0, None)
        frac = (ox * oy) / 25.0
        w[cols] += frac.sum(axis=1)
        covered += frac.sum()
    n_rays = d["ray_pos_mm"].shape[0]
    ours = dij.patient_dose(w)
    ref = d["dose"].astype(np.float64)
    tmask = np.zeros(grid.shape, bool)
    for n in targets:
        tmask |= structures[n].mask
    scale = ref[tmask].mean() / ours[tmask].mean()
    ev = ours * scale
    rate, n_vox = gamma_pass_rate(ref, ev, grid.spacing_mm)
    print(f"pyRadPlan dij: {int(d['n_bixels'])} bixels, {float(d['wall_s']):.1f} s wall, "
          f"{float(d['cpu_s']):.1f} s CPU, peak RSS {int(d['peak_rss_mb'])} MB")
    print(f"atp dij: {dij.n_beamlets} beamlets (dose grid x{args.dose_grid_factor}, depth "
          f"{args.depth_method}), nnz {dij.matrix.nnz}, "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"fluence mapped: {covered:.1f} of {n_rays} bixel areas on atp beamlets")
    print(f"calibration scale (pyRadPlan / atp, target mean): {scale:.4g}")
    print(f"gamma 3%/3mm global, >= 10% of max: {rate:.1f} % of {n_vox} voxels pass")


if __name__ == "__main__":
    main()
