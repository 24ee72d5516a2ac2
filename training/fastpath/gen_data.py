"""Training data for Bev2Fluence: BEV inputs + optimised fluence maps, one npz per patient.

    python -m training.fastpath.gen_data --data ../shared/data/openkbp --split train \\
        --out DIR [--limit N] [--arc-spacing 6] [--dose-grid-factor 3] [--max-iter 300]

Per patient: load, predict the dose (``--predictor``; default: the registry's default, as
``atp plan --fast``), build the dij of one full arc (one control point per
``--arc-spacing`` deg, coarse dose grid), run the full optimiser pipeline (cpu backend,
no sequencing) for the target fluence (MU), and compute the BEV inputs exactly as the
fast path does at inference
(:func:`atp.optimizer.fastpath.bev2fluence.bev_features`). Saved per patient (compressed):

  inputs       float32 (n_cp, n_channels, n_v, n_u)   network input (see ``channels``)
  target_mu    float32 (n_cp, n_v, n_u)   optimised fluence, MU (0 where no beamlet)
  mask         bool    (n_cp, n_v, n_u)   True where a beamlet exists
  gantry_deg   float64 (n_cp,)
  u_mm, v_mm   float64 BEV pixel centres at the isocentre plane (mm)
  channels     str     the input channel names;  meta_json  str  (ids, settings, timings)

Resumable (patients whose file exists are skipped); each file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


class _ScipyTranspose:
    """``transpose_apply(g) = A.T @ g`` with scipy (no torch CSR copy of A to build)."""

    def __init__(self, matrix) -> None:
        self.a_t = matrix.T.tocsr()

    def transpose_apply(self, g):
        import torch

        return torch.from_numpy(np.asarray(self.a_t @ g.cpu().numpy(), dtype=np.float32))


def dose_grid_inputs(patient, dij, predicted_dose_gy) -> SimpleNamespace:
    """What :func:`~atp.optimizer.fastpath.bev2fluence.bev_features` reads from a prepared
    FastPath (pred, rx, oar_w, mimic_w on the dose grid: :func:`~atp.optimizer.fastpath.
    chain.dose_grid_arrays`, as FastPath builds them; ``op.transpose_apply``), without
    FastPath's step-size estimate and torch copy of A, which the features do not need
    (about half of the per-patient feature time)."""
    import torch
    from atp.optimizer.fastpath.chain import dose_grid_arrays

    g = dose_grid_arrays(patient, dij.dose_grid, predicted_dose_gy)
    return SimpleNamespace(dij=dij, pred=g.pred, rx=g.rx, oar_w=g.oar_w, mimic_w=g.mimic_w,
                           op=_ScipyTranspose(dij.matrix), device=torch.device("cpu"))


def patient_record(patient, dij, predicted_dose_gy, target_fluence_mu) -> dict:
    """The arrays saved for one patient (see module docstring), given the target fluence."""
    from atp.optimizer.fastpath.bev2fluence import FEATURE_CHANNELS, FEATURE_VERSION, bev_features

    feats, layout = bev_features(dose_grid_inputs(patient, dij, predicted_dose_gy))
    target = np.asarray(target_fluence_mu, dtype=np.float32).reshape(-1)
    return {"inputs": feats.cpu().numpy().astype(np.float32),
            "target_mu": layout.scatter(target), "mask": layout.mask(),
            "gantry_deg": dij.beamlets.gantry_deg, "u_mm": layout.u_mm,
            "v_mm": layout.v_mm, "channels": np.array(FEATURE_CHANNELS),
            "feature_version": np.array(FEATURE_VERSION)}


def save_record(path: Path, record: dict, meta: dict) -> None:
    """Compressed npz, written atomically (:func:`atp.outputs.atomic_write_file`)."""
    from atp.outputs import atomic_write_file

    atomic_write_file(path, lambda fh: np.savez_compressed(
        fh, meta_json=np.array(json.dumps(meta, default=str)), **record))


def generate_one(path: Path, args, predictor) -> tuple[dict, dict]:
    """Record and metadata of one OpenKBP patient (timings in seconds)."""
    from atp.dose.arc import ARC_THRESHOLD, arc_influence
    from atp.dose.geometry import arc_control_points
    from atp.io import load_patient
    from atp.pipeline import plan

    t = {}
    t0 = time.perf_counter()
    patient = load_patient(path)
    pred = predictor.predict(patient)
    t1 = time.perf_counter()
    t["load_predict"] = t1 - t0
    cps = arc_control_points(args.arc_start, args.arc_start, args.arc_spacing)
    dij = arc_influence(patient, cps, dose_grid_factor=args.dose_grid_factor,
                        threshold=ARC_THRESHOLD)
    t2 = time.perf_counter()
    t["dij"] = t2 - t1
    pl = plan(patient, site=args.site, predicted_dose=pred, dij=dij, backend="cpu",
              sequence=False, progress=False, optimizer_options={"max_iter": args.max_iter})
    t3 = time.perf_counter()
    t["plan"] = t3 - t2
    record = patient_record(patient, dij, pred, pl.fluence)
    t["features"] = time.perf_counter() - t3
    s = pl.summary()
    meta = {"patient_id": patient.patient_id, "source": str(path), "split": args.split,
            "predictor": args.predictor, "site": args.site, "arc_start_deg": args.arc_start,
            "arc_spacing_deg": args.arc_spacing, "control_points": len(cps),
            "dose_grid_factor": args.dose_grid_factor, "threshold": ARC_THRESHOLD,
            "n_beamlets": dij.n_beamlets, "dose_grid_shape": list(dij.dose_grid.shape),
            "max_iter": args.max_iter, "optimizer_status": pl.optimizer.get("status"),
            "optimizer_iterations": pl.optimizer.get("iterations"),
            "optimizer_objective": pl.optimizer.get("objective"),
            "goals_passed": s["goals_passed"], "goals_total": s["goals_total"],
            "timings_s": t}
    return record, meta


def refeature_one(path: Path, dest: Path, args, predictor) -> tuple[dict, dict]:
    """Record and metadata of an existing ``dest`` with its inputs recomputed by this
    code's :func:`~atp.optimizer.fastpath.bev2fluence.bev_features` (current feature version,
    ``--predictor``); the target fluence (the optimiser's) is kept, so no re-planning."""
    from atp.optimizer.fastpath.bev2fluence import BEVLayout

    from atp.dose.arc import ARC_THRESHOLD, arc_influence
    from atp.dose.geometry import arc_control_points
    from atp.io import load_patient

    with np.load(dest) as z:
        meta = json.loads(str(z["meta_json"]))
        old_maps = np.asarray(z["target_mu"])
    t0 = time.perf_counter()
    patient = load_patient(path)
    pred = predictor.predict(patient)
    cps = arc_control_points(meta["arc_start_deg"], meta["arc_start_deg"],
                             meta["arc_spacing_deg"])
    dij = arc_influence(patient, cps, dose_grid_factor=meta["dose_grid_factor"],
                        threshold=meta.get("threshold", ARC_THRESHOLD))
    if dij.n_beamlets != meta["n_beamlets"]:
        raise RuntimeError(f"{dest}: the arc dij now has {dij.n_beamlets} beamlets, the "
                           f"record {meta['n_beamlets']}; generate it again")
    layout = BEVLayout.from_beamlets(dij.beamlets)
    if tuple(layout.shape) != tuple(old_maps.shape):
        raise RuntimeError(f"{dest}: BEV layout changed; generate it again")
    record = patient_record(patient, dij, pred, layout.gather(old_maps))
    meta = dict(meta, feature_predictor=args.predictor,
                refeatured_s=time.perf_counter() - t0)
    return record, meta


def _needs_refeature(dest: Path) -> bool:
    from atp.optimizer.fastpath.bev2fluence import FEATURE_VERSION

    with np.load(dest) as z:
        return int(z["feature_version"]) != FEATURE_VERSION


def source_files(data, split: str, limit: int | None = None) -> list[Path]:
    """The OpenKBP patient files of ``data/split`` in patient-number order (first
    ``limit``)."""
    src = sorted(Path(data, split).glob("*.npz"), key=_patient_key)
    return src if limit is None else src[:limit]


def _patient_key(p: Path):
    m = re.search(r"(\d+)", p.stem)
    return (int(m.group(1)) if m else 0, p.stem)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fastpath.gen_data",
                                 description=__doc__.split("\n")[0])
    add_common_arguments(ap, arc_spacing_deg=6.0)
    ap.add_argument("--arc-start", type=float, default=180.0, help="arc start, deg (180)")
    ap.add_argument("--max-iter", type=int, default=300, help="optimiser iterations (300)")
    ap.add_argument("--site", default="hn")
    ap.add_argument("--refeature", action="store_true",
                    help="recompute the inputs of existing files made with another feature "
                         "version (keeps their target fluence; no re-planning)")
    args = ap.parse_args(argv)
    src, out, predictor = common_setup(args)

    def make(path, dest):
        if dest.exists() and args.refeature and _needs_refeature(dest):
            record, meta = refeature_one(path, dest, args, predictor)
            return record, meta, "inputs recomputed"
        if dest.exists():
            return None
        record, meta = generate_one(path, args, predictor)
        tm = meta["timings_s"]
        return record, meta, (f"dij {tm['dij']:.1f}, plan {tm['plan']:.1f}, features "
                              f"{tm['features']:.1f}; {meta['n_beamlets']} beamlets, goals "
                              f"{meta['goals_passed']}/{meta['goals_total']}")

    return write_patients(src, out, make)


