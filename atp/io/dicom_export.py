"""DICOM export of a plan: CT series (when the patient did not come from DICOM), RT
Structure Set, RT Plan and RT Dose, all sharing one study and frame of reference.

* Patient and study attributes (and the frame of reference, the CT instances the
  structure set refers to) are taken from ``patient.metadata['dicom']`` when the patient
  was imported from DICOM; otherwise fresh UIDs are made and a CT series is written so
  the set is complete.
* Geometry: our grids are put into plane/row/column order by
  :func:`atp.io.dicom_export_geometry.slice_layout` (axis-aligned grids: IOP
  [1,0,0,0,1,0], planes along +z); patient coordinates are DICOM LPS mm throughout.
* The RT Plan takes a sequenced ``Delivery`` (duck-typed: ``beams`` with control points,
  ``machine`` with leaf boundaries, ``fractions``): beam limiting devices ASYMX, ASYMY and
  MLCX (bank A then bank B), cumulative meterset weights, per-fraction beam MU in the
  fraction group, and a reference to the RT Struct.
* RT Struct: written for patients without one; a DICOM patient's own structure set is
  referenced by the plan instead (``write_struct=True`` writes ours anyway).
* RT Dose: total-course dose in Gy, 16-bit unsigned with ``DoseGridScaling`` (steps of
  max/65000, 0.0011 Gy at 70 Gy), referencing the plan.

``export_plan_set(out_dir, patient, dose_gy, delivery)`` writes all of them; the single
writers take an :class:`ExportContext` so UIDs stay consistent.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)

from atp.errors import InputError
from atp.grid import Grid
from atp.io.dicom_export_contours import mask_contours
from atp.io.dicom_export_geometry import SliceLayout, slice_layout
from atp.outputs import atomic_write_bytes
from atp.version import __version__

MANUFACTURER = "atp"
_ROLE_TYPE = {"target": "PTV", "organ": "ORGAN", "control": "CONTROL", "external": "EXTERNAL"}
_COLOURS = [(255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 200),
            (0, 220, 220), (255, 128, 0), (128, 128, 255), (160, 80, 40), (255, 105, 180)]


def _ds(v: float) -> str:
    """A DS value string of at most 16 characters."""
    for digits in (10, 9, 8, 7, 6):
        s = f"{float(v):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(v):.5g}"


def _set_raw_ds(ds: Dataset, tag: int, values) -> None:
    """Store a long DS list as raw bytes (pydicom converts lazily; converting thousands
    of contour coordinates one by one is slow). Values written with 3 decimals (um)."""
    text = "\\".join(f"{v:.3f}" for v in np.asarray(values, dtype=np.float64))
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    ds[Tag(tag)] = RawDataElement(Tag(tag), "DS", len(raw), raw, 0, False, True)


def _ds_list(values) -> list[str]:
    return [_ds(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


@dataclass
class ExportContext:
    """Identity shared by every exported object of one plan."""

    patient_attrs: dict
    study_attrs: dict
    frame_of_reference_uid: str
    layout: SliceLayout
    ct_series_uid: str
    ct_sop_uids: list[str]  # one per plane of ``layout`` (plane order)
    ct_from_source: bool  # True: the CT exists already (DICOM import), not re-exported
    rtstruct_uid: str = field(default_factory=generate_uid)
    source_rtstruct_uid: str | None = None  # the input's RT Struct (DICOM import)
    rtplan_uid: str = field(default_factory=generate_uid)
    rtdose_uid: str = field(default_factory=generate_uid)
    series_uids: dict = field(default_factory=lambda: {k: generate_uid() for k in
                                                       ("RTSTRUCT", "RTPLAN", "RTDOSE")})
    roi_numbers: dict = field(default_factory=dict)
    when: _dt.datetime = field(default_factory=_dt.datetime.now)

    @property
    def date(self) -> str:
        return self.when.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return self.when.strftime("%H%M%S")


def export_context(patient) -> ExportContext:
    """UIDs and patient/study attributes for exporting ``patient``'s plan."""
    layout = slice_layout(patient.grid)
    meta = dict(patient.metadata.get("dicom", {}) or {})
    now = _dt.datetime.now()
    if meta.get("StudyInstanceUID") and meta.get("FrameOfReferenceUID"):
        pat = {k: meta.get(k, "") for k in ("PatientName", "PatientID", "PatientBirthDate",
                                             "PatientSex")}
        pat["PatientID"] = pat["PatientID"] or patient.patient_id
        study = {k: meta.get(k, "") for k in ("StudyInstanceUID", "StudyID", "StudyDate",
                                               "StudyTime", "AccessionNumber",
                                               "ReferringPhysicianName", "StudyDescription")}
        uids = list(meta.get("ct_sop_instance_uids", []))
        if len(uids) != patient.grid.shape[layout.perm[0]] or layout.perm[0] != 0:
            raise InputError("DICOM metadata does not list one CT instance per slice",
                             file=patient.source, field="metadata.dicom.ct_sop_instance_uids")
        uids = [uids[i] for i in layout.source_plane_index]
        return ExportContext(pat, study, meta["FrameOfReferenceUID"], layout,
                             meta.get("SeriesInstanceUID", generate_uid()), uids, True,
                             source_rtstruct_uid=meta.get("rtstruct_sop_instance_uid") or None,
                             when=now)
    pat = {"PatientName": str(patient.patient_id).replace("^", " ") + "^",
           "PatientID": str(patient.patient_id), "PatientBirthDate": "", "PatientSex": ""}
    study = {"StudyInstanceUID": generate_uid(), "StudyID": "ATP1",
             "StudyDate": now.strftime("%Y%m%d"), "StudyTime": now.strftime("%H%M%S"),
             "AccessionNumber": "", "ReferringPhysicianName": "",
             "StudyDescription": "atp automated plan"}
    n = layout.grid.shape[0]
    return ExportContext(pat, study, generate_uid(), layout, generate_uid(),
                         [generate_uid() for _ in range(n)], False, when=now)


