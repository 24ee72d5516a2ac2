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

from atp.errors import InputError, quote
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


VOXEL_MM_RANGE = (0.1, 20.0)   # a CT voxel edge in mm (OpenKBP: 2.0 .. 4.0)
# HU + 1024, HU at most the int16 maximum 32767: real OpenKBP CTs reach 28036 with metal
# (8 train patients exceed 6000, e.g. train/pt_132), so the bound only stops absurd values
CT_RAW_RANGE = (0.0, 33791.0)
DOSE_MAX_GY = 1000.0


def check_voxel_mm(voxel, *, file, field: str = "voxel_mm") -> np.ndarray:
    """The voxel size as 3 finite mm values in VOXEL_MM_RANGE, or InputError(file, field)."""
    v = np.asarray(voxel)
    if v.dtype.kind not in "iuf":
        raise InputError(f"must be 3 numbers (mm), got dtype {v.dtype}", file=file,
                         field=field)
    v = v.astype(np.float64).reshape(-1) if v.size <= 16 else v.reshape(-1)[:16]
    if v.shape != (3,):
        raise InputError(f"must be 3 numbers (mm), got {np.asarray(voxel).size}", file=file,
                         field=field)
    lo, hi = VOXEL_MM_RANGE
    if not np.all(np.isfinite(v)) or np.any(v < lo) or np.any(v > hi):
        raise InputError(f"each voxel size must be a finite number in [{lo:g}, {hi:g}] mm, "
                         f"got {quote(v.tolist())}", file=file, field=field)
    return v


