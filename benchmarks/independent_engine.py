"""atp's dose against an independent engine: opentps-core 3.0.1's collapsed-cone
convolution (CCC, the WiscPlan engine it ships) on water, slab phantoms and an OpenKBP
H&N CT (issue 20 item 2).

    bash benchmarks/opentps_setup.sh /work/venvs/opentps        # once, throw-away venv
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/independent_engine.py \\
        --opentps-python /work/venvs/opentps/bin/python --work /tmp/indep \\
        [--cases water,slab,hn] [--patient PATH.npz] [--json OUT.json]

atp (this interpreter) and opentps (the throw-away one, ``benchmarks/opentps_ccc.py``)
never share a process: per case this script writes the density (atp's HU table) and the
field geometry (atp's IEC beam frames) to ``WORK/case_NAME.npz``, the other interpreter
writes the CCC dose to ``WORK/ccc_NAME.npz``, atp's doses go to ``WORK/atp_NAME.npz``
(all reused on a rerun; delete them to recompute). atp's dose of each open field is the
``atp dose`` code path (:func:`atp.forward.forward_dose`: a static delivery, jaws
defining the field, leaves retracted, 100 MU, dose grid = CT grid).

What the CCC engine is and is not: a polyenergetic point-kernel convolution (6 polar x
12 azimuthal cones, density-scaled kernels, beam hardening in terma), uniform fluence
inside the jaws (no horns, no source size, no head scatter, no MLC/jaw leakage, no
electron contamination) and no MU calibration. So only shapes and ratios are compared:

* water, SSD 100: PDDs (each curve normalised at its maximum) of atp, CCC and the
  published reference data atp was fitted to (``atp/data/photon_6mv_reference.csv``);
* slabs (3 cm of air or lung rho 0.25 from 5.1 to 8.1 cm depth, water around):
  heterogeneous / homogeneous central-axis dose per depth for each engine, same field,
  same MU, and atp minus CCC;
* H&N: every CCC field is scaled so that its central-axis dose at 10 cm depth in water
  (SSD 100, the same field) equals atp's -- the independent engine inherits atp's output
  factor and MU calibration, so what differs is the transport in the patient. Gamma
  (atp.gamma: global, CCC as reference, 10 % threshold of the CCC maximum, both doses
  inside the body only) per field and for the fields summed.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from atp.dose.commission import water_phantom
from atp.dose.density import hu_to_density
from atp.dose.geometry import Beam
from atp.forward import forward_dose
from atp.gamma import gamma_index
from atp.patient import Patient

SPACING = 3.0  # mm, phantoms
BIG_FIELD_SPACING = 5.0  # mm, fields over 10 cm: atp's 3 mm dij of a 20 x 20 field needs ~9 GB
DEPTH_MM = 300.0
SLAB_MM = (51.0, 81.0)  # on the 3 mm voxel boundaries
SLABS = (("air", -1000.0), ("lung", -740.0))  # atp HU table: 0.001 and 0.25
WATER_FIELDS_CM = (3.0, 5.0, 10.0, 20.0)
SLAB_FIELDS_CM = (2.0, 3.0, 5.0, 10.0)
PDD_DEPTHS_CM = (1.5, 3.0, 5.0, 10.0, 15.0, 20.0, 25.0)
SLAB_DEPTHS_CM = (3.0, 4.5, 6.0, 7.5, 8.25, 8.55, 9.0, 9.75, 10.5, 12.0, 15.0, 20.0)
HN_FIELDS = ((0.0, 10.0), (90.0, 10.0), (270.0, 10.0), (30.0, 5.0))  # gantry, side cm
MU = 100.0
REF_CSV = Path(__file__).resolve().parents[1] / "atp" / "data" / "photon_6mv_reference.csv"


def _odd(n: float) -> int:
    n = int(np.ceil(n))
    return n if n % 2 else n + 1


def phantom(side_cm: float, slab_hu: float | None = None) -> Patient:
    """Water box, SSD 100 cm for gantry 0 (iso on the surface), wide enough for the
    diverging field at 30 cm depth plus 2 cm, odd voxel counts so a voxel sits on the
    central axis; optionally a slab of ``slab_hu`` across SLAB_MM of depth."""
    sp = SPACING if side_cm <= 10.0 else BIG_FIELD_SPACING
    lat = _odd((13.0 * side_cm + 40.0) / sp) * sp
    p = water_phantom((lat, DEPTH_MM, lat), (sp,) * 3, target_half_mm=5.0)
    if slab_hu is None:
        return p
    ct = p.ct_hu.copy()
    y = depth_mm(p.grid)
    ct[:, (y > SLAB_MM[0]) & (y < SLAB_MM[1]), :] = slab_hu
    return Patient(ct, p.grid, p.structures, p.prescriptions, p.patient_id, {}, p.source)


def depth_mm(g) -> np.ndarray:
    """Depth (mm) of the voxel centres along the phantom's y axis (surface at y = 0)."""
    return g.origin_mm[1] + g.axis_coords_mm(1)


