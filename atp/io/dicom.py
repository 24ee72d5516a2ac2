"""DICOM import: one CT series + the RTSTRUCT that references it -> :class:`Patient`.

* Files: every file below the folder is read as DICOM except hidden files and obvious
  non-DICOM suffixes (``.yaml``, ``.json``, ``.txt``, ...); one that is not DICOM or
  is truncated is an error naming that file. Modalities other than CT and RTSTRUCT
  (RTPLAN, RTDOSE, ...) are ignored and listed in ``metadata['dicom']['ignored']``.
* CT: one ``SeriesInstanceUID`` (if the folder holds several, the one the RTSTRUCT
  references). Slices are sorted by ``ImagePositionPatient`` projected on the slice
  normal (row cosines x column cosines from ``ImageOrientationPatient``); orientation,
  rows, columns and ``PixelSpacing`` must agree across slices and the spacing must be
  uniform: a gap above 1.5 spacings is a missing slice. HU = stored value x
  ``RescaleSlope`` + ``RescaleIntercept`` (float32).
* Grid: array axes (slice, row, column); ``direction`` columns are the slice normal,
  the column cosines (down the rows) and the row cosines (along a row); spacing is
  (slice distance, ``PixelSpacing[0]``, ``PixelSpacing[1]``); origin = the first
  slice's ``ImagePositionPatient``.
* RTSTRUCT: must reference the CT's ``FrameOfReferenceUID`` and, where it names one,
  its ``SeriesInstanceUID``. Closed planar contours are rasterised with
  :mod:`atp.io.rasterize`. ROI names go through :func:`atp.names.canonical_name`;
  known names get :func:`atp.names.role_for`, unknown ones keep their name and get the
  role from ``RTROIInterpretedType`` (EXTERNAL, PTV/CTV/GTV/ITV -> target) or ORGAN.
  Empty ROIs are skipped and noted in ``metadata['warnings']``.
* Prescriptions: see :mod:`atp.io.prescription`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from atp.errors import DicomError, InputError, quote
from atp.grid import Grid
from atp.io.prescription import find_sidecar, load_prescription_file, resolve_prescriptions
from atp.io.rasterize import rasterize_contours
from atp.names import AliasTable, canonical_name, role_for
from atp.patient import Patient, Role, Structure

# pydicom logs (and warns about) odd values; with no handler Python would print them on
# stderr beside atp's one error line. Errors that matter are raised by this module.
logging.getLogger("pydicom").addHandler(logging.NullHandler())

NOT_DICOM_SUFFIXES = {".yaml", ".yml", ".json", ".txt", ".md", ".csv", ".npz", ".npy",
                      ".png", ".jpg", ".jpeg", ".pdf", ".html", ".xml", ".py", ".zip"}
HU_RANGE = (-10_000, 70_000)  # wider than any scanner's (padding -3024, metal ~30000)
GAP_FACTOR = 1.5  # a slice distance above this many spacings = missing slice(s)
_INTERPRETED_ROLE = {"EXTERNAL": Role.EXTERNAL, "PTV": Role.TARGET, "CTV": Role.TARGET,
                     "GTV": Role.TARGET, "ITV": Role.TARGET, "CONTROL": Role.CONTROL,
                     "AVOIDANCE": Role.CONTROL}
# UIDs and demographics kept for export (RT Plan / RT Dose / RT Struct writers)
_PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                 "AccessionNumber", "ReferringPhysicianName", "StudyDescription")


def _read_all(folder: Path):
    """(path, dataset) for every candidate file; InputError for corrupt ones."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in NOT_DICOM_SUFFIXES:
            continue
        try:
            ds = pydicom.dcmread(path)
            for _ in ds.iterall():  # parse every element now: a truncated file fails here
                pass
        except InvalidDicomError:
            raise DicomError("not a DICOM file (remove it from the folder or fix it)",
                             file=path) from None
        except Exception as exc:  # noqa: BLE001 - any decode failure = corrupt file
            raise DicomError(f"corrupt DICOM file: {quote(str(exc), 120, repr_=False)}",
                             file=path) from None
        if "Modality" not in ds:
            raise DicomError("DICOM file without Modality", file=path, field="Modality")
        out.append((path, ds))
    return out


