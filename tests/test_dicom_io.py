"""DICOM import: synthetic CT (pydicom) + RTSTRUCT (rt-utils, and hand-built), the
rasteriser, prescriptions, and every bad-input class."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_fixtures import write_ct_series, write_rtstruct, write_rtstruct_rtutils

from atp.errors import DicomError, InputError, StructureError
from atp.io.dicom import load_dicom
from atp.io.loader import load_patient
from atp.io.prescription import load_prescription_file
from atp.io.rasterize import rasterize_contours, rasterize_slice
from atp.names import AliasTable
from atp.patient import Role


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _boundary(mask):
    """Voxels of ``mask`` with an in-plane 4-neighbour outside it."""
    m = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] \
        & m[:, 1:-1, 2:]
    return mask & ~inner


# --- rt-utils round trip -----------------------------------------------------------------
@pytest.fixture(scope="module")
def rtutils_case(tmp_path_factory):
    pytest.importorskip("rt_utils")  # dev extra: the independent RTSTRUCT writer
    folder = tmp_path_factory.mktemp("rtutils")
    ct = write_ct_series(folder, shape=(20, 48, 48), spacing_mm=(2.5, 1.25, 1.25),
                         origin_mm=(-31.7, -12.4, 40.0), angle_deg=20.0)
    kk, rr, cc = np.indices(ct.hu.shape)
    masks = {
        "lparotid": ((rr - 20) ** 2 + (cc - 18) ** 2 <= 100) & (kk >= 3) & (kk <= 15),
        "PTV 70": ((rr - 27) ** 2 / 100 + (cc - 31) ** 2 / 64 <= 1) & (kk >= 5) & (kk <= 12),
        "Spinal Cord": ((rr - 36) ** 2 + (cc - 24) ** 2 <= 9) & (kk >= 1),
        "BODY": ct.hu > -500,
        "my helper thing": (rr >= 10) & (rr < 16) & (cc >= 30) & (cc < 38) & (kk == 9),
    }
    write_rtstruct_rtutils(ct, masks, folder / "RS.dcm")
    return ct, masks


def test_rtutils_round_trip(rtutils_case):
    ct, masks = rtutils_case
    p = load_dicom(ct.folder, fractions=35)
    # CT values and geometry
    assert p.ct_hu.dtype == np.float32 and np.all(np.isfinite(p.ct_hu))
    np.testing.assert_array_equal(p.ct_hu, ct.hu)
    assert p.grid.shape == (20, 48, 48)
    np.testing.assert_allclose(p.grid.spacing_mm, (2.5, 1.25, 1.25), atol=1e-6)
    for idx in [(0, 0, 0), (19, 47, 0), (7, 3, 41)]:
        np.testing.assert_allclose(p.grid.index_to_patient(idx), ct.index_to_patient(*idx),
                                   atol=1e-3)
    # names and roles
    expected = {"lparotid": ("Parotid_L", Role.ORGAN), "PTV 70": ("PTV_70", Role.TARGET),
                "Spinal Cord": ("SpinalCord", Role.ORGAN), "BODY": ("External", Role.EXTERNAL),
                "my helper thing": ("my helper thing", Role.ORGAN)}
    for original, (name, role) in expected.items():
        s = p.structure(name)
        assert s.original_name == original and s.role == role
        ref = masks[original]
        ours = s.mask
        dice = _dice(ours, ref)
        # rt-utils traces contours through the centres of the mask's boundary voxels, so
        # voxel centres on the contour are ties: disagreement is confined to the boundary
        # (half the boundary of a 3-voxel-radius cord is a large fraction of it)
        assert dice > (0.95 if ref.sum() > 1000 else 0.75), (name, dice)
        assert not np.any(ours & ~ref), name          # never outside the given mask
        assert np.all((ref & ~ours) <= _boundary(ref)), name
    assert [(rx.target, rx.dose_gy, rx.fractions) for rx in p.prescriptions] == \
        [("PTV_70", 70.0, 35)]
    meta = p.metadata["dicom"]
    assert meta["SeriesInstanceUID"] == ct.series_uid
    assert meta["FrameOfReferenceUID"] == ct.frame_uid
    assert meta["StudyInstanceUID"] == ct.study_uid
    assert meta["ct_sop_instance_uids"] == ct.sop_uids  # in slice order
    assert p.patient_id == "SYN001"


def test_rtutils_volume_matches_polygon_area(rtutils_case):
    """Rasterised volume vs the exact area of the contours (shoelace) x slice thickness."""
    import pydicom

    ct, _ = rtutils_case
    p = load_dicom(ct.folder, fractions=35)
    rs = pydicom.dcmread(ct.folder / "RS.dcm")
    names = {int(r.ROINumber): r.ROIName for r in rs.StructureSetROISequence}
    for rc in rs.ROIContourSequence:
        original = names[int(rc.ReferencedROINumber)]
        if original == "my helper thing":
            continue  # single slice of 6x8 voxels: too small for a volume comparison
        area = 0.0
        for c in rc.ContourSequence:
            pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
            u, v = pts @ ct.row_dir, pts @ ct.col_dir
            area += 0.5 * abs(np.dot(u, np.roll(v, -1)) - np.dot(v, np.roll(u, -1)))
        exact_cc = area * ct.spacing_mm[0] / 1000.0
        s = next(s for s in p.structures.values() if s.original_name == original)
        assert s.volume_cc(p.grid) == pytest.approx(exact_cc, rel=0.05), original


def test_cli_info_json(rtutils_case, capsys):
    from atp.cli import main

    ct, _ = rtutils_case
    assert main(["info", str(ct.folder), "--json", "--fractions", "35"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {s["name"]: s for s in info["structures"]}
    assert names["Parotid_L"]["original_name"] == "lparotid"
    assert names["PTV_70"]["role"] == "target"
    assert info["prescriptions"] == [{"target": "PTV_70", "dose_gy": 70.0, "fractions": 35}]
    assert info["grid"]["shape"] == [20, 48, 48]
    # without fractions: info still describes the patient and says planning needs them
    assert main(["info", str(ct.folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prescriptions"] == [] and len(info["structures"]) == len(names)
    assert "fractions" in info["prescription_note"] and "--rx" in info["prescription_note"]
    assert main(["info", str(ct.folder)]) == 0
    out = capsys.readouterr().out
    assert "PTV_70" in out and "planning will need a prescription" in out
    # planning still requires it: exit code 2 and one line naming the folder and field
    assert main(["plan", str(ct.folder), "--out", str(ct.folder.parent / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fractions" in err and str(ct.folder) in err
    assert not (ct.folder.parent / "p").exists()
    # a prescription that is given but wrong is still an error for info
    assert main(["info", str(ct.folder), "--rx", "PTV_99=70", "--fractions", "35"]) == 2
    assert "--rx PTV_99" in capsys.readouterr().err


def test_loader_dispatches_to_dicom(rtutils_case):
    ct, _ = rtutils_case
    p = load_patient(ct.folder, prescriptions={"PTV70": 66.0}, fractions=33)
    assert p.metadata["format"] == "dicom"
    assert [(rx.target, rx.dose_gy, rx.fractions) for rx in p.prescriptions] == \
        [("PTV_70", 66.0, 33)]


# --- hand-built RTSTRUCT: ring with a hole, two contours on one slice ----------------------
def _rect(ct, k, r0, r1, c0, c1, dk=0.0):
    """Rectangle with corners at continuous (row, col) indices, on slice k (+dk)."""
    rc = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    return np.array([ct.index_to_patient(k + dk, r, c) for r, c in rc])


@pytest.fixture(scope="module")
def hand_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hand")
    # non-square pixels (rows 1.0 mm, columns 2.0 mm), rotated in-plane axes
    ct = write_ct_series(folder, shape=(8, 24, 20), spacing_mm=(3.0, 1.0, 2.0),
                         origin_mm=(10.0, -50.0, -100.0), angle_deg=-30.0, seed=3)
    ring = [_rect(ct, 3, 2.5, 12.5, 3.5, 10.5), _rect(ct, 3, 5.5, 8.5, 5.5, 7.5),
            _rect(ct, 3, 14.5, 17.5, 12.5, 15.5),            # second island, same slice
            _rect(ct, 4, 2.5, 4.5, 3.5, 5.5, dk=0.3)]         # off-slice by 0.3 slice
    rois = [("PTV_5425", ring), ("empty one", []), ("Larynx", [_rect(ct, 6, 1.5, 3.5, 1.5, 3.5)]),
            ("Larynx total", [_rect(ct, 6, 1.5, 2.5, 1.5, 2.5)])]
    write_rtstruct(folder / "RS_hand.dcm", ct, rois)
    (folder / "prescription.yaml").write_text("fractions: 25\ntargets:\n  PTV 5425: 54.25\n")
    return ct


def test_hand_built_ring_and_islands(hand_case):
    ct = hand_case
    p = load_dicom(ct.folder)
    expected = np.zeros((8, 24, 20), dtype=bool)
    expected[3, 3:13, 4:11] = True
    expected[3, 6:9, 6:8] = False          # the hole
    expected[3, 15:18, 13:16] = True       # the second island
    expected[4, 3:5, 4:6] = True           # contour 0.3 slice off its slice
    s = p.structure("PTV_54.25")
    assert s.role == Role.TARGET and s.original_name == "PTV_5425"
    np.testing.assert_array_equal(s.mask, expected)
    assert [(rx.target, rx.dose_gy, rx.fractions) for rx in p.prescriptions] == \
        [("PTV_54.25", 54.25, 25)]
    assert p.metadata["prescription_file"].endswith("prescription.yaml")
    # empty ROI skipped with a warning; duplicate canonical name kept under its own name
    warnings = " ".join(p.metadata["warnings"])
    assert "empty one" in warnings and "empty one" not in p.structures
    assert p.structure("Larynx").n_voxels == 4
    assert p.structure("Larynx total").n_voxels == 1 and "already taken" in warnings


def test_explicit_prescription_overrides_sidecar(hand_case):
    p = load_dicom(hand_case.folder, prescriptions={"PTV_54.25": 50.0}, fractions=20)
    assert [(rx.dose_gy, rx.fractions) for rx in p.prescriptions] == [(50.0, 20)]


def test_user_alias_table(hand_case, tmp_path):
    user = tmp_path / "a.yaml"
    user.write_text("aliases:\n  Larynx total: Larynx_Glottic\n")
    table = AliasTable.default().merged(AliasTable.load(user))
    p = load_dicom(hand_case.folder, alias_table=table)
    assert p.structure("Larynx_Glottic").original_name == "Larynx total"


def test_rasterize_slice_matches_matplotlib_even_odd():
    mpath = pytest.importorskip("matplotlib.path")
    rng = np.random.default_rng(1)
    rr, cc = np.mgrid[0:30, 0:30]
    centres = np.c_[rr.ravel(), cc.ravel()]
    for _ in range(30):
        poly = rng.uniform(-4, 34, (int(rng.integers(3, 25)), 2)) + 0.137
        ours = rasterize_slice([poly], (30, 30))
        ref = mpath.Path(poly).contains_points(centres).reshape(30, 30)
        np.testing.assert_array_equal(ours, ref)


def test_rasterize_disc_area():
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    disc = np.c_[100.3 + 80 * np.sin(t), 99.8 + 80 * np.cos(t)]
    hole = np.c_[100.3 + 30 * np.sin(t), 99.8 + 30 * np.cos(t)]
    m = rasterize_slice([disc, hole], (200, 200))
    assert m.sum() == pytest.approx(np.pi * (80 ** 2 - 30 ** 2), rel=2e-3)
    assert not m[100, 100] and m[100, 160]


# --- bad input -------------------------------------------------------------------------------
def _copy(ct, tmp_path, name="case"):
    dst = tmp_path / name
    shutil.copytree(ct.folder, dst)
    return dst


def test_missing_ct_slice(tmp_path):
    ct = write_ct_series(tmp_path / "gap", shape=(10, 16, 16), drop_slices=(4,))
    write_rtstruct(tmp_path / "gap" / "RS.dcm", ct, [("PTV_70", [_rect(ct, 2, 2, 8, 2, 8)])])
    with pytest.raises(DicomError) as ei:
        load_dicom(ct.folder, fractions=35)
    assert ei.value.field == "ImagePositionPatient" and ei.value.file == str(ct.folder)
    assert "missing" in str(ei.value)


def test_rtstruct_referencing_another_series(tmp_path):
    from pydicom.uid import generate_uid

    ct = write_ct_series(tmp_path / "ref", shape=(6, 16, 16))
    rs = write_rtstruct(tmp_path / "ref" / "RS.dcm", ct, [("PTV_70", [_rect(ct, 2, 2, 8, 2, 8)])],
                        series_uid=generate_uid())
    with pytest.raises(DicomError) as ei:
        load_dicom(ct.folder, fractions=35)
    assert ei.value.field == "ReferencedSeriesInstanceUID" and ei.value.file == str(rs)
    rs.unlink()
    rs = write_rtstruct(rs, ct, [("PTV_70", [_rect(ct, 2, 2, 8, 2, 8)])],
                        frame_uid=generate_uid())
    with pytest.raises(DicomError) as ei:
        load_dicom(ct.folder, fractions=35)
    assert ei.value.field == "FrameOfReferenceUID" and ei.value.file == str(rs)


def test_corrupt_and_truncated_files(hand_case, tmp_path):
    folder = _copy(hand_case, tmp_path, "junk")
    (folder / "junk.dcm").write_bytes(b"this is not DICOM at all")
    with pytest.raises(DicomError) as ei:
        load_dicom(folder)
    assert ei.value.file == str(folder / "junk.dcm")
    (folder / "junk.dcm").unlink()
    victim = min(folder.glob("CT_*.dcm"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])   # cut into the pixel data
    with pytest.raises(DicomError) as ei:
        load_dicom(folder)
    assert ei.value.file == str(victim)
    victim.write_bytes(data[:200])                 # cut into the header
    with pytest.raises(DicomError) as ei:
        load_dicom(folder)
    assert ei.value.file == str(victim)


def test_no_prescription_available(tmp_path):
    ct = write_ct_series(tmp_path / "norx", shape=(6, 16, 16))
    write_rtstruct(tmp_path / "norx" / "RS.dcm", ct,
                   [("PTV high", [_rect(ct, 2, 2, 8, 2, 8)])])
    with pytest.raises(InputError) as ei:
        load_dicom(ct.folder, fractions=30)
    assert ei.value.field == "prescriptions" and "--rx" in str(ei.value)
    p = load_dicom(ct.folder, fractions=30, require_prescription=False)  # atp info
    assert p.prescriptions == () and "--rx" in p.metadata["prescription_missing"]
    # a dose in the name but no fractions anywhere
    p = load_dicom(ct.folder, prescriptions={"PTV_High": 60}, fractions=30)
    assert p.prescriptions[0].dose_gy == 60.0
    with pytest.raises(InputError) as ei:
        load_dicom(ct.folder, prescriptions={"PTV_High": 60})
    assert ei.value.field == "fractions"
    with pytest.raises(StructureError) as ei:
        load_dicom(ct.folder, prescriptions={"PTV_70": 70}, fractions=35)
    assert ei.value.field == "--rx PTV_70"


def test_bad_sidecar(hand_case, tmp_path):
    folder = _copy(hand_case, tmp_path, "sidecar")
    side = folder / "prescription.yaml"
    side.write_text("fractions: 25\ntargets:\n  PTV_5425: [54]\n")
    with pytest.raises(InputError) as ei:
        load_dicom(folder)
    assert ei.value.file == str(side) and ei.value.field == "targets.PTV_5425"
    assert ei.value.line == 3
    side.write_text("fractions: 25\ntargets:\n  Parotid_R: 20\n")
    with pytest.raises(StructureError) as ei:
        load_dicom(folder)
    assert ei.value.line == 3 and "not among" in str(ei.value)
    side.write_text("fractions: 2.5\n")
    with pytest.raises(InputError) as ei:
        load_prescription_file(side)
    assert ei.value.field == "fractions" and ei.value.line == 1
    side.write_text("fractions: [25\n")
    with pytest.raises(InputError) as ei:
        load_prescription_file(side)
    assert ei.value.line is not None
    with pytest.raises(InputError):
        load_dicom(folder, prescription_file=tmp_path / "missing.yaml")


def test_nan_contour_and_contour_off_the_ct(tmp_path):
    ct = write_ct_series(tmp_path / "nan", shape=(6, 16, 16))
    bad = _rect(ct, 2, 2, 8, 2, 8)
    bad[1, 0] = np.nan
    write_rtstruct(tmp_path / "nan" / "RS.dcm", ct, [("PTV_70", [bad])])
    with pytest.raises(DicomError) as ei:
        load_dicom(ct.folder, fractions=35)
    assert ei.value.field == "ContourData"
    (tmp_path / "nan" / "RS.dcm").unlink()
    write_rtstruct(tmp_path / "nan" / "RS.dcm", ct, [("PTV_70", [_rect(ct, 7, 2, 8, 2, 8)])])
    with pytest.raises(InputError) as ei:
        load_dicom(ct.folder, fractions=35)
    assert "outside" in str(ei.value) and "PTV_70" in ei.value.field


def test_rasterize_rejects_non_planar_contour(hand_case):
    from atp.grid import Grid

    ct = hand_case
    grid = Grid((8, 24, 20), (3.0, 1.0, 2.0), ct.origin_mm,
                np.column_stack([ct.normal, ct.col_dir, ct.row_dir]))
    tilted = _rect(ct, 3, 2, 8, 2, 8)
    tilted[2] += 2.0 * ct.normal * 3.0   # one corner two slices away
    with pytest.raises(InputError, match="not on a CT slice"):
        rasterize_contours([tilted], grid, field="ROI x")


def test_no_rtstruct_and_empty_folder(tmp_path):
    ct = write_ct_series(tmp_path / "nors", shape=(4, 8, 8))
    with pytest.raises(DicomError, match="RTSTRUCT"):
        load_dicom(ct.folder, fractions=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError):
        load_dicom(tmp_path / "empty")