def open_field(iso, gantry_deg: float, side_mm: float):
    """(static open-field delivery, its dose beam): square jaws, leaves 2 cm outside."""
    from atp.sequencer.delivery import BeamDelivery, Delivery
    from atp.sequencer.machine import load_machine

    m = load_machine("millennium120")
    h = side_mm / 2.0
    n = m.n_pairs
    beam = BeamDelivery("open", "static", np.full(2, gantry_deg), 0.0, 0.0, np.asarray(iso),
                        np.full((2, n), -h - 20.0), np.full((2, n), h + 20.0),
                        np.array([[-h, h]] * 2), np.array([[-h, h]] * 2),
                        np.array([0.0, MU]), np.zeros(2, int), 1)
    return Delivery("imrt-sns", m, (beam,), 1), Beam(gantry_deg, 0.0, 0.0, tuple(iso))


def atp_dose(patient: Patient, fields) -> np.ndarray:
    """(F, *grid) atp dose in Gy for MU monitor units of each (gantry, side_mm, iso)."""
    out = []
    for g, side, iso in fields:
        delivery, beam = open_field(iso, g, side)
        dose, _ = forward_dose(patient, delivery, [beam], dose_grid_factor=1)
        out.append(np.asarray(dose, np.float32))
    return np.stack(out)


def ccc_geometry(patient: Patient, fields, lo=(0, 0, 0)) -> dict:
    """Field geometry in the array frame of the (cropped at index ``lo``) grid: voxel
    (i, j, k) centre at (i, j, k) * spacing mm."""
    g = patient.grid
    d = g.direction
    origin = g.origin_mm + d @ (np.asarray(lo) * g.spacing_mm)
    out = {k: [] for k in ("source_mm", "ip", "jp", "kp", "aperture_mm")}
    for gantry, side, iso in fields:
        fr = Beam(gantry, 0.0, 0.0, tuple(iso)).frame()
        ip, jp, kp = d.T @ fr.x_axis, d.T @ fr.y_axis, -(d.T @ fr.z_axis)
        ap = [0.0, 0.0, side, side]
        if np.dot(np.cross(ip, jp), kp) < 0:  # the engine needs cross(ip, jp) = kp
            ip, jp = jp, ip
        out["source_mm"].append(d.T @ (fr.source_mm - origin))
        out["ip"].append(ip)
        out["jp"].append(jp)
        out["kp"].append(np.cross(ip, jp))
        out["aperture_mm"].append(ap)  # square fields centred on the axis
    return {k: np.asarray(v, float) for k, v in out.items()}


def run_ccc(work: Path, name: str, python: str | None, jobs: int) -> dict:
    out = work / f"ccc_{name}.npz"
    if not out.exists():
        if python is None:
            sys.exit(f"{out}: missing; pass --opentps-python")
        script = Path(__file__).with_name("opentps_ccc.py")
        subprocess.run([python, str(script), str(work / f"case_{name}.npz"), str(out),
                        "--jobs", str(jobs)], check=True)
    return dict(np.load(out))


