"""DICOM export: RT Plan / RT Dose / RT Struct (+ CT) load in pydicom, pass dciodvfy, and
dicompyler-core's DVH from our RT Dose + RT Struct matches our own metrics within 1 %."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import numpy as np
import pydicom
import pytest
from atp.sequencer import fluence_set, get_sequencer, load_machine

from atp.dose.influence import BeamletInfo
from atp.io.dicom_export import export_plan_set
from atp.io.dicom_export_contours import plane_contours
from atp.io.dicom_export_geometry import slice_layout


def smooth_dose(patient):
    c = patient.target_centroid_mm()
    pts = patient.grid.voxel_centres_mm().reshape(*patient.grid.shape, 3)
    return 70.0 * np.exp(-((pts - c) ** 2).sum(-1) / (2 * 40.0 ** 2))


def small_delivery(patient, technique):
    m = load_machine("millennium120")
    c = patient.target_centroid_mm()
    X, Y = np.meshgrid((np.arange(12) - 5.5) * 5.0, (np.arange(8) - 3.5) * 5.0)
    if technique.startswith("vmat"):
        n, gantry = 20, (181.0 + 2.0 * np.arange(20)) % 360
        f = 60.0 * (X ** 2 / 625 + Y ** 2 / 300 < 1)
    else:
        n, gantry = 5, np.arange(5) * 72.0
        f = 900.0 * np.exp(-(X ** 2 + Y ** 2) / 500.0)
    info = BeamletInfo(np.repeat(np.arange(n), X.size), gantry, np.zeros(n), np.zeros(n),
                       np.tile(c, (n, 1)), np.tile(X.ravel(), n), np.tile(Y.ravel(), n))
    fs = fluence_set(np.tile(f.ravel(), n), info, m.leaf_edges_mm, fractions=35)
    return get_sequencer(technique).sequence(fs, m)


@pytest.fixture(scope="module")
def exported(phantom, tmp_path_factory):
    out = {}
    dose = smooth_dose(phantom)
    for tech in ("imrt-sns", "vmat", "vmat-sliding"):
        d = small_delivery(phantom, tech)
        folder = tmp_path_factory.mktemp(tech)
        out[tech] = (folder, export_plan_set(folder, phantom, dose, d), d)
    return out, dose


def test_files_load_and_reference_each_other(exported, phantom):
    sets, dose = exported
    _, written, d = sets["imrt-sns"]
    assert len(written["CT"]) == phantom.grid.shape[0]
    rp = pydicom.dcmread(written["RTPLAN"])
    rs = pydicom.dcmread(written["RTSTRUCT"])
    rd = pydicom.dcmread(written["RTDOSE"])
    ct = pydicom.dcmread(written["CT"][0])
    study = {x.StudyInstanceUID for x in (rp, rs, rd, ct)}
    frame = {x.FrameOfReferenceUID for x in (rp, rs, rd, ct)}
    assert len(study) == 1 and len(frame) == 1
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    for x in (rp, rs, rd, ct):
        assert pydicom.uid.UID(x.SOPInstanceUID).is_valid
    # the dose comes back in Gy on the right planes
    back = rd.pixel_array * float(rd.DoseGridScaling)
    assert back.shape == phantom.grid.shape
    assert np.allclose(back, slice_layout(phantom.grid).reorient(dose), atol=70 / 65000)
    # plan contents
    fg = rp.FractionGroupSequence[0]
    assert fg.NumberOfFractionsPlanned == 35 and fg.NumberOfBeams == len(d.beams)
    for ref, beam, b in zip(fg.ReferencedBeamSequence, rp.BeamSequence, d.beams):
        assert np.isclose(float(ref.BeamMeterset), b.mu / 35, rtol=1e-4)
        assert beam.NumberOfControlPoints == b.n_control_points
        mlc = next(x for x in beam.ControlPointSequence[0].BeamLimitingDevicePositionSequence
                   if x.RTBeamLimitingDeviceType == "MLCX")
        assert len(mlc.LeafJawPositions) == 120
        w = [float(cp.CumulativeMetersetWeight) for cp in beam.ControlPointSequence]
        assert w[0] == 0 and np.isclose(w[-1], 1.0) and np.all(np.diff(w) >= 0)
    arc = pydicom.dcmread(sets["vmat"][1]["RTPLAN"]).BeamSequence[0]
    gantry = [float(cp.GantryAngle) for cp in arc.ControlPointSequence]
    assert len(gantry) == 22 and arc.ControlPointSequence[0].GantryRotationDirection == "CW"
    # sliding-window arcs: many control points, the gantry turning one way throughout
    _, written, d = sets["vmat-sliding"]
    for beam, b in zip(pydicom.dcmread(written["RTPLAN"]).BeamSequence, d.beams):
        assert beam.NumberOfControlPoints == b.n_control_points > 22
        g = np.unwrap(np.deg2rad([float(cp.GantryAngle) for cp in beam.ControlPointSequence]))
        assert np.all(np.diff(g) > 0) or np.all(np.diff(g) < 0)


def test_dynamic_beams_carry_the_dynamic_dose_rate(phantom, tmp_path):
    """A sliding-window beam is written with the dose rate its leaves were timed at."""
    from dataclasses import replace

    d = small_delivery(phantom, "imrt-sliding")
    slow = replace(d.machine, dynamic_dose_rate_mu_min=400.0)
    for machine, rate in ((d.machine, 600.0), (slow, 400.0)):
        out = export_plan_set(tmp_path / f"r{rate:g}", phantom, smooth_dose(phantom),
                              replace(d, machine=machine))
        rp = pydicom.dcmread(out["RTPLAN"])
        assert {float(b.ControlPointSequence[0].DoseRateSet) for b in rp.BeamSequence} == {rate}


def test_struct_contours_recover_the_masks(exported, phantom):
    from matplotlib.path import Path as MplPath

    _, written, _ = exported[0]["imrt-sns"]
    rs = pydicom.dcmread(written["RTSTRUCT"])
    layout = slice_layout(phantom.grid)
    names = {r.ROINumber: r.ROIName for r in rs.StructureSetROISequence}
    for rc in rs.ROIContourSequence:
        name = names[rc.ReferencedROINumber]
        mask = layout.reorient(phantom.mask(name))
        got = np.zeros_like(mask)
        rr, cc = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
        for c in getattr(rc, "ContourSequence", []):
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            idx = layout.grid.patient_to_index(pts)
            k = round(idx[0, 0])
            inside = MplPath(idx[:, 1:]).contains_points(np.stack([rr.ravel(), cc.ravel()], 1))
            got[k] ^= inside.reshape(mask.shape[1:])
        assert np.array_equal(got, mask), name


def test_plane_contours_keep_holes():
    m = np.zeros((10, 10), bool)
    m[1:9, 1:9] = True
    m[3:6, 3:6] = False
    assert len(plane_contours(m)) == 2
    assert plane_contours(np.zeros((4, 4), bool)) == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) not installed; "
                           "`make sysdeps` installs it")
def test_dciodvfy_reports_no_errors(exported):
    for tech, (folder, written, _) in exported[0].items():
        for f in (written["RTPLAN"], written["RTSTRUCT"], written["RTDOSE"], written["CT"][0]):
            res = subprocess.run(["dciodvfy", f], capture_output=True, text=True, check=False)
            errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
            assert errors == [], (tech, f, errors)


def _dicompyler():
    """dicompyler-core 0.5.6 still imports pydicom 2 names; map them onto pydicom 3."""
    pytest.importorskip("dicompylercore")
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        pydicom.dicomio.read_file = pydicom.dcmread
    if "pydicom.pixel_data_handlers.util" not in sys.modules:
        try:
            import pydicom.pixel_data_handlers.util
        except ImportError:
            from pydicom.pixels.utils import pixel_dtype

            pkg = types.ModuleType("pydicom.pixel_data_handlers")
            util = types.ModuleType("pydicom.pixel_data_handlers.util")
            util.pixel_dtype = pixel_dtype
            pkg.util = util
            sys.modules["pydicom.pixel_data_handlers"] = pkg
            sys.modules["pydicom.pixel_data_handlers.util"] = util
    from dicompylercore import dvhcalc

    return dvhcalc


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dicompyler-core -> pydicom 2 API
def test_dicompyler_dvh_matches_ours(exported, phantom):
    dvhcalc = _dicompyler()
    (_, written, _), dose = exported[0]["imrt-sns"], exported[1]
    rs = pydicom.dcmread(written["RTSTRUCT"])
    checked = 0
    for roi in rs.StructureSetROISequence:
        mask = phantom.mask(roi.ROIName)
        theirs = dvhcalc.get_dvh(written["RTSTRUCT"], written["RTDOSE"], roi.ROINumber)
        ours_mean, ours_max = float(dose[mask].mean()), float(dose[mask].max())
        assert theirs.mean == pytest.approx(ours_mean, rel=0.01), roi.ROIName
        assert theirs.max == pytest.approx(ours_max, rel=0.01), roi.ROIName
        assert theirs.volume == pytest.approx(mask.sum() * phantom.grid.voxel_volume_cc,
                                              rel=0.01), roi.ROIName
        checked += 1
    assert checked == len(phantom.structures)


def test_dicom_patient_keeps_its_identity(exported, phantom, tmp_path):
    """A patient imported from DICOM: study/patient/frame UIDs are reused, CT not rewritten,
    the new structure set references the original CT instances."""
    from atp.io.dicom import load_dicom

    folder, written, d = exported[0]["imrt-sns"]
    src = tmp_path / "in"
    shutil.copytree(folder / "CT", src)
    shutil.copy(written["RTSTRUCT"], src / "RS.dcm")
    patient = load_dicom(src, prescriptions={"PTV_70": 70.0, "PTV_56": 56.0}, fractions=35)
    out = export_plan_set(tmp_path / "out", patient, smooth_dose(patient), d)
    assert "CT" not in out and "RTSTRUCT" not in out
    ct0 = pydicom.dcmread(written["CT"][0])
    rp = pydicom.dcmread(out["RTPLAN"])
    src_rs = pydicom.dcmread(src / "RS.dcm")
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == src_rs.SOPInstanceUID
    out = export_plan_set(tmp_path / "out2", patient, smooth_dose(patient), d,
                          write_struct=True)
    rs = pydicom.dcmread(out["RTSTRUCT"])
    rp = pydicom.dcmread(out["RTPLAN"])
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rp.StudyInstanceUID == ct0.StudyInstanceUID
    assert rp.PatientID == ct0.PatientID and rp.FrameOfReferenceUID == ct0.FrameOfReferenceUID
    ref = {c.ReferencedSOPInstanceUID for c in rs.ReferencedFrameOfReferenceSequence[0]
           .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    originals = {pydicom.dcmread(p).SOPInstanceUID for p in written["CT"]}
    assert ref == originals


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openkbp_patient_export_matches_dicompyler(openkbp_pt1, tmp_path):
    """Real OpenKBP anatomy on its (y, x, -z) grid with its reference dose."""
    dvhcalc = _dicompyler()
    p = openkbp_pt1
    dose = np.asarray(p.metadata["reference_dose_gy"])
    d = small_delivery(p, "imrt-sns")
    out = export_plan_set(tmp_path, p, dose, d, structures=["PTV_70", "SpinalCord",
                                                           "Parotid_L"])
    rs = pydicom.dcmread(out["RTSTRUCT"])
    for roi in rs.StructureSetROISequence:
        mask = p.mask(roi.ROIName)
        theirs = dvhcalc.get_dvh(out["RTSTRUCT"], out["RTDOSE"], roi.ROINumber)
        assert theirs.mean == pytest.approx(float(dose[mask].mean()), rel=0.01)
        assert theirs.max == pytest.approx(float(dose[mask].max()), rel=0.01)
    if shutil.which("dciodvfy"):
        for f in (out["RTPLAN"], out["RTSTRUCT"], out["RTDOSE"], out["CT"][0]):
            res = subprocess.run(["dciodvfy", f], capture_output=True, text=True, check=False)
            assert "Error" not in res.stdout + res.stderr, f