MAX_PIXELS = 2048          # Rows / Columns of one CT image
MAX_VOXELS = 300_000_000   # slices x rows x columns of one CT series (1.2 GB float32)


@contextlib.contextmanager
def _guard(path, what: str):
    """Turn a malformed dataset's AttributeError / KeyError / ValueError (a missing or
    unconvertible attribute found while reading ``what``) into a DicomError naming the
    file and, where the message says, the attribute."""
    try:
        yield
    except InputError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OverflowError,
            struct.error, EOFError) as exc:
        m = re.search(r"attribute '(\w+)'", str(exc)) or re.search(r"\((\w+)\)", str(exc))
        raise DicomError(f"malformed {what}: {quote(str(exc), 120, repr_=False)}", file=path,
                         field=m.group(1) if m else what) from None


def _int(ds, tag: str, path, lo: int = 0, hi: int = 2**31 - 1) -> int:
    """A required integer attribute in [lo, hi], or DicomError naming file and tag."""
    try:
        v = ds[tag].value
    except KeyError:
        raise DicomError("missing attribute", file=path, field=tag) from None
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot convert
        raise DicomError(f"unreadable value: {quote(str(exc), 80, repr_=False)}", file=path,
                         field=tag) from None
    try:
        i = int(v)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"not an integer: {quote(v)}", file=path, field=tag) from None
    if not lo <= i <= hi:
        raise DicomError(f"must be in {lo}..{hi}, got {i}", file=path, field=tag)
    return i


def _floats(ds, tag: str, n: int, path) -> np.ndarray:
    try:
        raw = ds[tag].value
        raw = raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") and \
            not isinstance(raw, (str, bytes)) else [raw]
        v = np.array([float(x) for x in raw], dtype=np.float64)
    except KeyError:
        raise DicomError("missing attribute", file=path, field=tag) from None
    except (TypeError, ValueError, OverflowError):
        raise DicomError("not numeric", file=path, field=tag) from None
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot convert
        raise DicomError(f"unreadable value: {quote(str(exc), 80, repr_=False)}", file=path,
                         field=tag) from None
    if v.shape != (n,) or not np.all(np.isfinite(v)):
        raise DicomError(f"expected {n} finite numbers, got {quote(v.tolist())}", file=path,
                         field=tag)
    return v