def case(work: Path, name: str, patient: Patient, fields, python, jobs, crop=None):
    """atp and CCC doses (F, *grid) of ``fields`` on ``patient`` (cached in ``work``)."""
    a = work / f"atp_{name}.npz"
    if a.exists():
        atp = np.load(a)["dose"]
    else:
        t = time.perf_counter()
        atp = atp_dose(patient, fields)
        np.savez_compressed(a, dose=atp, seconds=time.perf_counter() - t)
    lo, hi = (np.zeros(3, int), np.array(patient.grid.shape)) if crop is None else crop
    sl = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
    c = work / f"case_{name}.npz"
    if not c.exists():
        dens = hu_to_density(patient.ct_hu).astype(np.float32)[sl]
        np.savez(c, density=dens, spacing_mm=patient.grid.spacing_mm, sad_mm=1000.0,
                 **ccc_geometry(patient, fields, lo))
    res = run_ccc(work, name, python, jobs)
    ccc = np.zeros_like(atp)
    ccc[(slice(None),) + sl] = res["dose"]
    return atp, ccc, res


def _cax(dose, g):
    i, k = g.shape[0] // 2, g.shape[2] // 2
    return dose[..., i, :, k]


def _peak(y, d) -> float:
    """The curve's maximum from a cubic spline through the voxel centres (a coarse grid
    would otherwise miss the top of the build-up)."""
    from scipy.interpolate import CubicSpline

    fine = np.arange(y[0], y[-1], 0.01)
    return float(CubicSpline(y, d)(fine).max())


def reference_pdd(side_cm: float):
    with open(REF_CSV) as fh:
        rows = list(csv.reader(line for line in fh if not line.startswith("#")))
    pts = [(float(r[3]), float(r[5])) for r in rows[1:] if r[0] == "pdd"
           and float(r[1]) == side_cm and float(r[2]) == side_cm]
    return np.array(sorted(pts))


def water(args, work):
    out, cal = {}, {}
    cache = {}
    for f in sorted(set(WATER_FIELDS_CM) | set(SLAB_FIELDS_CM) | {5.0, 10.0}):
        p = phantom(f)
        atp, ccc, res = case(work, f"water_{f:g}", p, [(0.0, 10.0 * f, (0, 0, 0))],
                             args.opentps_python, args.jobs)
        y = depth_mm(p.grid) / 10.0
        cache[f] = (y, _cax(atp[0], p.grid), _cax(ccc[0], p.grid))
        a, c = cache[f][1], cache[f][2]
        cal[f] = float(np.interp(10.0, y, a) / np.interp(10.0, y, c))
        if f not in WATER_FIELDS_CM:
            continue
        ref = reference_pdd(f)
        rows = []
        for dcm in PDD_DEPTHS_CM:
            pa = 100 * np.interp(dcm, y, a) / _peak(y, a)
            pc = 100 * np.interp(dcm, y, c) / _peak(y, c)
            pr = float(np.interp(dcm, ref[:, 0], ref[:, 1])) if ref.size else None
            rows.append({"depth_cm": dcm, "atp": round(pa, 1), "ccc": round(pc, 1),
                         "reference": pr, "atp_minus_ccc": round(pa - pc, 1),
                         "atp_minus_ref": None if pr is None else round(pa - pr, 1)})
        out[f"{f:g}x{f:g}"] = {"dmax_cm": {"atp": round(float(y[a.argmax()]), 2),
                                           "ccc": round(float(y[c.argmax()]), 2)},
                               "rows": rows, "ccc_seconds": float(res["seconds"][0])}
    return out, cal, cache


def slabs(args, work, cache):
    out = {}
    for mat, hu in SLABS:
        for f in SLAB_FIELDS_CM:
            p = phantom(f, hu)
            atp, ccc, _res = case(work, f"{mat}_{f:g}", p, [(0.0, 10.0 * f, (0, 0, 0))],
                                 args.opentps_python, args.jobs)
            y, aw, cw = cache[f]
            a, c = _cax(atp[0], p.grid), _cax(ccc[0], p.grid)
            rows = []
            for dcm in SLAB_DEPTHS_CM:
                j = int(np.argmin(np.abs(y - dcm)))
                ra, rc = a[j] / aw[j], c[j] / cw[j]
                rows.append({"depth_cm": round(float(y[j]), 2),
                             "in_slab": bool(SLAB_MM[0] < 10 * y[j] < SLAB_MM[1]),
                             "atp": round(float(ra), 3), "ccc": round(float(rc), 3),
                             "atp_minus_ccc": round(float(ra - rc), 3)})
            out[f"{mat}_{f:g}x{f:g}"] = rows
    return out


