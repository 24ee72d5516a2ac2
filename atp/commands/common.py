"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from atp.commands import argtypes
from atp.errors import InputError
from atp.outputs import to_jsonable

DEFAULT_SITE = "hn"  # --site when neither --site nor --goal-list is given (every command)


def add_patient_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("patient", help="OpenKBP .npz, OpenKBP CSV folder, DICOM folder, or "
                                   "'phantom' for the embedded default case")
    p.add_argument("--prescription-file", help="YAML sidecar with prescriptions (DICOM)")
    p.add_argument("--rx", action="append", default=[], metavar="TARGET=GY",
                   help="prescription for a target in Gy (DICOM; repeatable)")
    p.add_argument("--fractions", type=argtypes.FRACTIONS, help="number of fractions (DICOM)")


class _HiddenAlias(argparse.Action):
    """An old option name kept for a release: hidden from --help, same destination as
    its new name, and one line on stderr saying which name to use."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"atp: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_repeatable(p, flag: str, metavar: str, help: str) -> None:
    """A repeatable ``--flag KEY=VALUE`` option collected into a list (``--spare``, ``--vmat``,
    ``--set``); the command parses the pairs."""
    p.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


def add_hidden_alias(p: argparse.ArgumentParser, old: str, new: str, **kw) -> None:
    """Keep ``old`` as a hidden alias of the already-added option ``new``."""
    dest = next(a.dest for a in p._actions if new in a.option_strings)
    p.add_argument(old, dest=dest, action=_HiddenAlias, new=new, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **kw)


def load_patient_from_args(args, *, require_prescription: bool = True):
    rx = {}
    for item in args.rx:
        name, _, value = item.partition("=")
        try:
            gy = float(value)
        except ValueError:
            gy = None
        if not name.strip() or gy is None or not 0 < gy < 1000:  # nan / inf fail too
            raise InputError(f"expected TARGET=GY with a dose in (0, 1000) Gy, got "
                             f"'{item[:60]}'", field="--rx")
        rx[name.strip()] = gy
    # lazy: CLI start-up (atp.io imports pydicom, ~1-2 s; every command is imported to
    # build the parser, so a top-level import would slow `atp --help` and `atp list`)
    from atp.io import load_patient

    return load_patient(args.patient, prescription_file=args.prescription_file,
                        prescriptions=rx or None, fractions=args.fractions,
                        require_prescription=require_prescription)


def print_json(obj) -> None:
    json.dump(to_jsonable(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")
