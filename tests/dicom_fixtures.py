"""Helpers that write small synthetic DICOM data (CT series via pydicom; RTSTRUCT either
hand-built with pydicom or written by rt-utils, an independent library) for the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class CtSeries:
    """What was written: geometry (sorted by position along the normal) and UIDs."""

    folder: Path
    files: list[Path]          # in slice order (ascending along the normal)
    hu: np.ndarray             # (slices, rows, cols) float32 HU as written
    spacing_mm: tuple[float, float, float]   # (slice, row, col)
    origin_mm: np.ndarray      # IPP of slice 0
    row_dir: np.ndarray        # IOP[:3]: along a row (increasing column)
    col_dir: np.ndarray        # IOP[3:]: down a column (increasing row)
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: list[str]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def index_to_patient(self, k, r, c) -> np.ndarray:
        """Independent (DICOM-formula) voxel -> patient mm for (slice, row, col)."""
        k, r, c = (np.asarray(v, dtype=np.float64) for v in (k, r, c))
        return (self.origin_mm + np.multiply.outer(k * self.spacing_mm[0], self.normal)
                + np.multiply.outer(r * self.spacing_mm[1], self.col_dir)
                + np.multiply.outer(c * self.spacing_mm[2], self.row_dir))


def _file_dataset(path: Path, sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _patient_study(ds, study_uid: str) -> None:
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""


def write_ct_series(folder: Path, *, shape=(20, 48, 48), spacing_mm=(2.5, 1.25, 1.25),
                    origin_mm=(-31.7, -12.4, 40.0), angle_deg: float = 0.0,
                    hu: np.ndarray | None = None, slope: float = 1.0,
                    intercept: float = -1024.0, drop_slices=(), study_uid=None,
                    series_uid=None, frame_uid=None, seed: int = 0) -> CtSeries:
    """Write a CT series; in-plane axes rotated by ``angle_deg`` about the slice normal.

    Files are named in shuffled order so that readers must sort by position.
    ``drop_slices`` leaves those slice indices out (to make a gap).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    a = np.deg2rad(angle_deg)
    row_dir = np.array([np.cos(a), np.sin(a), 0.0])
    col_dir = np.array([-np.sin(a), np.cos(a), 0.0])
    normal = np.cross(row_dir, col_dir)
    if hu is None:
        kk, rr, cc = np.indices(shape)
        body = ((rr - rows / 2) ** 2 / (0.42 * rows) ** 2
                + (cc - cols / 2) ** 2 / (0.45 * cols) ** 2) <= 1
        hu = np.where(body, 40.0 + 10 * np.sin(kk + cc / 5.0), -1000.0)
        hu = np.round(hu)
    hu = np.asarray(hu, dtype=np.float32)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    origin = np.asarray(origin_mm, dtype=np.float64)
    names = rng.permutation(n)
    files, sops = [], []
    for k in range(n):
        sop = generate_uid()
        path = folder / f"CT_{names[k]:03d}.dcm"
        files.append(path)
        sops.append(sop)
        if k in drop_slices:
            continue
        ds = _file_dataset(path, CT_SOP_CLASS, sop)
        _patient_study(ds, study_uid)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ipp = origin + k * spacing_mm[0] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[2]:g}"]
        ds.SliceThickness = f"{spacing_mm[0]:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        stored = np.rint((hu[k] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
    return CtSeries(folder, files, hu, tuple(float(s) for s in spacing_mm), origin, row_dir,
                    col_dir, study_uid, series_uid, frame_uid, sops)


def write_rtstruct(path: Path, ct: CtSeries, rois: list[tuple[str, list[np.ndarray]]], *,
                   series_uid: str | None = None, frame_uid: str | None = None,
                   interpreted: dict[str, str] | None = None) -> Path:
    """Hand-built RTSTRUCT: ``rois`` = [(name, [contour (N, 3) mm, ...]), ...]."""
    path = Path(path)
    ds = _file_dataset(path, RTSTRUCT_SOP_CLASS, generate_uid())
    _patient_study(ds, ct.study_uid)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.StructureSetLabel = "synthetic"
    frame_uid = frame_uid or ct.frame_uid
    fr = pydicom.Dataset()
    fr.FrameOfReferenceUID = frame_uid
    st = pydicom.Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    st.ReferencedSOPInstanceUID = ct.study_uid
    se = pydicom.Dataset()
    se.SeriesInstanceUID = series_uid or ct.series_uid
    images = []
    for sop in ct.sop_uids:
        im = pydicom.Dataset()
        im.ReferencedSOPClassUID = CT_SOP_CLASS
        im.ReferencedSOPInstanceUID = sop
        images.append(im)
    se.ContourImageSequence = Sequence(images)
    st.RTReferencedSeriesSequence = Sequence([se])
    fr.RTReferencedStudySequence = Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])
    ssr, rcs, obs = [], [], []
    for i, (name, contours) in enumerate(rois, start=1):
        r = pydicom.Dataset()
        r.ROINumber = i
        r.ReferencedFrameOfReferenceUID = frame_uid
        r.ROIName = name
        r.ROIGenerationAlgorithm = "MANUAL"
        ssr.append(r)
        rc = pydicom.Dataset()
        rc.ReferencedROINumber = i
        rc.ROIDisplayColor = [255, 0, 0]
        cs = []
        for pts in contours:
            c = pydicom.Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.4f}" for v in np.asarray(pts, dtype=float).ravel()]
            cs.append(c)
        if cs:
            rc.ContourSequence = Sequence(cs)
        rcs.append(rc)
        o = pydicom.Dataset()
        o.ObservationNumber = i
        o.ReferencedROINumber = i
        o.RTROIInterpretedType = (interpreted or {}).get(name, "ORGAN")
        o.ROIInterpreter = ""
        obs.append(o)
    ds.StructureSetROISequence = Sequence(ssr)
    ds.ROIContourSequence = Sequence(rcs)
    ds.RTROIObservationsSequence = Sequence(obs)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtstruct_rtutils(ct: CtSeries, masks: dict[str, np.ndarray], path: Path) -> Path:
    """RTSTRUCT written by rt-utils from masks in (slice, row, col) order."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_new(dicom_series_path=str(ct.folder))
    for i, (name, mask) in enumerate(masks.items()):
        # rt-utils wants (rows, cols, slices) with slices ascending along the normal
        rt.add_roi(mask=np.transpose(np.asarray(mask, dtype=bool), (1, 2, 0)), name=name,
                   color=[(40 * i) % 255, 100, 200])
    rt.save(str(path))
    return Path(path)