def head_neck(args, work, cal):
    from atp.dose.geometry import default_isocenter
    from atp.io.openkbp import load_openkbp_npz

    p = load_openkbp_npz(args.patient)
    iso = tuple(float(v) for v in default_isocenter(p))
    body = p.body_mask
    # the CCC grid: the body's bounding box + 3 cm in plane, + 5 cm along the slices
    # (scatter from tissue further away is not computed: terma is zero outside the grid)
    idx = np.argwhere(body)
    margin = np.ceil(np.where(np.arange(3) == np.argmax(np.abs(p.grid.direction[2])),
                              50.0, 30.0) / p.grid.spacing_mm).astype(int)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, np.array(p.grid.shape))
    fields = [(g, 10.0 * s, iso) for g, s in HN_FIELDS]
    atp, ccc, res = case(work, f"hn_{Path(args.patient).stem}", p, fields,
                         args.opentps_python, args.jobs, crop=(lo, hi))
    ccc = ccc * body  # atp's dose grid is the body; the CCC dose in the air is dropped
    for n, (_, s) in enumerate(HN_FIELDS):
        ccc[n] *= cal[s]
    out = {"patient": str(args.patient), "isocentre_mm": [round(v, 1) for v in iso],
           "grid": list(p.grid.shape), "spacing_mm": [float(v) for v in p.grid.spacing_mm],
           "ccc_seconds": [round(float(s)) for s in res["seconds"]], "fields": []}
    # where gamma fails: within 15 mm of the skin, within 10 mm of air inside the body
    # (< -400 HU: airway, oral cavity, sinuses), elsewhere
    from scipy.ndimage import distance_transform_edt

    sp_mm = p.grid.spacing_mm
    skin = distance_transform_edt(body, sampling=sp_mm) <= 15.0
    cavity = distance_transform_edt(~(body & (p.ct_hu < -400)), sampling=sp_mm) <= 10.0
    sets = [(f"G{g:g} {s:g}x{s:g}", [n]) for n, (g, s) in enumerate(HN_FIELDS)]
    sets.append(("all fields summed", list(range(len(HN_FIELDS)))))
    for label, ns in sets:
        ref, ev = ccc[ns].sum(0), atp[ns].sum(0)
        row = {"fields": label}
        for dd, dta in ((3.0, 3.0), (2.0, 2.0)):
            g = gamma_index(ref, ev, p.grid.spacing_mm, dose_pct=dd, dta_mm=dta,
                            threshold_pct=10.0)
            row[f"gamma_{dd:g}_{dta:g}"] = round(g.pass_rate_pct, 1)
            row["n_scored"] = g.n_scored
            # the same gamma, scored in tissue only (dose in air voxels, < -400 HU, is
            # defined differently by the two engines)
            tissue = p.ct_hu[g.mask] >= -400
            row[f"gamma_{dd:g}_{dta:g}_tissue"] = round(
                100.0 * float(np.mean(g.gamma[tissue] <= 1.0)), 1)
            if dd == 3.0:
                fail = np.zeros(ref.shape, bool)
                fail[g.mask] = g.gamma > 1.0
                near_air = fail & cavity
                at_skin = fail & skin & ~cavity
                row["fail_3_3"] = {
                    "near_air_cavity": int(near_air.sum()), "skin_15mm": int(at_skin.sum()),
                    "elsewhere": int((fail & ~cavity & ~skin).sum()),
                    "atp_higher": int((fail & (ev > ref)).sum()),
                    "atp_lower": int((fail & (ev <= ref)).sum())}
        hi_dose = ref >= 0.5 * ref.max()
        row["mean_diff_pct_above_50"] = round(float(100 * np.mean(ev[hi_dose] - ref[hi_dose])
                                                    / ref.max()), 2)
        out["fields"].append(row)
    return out


