"""OpenKBP import: the compact ``.npz`` of ../shared and the original CSV folder layout.

OpenKBP stores CT as HU + 1024 (0 where no value is given -> air, -1024 HU); dose in Gy;
ROI masks; a "possible dose mask" that we take as the external/body structure. Arrays
are 128^3, C order; the voxel size is given per array axis. Orientation (checked on the
data: mandible anterior of cord, left parotid at higher column index, brainstem at lower
slice index than cord): axis 0 = rows = +y (posterior), axis 1 = columns = +x (patient
left), axis 2 = slices = -z (towards the feet). PTV56/63/70 get 56/63/70 Gy in 35 fx.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from atp.errors import InputError
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure

OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_ROIS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
                "Larynx", "Mandible", "PTV56", "PTV63", "PTV70")
# OpenKBP ROI name -> (TG-263 canonical name, role, prescription Gy or None)
OPENKBP_CANONICAL = {
    "Brainstem": ("Brainstem", Role.ORGAN, None),
    "SpinalCord": ("SpinalCord", Role.ORGAN, None),
    "RightParotid": ("Parotid_R", Role.ORGAN, None),
    "LeftParotid": ("Parotid_L", Role.ORGAN, None),
    "Esophagus": ("Esophagus", Role.ORGAN, None),
    "Larynx": ("Larynx", Role.ORGAN, None),
    "Mandible": ("Bone_Mandible", Role.ORGAN, None),
    "PTV56": ("PTV_56", Role.TARGET, 56.0),
    "PTV63": ("PTV_63", Role.TARGET, 63.0),
    "PTV70": ("PTV_70", Role.TARGET, 70.0),
}
OPENKBP_FRACTIONS = 35
EXTERNAL_NAME = "External"
OPENKBP_DIRECTION = np.array([[0.0, 1.0, 0.0],   # columns: axis0 -> +y, axis1 -> +x,
                              [1.0, 0.0, 0.0],   # axis2 -> -z
                              [0.0, 0.0, -1.0]])


def openkbp_grid(voxel_mm) -> Grid:
    """The OpenKBP grid for a voxel size, centred on the patient-coordinate origin."""
    spacing = np.asarray(voxel_mm, dtype=np.float64)
    centre_index = (np.array(OPENKBP_SHAPE) - 1) / 2.0
    origin = -(OPENKBP_DIRECTION @ (centre_index * spacing))
    return Grid(OPENKBP_SHAPE, spacing, origin, OPENKBP_DIRECTION)


def _build(ct_raw: np.ndarray, masks: dict[str, np.ndarray], possible: np.ndarray | None,
           voxel_mm, patient_id: str, source: str, dose: np.ndarray | None) -> Patient:
    grid = openkbp_grid(voxel_mm)
    ct_raw = np.asarray(ct_raw, dtype=np.float32)
    grid.check_array(ct_raw, file=source, field="ct")
    ct_hu = np.where(ct_raw > 0, ct_raw - 1024.0, -1024.0).astype(np.float32)
    structures: dict[str, Structure] = {}
    prescriptions = []
    for roi in OPENKBP_ROIS:
        if roi not in masks:
            continue
        m = np.asarray(masks[roi], dtype=bool)
        if not m.any():
            continue  # OpenKBP: an ROI a patient lacks has no voxels
        name, role, rx = OPENKBP_CANONICAL[roi]
        structures[name] = Structure(name, m, role, original_name=roi)
        if rx is not None:
            prescriptions.append(Prescription(name, rx, OPENKBP_FRACTIONS))
    if possible is not None:
        pm = np.asarray(possible, dtype=bool)
        if not pm.any():
            raise InputError("possible_dose_mask is empty", file=source,
                             field="possible_dose_mask")
        structures[EXTERNAL_NAME] = Structure(EXTERNAL_NAME, pm, Role.EXTERNAL,
                                              original_name="possible_dose_mask")
    if not prescriptions:
        raise InputError("no PTV56/PTV63/PTV70 target with voxels", file=source, field="rois")
    meta = {"format": "openkbp"}
    if dose is not None:
        meta["reference_dose_gy"] = dose
    return Patient(ct_hu, grid, structures, tuple(prescriptions), patient_id, meta, source)


def load_openkbp_npz(path: str | Path) -> Patient:
    """Read one patient from the compact OpenKBP ``.npz`` (see ../shared README).

    The reference dose, when present, is kept in ``metadata['reference_dose_gy']``.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - zipfile / value errors
        raise InputError(f"cannot read OpenKBP npz: {exc}", file=path) from None
    for key in ("ct", "masks", "rois", "voxel_mm"):
        if key not in keys:
            raise InputError("missing array", file=path, field=key)
    try:
        rois = [str(r) for r in data["rois"]]
        bits = data["masks"]
        masks = {r: ((bits >> i) & 1).astype(bool) for i, r in enumerate(rois)}
        possible = None
        if "possible_dose_mask" in keys:
            packed = data["possible_dose_mask"]
            n = int(np.prod(OPENKBP_SHAPE))
            possible = np.unpackbits(packed)[:n].reshape(OPENKBP_SHAPE).astype(bool)
        dose = data["dose"].astype(np.float32) if "dose" in keys else None
        ct, voxel = data["ct"], data["voxel_mm"]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode error is a corrupt file
        raise InputError(f"corrupt OpenKBP npz: {exc}", file=path) from None
    if dose is not None and not np.all(np.isfinite(dose)):
        raise InputError("dose contains NaN/inf", file=path, field="dose")
    return _build(ct, masks, possible, voxel, path.stem, str(path), dose)


