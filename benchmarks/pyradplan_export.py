"""Run pyRadPlan's photon pencil-beam engine on its TG119 phantom and export what
``benchmarks/compare_pyradplan.py`` needs. Runs ONLY in a throw-away environment:

    python -m venv /tmp/pyrp && /tmp/pyrp/bin/pip install "pyRadPlan==0.5.0" \
        "pydantic<2.14" "numpy<2.4"
    nice -n 10 /tmp/pyrp/bin/python benchmarks/pyradplan_export.py OUT.npz [--beams 7]

pyRadPlan is never a dependency of atp. Exported: the CT (HU, array axes z, y, x as
SimpleITK gives them, origin / spacing in mm), target and body masks, beam angles,
isocentre, source points and ray (bixel) positions in world mm, pyRadPlan's dose on the
CT grid for unit weight on every bixel, and its dij timing / size / peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    import SimpleITK as sitk
    from pyRadPlan import PhotonPlan, calc_dose_influence, generate_stf, load_tg119

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--beams", type=int, default=7)
    args = ap.parse_args()
    ct, cst = load_tg119()
    pln = PhotonPlan(machine="Generic")
    angles = np.linspace(0, 360, args.beams, endpoint=False)
    pln.prop_stf = {"gantry_angles": angles, "couch_angles": np.zeros(args.beams),
                    "bixel_width": 5.0}
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": 5.0, "y": 5.0, "z": 5.0}}}
    stf = generate_stf(ct, cst, pln)
    t, c = time.perf_counter(), time.process_time()
    dij = calc_dose_influence(ct, cst, stf, pln)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    m = dij.physical_dose.flat[0]
    n = m.shape[1]
    dose = sitk.GetArrayFromImage(dij.compute_result_ct_grid(np.ones(n))["physical_dose"])
    img = ct.cube_hu
    out = {
        "ct_hu": sitk.GetArrayFromImage(img).astype(np.float32),
        "origin_mm": np.array(img.GetOrigin()), "spacing_mm": np.array(img.GetSpacing()),
        "direction": np.array(img.GetDirection()).reshape(3, 3),
        "dose": dose.astype(np.float32),
        "gantry_deg": np.array([b.gantry_angle for b in stf.beams]),
        "couch_deg": np.array([b.couch_angle for b in stf.beams]),
        "iso_mm": np.array([b.iso_center for b in stf.beams]),
        "source_mm": np.array([b.source_point for b in stf.beams]),
        "ray_beam": np.concatenate([np.full(len(b.rays), i) for i, b in enumerate(stf.beams)]),
        "ray_pos_mm": np.concatenate([[r.ray_pos for r in b.rays] for b in stf.beams]),
        "wall_s": wall, "cpu_s": cpu, "n_bixels": n, "nnz": m.nnz,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    for voi in cst.vois:
        mask = sitk.GetArrayFromImage(voi.mask).astype(bool) if hasattr(voi, "mask") else None
        if mask is None:
            continue
        out[f"mask_{voi.voi_type}_{voi.name}"] = mask
    np.savez_compressed(args.out, **out)
    print(f"pyRadPlan dij: {n} bixels, nnz {m.nnz}, {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"peak RSS {out['peak_rss_mb']} MB -> {args.out}")


if __name__ == "__main__":
    main()