def markdown(res: dict) -> str:
    """The per-depth / per-field tables of ``res`` as Markdown."""
    out = [("PDD (% of each curve's maximum), water, SSD 100 cm, central axis; "
           "d_max atp / CCC in the heading:"), ""]
    for name, w in res["water"].items():
        out += [(f"| {name} (d_max {w['dmax_cm']['atp']} / {w['dmax_cm']['ccc']} cm) "
                "| atp | CCC | reference | atp - CCC | atp - reference |"),
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['depth_cm']:g} cm | {r['atp']} | {r['ccc']} | {r['reference']} | "
                f"{r['atp_minus_ccc']:+.1f} | {r['atp_minus_ref']:+.1f} |" for r in w["rows"]]
        out.append("")
    if "slab" in res:
        first = next(iter(res["slab"].values()))
        heads = [f"{r['depth_cm']:g}" + (" (in slab)" if r["in_slab"] else "") for r in first]
        out += [("Slab / water central-axis dose at the same depth (same field, same MU), "
                "atp | CCC | atp - CCC per depth (cm):"), "",
                "| slab, field | " + " | ".join(heads) + " |",
                "| --- |" + " --- |" * len(heads)]
        for name, rows in res["slab"].items():
            out.append(f"| {name} | " + " | ".join(
                f"{r['atp']:.3f} / {r['ccc']:.3f} ({r['atp_minus_ccc']:+.3f})" for r in rows)
                + " |")
        out.append("")
    if "hn" in res:
        h = res["hn"]
        out += [(f"H&N {h['patient']}, isocentre {h['isocentre_mm']} mm, CT grid {h['grid']} "
                f"x {h['spacing_mm']} mm:"), "",
                ("| fields | gamma 3 %/3 mm | gamma 2 %/2 mm | the same, tissue only (>= -400 "
                 "HU) | voxels scored | mean atp - CCC above 50 % (% of max) |"),
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['fields']} | {r['gamma_3_3']} % | {r['gamma_2_2']} % | "
                f"{r['gamma_3_3_tissue']} / {r['gamma_2_2_tissue']} % | {r['n_scored']} "
                f"| {r['mean_diff_pct_above_50']:+.2f} |" for r in h["fields"]]
        out += ["", ("Voxels failing 3 %/3 mm, by place (within 10 mm of air inside the body, "
                     "i.e. airway / oral cavity; else within 15 mm of the skin; else "
                     "elsewhere) and by sign (atp higher / lower than CCC):"), "",
                "| fields | near air cavity | skin | elsewhere | atp higher | atp lower |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['fields']} | " + " | ".join(str(r["fail_3_3"][k]) for k in (
            "near_air_cavity", "skin_15mm", "elsewhere", "atp_higher", "atp_lower")) + " |"
            for r in h["fields"]]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opentps-python", help="python of the throw-away opentps venv")
    ap.add_argument("--work", default="/tmp/indep_engine")
    ap.add_argument("--cases", default="water,slab,hn")
    ap.add_argument("--patient", default="/work/shared/data/openkbp/train/pt_1.npz")
    ap.add_argument("--jobs", type=int, default=1, help="CCC fields run in parallel")
    ap.add_argument("--json")
    ap.add_argument("--markdown", help="write the tables as Markdown to this file")
    ap.add_argument("--report", help="only render --markdown from this earlier --json")
    args = ap.parse_args()
    if args.report:
        text = markdown(json.loads(Path(args.report).read_text()))
        Path(args.markdown).write_text(text) if args.markdown else print(text)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = set(args.cases.split(","))
    res = {"date": "2026-12-03", "engine": "opentps-core 3.0.1 CCC_DoseEngine, Kernels_6MV"}
    res["water"], cal, cache = water(args, work)
    res["calibration_atp_over_ccc_at_10cm"] = {f"{k:g}": round(v, 6) for k, v in cal.items()}
    if "slab" in cases:
        res["slab"] = slabs(args, work, cache)
    if "hn" in cases:
        res["hn"] = head_neck(args, work, cal)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
