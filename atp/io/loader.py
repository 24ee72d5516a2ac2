"""Pick the right reader for a patient path.

* ``phantom`` (or ``demo``): the embedded default case, built in code;
* ``*.npz``: compact OpenKBP patient;
* a folder with ``ct.csv``: original OpenKBP CSV layout;
* a folder with DICOM files (CT series + RTSTRUCT): DICOM import.
"""

from __future__ import annotations

from pathlib import Path

from atp.errors import InputError
from atp.io.dicom import load_dicom
from atp.io.openkbp import load_openkbp_csv, load_openkbp_npz
from atp.patient import Patient
from atp.phantom import head_neck_phantom

PHANTOM_NAMES = ("phantom", "demo", "default")


def load_patient(path: str | Path, *, prescription_file: str | Path | None = None,
                 prescriptions: dict[str, float] | None = None,
                 fractions: int | None = None,
                 require_prescription: bool = True) -> Patient:
    """Load a patient from ``path`` (see module docstring for what is recognised).

    prescription_file / prescriptions / fractions apply to DICOM input, where the
    prescription is usually not in the data (sidecar YAML or explicit values);
    ``require_prescription=False`` (``atp info``) loads a DICOM patient without one (see
    :func:`atp.io.dicom.load_dicom`).
    """
    text = str(path)
    p = Path(path)
    if text in PHANTOM_NAMES or (p.is_file() and p.suffix == ".npz") or (
            p.is_dir() and (p / "ct.csv").is_file()):
        given = [flag for flag, v in (("--rx", prescriptions), ("--fractions", fractions),
                                      ("--prescription-file", prescription_file)) if v]
        if given:  # not silently ignored: these cases carry their own prescription
            raise InputError(f"{given[0]} applies to DICOM input only; this patient carries "
                             "its own prescription", file=text, field=given[0])
    if text in PHANTOM_NAMES:
        return head_neck_phantom()
    if not p.exists():
        raise InputError("no such file or folder", file=p)
    if p.is_file() and p.suffix == ".npz":
        return load_openkbp_npz(p)
    if p.is_dir() and (p / "ct.csv").is_file():
        return load_openkbp_csv(p)
    if p.is_dir():
        return load_dicom(p, prescription_file=prescription_file,
                          prescriptions=prescriptions, fractions=fractions,
                          require_prescription=require_prescription)
    raise InputError("not a recognised patient (expected an OpenKBP .npz, an OpenKBP CSV "
                     "folder, a DICOM folder, or 'phantom')", file=p)