def _ct_geometry(slices, folder: Path):
    """Sort the series and derive the Grid; returns (sorted [(path, ds)], Grid)."""
    path0, ds0 = slices[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, path0)
    row_dir, col_dir = iop[:3], iop[3:]
    if not (abs(np.linalg.norm(row_dir) - 1) < 1e-3 and abs(np.linalg.norm(col_dir) - 1) < 1e-3
            and abs(row_dir @ col_dir) < 1e-3):
        raise DicomError("orientation cosines are not orthonormal", file=path0,
                         field="ImageOrientationPatient")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    ps0 = _floats(ds0, "PixelSpacing", 2, path0)
    if np.any(ps0 <= 0) or np.any(ps0 > 50):
        raise DicomError(f"pixel spacing must be in (0, 50] mm, got {quote(ps0.tolist())}",
                         file=path0, field="PixelSpacing")
    rows0 = _int(ds0, "Rows", path0, 1, MAX_PIXELS)
    cols0 = _int(ds0, "Columns", path0, 1, MAX_PIXELS)
    if len(slices) * rows0 * cols0 > MAX_VOXELS:
        raise DicomError(f"CT series of {len(slices)} x {rows0} x {cols0} voxels is larger "
                         f"than {MAX_VOXELS}", file=folder, field="Rows")
    pos = []
    for path, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), iop, atol=1e-4):
            raise DicomError("orientation differs from the rest of the series", file=path,
                             field="ImageOrientationPatient")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), ps0, atol=1e-4):
            raise DicomError("pixel spacing differs from the rest of the series", file=path,
                             field="PixelSpacing")
        if (_int(ds, "Rows", path), _int(ds, "Columns", path)) != (rows0, cols0):
            raise DicomError("image size differs from the rest of the series", file=path,
                             field="Rows")
        pos.append(_floats(ds, "ImagePositionPatient", 3, path))
    pos = np.array(pos)
    s = pos @ normal
    order = np.argsort(s, kind="stable")
    slices = [slices[i] for i in order]
    pos, s = pos[order], s[order]
    if len(slices) < 2:
        raise DicomError("CT series has a single slice; need at least 2", file=folder,
                         field="ImagePositionPatient")
    d = np.diff(s)
    if np.min(d) < 1e-3:
        i = int(np.argmin(d))
        raise DicomError(f"two CT slices at the same position {s[i]:.3f} mm "
                         f"({slices[i][0].name}, {slices[i + 1][0].name})", file=folder,
                         field="ImagePositionPatient")
    spacing = float(np.median(d))
    if spacing > 50:
        raise DicomError(f"slice spacing {spacing:g} mm is above 50 mm", file=folder,
                         field="ImagePositionPatient")
    if np.max(d) > GAP_FACTOR * spacing:
        i = int(np.argmax(d))
        raise DicomError(f"missing CT slice(s): gap of {d[i]:.3f} mm between slices at "
                         f"{s[i]:.3f} and {s[i + 1]:.3f} mm (spacing {spacing:.3f} mm)",
                         file=folder, field="ImagePositionPatient")
    tol = max(0.01, 0.01 * spacing)
    if np.max(np.abs(d - spacing)) > tol:
        raise DicomError(f"non-uniform slice spacing: {d.min():.3f} to {d.max():.3f} mm",
                         file=folder, field="ImagePositionPatient")
    # in-plane offsets must not drift (all slices on one straight line along the normal)
    inplane = (pos - pos[0]) - np.outer(s - s[0], normal)
    if np.max(np.abs(inplane)) > max(0.01, 0.01 * min(ps0)):
        raise DicomError("slice positions do not lie on a line along the slice normal "
                         "(tilted/sheared series is not supported)", file=folder,
                         field="ImagePositionPatient")
    direction = np.column_stack([normal, col_dir, row_dir])
    grid = Grid((len(slices), rows0, cols0), (spacing, ps0[0], ps0[1]), pos[0], direction)
    return slices, grid


def _optional_float(ds, tag: str, default: float, path) -> float:
    """A type-3 numeric attribute: ``default`` when absent or empty, else a finite
    number (a slope of 0 is not silently read as 1)."""
    try:
        raw = ds.get(tag)  # the value (keyword lookup)
        empty = raw is None or (isinstance(raw, str) and not raw.strip())
        v = default if empty else float(raw)
    except Exception:  # noqa: BLE001 - a malformed DS value
        raise DicomError("not numeric", file=path, field=tag) from None
    if not np.isfinite(v):
        raise DicomError(f"not finite: {v}", file=path, field=tag)
    return v


def _ct_volume(slices, grid: Grid) -> np.ndarray:
    ct = np.empty(grid.shape, dtype=np.float32)
    for k, (path, ds) in enumerate(slices):
        try:
            px = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decode failure = corrupt pixels
            raise DicomError(f"cannot decode pixel data: {quote(str(exc), 120, repr_=False)}",
                             file=path,
                             field="PixelData") from None
        if px.shape != grid.shape[1:]:
            raise DicomError(f"pixel data shape {px.shape} != Rows x Columns "
                             f"{grid.shape[1:]}", file=path, field="PixelData")
        slope = _optional_float(ds, "RescaleSlope", 1.0, path)
        intercept = _optional_float(ds, "RescaleIntercept", 0.0, path)
        if slope <= 0:
            raise DicomError(f"must be > 0, got {slope:g}", file=path, field="RescaleSlope")
        hu = px.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        if not np.all(np.isfinite(hu)):
            raise DicomError("CT values are not finite", file=path, field="PixelData")
        lo, hi = float(hu.min()), float(hu.max())
        if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
            raise DicomError(f"CT values {lo:g} .. {hi:g} HU outside [{HU_RANGE[0]}, "
                             f"{HU_RANGE[1]}] (check RescaleSlope / RescaleIntercept)",
                             file=path, field="PixelData")
        ct[k] = hu
    return ct


