"""``atp dij``: compute (or import) a dose-influence matrix and save it as ``.npz``.

    atp dij PATIENT --beams 9 [--beam-angles 0,40,...] [--dose-grid-factor 2] --out dij.npz
    atp dij --import matrad FILE.mat --out dij.npz

The ``.npz`` layout is documented in :mod:`atp.dose.influence`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from atp.commands import argtypes, common
from atp.commands.common import add_hidden_alias, print_json
from atp.errors import InputError
from atp.outputs import check_output_file
from atp.progress import is_terminal

# CLI start-up: the CLI imports every command to build its parser, so the dose engines
# (atp.dose.*) load inside the functions that use them (marked "lazy: CLI start-up")


def register(sub) -> None:
    p = sub.add_parser("dij", help="compute or import a dose-influence matrix (.npz)")
    p.add_argument("patient", nargs="?", help="OpenKBP .npz, OpenKBP CSV folder, DICOM "
                                               "folder, or 'phantom'")
    p.add_argument("--prescription-file", help="YAML sidecar with prescriptions (DICOM)")
    p.add_argument("--rx", action="append", default=[], metavar="TARGET=GY",
                   help="prescription for a target in Gy (DICOM; repeatable)")
    p.add_argument("--fractions", type=argtypes.FRACTIONS, help="number of fractions (DICOM)")
    p.add_argument("--beams", type=argtypes.BEAMS, default=9, help="number of equispaced beams (9)")
    p.add_argument("--start-angle", type=argtypes.ANGLE_DEG, default=0.0,
                   help="gantry angle of the first equispaced beam, degrees (0)")
    p.add_argument("--beam-angles", help="comma-separated IEC gantry angles (overrides "
                                         "--beams)")
    p.add_argument("--arc", nargs=3, type=argtypes.float_range(-720.0, 720.0), metavar=("START", "STOP", "SPACING"),
                   help="VMAT arc: one control point per SPACING degrees from START to "
                        "STOP clockwise (overrides --beams)")
    p.add_argument("--collimator", type=argtypes.ANGLE_DEG, default=0.0, help="collimator angle, deg")
    p.add_argument("--couch", type=argtypes.ANGLE_DEG, default=0.0, help="couch angle, deg")
    p.add_argument("--isocenter", help="x,y,z in patient LPS mm (default: centre of mass "
                                       "of the highest-dose target)")
    p.add_argument("--dose-grid-factor", type=argtypes.DOSE_GRID_FACTOR, default=None,
                   help="dose grid = CT grid down-sampled by this factor (2, arcs 3; "
                        "1 = CT grid)")
    p.add_argument("--beamlet-size", type=argtypes.float_range(1.0, 20.0), default=5.0, help="beamlet size, mm (5)")
    p.add_argument("--margin", type=argtypes.float_range(0.0, 100.0), default=5.0,
                   help="beamlets kept within this BEV margin of the targets, mm (5)")
    p.add_argument("--threshold", type=argtypes.float_range(0.0, 1.0), default=None,
                   help="relative sparsification threshold (engine default 1e-4, arcs "
                        "3e-4)")
    p.add_argument("--dose-engine", default="pencil-beam",
                   help="dose engine name (`atp list engines`)")
    add_hidden_alias(p, "--engine", "--dose-engine")
    p.add_argument("--device", choices=("cpu", "cuda", "gpu"), default="cpu",
                   metavar="cpu|cuda", help="pencil-beam: cpu (NumPy) or cuda (CuPy)")
    p.add_argument("--hu-table", help="HU -> relative electron density CSV (pencil-beam; "
                                      "default atp/data/hu_to_density.csv)")
    p.add_argument("--beam-model", help="beam-model JSON (pencil-beam; default built-in 6 MV)")
    p.add_argument("--import", dest="import_format", metavar="FORMAT",
                   help="import an external dij instead (formats: matrad)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _floats(text: str, field: str, n: int | None = None) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got '{text}'",
                         field=field) from None
    if n is not None and len(vals) != n:
        raise InputError(f"expected {n} numbers, got {len(vals)}", field=field)
    if not vals:
        raise InputError("no values given", field=field)
    return vals


def _beams(args):  # lazy: CLI start-up
    from atp.dose.geometry import Beam, arc_control_points, equispaced_beams

    iso = tuple(_floats(args.isocenter, "--isocenter", 3)) if args.isocenter else None
    if args.arc:
        start, stop, spacing = args.arc
        beams = arc_control_points(start % 360.0, stop % 360.0, spacing)
    elif args.beam_angles:
        beams = [Beam(a) for a in _floats(args.beam_angles, "--beam-angles")]
    else:
        beams = equispaced_beams(args.beams, args.start_angle)
    return [Beam(b.gantry_deg, args.collimator, args.couch, iso) for b in beams]


def summary(dij) -> dict:
    m = dij.matrix
    return {"beams": dij.beamlets.n_beams, "beamlets": dij.n_beamlets,
            "dose_grid": dij.dose_grid.to_dict(), "nnz": int(m.nnz),
            "megabytes": round((m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 2**20,
                               1),
            "meta": dij.meta}


def is_dij_file(path) -> bool:  # lazy: CLI start-up
    """An ``.npz`` of the format ``atp dij`` writes (reads only its format tag)."""
    from atp.dose.influence import FORMAT_TAG

    with np.load(path, allow_pickle=False) as d:
        return "format" in d.files and str(d["format"]) == FORMAT_TAG


def run(args) -> int:  # lazy: CLI start-up
    out = Path(args.out)
    if out.suffix != ".npz":
        raise InputError("output must end in .npz", field="--out")
    check_output_file(out, recognise=is_dij_file, what="an atp-dij-1 .npz")  # before work
    if args.import_format:
        from atp.dose.external import import_dij

        if not args.patient:
            raise InputError("--import needs the FILE to import", field="FILE")
        dij = import_dij(args.import_format, args.patient)
    else:
        if not args.patient:
            raise InputError("give a PATIENT (or --import FORMAT FILE)", field="PATIENT")
        from atp.dose import registry

        patient = common.load_patient_from_args(args)
        beams = _beams(args)
        device = "gpu" if args.device in ("cuda", "gpu") else "cpu"  # gpu: the old name
        engine = registry.get({"name": args.dose_engine, "device": device,
                               "hu_table": args.hu_table, "model": args.beam_model}
                              if args.dose_engine == "pencil-beam" else args.dose_engine)
        from atp.dose.arc import ARC_DOSE_GRID_FACTOR, ARC_THRESHOLD

        factor = args.dose_grid_factor or (ARC_DOSE_GRID_FACTOR if args.arc else 2)
        kw = {"beamlet_size_mm": args.beamlet_size, "dose_grid_factor": factor,
              "margin_mm": args.margin}
        if args.threshold is not None:
            kw["threshold"] = args.threshold
        elif args.arc:
            kw["threshold"] = ARC_THRESHOLD
        progress = None
        if not (args.quiet or args.json):
            tty = is_terminal(sys.stderr)

            def progress(i, n):  # no carriage-return frames in a log: every 10 %
                if tty:
                    print(f"\rbeam {i}/{n}", end="" if i < n else "\n", file=sys.stderr,
                          flush=True)
                elif i == n or i % max(1, n // 10) == 0:
                    print(f"atp: dose influence: beam {i}/{n}", file=sys.stderr,
                          flush=True)
        dij = engine.influence(patient, beams, progress=progress, **kw)
    dij.save(out)
    info = summary(dij)
    info["out"] = str(out)
    if args.json:
        print_json(info)
    elif not args.quiet:
        print(f"{info['beamlets']} beamlets in {info['beams']} beams, {info['nnz']} non-zeros "
              f"({info['megabytes']} MB) -> {out}")
    return 0