def check_volume(a, *, file, field: str, kinds: str = "iuf",
                 value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A 128^3 real array (dtype kind in ``kinds``), finite, within ``value_range``; else
    InputError naming the file and field."""
    a = np.asarray(a)
    if a.dtype.kind not in kinds:
        raise InputError(f"must be a numeric array, got dtype {a.dtype}", file=file,
                         field=field)
    if a.shape != OPENKBP_SHAPE:
        raise InputError(f"array shape {a.shape} is not the OpenKBP grid {OPENKBP_SHAPE}",
                         file=file, field=field)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        n = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InputError(f"{n} voxels are NaN/inf", file=file, field=field)
    if value_range is not None and a.size:
        lo, hi = float(a.min()), float(a.max())
        if lo < value_range[0] or hi > value_range[1]:
            raise InputError(f"values {lo:g} .. {hi:g} outside [{value_range[0]:g}, "
                             f"{value_range[1]:g}]", file=file, field=field)
    return a


def openkbp_grid(voxel_mm) -> Grid:
    """The OpenKBP grid for a voxel size, centred on the patient-coordinate origin."""
    spacing = np.asarray(voxel_mm, dtype=np.float64)
    centre_index = (np.array(OPENKBP_SHAPE) - 1) / 2.0
    origin = -(OPENKBP_DIRECTION @ (centre_index * spacing))
    return Grid(OPENKBP_SHAPE, spacing, origin, OPENKBP_DIRECTION)


def _build(ct_raw: np.ndarray, masks: dict[str, np.ndarray], possible: np.ndarray | None,
           voxel_mm, patient_id: str, source: str, dose: np.ndarray | None) -> Patient:
    grid = openkbp_grid(check_voxel_mm(voxel_mm, file=source))
    ct_raw = check_volume(ct_raw, file=source, field="ct", value_range=CT_RAW_RANGE)
    ct_raw = np.asarray(ct_raw, dtype=np.float32)
    if dose is not None:
        dose = check_volume(dose, file=source, field="dose", value_range=(0.0, DOSE_MAX_GY))
        dose = np.asarray(dose, dtype=np.float32)
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


def _check_npz_sizes(data, path) -> None:
    """Refuse an archive member whose header declares more than 128^3 x 8 bytes, before
    reading it (a few kB of zeros compress to gigabytes)."""
    limit = int(np.prod(OPENKBP_SHAPE)) * 8
    for key in data.files:
        try:
            with data.zip.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
        except Exception as exc:  # noqa: BLE001 - a corrupt member header
            raise InputError(f"corrupt array header: {quote(str(exc), 120, repr_=False)}",
                             file=path, field=key) from None
        if int(np.prod(shape, dtype=np.float64)) * max(dtype.itemsize, 1) > limit:
            raise InputError(f"array of shape {quote(shape)} and dtype {dtype} is larger "
                             "than an OpenKBP volume", file=path, field=key)


def load_openkbp_npz(path: str | Path) -> Patient:
    """Read one patient from the compact OpenKBP ``.npz`` (see ../shared README).

    The reference dose, when present, is kept in ``metadata['reference_dose_gy']``.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - zipfile / value errors
        raise InputError(f"cannot read OpenKBP npz: {quote(str(exc), 120, repr_=False)}",
                         file=path) from None
    if not hasattr(data, "files"):
        raise InputError("not an .npz archive (a single .npy array)", file=path)
    for key in ("ct", "masks", "rois", "voxel_mm"):
        if key not in keys:
            raise InputError("missing array", file=path, field=key)
    _check_npz_sizes(data, path)
    field = "rois"
    try:
        raw_rois = data["rois"]
        if raw_rois.dtype.kind not in "US" or raw_rois.ndim != 1 or raw_rois.size > 16:
            raise InputError(f"must be up to 16 ROI names, got dtype {raw_rois.dtype} "
                             f"shape {raw_rois.shape}", file=path, field="rois")
        rois = [str(r) for r in raw_rois]
        field = "masks"
        bits = data["masks"]
        if bits.dtype.kind not in "iu" or bits.shape != OPENKBP_SHAPE:
            raise InputError(f"must be a {OPENKBP_SHAPE} integer bit mask, got dtype "
                             f"{bits.dtype} shape {bits.shape}", file=path, field="masks")
        if bits.dtype.kind == "i" and bits.min() < 0:
            raise InputError("bit mask has negative values", file=path, field="masks")
        if len(rois) > 8 * bits.dtype.itemsize:
            raise InputError(f"{len(rois)} ROI names but {8 * bits.dtype.itemsize} mask bits",
                             file=path, field="rois")
        masks = {r: ((bits >> i) & 1).astype(bool) for i, r in enumerate(rois)}
        possible = None
        n = int(np.prod(OPENKBP_SHAPE))
        if "possible_dose_mask" in keys:
            field = "possible_dose_mask"
            packed = data["possible_dose_mask"]
            if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != n // 8:
                raise InputError(f"must be {n // 8} bit-packed uint8 bytes, got dtype "
                                 f"{packed.dtype} shape {packed.shape}", file=path,
                                 field="possible_dose_mask")
            possible = np.unpackbits(packed)[:n].reshape(OPENKBP_SHAPE).astype(bool)
        field = "dose"
        dose = data["dose"] if "dose" in keys else None
        field = "ct"
        ct = data["ct"]
        field = "voxel_mm"
        voxel = data["voxel_mm"]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode error is a corrupt file
        raise InputError(f"corrupt OpenKBP npz: {quote(str(exc), 120, repr_=False)}",
                         file=path, field=field) from None
    return _build(ct, masks, possible, voxel, path.stem, str(path), dose)


def _read_sparse_csv(path: Path, n: int, *, values: bool) -> np.ndarray:
    """OpenKBP CSV: header ',data', rows 'flat_index,value' (value column may be empty)."""
    out = np.zeros(n, dtype=np.float32 if values else bool)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"not a CSV text file: {quote(str(exc), 120, repr_=False)}",
                         file=path, field="data") from None
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
    except (ValueError, IndexError, OverflowError) as exc:
        raise InputError(f"malformed row: {quote(str(exc), 120, repr_=False)}", file=path,
                         field="data") from None
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
        if vox_file.stat().st_size > 10_000:
            raise InputError("larger than 3 numbers", file=vox_file, field="voxel_mm")
        voxel = np.loadtxt(vox_file, dtype=np.float64, delimiter=None).reshape(-1)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed: {quote(str(exc), 120, repr_=False)}", file=vox_file,
                         field="voxel_mm") from None
    voxel = check_voxel_mm(voxel, file=vox_file)
    ct = _read_sparse_csv(ct_file, n, values=True).reshape(OPENKBP_SHAPE)
    check_volume(ct, file=ct_file, field="data", value_range=CT_RAW_RANGE)
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
        check_volume(dose, file=df, field="data", value_range=(0.0, DOSE_MAX_GY))
    return _build(ct, masks, possible, voxel, folder.name, str(folder), dose)
