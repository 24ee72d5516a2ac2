"""Where the H&N gamma of single fields against the independent engine fails (issue 20
item 2): the failing voxels of ``benchmarks/independent_engine.py``'s H&N case sorted by
place -- depth below the entrance skin, behind air cavities, field edge, low dose --
with the pass rate per place and the pass rate under the usual exclusions.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hn_gamma_regions.py --work WORK \\
        [--patient PATH.npz] [--fields 1,2] [--heterogeneity KEY=VALUE]
        [--slab-work FULL_WORK] [--json OUT.json]

WORK is the work folder of an ``independent_engine.py --cases hn`` run (atp's and the
CCC's doses of the water fields and the H&N fields are read from it, nothing is
recomputed); the dose sets, CCC calibration (per field at 10 cm depth in water) and gamma
(atp.gamma, 3 %/3 mm global, CCC the reference, 10 % threshold of the CCC maximum, body
only) are the ones that script reports. ``--fields`` indexes its HN_FIELDS (0: G0 10 x 10,
1: G90, 2: G270, 3: G30 5 x 5).

Places of a scored voxel, per field (the ray is the divergent ray from the source through
the voxel centre, sampled every 0.5 mm):

* entrance depth: geometric distance from the voxel back along the ray to the first body
  voxel the ray meets coming from the source (the entrance skin);
* behind air: the ray crossed >= 2 mm of air inside the body (< -400 HU) between the
  entrance skin and the voxel, and the voxel is <= 20 mm of path past that air;
* field edge: the voxel's BEV position at the isocentre plane within 6 mm of the jaw edge
  (inside or outside); out of field: more than 6 mm outside it;
* dose level: the CCC dose relative to its maximum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt, map_coordinates

sys.path.insert(0, str(Path(__file__).resolve().parent))
import independent_engine as ie

from atp.dose.geometry import Beam
from atp.gamma import gamma_index

STEP_MM = 0.5
AIR_HU = -400.0


def _calibration(work: Path) -> dict:
    """atp / CCC on the central axis at 10 cm depth in water, per field side (cm), from
    the cached water cases (the same numbers independent_engine.py uses)."""
    cal = {}
    for f in sorted({s for _, s in ie.HN_FIELDS}):
        p = ie.phantom(f)
        atp, ccc, _ = ie.case(work, f"water_{f:g}", p, [(0.0, 10.0 * f, (0, 0, 0))], None, 1)
        y = ie.depth_mm(p.grid) / 10.0
        a, c = ie._cax(atp[0], p.grid), ie._cax(ccc[0], p.grid)
        cal[f] = float(np.interp(10.0, y, a) / np.interp(10.0, y, c))
    return cal


def _doses(work: Path, patient_path: str):
    from atp.dose.geometry import default_isocenter
    from atp.io.openkbp import load_openkbp_npz

    p = load_openkbp_npz(patient_path)
    iso = tuple(float(v) for v in default_isocenter(p))
    body = p.body_mask
    idx = np.argwhere(body)
    margin = np.ceil(np.where(np.arange(3) == np.argmax(np.abs(p.grid.direction[2])),
                              50.0, 30.0) / p.grid.spacing_mm).astype(int)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, np.array(p.grid.shape))
    fields = [(g, 10.0 * s, iso) for g, s in ie.HN_FIELDS]
    atp, ccc, _ = ie.case(work, f"hn_{Path(patient_path).stem}", p, fields, None, 1,
                          crop=(lo, hi))
    cal = _calibration(work)
    ccc = ccc * body
    for n, (_, s) in enumerate(ie.HN_FIELDS):
        ccc[n] *= cal[s]
    return p, iso, atp, ccc, cal


def ray_features(p, iso, gantry_deg: float, side_mm: float, idx: np.ndarray) -> dict:
    """Per voxel index (N, 3): entrance depth, air crossed and path since it, BEV edge
    distance (mm), along the divergent ray from the source."""
    g = p.grid
    fr = Beam(gantry_deg, 0.0, 0.0, iso).frame()
    pts = g.origin_mm + (idx * g.spacing_mm) @ g.direction.T
    u, v, _s = fr.project(pts)
    edge = np.maximum(np.abs(u), np.abs(v)) - side_mm / 2.0  # > 0 outside the field
    body = p.body_mask.astype(np.float32)
    air = (p.body_mask & (p.ct_hu < AIR_HU)).astype(np.float32)
    to_src = fr.source_mm - pts
    dist = np.linalg.norm(to_src, axis=1)
    unit = to_src / dist[:, None]
    n_steps = int(np.ceil(350.0 / STEP_MM))
    entrance = np.zeros(len(idx))
    inv = np.linalg.inv(g.direction * g.spacing_mm)  # patient mm -> index
    in_body_path = np.zeros((len(idx), n_steps + 1), bool)
    in_air_path = np.zeros((len(idx), n_steps + 1), bool)
    for k in range(n_steps + 1):
        t = k * STEP_MM
        q = (pts + t * unit - g.origin_mm) @ inv.T
        in_body_path[:, k] = map_coordinates(body, q.T, order=0, mode="constant") > 0.5
        in_air_path[:, k] = map_coordinates(air, q.T, order=0, mode="constant") > 0.5
    last_body = np.where(in_body_path.any(1),
                         n_steps - np.argmax(in_body_path[:, ::-1], axis=1), 0)
    entrance = last_body * STEP_MM
    inside = np.arange(n_steps + 1)[None, :] <= last_body[:, None]
    air_path = in_air_path & inside
    air_mm = air_path.sum(1) * STEP_MM
    first_air = np.where(air_path.any(1), np.argmax(air_path, axis=1), -1)
    since_air = np.where(first_air >= 0, first_air * STEP_MM, np.inf)
    return {"entrance_mm": entrance, "air_mm": air_mm, "since_air_mm": since_air,
            "edge_mm": edge}


def regions(p, feat, rel_dose, skin_mm) -> dict:
    """Boolean masks (N,) of the places, in the order they are assigned exclusively."""
    behind_air = (feat["air_mm"] >= 2.0) & (feat["since_air_mm"] <= 20.0)
    return {
        "build-up, entrance depth < 5 mm": feat["entrance_mm"] < 5.0,
        "entrance depth 5-10 mm": (feat["entrance_mm"] >= 5.0) & (feat["entrance_mm"] < 10.0),
        "air voxel inside the body (< -400 HU)": skin_mm["air"] <= 0.0,
        "tissue within 5 mm of air inside the body": skin_mm["air"] <= 5.0,
        "behind air (>= 2 mm crossed, <= 20 mm past)": behind_air,
        "field edge (BEV within 6 mm of the jaw edge)": np.abs(feat["edge_mm"]) <= 6.0,
        "out of field (BEV > 6 mm outside the edge)": feat["edge_mm"] > 6.0,
        "exit skin (< 5 mm of the skin, not entrance)": skin_mm["skin"] < 5.0,
        "low dose 10-20 % of max": rel_dose < 0.2,
        "rest: in field, >= 10 mm deep, tissue, >= 20 %": np.ones(len(rel_dose), bool),
    }


def analyse(p, iso, ref, ev, gantry, side_mm) -> dict:
    sp = p.grid.spacing_mm
    g = gamma_index(ref, ev, sp, dose_pct=3.0, dta_mm=3.0, threshold_pct=10.0)
    idx = np.argwhere(g.mask)
    fail = g.gamma > 1.0
    rel = ref[g.mask] / ref.max()
    diff = 100.0 * (ev[g.mask] - ref[g.mask]) / ref.max()
    feat = ray_features(p, iso, gantry, side_mm, idx.astype(float))
    body = p.body_mask
    dist_skin = distance_transform_edt(body, sampling=sp)[g.mask]
    dist_air = distance_transform_edt(~(body & (p.ct_hu < AIR_HU)), sampling=sp)[g.mask]
    regs = regions(p, feat, rel, {"skin": dist_skin, "air": dist_air})
    taken = np.zeros(len(rel), bool)
    table = []
    for name, m in regs.items():
        own = m & ~taken
        taken |= own
        table.append({"place": name, "scored": int(own.sum()),
                      "pass_pct": round(100.0 * float(np.mean(~fail[own])), 1) if own.any()
                      else None,
                      "failing": int((fail & own).sum()),
                      "share_of_failing_pct": round(100.0 * float((fail & own).sum())
                                                    / max(1, int(fail.sum())), 1),
                      "mean_atp_minus_ccc_failing_pct_of_max": round(
                          float(diff[fail & own].mean()), 2) if (fail & own).any() else None,
                      "atp_lower_failing": int((fail & own & (diff < 0)).sum())})

    # the same voxels in non-exclusive bins: dose level and entrance depth
    bins = {}
    for lo, hi in ((0.1, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 9.0)):
        bins[f"dose {100 * lo:.0f}-{min(100 * hi, 100):.0f} % of max"] = (rel >= lo) & (rel < hi)
    for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 1e9)):
        bins[f"entrance depth {lo}-{hi if hi < 1e9 else 'max'} mm"] = (
            (feat["entrance_mm"] >= lo) & (feat["entrance_mm"] < hi))
    binned = [{"bin": k, "scored": int(m.sum()),
               "pass_pct": round(100.0 * float(np.mean(~fail[m])), 1) if m.any() else None,
               "failing": int((fail & m).sum()),
               "mean_atp_minus_ccc_pct_of_max": round(float(diff[m].mean()), 2)
               if m.any() else None} for k, m in bins.items()]

    # the field edge split by side: u = in-plane (along leaf travel), v = cranio-caudal
    fr = Beam(gantry, 0.0, 0.0, iso).frame()
    u, v, _ = fr.project(p.grid.origin_mm + (idx * sp) @ p.grid.direction.T)
    edges = []
    for name, e, other in (("u", np.abs(u) - side_mm / 2, np.abs(v) - side_mm / 2),
                           ("v", np.abs(v) - side_mm / 2, np.abs(u) - side_mm / 2)):
        for lo, hi in ((-6, -3), (-3, 0), (0, 3), (3, 6)):
            m = (e >= lo) & (e < hi) & (other < -6.0)
            if m.any():
                edges.append({"edge": name, "band_mm": [lo, hi], "scored": int(m.sum()),
                              "pass_pct": round(100.0 * float(np.mean(~fail[m])), 1),
                              "mean_atp_minus_ccc_failing_pct_of_max": round(
                                  float(diff[m & fail].mean()), 2) if (m & fail).any()
                              else None})

    # the entrance layers in field (> 8 mm inside the edge, no air on the path), whole
    # CCC-thresholded set: mean dose in % of the CCC maximum, each engine
    layers = []
    inner = (feat["edge_mm"] < -8.0) & (feat["air_mm"] < 1.0)
    for lo, hi in ((0.0, 2.5), (2.5, 5.0), (5.0, 7.5), (7.5, 10.0), (15.0, 25.0)):
        m = inner & (feat["entrance_mm"] >= lo) & (feat["entrance_mm"] < hi)
        if m.any():
            layers.append({"entrance_mm": [lo, hi], "voxels": int(m.sum()),
                           "atp_pct": round(100.0 * float(ev[g.mask][m].mean() / ref.max()), 1),
                           "ccc_pct": round(100.0 * float(ref[g.mask][m].mean() / ref.max()), 1)})

    def rate(keep):
        return {"pass_pct": round(100.0 * float(np.mean(~fail[keep])), 1),
                "scored": int(keep.sum())}

    ent = feat["entrance_mm"]
    variants = {
        "10 % threshold (as reported)": rate(np.ones(len(rel), bool)),
        "10 %, without the first 5 mm below the entrance skin": rate(ent >= 5.0),
        "10 %, without the first 5 mm below any skin": rate(dist_skin >= 5.0),
        "10 %, without the first 10 mm below the entrance skin": rate(ent >= 10.0),
        "20 % threshold": rate(rel >= 0.2),
        "20 %, without the first 5 mm below any skin": rate((rel >= 0.2) & (dist_skin >= 5.0)),
        "10 %, tissue only (>= -400 HU), without 5 mm below any skin": rate(
            (p.ct_hu[g.mask] >= AIR_HU) & (dist_skin >= 5.0)),
    }
    # central-axis depth dose in the patient: atp / CCC along the beam axis
    fr = Beam(gantry, 0.0, 0.0, iso).frame()
    ts = np.arange(-150.0, 150.1, 5.0)
    pts = np.asarray(iso)[None, :] - ts[:, None] * fr.z_axis[None, :]
    q = ((pts - p.grid.origin_mm) @ np.linalg.inv(p.grid.direction * sp).T).T
    a_ax = map_coordinates(ev, q, order=1, mode="constant")
    c_ax = map_coordinates(ref, q, order=1, mode="constant")
    b_ax = map_coordinates(body.astype(np.float32), q, order=0, mode="constant") > 0.5
    ent_t = ts[b_ax].min() if b_ax.any() else 0.0
    mx = float(ref.max())
    axis = [{"depth_mm": round(float(t - ent_t), 1), "atp_pct": round(100 * float(a) / mx, 1),
             "ccc_pct": round(100 * float(c) / mx, 1),
             "atp_over_ccc": round(float(a / c), 3) if c > 0 else None}
            for t, a, c, b in zip(ts, a_ax, c_ax, b_ax) if b]
    return {"gamma_3_3_pct": round(g.pass_rate_pct, 1), "scored": g.n_scored,
            "failing": int(fail.sum()), "places": table, "bins": binned, "edge_bands": edges,
            "entrance_layers": layers, "variants": variants,
            "central_axis": axis}


def _variant_doses(p, iso, atp, spec: str, fields: str) -> np.ndarray:
    """atp's doses of ``fields`` recomputed with the model's heterogeneity parameters
    changed as in ``spec``; the water calibration is unchanged (uniform media do not see
    these parameters)."""
    import tempfile

    import atp.dose.beam_model as bm

    model = json.loads(bm.DEFAULT_MODEL.read_text())
    for item in spec.split(","):
        k, v = item.split("=")
        if k not in model["parameters"]["heterogeneity"]:
            sys.exit(f"--heterogeneity: {k!r} is not a heterogeneity parameter")
        model["parameters"]["heterogeneity"][k] = float(v)
    out = atp.copy()
    shipped = bm.DEFAULT_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        bm.DEFAULT_MODEL = Path(tmp) / "model.json"
        bm.DEFAULT_MODEL.write_text(json.dumps(model))
        try:
            for n in (int(x) for x in fields.split(",")):
                g, s = ie.HN_FIELDS[n]
                out[n] = ie.atp_dose(p, [(g, 10.0 * s, iso)])[0]
        finally:
            bm.DEFAULT_MODEL = shipped
    return out


def slab_check(slab_work: Path, spec: str | None) -> list:
    """Central-axis slab / water ratios of atp (model changed as in ``spec``, or shipped)
    and the CCC at the slab depths of independent_engine.py, for a few slab cases whose
    CCC and water doses are cached in ``slab_work`` (a full independent_engine.py run)."""
    import tempfile

    import atp.dose.beam_model as bm

    shipped = bm.DEFAULT_MODEL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if spec:
            model = json.loads(shipped.read_text())
            for item in spec.split(","):
                k, v = item.split("=")
                model["parameters"]["heterogeneity"][k] = float(v)
            bm.DEFAULT_MODEL = Path(tmp) / "model.json"
            bm.DEFAULT_MODEL.write_text(json.dumps(model))
        try:
            for mat, hu, side in (("air", -1000.0, 10.0), ("air", -1000.0, 3.0),
                                  ("lung", -740.0, 2.0), ("lung", -740.0, 5.0)):
                p = ie.phantom(side, hu)
                a = ie.atp_dose(p, [(0.0, 10.0 * side, (0, 0, 0))])[0]
                ld = {k: np.load(slab_work / f"{k}.npz")["dose"][0] for k in (
                    f"atp_water_{side:g}", f"ccc_{mat}_{side:g}", f"ccc_water_{side:g}")}
                y = ie.depth_mm(p.grid) / 10.0
                cax = {k: ie._cax(v, p.grid) for k, v in ld.items()}
                ax = ie._cax(a, p.grid)
                for d in (7.35, 8.25, 8.55, 9.75, 11.85):
                    j = int(np.argmin(np.abs(y - d)))
                    rows.append({"case": f"{mat}_{side:g}x{side:g}", "depth_cm": round(float(y[j]), 2),
                                 "atp": round(float(ax[j] / cax[f"atp_water_{side:g}"][j]), 3),
                                 "ccc": round(float(cax[f"ccc_{mat}_{side:g}"][j]
                                                    / cax[f"ccc_water_{side:g}"][j]), 3)})
        finally:
            bm.DEFAULT_MODEL = shipped
    return rows


def water_penumbra(work: Path, side_cm: float = 10.0, depth_cm: float = 10.0) -> dict:
    """80-20 % penumbra (mm) of the cached water field at ``depth_cm``, atp and CCC, both
    edges of the in-plane profile through the central axis (each profile normalised to
    its central value), linear interpolation between the 3 mm voxels."""
    p = ie.phantom(side_cm)
    atp, ccc, _ = ie.case(work, f"water_{side_cm:g}", p, [(0.0, 10.0 * side_cm, (0, 0, 0))],
                          None, 1)
    g = p.grid
    j = int(np.argmin(np.abs(ie.depth_mm(g) - 10.0 * depth_cm)))
    x = g.origin_mm[0] + g.axis_coords_mm(0)
    out = {}
    for name, d in (("atp", atp[0]), ("ccc", ccc[0])):
        prof = d[:, j, g.shape[2] // 2]
        prof = prof / prof[g.shape[0] // 2]
        widths = []
        for sgn in (1, -1):
            half = x * sgn >= 0
            xs, ps = np.abs(x[half]), prof[half]
            order = np.argsort(xs)
            xs, ps = xs[order], ps[order]
            x80 = np.interp(-0.8, -ps, xs)
            x20 = np.interp(-0.2, -ps, xs)
            widths.append(round(float(x20 - x80), 2))
        out[name] = widths
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--patient", default="/work/shared/data/openkbp/train/pt_1.npz")
    ap.add_argument("--fields", default="1,2")
    ap.add_argument("--heterogeneity", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="experiment: recompute atp's doses of --fields with the default "
                         "model's heterogeneity parameters changed (e.g. "
                         "max_lateral_scale=3); written to a temporary model file, the "
                         "shipped model and WORK are left alone")
    ap.add_argument("--slab-work", help="also: slab / water ratios of a few slab cases "
                    "(atp with --heterogeneity's model, CCC) from this full "
                    "independent_engine.py work folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    p, iso, atp, ccc, cal = _doses(Path(args.work), args.patient)
    if args.heterogeneity:
        atp = _variant_doses(p, iso, atp, args.heterogeneity, args.fields)
    out = {"patient": args.patient, "calibration": {f"{k:g}": v for k, v in cal.items()},
           "heterogeneity": args.heterogeneity,
           "water_10x10_penumbra_80_20_mm_at_10cm": water_penumbra(Path(args.work)),
           "fields": {}}
    print("water 10 x 10 penumbra 80-20 % at 10 cm (mm, both edges):",
          out["water_10x10_penumbra_80_20_mm_at_10cm"], flush=True)
    for n in (int(s) for s in args.fields.split(",")):
        gantry, side = ie.HN_FIELDS[n]
        label = f"G{gantry:g} {side:g}x{side:g}"
        out["fields"][label] = analyse(p, iso, ccc[n], atp[n], gantry, 10.0 * side)
        print(label, json.dumps(out["fields"][label], indent=1), flush=True)
    if args.slab_work:
        out["slabs"] = slab_check(Path(args.slab_work), args.heterogeneity)
        for r in out["slabs"]:
            print(r, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