# --- common modules ------------------------------------------------------------------------

def _base(ctx: ExportContext, sop_class: str, sop_uid: str, modality: str,
          series_uid: str, series_number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ctx.date
    ds.InstanceCreationTime = ctx.time
    for k, v in ctx.patient_attrs.items():
        setattr(ds, k, v)
    for k, v in ctx.study_attrs.items():
        if k == "StudyDescription" and not v:
            continue
        setattr(ds, k, v)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "atp"
    ds.SoftwareVersions = _version()
    return ds


def _version() -> str:
    return str(__version__)


def _save(ds: Dataset, path: Path) -> Path:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _frame_of_reference(ds: Dataset, ctx: ExportContext) -> None:
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _image_plane(ds: Dataset, layout: SliceLayout, k: int) -> None:
    ds.ImageOrientationPatient = _ds_list(layout.orientation)
    ds.ImagePositionPatient = _ds_list(layout.plane_position_mm(k))
    ds.PixelSpacing = _ds_list(layout.pixel_spacing_mm)
    ds.SliceThickness = _ds(layout.slice_spacing_mm)


# --- CT --------------------------------------------------------------------------------------

def export_ct_series(folder: str | os.PathLike, patient, ctx: ExportContext) -> list[Path]:
    """Write the patient's CT as a CT Image series (one file per plane, ``CT_<n>.dcm``)."""
    folder = Path(folder)
    layout = ctx.layout
    hu = layout.reorient(patient.ct_hu)
    lo = float(min(hu.min(), -1024.0))
    slope = 1.0
    if hu.max() - lo > 65535:
        slope = float((hu.max() - lo) / 65535.0)
    paths = []
    for k in range(hu.shape[0]):
        ds = _base(ctx, CTImageStorage, ctx.ct_sop_uids[k], "CT", ctx.ct_series_uid, 1,
                   "atp CT")
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEADNECK"
        _frame_of_reference(ds, ctx)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        ds.ContentDate, ds.ContentTime = ctx.date, ctx.time
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        _image_plane(ds, layout, k)
        ds.SliceLocation = _ds(float(np.dot(layout.plane_position_mm(k),
                                            layout.grid.direction[:, 0])))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = _ds(lo)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        pix = np.clip(np.rint((hu[k] - lo) / slope), 0, 65535).astype(np.uint16)
        ds.PixelData = pix.tobytes()
        paths.append(_save(ds, folder / f"CT_{k + 1:04d}.dcm"))
    return paths


# --- RT Structure Set -------------------------------------------------------------------------

def export_rt_struct(path: str | os.PathLike, patient, ctx: ExportContext,
                     structures: list[str] | None = None) -> Path:
    """Write the patient's structures (masks) as an RT Structure Set of closed planar
    contours (holes as separate contours) referencing the CT planes."""
    layout = ctx.layout
    ds = _base(ctx, RTStructureSetStorage, ctx.rtstruct_uid, "RTSTRUCT",
               ctx.series_uids["RTSTRUCT"], 2, "atp structures")
    _frame_of_reference(ds, ctx)
    ds.StructureSetLabel = "atp"
    ds.StructureSetName = "atp structures"
    ds.StructureSetDate, ds.StructureSetTime = ctx.date, ctx.time

    contour_images = Sequence()
    for uid in ctx.ct_sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = ctx.ct_series_uid
    series.ContourImageSequence = contour_images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Mgmt (retired)
    study.ReferencedSOPInstanceUID = ctx.study_attrs["StudyInstanceUID"]
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ctx.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    names = list(patient.structures) if structures is None else structures
    rois, contours, observations = Sequence(), Sequence(), Sequence()
    for i, name in enumerate(names):
        s = patient.structure(name)
        number = i + 1
        ctx.roi_numbers[name] = number
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ctx.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL" if s.original_name else "AUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = list(_COLOURS[i % len(_COLOURS)])
        seq = Sequence()
        for k, pts in mask_contours(s.mask, layout):
            c = Dataset()
            img = Dataset()
            img.ReferencedSOPClassUID = CTImageStorage
            img.ReferencedSOPInstanceUID = ctx.ct_sop_uids[k]
            c.ContourImageSequence = Sequence([img])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            _set_raw_ds(c, 0x30060050, pts.reshape(-1))  # ContourData
            seq.append(c)
        if len(seq):
            rc.ContourSequence = seq
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _ROLE_TYPE.get(s.role.value, "ORGAN")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    return _save(ds, Path(path))


# --- RT Dose ------------------------------------------------------------------------------------

def export_rt_dose(path: str | os.PathLike, dose_gy, grid: Grid, ctx: ExportContext,
                   *, reference_plan: bool = True, comment: str = "") -> Path:
    """Write a 3-D dose (Gy, total course) on ``grid`` as an RT Dose (summation PLAN),
    referencing the context's RT Plan unless ``reference_plan`` is False."""
    dose = np.asarray(dose_gy, dtype=np.float64)
    grid.check_array(dose, field="dose_gy")
    if not np.all(np.isfinite(dose)) or dose.min() < 0:
        raise InputError("dose must be finite and >= 0 Gy", field="dose_gy")
    layout = slice_layout(grid)
    d = layout.reorient(dose)
    ds = _base(ctx, RTDoseStorage, ctx.rtdose_uid, "RTDOSE", ctx.series_uids["RTDOSE"], 4,
               "atp dose")
    _frame_of_reference(ds, ctx)
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ctx.date, ctx.time
    _image_plane(ds, layout, 0)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = int(d.shape[0])
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.Rows, ds.Columns = int(d.shape[1]), int(d.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    if comment:
        ds.DoseComment = comment[:64]
    ds.GridFrameOffsetVector = _ds_list(np.arange(d.shape[0]) * layout.slice_spacing_mm)
    dmax = float(d.max())
    scale = float(_ds(dmax / 65000.0)) if dmax > 0 else 1.0
    ds.DoseGridScaling = _ds(scale)
    ds.PixelData = np.clip(np.rint(d / scale), 0, 65535).astype("<u2").tobytes()
    if reference_plan:
        plan = Dataset()
        plan.ReferencedSOPClassUID = RTPlanStorage
        plan.ReferencedSOPInstanceUID = ctx.rtplan_uid
        ds.ReferencedRTPlanSequence = Sequence([plan])
    return _save(ds, Path(path))


# --- RT Plan ---------------------------------------------------------------------------------

def _device(kind: str, n: int, boundaries=None) -> Dataset:
    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.NumberOfLeafJawPairs = n
    if boundaries is not None:
        d.LeafPositionBoundaries = _ds_list(boundaries)
    return d


def _position(kind: str, values) -> Dataset:
    p = Dataset()
    p.RTBeamLimitingDeviceType = kind
    p.LeafJawPositions = _ds_list(values)
    return p


def export_rt_plan(path: str | os.PathLike, delivery, patient, ctx: ExportContext, *,
                   label: str = "atp", prescription_gy: float | None = None) -> Path:
    """Write a sequenced delivery as an RT Plan (photon beams or arcs, MLCX + jaws)."""
    m = delivery.machine
    ds = _base(ctx, RTPlanStorage, ctx.rtplan_uid, "RTPLAN", ctx.series_uids["RTPLAN"], 3,
               "atp plan")
    _frame_of_reference(ds, ctx)
    ds.RTPlanLabel = label[:16]
    ds.RTPlanName = f"atp {delivery.technique}"[:64]
    ds.RTPlanDate, ds.RTPlanTime = ctx.date, ctx.time
    ds.RTPlanGeometry = "PATIENT"
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RTStructureSetStorage
    ref_ss.ReferencedSOPInstanceUID = ctx.rtstruct_uid
    ds.ReferencedStructureSetSequence = Sequence([ref_ss])

    rx_gy = prescription_gy
    if rx_gy is None and getattr(patient, "prescriptions", ()):
        rx_gy = patient.prescriptions[0].dose_gy
    if rx_gy is not None and patient.prescriptions:
        dref = Dataset()
        dref.DoseReferenceNumber = 1
        dref.DoseReferenceUID = generate_uid()
        dref.DoseReferenceStructureType = "SITE"
        dref.DoseReferenceDescription = patient.prescriptions[0].target[:64]
        dref.DoseReferenceType = "TARGET"
        dref.TargetPrescriptionDose = _ds(rx_gy)
        ds.DoseReferenceSequence = Sequence([dref])

    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    ds.PatientSetupSequence = Sequence([setup])

    fractions = int(delivery.fractions)
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = fractions
    fg.NumberOfBeams = len(delivery.beams)
    fg.NumberOfBrachyApplicationSetups = 0
    refs = Sequence()
    beams = Sequence()
    for i, b in enumerate(delivery.beams):
        number = i + 1
        mu_fx = b.mu / fractions
        r = Dataset()
        r.ReferencedBeamNumber = number
        r.BeamMeterset = _ds(round(mu_fx, 4))
        refs.append(r)
        beams.append(_beam_dataset(b, number, m, delivery))
    fg.ReferencedBeamSequence = refs
    ds.FractionGroupSequence = Sequence([fg])
    ds.BeamSequence = beams
    ds.ApprovalStatus = "UNAPPROVED"
    return _save(ds, Path(path))


def _beam_dataset(b, number: int, machine, delivery) -> Dataset:
    n_pairs = machine.n_pairs
    if b.leaf_a_mm.shape[1] != n_pairs:
        raise InputError(f"beam {b.name} has {b.leaf_a_mm.shape[1]} leaf pairs, the machine "
                         f"{n_pairs}", field="delivery")
    bd = Dataset()
    bd.BeamNumber = number
    bd.BeamName = b.name[:64]
    bd.BeamDescription = f"{delivery.technique} {b.kind}"[:64]
    bd.BeamType = "DYNAMIC" if b.n_control_points > 2 or b.kind != "static" else "STATIC"
    bd.RadiationType = "PHOTON"
    bd.TreatmentMachineName = machine.treatment_machine_name[:16]
    bd.Manufacturer = machine.manufacturer[:64]
    bd.PrimaryDosimeterUnit = "MU"
    bd.SourceAxisDistance = _ds(machine.source_axis_distance_mm)
    bd.BeamLimitingDeviceSequence = Sequence([
        _device("ASYMX", 1), _device("ASYMY", 1),
        _device("MLCX", n_pairs, machine.leaf_edges_mm)])
    bd.ReferencedPatientSetupNumber = 1
    bd.TreatmentDeliveryType = "TREATMENT"
    bd.NumberOfWedges = 0
    bd.NumberOfCompensators = 0
    bd.NumberOfBoli = 0
    bd.NumberOfBlocks = 0
    bd.FinalCumulativeMetersetWeight = "1"
    bd.NumberOfControlPoints = b.n_control_points
    weights = b.meterset_weights
    cps = Sequence()
    arc = b.kind == "arc"
    for k in range(b.n_control_points):
        cp = Dataset()
        cp.ControlPointIndex = k
        cp.CumulativeMetersetWeight = _ds(round(float(weights[k]), 8))
        positions = Sequence()
        jaws_change = k > 0 and (not np.allclose(b.jaw_x_mm[k], b.jaw_x_mm[k - 1])
                                 or not np.allclose(b.jaw_y_mm[k], b.jaw_y_mm[k - 1]))
        if k == 0 or jaws_change:
            positions.append(_position("ASYMX", b.jaw_x_mm[k]))
            positions.append(_position("ASYMY", b.jaw_y_mm[k]))
        leaves_change = k == 0 or not (np.allclose(b.leaf_a_mm[k], b.leaf_a_mm[k - 1])
                                       and np.allclose(b.leaf_b_mm[k], b.leaf_b_mm[k - 1]))
        if leaves_change or not arc:
            positions.append(_position("MLCX", np.concatenate([b.leaf_a_mm[k],
                                                               b.leaf_b_mm[k]])))
        if len(positions):
            cp.BeamLimitingDevicePositionSequence = positions
        if k == 0:
            cp.NominalBeamEnergy = _ds(machine.nominal_energy_mv)
            cp.DoseRateSet = _ds(machine.dose_rate_mu_min(b.kind))
            cp.GantryAngle = _ds(float(b.gantry_deg[0]) % 360.0)
            cp.GantryRotationDirection = b.rotation_direction
            cp.BeamLimitingDeviceAngle = _ds(b.collimator_deg)
            cp.BeamLimitingDeviceRotationDirection = "NONE"
            cp.PatientSupportAngle = _ds(b.couch_deg)
            cp.PatientSupportRotationDirection = "NONE"
            cp.TableTopEccentricAngle = "0"
            cp.TableTopEccentricRotationDirection = "NONE"
            cp.TableTopVerticalPosition = ""
            cp.TableTopLongitudinalPosition = ""
            cp.TableTopLateralPosition = ""
            cp.IsocenterPosition = _ds_list(b.isocenter_mm)
        elif arc:
            cp.GantryAngle = _ds(float(b.gantry_deg[k]) % 360.0)
            cp.GantryRotationDirection = b.rotation_direction if k < b.n_control_points - 1 \
                else "NONE"
        cps.append(cp)
    bd.ControlPointSequence = cps
    return bd


# --- the whole set ---------------------------------------------------------------------------

def export_plan_set(out_dir: str | os.PathLike, patient, dose_gy, delivery=None, *,
                    dose_grid: Grid | None = None, structures: list[str] | None = None,
                    write_ct: bool | None = None, write_struct: bool | None = None) -> dict:
    """Write RT Plan (when ``delivery`` is given), RT Dose, RT Struct and, for patients
    not imported from DICOM, the CT series into ``out_dir``. Returns {kind: path(s)}.

    dose_gy: total-course dose in Gy on ``dose_grid`` (default: the patient grid).
    Without a ``delivery`` no RT Plan is written and the RT Dose cannot reference one (its
    Referenced RT Plan Sequence, required for summation type PLAN, is then absent).
    write_struct: default True unless the patient came from DICOM with an RT Struct, in
    which case the plan refers to that structure set instead of a new one.
    write_ct: default True unless the patient came from DICOM.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = export_context(patient)
    written: dict = {}
    if write_ct if write_ct is not None else not ctx.ct_from_source:
        written["CT"] = [str(p) for p in export_ct_series(out / "CT", patient, ctx)]
    if write_struct if write_struct is not None else ctx.source_rtstruct_uid is None:
        written["RTSTRUCT"] = str(export_rt_struct(out / "RS.atp.dcm", patient, ctx,
                                                   structures))
    else:
        if not ctx.source_rtstruct_uid:
            raise InputError("write_struct=False needs a patient read from DICOM with an "
                             "RT Struct", field="write_struct")
        ctx.rtstruct_uid = ctx.source_rtstruct_uid
    if delivery is not None:
        written["RTPLAN"] = str(export_rt_plan(out / "RP.atp.dcm", delivery, patient, ctx))
    written["RTDOSE"] = str(export_rt_dose(out / "RD.atp.dcm", dose_gy,
                                           dose_grid or patient.grid, ctx,
                                           reference_plan=delivery is not None))
    written["uids"] = {"study": ctx.study_attrs["StudyInstanceUID"],
                       "frame_of_reference": ctx.frame_of_reference_uid,
                       "rtstruct": ctx.rtstruct_uid, "rtplan": ctx.rtplan_uid,
                       "rtdose": ctx.rtdose_uid}
    return written