def _referenced_series(rs) -> set[str]:
    out = set()
    for fr in getattr(rs, "ReferencedFrameOfReferenceSequence", []) or []:
        for st in getattr(fr, "RTReferencedStudySequence", []) or []:
            for se in getattr(st, "RTReferencedSeriesSequence", []) or []:
                if "SeriesInstanceUID" in se:
                    out.add(str(se.SeriesInstanceUID))
    return out


def _referenced_frames(rs) -> set[str]:
    frames = {str(fr.FrameOfReferenceUID)
              for fr in getattr(rs, "ReferencedFrameOfReferenceSequence", []) or []
              if "FrameOfReferenceUID" in fr}
    frames |= {str(r.ReferencedFrameOfReferenceUID)
               for r in getattr(rs, "StructureSetROISequence", []) or []
               if "ReferencedFrameOfReferenceUID" in r}
    return frames


def _choose(ct_by_series: dict, structs: list, folder: Path):
    """Pick (CT series uid, rtstruct (path, ds)) and check the references."""
    if not ct_by_series:
        raise DicomError("no CT images in the folder", file=folder, field="Modality")
    if not structs:
        raise DicomError("no RTSTRUCT in the folder (contours are needed)", file=folder,
                         field="Modality")
    if len(ct_by_series) == 1:
        series_uid = next(iter(ct_by_series))
        matching = [rs for rs in structs
                    if not _referenced_series(rs[1])
                    or series_uid in _referenced_series(rs[1])]
    else:
        matching = [rs for rs in structs if _referenced_series(rs[1]) & set(ct_by_series)]
        uids = {u for rs in matching for u in _referenced_series(rs[1]) & set(ct_by_series)}
        if len(uids) != 1:
            raise DicomError(f"{len(ct_by_series)} CT series in the folder and no single "
                             "RTSTRUCT that picks one; keep one CT series per folder",
                             file=folder, field="SeriesInstanceUID")
        series_uid = uids.pop()
    if not matching:
        path, rs = structs[0]
        raise DicomError(f"RTSTRUCT references series {sorted(_referenced_series(rs))}, not "
                         f"the CT series {series_uid}", file=path,
                         field="ReferencedSeriesInstanceUID")
    if len(matching) > 1:
        raise DicomError(f"{len(matching)} RTSTRUCTs reference the CT series "
                         f"({', '.join(p.name for p, _ in matching)}); keep one",
                         file=folder, field="Modality")
    return series_uid, matching[0]


def _contour_data(contour) -> np.ndarray:
    """ContourData as float64, parsed from the raw DS bytes when still unparsed.

    pydicom turns each DS value into a Python object, which dominates import time for
    clinical structure sets (millions of values); the raw text is parsed in one go.
    """
    elem = contour.get_item("ContourData")
    if elem is None:
        raise KeyError("ContourData")
    raw = elem.value
    if isinstance(raw, (bytes, bytearray)):
        text = raw.decode("ascii", errors="strict").replace("\\", " ")
        return np.array(text.split(), dtype=np.float64)
    values = raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw]
    return np.array([float(v) for v in values], dtype=np.float64)


