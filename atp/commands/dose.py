"""``atp dose RTPLAN --patient PATIENT --out DIR``: recompute the dose of any RT Plan.

Reads a DICOM RT Plan (ours or another system's: static, step-and-shoot, sliding window,
VMAT; :mod:`atp.sequencer.rtplan`) and computes its dose on the patient's CT through the
same deliverable-dose code path the planner uses (:mod:`atp.forward`): MLC / jaw
transmission, tongue-and-groove and DLG from ``--machine``. Writes ``dose.npy`` (Gy,
total course, patient grid), ``RD.atp.dcm`` (RT Dose referencing the plan) and
``dose.json`` (MU, MU per cGy, beams, timing).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from atp.commands import argtypes, common
from atp.commands.common import print_json
from atp.errors import InputError
from atp.outputs import atomic_output_dir, check_output_dir, write_json

# CLI start-up: the CLI imports every command to build its parser, so the forward dose
# (dose engines, sequencer) and the DICOM export load inside run() ("lazy: CLI start-up")


def register(sub) -> None:
    p = sub.add_parser("dose", help="recompute the dose of a DICOM RT Plan on a patient's "
                                    "CT (secondary dose check)")
    p.add_argument("rtplan", help="DICOM RT Plan file")
    p.add_argument("--patient", required=True,
                   help="OpenKBP .npz, OpenKBP CSV folder, DICOM folder, or 'phantom'")
    p.add_argument("--prescription-file", help="YAML sidecar with prescriptions (DICOM)")
    p.add_argument("--rx", action="append", default=[], metavar="TARGET=GY",
                   help="prescription for a target in Gy (DICOM; repeatable)")
    p.add_argument("--fractions", type=argtypes.FRACTIONS, help="number of fractions (DICOM)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--machine", default="millennium120",
                   help="machine model for transmission, T&G and DLG (shipped name or "
                        "YAML; default millennium120)")
    p.add_argument("--dose-grid-factor", type=argtypes.DOSE_GRID_FACTOR, default=2,
                   help="dose grid = CT grid down-sampled by this factor (2)")
    p.add_argument("--dose-engine", default="pencil-beam", help="dose engine name")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:  # lazy: CLI start-up
    from atp.forward import rt_plan_dose
    from atp.io.dicom_export import export_context, export_rt_dose

    t0 = time.perf_counter()
    out = Path(args.out)
    check_output_dir(out, min_bytes=2**20)
    if not Path(args.rtplan).is_file():
        raise InputError("no such file", file=args.rtplan, field="RTPLAN")
    patient_arg = args.patient
    patient = common.load_patient_from_args(args, require_prescription=False)
    dose, delivery, info = rt_plan_dose(args.rtplan, patient, machine=args.machine,
                                        engine=args.dose_engine,
                                        dose_grid_factor=args.dose_grid_factor)
    fx = delivery.fractions
    # MU per cGy of the prescription per fraction: the plan's own prescription (its
    # highest TargetPrescriptionDose), else the patient's
    rx = info.get("plan_prescription_gy") or (patient.prescriptions[0].dose_gy
                                              if patient.prescriptions else None)
    info["mu_per_cgy"] = (round(delivery.total_mu / fx / (100.0 * rx / fx), 3)
                          if rx else None)
    info["prescription_gy"] = rx
    info["patient"] = str(patient_arg)
    info["machine"] = delivery.machine.name
    info["beam_mu_per_fraction"] = {b.name: round(b.mu / fx, 3) for b in delivery.beams}
    with atomic_output_dir(out, kind="dose", field="--out") as tmp:
        np.save(tmp / "dose.npy", np.asarray(dose, dtype=np.float32))
        ctx = export_context(patient)
        if info.get("sop_instance_uid"):
            ctx.rtplan_uid = info["sop_instance_uid"]
        export_rt_dose(tmp / "RD.atp.dcm", dose, patient.grid, ctx,
                       comment="atp dose (forward dose of an RT Plan)")
        info["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / "dose.json", info)
    if args.json:
        print_json(info)
        return 0
    print(f"{info['file']}: {info['beams']} beams ({', '.join(info['kinds'])}), "
          f"{fx} fractions, machine model {info['machine']}")
    mu_cgy = f", {info['mu_per_cgy']} MU/cGy" if info["mu_per_cgy"] else ""
    print(f"MU per fraction {info['mu_per_fraction']}{mu_cgy}; max dose "
          f"{info['dose_max_gy']} Gy ({info['seconds']} s)")
    for s in info["skipped"]:
        print(f"  skipped {s}")
    print(f"wrote {out}/dose.npy, RD.atp.dcm, dose.json")
    return 0
