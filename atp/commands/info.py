"""``atp info PATIENT [--json]``: grid, structures (volume cc) and prescriptions.

A DICOM folder without a prescription is still described; the output notes that planning
will need one (``--rx TARGET=GY --fractions N`` or a ``prescription.yaml``)."""

from __future__ import annotations

from atp.commands.common import add_patient_arguments, load_patient_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a patient: grid, structures, prescriptions")
    add_patient_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    patient = load_patient_from_args(args, require_prescription=False)
    info = patient.summary()
    missing = patient.metadata.get("prescription_missing")
    if missing:
        info["prescription_note"] = f"planning will need a prescription: {missing}"
    if args.json:
        print_json(info)
        return 0
    g = info["grid"]
    print(f"patient {info['patient_id']}  ({info['source']})")
    print(f"grid {g['shape']} voxels, spacing {[round(s, 3) for s in g['spacing_mm']]} mm")
    print(f"{'structure':<16}{'role':<10}{'voxels':>9}{'volume cc':>12}")
    for s in info["structures"]:
        print(f"{s['name']:<16}{s['role']:<10}{s['voxels']:>9}{s['volume_cc']:>12.2f}")
    for rx in info["prescriptions"]:
        print(f"Rx {rx['target']}: {rx['dose_gy']:g} Gy in {rx['fractions']} fx")
    if missing:
        print(f"no prescription found; {info['prescription_note']}")
    return 0
