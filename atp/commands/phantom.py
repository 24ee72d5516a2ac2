"""``atp phantom tg119 --out DIR``: write a test phantom as a DICOM case.

``tg119``: the AAPM TG-119 C-shape phantom (Ezzell et al. 2009; geometry in
:mod:`atp.phantom`) as a CT series (``CT/``), an RT Structure Set (OuterTarget
RTROIInterpretedType PTV, Core ORGAN, BODY EXTERNAL) and a ``prescription.yaml``
(50 Gy in 25 fractions), so that ``atp plan DIR --site tg119_easy`` (or
``tg119_hard``) plans it like any DICOM patient.
"""

from __future__ import annotations

from pathlib import Path

from atp.commands import argtypes
from atp.outputs import atomic_output_dir, check_output_dir, write_json


def register(sub) -> None:
    p = sub.add_parser("phantom", help="write a test phantom (TG-119 C-shape) as a DICOM "
                                       "CT + RTSTRUCT case")
    p.add_argument("name", choices=["tg119"], help="which phantom (tg119: AAPM TG-119 "
                                                   "C-shape)")
    p.add_argument("--out", required=True, help="output folder (the DICOM case)")
    p.add_argument("--spacing-mm", nargs=3, type=argtypes.float_range(0.5, 10.0),
                   metavar=("Z", "Y", "X"),
                   help="CT voxel size in mm (default 2.5 3 3, pyRadPlan's TG119 CT)")
    p.set_defaults(func=run)


def run(args) -> int:  # lazy: CLI start-up (the DICOM writer loads pydicom)
    from atp import phantom

    out = check_output_dir(args.out, min_bytes=2**20)  # before any work
    spacing = tuple(args.spacing_mm) if args.spacing_mm else phantom.TG119_SPACING_MM
    patient = phantom.PHANTOMS[args.name](spacing)
    with atomic_output_dir(out, kind="phantom", field="--out") as tmp:
        written = phantom.write_dicom_case(patient, tmp)
        summary = {"phantom": args.name, "grid_shape": list(patient.grid.shape),
                   "spacing_mm": [float(s) for s in patient.grid.spacing_mm],
                   "structures_cc": {n: round(s.volume_cc(patient.grid), 2)
                                     for n, s in patient.structures.items()},
                   "prescriptions": patient.summary()["prescriptions"],
                   "ct_slices": len(written["CT"])}
        write_json(tmp / "phantom.json", summary)
    vols = ", ".join(f"{n} {v:g} cc" for n, v in summary["structures_cc"].items())
    mm = " x ".join(f"{s:g}" for s in summary["spacing_mm"])
    print(f"{args.name}: {summary['ct_slices']} CT slices, voxels {mm} mm; {vols}")
    print(f"written to {Path(out)}")
    return 0