def add_common_arguments(ap, *, arc_spacing_deg: float) -> None:
    """The options both training-data generators take (data, split, output, patients,
    arc, dose grid, predictor, threads)."""
    ap.add_argument("--data", required=True, help="OpenKBP root (with train/, validation/)")
    ap.add_argument("--split", default="train", choices=("train", "validation"))
    ap.add_argument("--out", required=True, help="output folder (one npz per patient)")
    ap.add_argument("--limit", type=int, default=None, help="first N patients (by id)")
    ap.add_argument("--arc-spacing", type=float, default=arc_spacing_deg,
                    help=f"control-point spacing of the full arc, deg ({arc_spacing_deg:g})")
    ap.add_argument("--dose-grid-factor", type=int, default=3, help="dij dose grid (3)")
    ap.add_argument("--predictor", default=None,
                    help="predictor of the goals and inputs (default: the registry's "
                         "default, as atp plan --fast)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1)")


def common_setup(args):
    """(source patient files, output folder, predictor) for parsed common arguments;
    sets the torch threads and fills in the default predictor's name."""
    import torch
    from atp.predictor import registry as predictors

    torch.set_num_threads(args.threads)
    args.predictor = args.predictor or predictors.default_predictor_name()
    return (source_files(args.data, args.split, args.limit), Path(args.out),
            predictors.get(args.predictor))


def write_patients(src, out: Path, make) -> int:
    """For each source patient file, ``make(path, dest)`` -> (record, meta, message) or
    None (``dest`` is up to date: skipped); the record is written atomically to
    ``out/<stem>.npz``. A failing patient is reported and left for the next run (the
    loop goes on). Returns the exit status: 1 when any patient failed."""
    done = failed = 0
    t_all = time.perf_counter()
    for i, path in enumerate(src, 1):
        dest = out / f"{path.stem}.npz"
        t0 = time.perf_counter()
        try:
            made = make(path, dest)
        except Exception as exc:  # noqa: BLE001 - keep going; retried on the next run
            failed += 1
            print(f"[{i}/{len(src)}] {path.stem}: FAILED {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            continue
        if made is None:
            print(f"[{i}/{len(src)}] {path.stem}: exists, skipped", flush=True)
            continue
        record, meta, message = made
        save_record(dest, record, meta)
        done += 1
        print(f"[{i}/{len(src)}] {path.stem}: {time.perf_counter() - t0:.1f} s ({message})"
              f" -> {dest}", flush=True)
    print(f"done: {done} written, {failed} failed, {len(src) - done - failed} skipped, "
          f"{time.perf_counter() - t_all:.0f} s", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    raise SystemExit(main())