def _read_sparse_csv(path: Path, n: int, *, values: bool) -> np.ndarray:
    """OpenKBP CSV: header ',data', rows 'flat_index,value' (value column may be empty)."""
    out = np.zeros(n, dtype=np.float32 if values else bool)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from None
    if not rows:
        raise InputError("empty CSV", file=path)
    body = rows[1:] if rows[0] and not rows[0][0].strip().isdigit() else rows
    if not body:
        return out
    try:
        idx = np.array([int(r[0]) for r in body], dtype=np.int64)
        if np.any(idx < 0) or np.any(idx >= n):
            raise InputError("voxel index outside the 128^3 grid", file=path, field="index")
        if values:
            vals = np.array([float(r[1]) for r in body], dtype=np.float32)
            if not np.all(np.isfinite(vals)):
                raise InputError("NaN/inf values", file=path, field="data")
            out[idx] = vals
        else:
            out[idx] = True
    except (ValueError, IndexError) as exc:
        raise InputError(f"malformed row: {exc}", file=path, field="data") from None
    return out


def load_openkbp_csv(folder: str | Path) -> Patient:
    """Read a patient folder of the original OpenKBP release (e.g. train-pats/pt_1)."""
    folder = Path(folder)
    n = int(np.prod(OPENKBP_SHAPE))
    ct_file = folder / "ct.csv"
    if not ct_file.is_file():
        raise InputError("OpenKBP folder has no ct.csv", file=folder, field="ct.csv")
    vox_file = folder / "voxel_dimensions.csv"
    if not vox_file.is_file():
        raise InputError("OpenKBP folder has no voxel_dimensions.csv", file=folder,
                         field="voxel_dimensions.csv")
    try:
        voxel = np.loadtxt(vox_file, dtype=np.float64).reshape(-1)
    except ValueError as exc:
        raise InputError(f"malformed: {exc}", file=vox_file) from None
    if voxel.shape != (3,):
        raise InputError(f"expected 3 voxel dimensions, got {voxel.size}", file=vox_file)
    ct = _read_sparse_csv(ct_file, n, values=True).reshape(OPENKBP_SHAPE)
    masks = {}
    for roi in OPENKBP_ROIS:
        f = folder / f"{roi}.csv"
        if f.is_file():
            masks[roi] = _read_sparse_csv(f, n, values=False).reshape(OPENKBP_SHAPE)
    possible = None
    pf = folder / "possible_dose_mask.csv"
    if pf.is_file():
        possible = _read_sparse_csv(pf, n, values=False).reshape(OPENKBP_SHAPE)
    dose = None
    df = folder / "dose.csv"
    if df.is_file():
        dose = _read_sparse_csv(df, n, values=True).reshape(OPENKBP_SHAPE)
    return _build(ct, masks, possible, voxel, folder.name, str(folder), dose)
