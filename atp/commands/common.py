"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from atp.outputs import to_jsonable


def add_patient_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("patient", help="OpenKBP .npz, OpenKBP CSV folder, DICOM folder, or "
                                   "'phantom' for the embedded default case")
    p.add_argument("--prescription-file", help="YAML sidecar with prescriptions (DICOM)")
    p.add_argument("--rx", action="append", default=[], metavar="TARGET=GY",
                   help="prescription for a target in Gy (DICOM; repeatable)")
    p.add_argument("--fractions", type=int, help="number of fractions (DICOM)")


def load_patient_from_args(args, *, require_prescription: bool = True):
    from atp.errors import InputError
    from atp.io import load_patient

    rx = {}
    for item in args.rx:
        name, _, value = item.partition("=")
        try:
            rx[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"expected TARGET=GY, got '{item}'", field="--rx") from None
    return load_patient(args.patient, prescription_file=args.prescription_file,
                        prescriptions=rx or None, fractions=args.fractions,
                        require_prescription=require_prescription)


def print_json(obj) -> None:
    json.dump(to_jsonable(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")