def _roi_contours(rs, path) -> dict[int, list[np.ndarray]]:
    """ROI number -> closed planar contours (N, 3) mm; other geometry types skipped."""
    out: dict[int, list[np.ndarray]] = {}
    for rc in getattr(rs, "ROIContourSequence", []) or []:
        num = _int(rc, "ReferencedROINumber", path)
        polys = out.setdefault(num, [])
        for c in getattr(rc, "ContourSequence", []) or []:
            gtype = str(getattr(c, "ContourGeometricType", "CLOSED_PLANAR")).upper()
            if gtype != "CLOSED_PLANAR":
                continue
            try:
                data = _contour_data(c)
            except (AttributeError, KeyError, TypeError, ValueError):
                raise DicomError(f"ROI {num}: contour data missing or not numeric",
                                 file=path, field="ContourData") from None
            if data.size % 3 or not np.all(np.isfinite(data)):
                raise DicomError(f"ROI {num}: contour data must be finite x,y,z triples",
                                 file=path, field="ContourData")
            polys.append(data.reshape(-1, 3))
    return out


def load_dicom(folder: str | Path, prescription_file: str | Path | None = None,
               prescriptions: Mapping[str, float] | None = None,
               fractions: int | None = None,
               alias_table: AliasTable | None = None,
               require_prescription: bool = True) -> Patient:
    """Read a DICOM folder (CT series + RTSTRUCT) into a Patient (see module docs).

    prescription_file: sidecar YAML (default: ``prescription.yaml`` in the folder);
    prescriptions: target name -> Gy (overrides the sidecar's targets);
    fractions: number of fractions (overrides the sidecar's);
    alias_table: structure-name table (default: the shipped TG-263 table);
    require_prescription: False (``atp info``) returns the patient without prescriptions
    when none can be found, the reason in ``metadata['prescription_missing']``; values
    that are given but wrong are still errors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder", file=folder)
    with warnings.catch_warnings():  # pydicom's value warnings: problems that matter
        warnings.simplefilter("ignore")  # become DicomErrors naming file and attribute
        return _load_dicom(folder, prescription_file, prescriptions, fractions,
                           alias_table, require_prescription)


def _load_dicom(folder, prescription_file, prescriptions, fractions, alias_table,
                require_prescription) -> Patient:
    files = _read_all(folder)
    if not files:
        raise DicomError("no DICOM files in the folder", file=folder)
    ct_by_series: dict[str, list] = {}
    structs, ignored = [], []
    for path, ds in files:
        modality = str(ds.Modality).upper()
        if modality == "CT":
            if "SeriesInstanceUID" not in ds:
                raise DicomError("CT image without SeriesInstanceUID", file=path,
                                 field="SeriesInstanceUID")
            ct_by_series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
        elif modality == "RTSTRUCT":
            structs.append((path, ds))
        else:
            ignored.append({"file": str(path.relative_to(folder)), "modality": modality})
    with _guard(folder, "RTSTRUCT references"):
        series_uid, (rs_path, rs) = _choose(ct_by_series, structs, folder)
    with _guard(folder, "CT series"):
        return _load(folder, ct_by_series, series_uid, rs_path, rs, ignored, prescription_file,
                     prescriptions, fractions, alias_table, require_prescription)


def _load(folder, ct_by_series, series_uid, rs_path, rs, ignored, prescription_file,
          prescriptions, fractions, alias_table, require_prescription) -> Patient:
    slices, grid = _ct_geometry(ct_by_series[series_uid], folder)
    ct_ds = slices[0][1]
    frame_uid = str(getattr(ct_ds, "FrameOfReferenceUID", ""))
    for path, ds in slices:
        if str(getattr(ds, "FrameOfReferenceUID", "")) != frame_uid:
            raise DicomError("CT slices disagree on FrameOfReferenceUID", file=path,
                             field="FrameOfReferenceUID")
    frames = _referenced_frames(rs)
    if frame_uid and frames and frame_uid not in frames:
        raise DicomError(f"RTSTRUCT frame of reference {sorted(frames)} is not the CT's "
                         f"{frame_uid}", file=rs_path, field="FrameOfReferenceUID")
    ct = _ct_volume(slices, grid)

    table = alias_table or AliasTable.default()
    with _guard(rs_path, "RTSTRUCT"):
        return _with_structures(folder, slices, grid, ct, ct_ds, series_uid, frame_uid,
                                rs_path, rs, ignored, table, prescription_file,
                                prescriptions, fractions, require_prescription)


def _with_structures(folder, slices, grid, ct, ct_ds, series_uid, frame_uid, rs_path, rs,
                     ignored, table, prescription_file, prescriptions, fractions,
                     require_prescription) -> Patient:
    for seq in ("StructureSetROISequence", "ROIContourSequence",
                "RTROIObservationsSequence"):  # type 1: absent = truncated / incomplete
        if seq not in rs:
            raise DicomError("RTSTRUCT lacks this required sequence (truncated or "
                             "incomplete file)", file=rs_path, field=seq)
    contours = _roi_contours(rs, rs_path)
    interpreted = {_int(o, "ReferencedROINumber", rs_path):
                   str(getattr(o, "RTROIInterpretedType", "") or "").upper()
                   for o in getattr(rs, "RTROIObservationsSequence", []) or []
                   if "ReferencedROINumber" in o}
    warnings: list[str] = []
    structures: dict[str, Structure] = {}
    roi_numbers: dict[str, int] = {}
    for roi in getattr(rs, "StructureSetROISequence", []) or []:
        num = _int(roi, "ROINumber", rs_path)
        original = str(getattr(roi, "ROIName", "") or f"ROI_{num}").strip()
        polys = contours.get(num, [])
        if not polys:
            warnings.append(f"ROI '{original}' has no closed contours; skipped")
            continue
        mask = rasterize_contours(polys, grid, file=rs_path, field=f"ROI '{original}'")
        if not mask.any():
            warnings.append(f"ROI '{original}' covers no voxel centre; skipped")
            continue
        canon = canonical_name(original, table)
        if canon is not None:
            name, role = canon, role_for(canon)
        else:
            name = original
            role = _INTERPRETED_ROLE.get(interpreted.get(num, ""), Role.ORGAN)
        if name in structures:
            warnings.append(f"ROI '{original}' maps to '{name}', already taken by "
                            f"'{structures[name].original_name}'; kept as '{original}'")
            name = original
            k = 2
            while name in structures:
                name, k = f"{original}_{k}", k + 1
        structures[name] = Structure(name, mask, role, original_name=original)
        roi_numbers[name] = num

    sidecar_path = Path(prescription_file) if prescription_file else find_sidecar(folder)
    sidecar = load_prescription_file(sidecar_path) if sidecar_path else None
    rx_missing = None
    try:
        rx = resolve_prescriptions(structures, explicit=prescriptions, fractions=fractions,
                                   sidecar=sidecar, source=str(folder), alias_table=table)
    except InputError as exc:  # none found (field prescriptions / fractions): not bad input
        if require_prescription or exc.field not in ("prescriptions", "fractions"):
            raise
        rx, rx_missing = (), exc.message

    dicom_meta = {tag: str(ct_ds.get(tag, "") or "") for tag in _PATIENT_TAGS}
    dicom_meta.update({
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_uid,
        "ct_sop_class_uid": str(ct_ds.get("SOPClassUID", "")),
        "ct_sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for _, ds in slices],
        "ct_files": [str(p.relative_to(folder)) for p, _ in slices],
        "rtstruct_file": str(rs_path.relative_to(folder)),
        "rtstruct_sop_instance_uid": str(rs.get("SOPInstanceUID", "")),
        "roi_numbers": roi_numbers,
        "ignored": ignored,
    })
    meta = {"format": "dicom", "dicom": dicom_meta, "warnings": warnings}
    if sidecar_path:
        meta["prescription_file"] = str(sidecar_path)
    if rx_missing:
        meta["prescription_missing"] = rx_missing
    patient_id = dicom_meta["PatientID"] or folder.name
    return Patient(ct, grid, structures, rx, patient_id, meta, str(folder))


__all__ = ["load_dicom"]
