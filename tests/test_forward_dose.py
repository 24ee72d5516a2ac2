"""``atp dose RTPLAN``: our own exported plan's dose round trip, another program's RT Plan
(pydicom's test file, one built by hand), bad input, and the closed-MLC commissioning."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage, generate_uid

from atp.cli import main
from atp.dose.geometry import Beam, equispaced_beams
from atp.dose.pencil_beam import PencilBeamEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_plan(phantom, tmp_path_factory):
    """A 3-field sliding-window delivery on the phantom, its reported dose as the planning
    pipeline computes it, exported as DICOM."""
    from atp import sequencer
    from atp.io.dicom_export import export_plan_set
    from atp.pipeline import _field_dose

    dij = PencilBeamEngine().influence(phantom, equispaced_beams(3, 20.0), dose_grid_factor=2)
    b = dij.beamlets
    w = 300.0 * np.exp(-(b.bev_x_mm ** 2 + b.bev_y_mm ** 2) / 900.0) * (1 + 0.5 * (b.bev_x_mm > 0))
    d = sequencer.sequence(w, dij, "imrt-sliding", fractions=phantom.fractions)
    ideal = dij.to_patient_grid(dij.dose(w))
    d, dose, _ = _field_dose(phantom, dij, d, ideal, ideal, None)
    folder = tmp_path_factory.mktemp("own")
    written = export_plan_set(folder / "dicom", phantom, dose, d)
    return folder, written, dose, d


def test_own_export_round_trip(own_plan, tmp_path, capsys):
    _, written, dose, d = own_plan
    assert d.meta["mu_per_cgy"] > 0
    out = tmp_path / "fwd"
    assert main(["dose", written["RTPLAN"], "--patient", "phantom", "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    fwd = np.load(out / "dose.npy")
    assert np.abs(fwd - dose).max() <= 0.005 * dose.max()
    assert info["mu_per_fraction"] == pytest.approx(d.total_mu / d.fractions, rel=1e-4)
    assert info["mu_per_cgy"] == pytest.approx(d.meta["mu_per_cgy"], rel=1e-3)
    rd = pydicom.dcmread(out / "RD.atp.dcm")
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == \
        pydicom.dcmread(written["RTPLAN"]).SOPInstanceUID
    np.testing.assert_allclose(float(rd.DoseGridScaling) * rd.pixel_array.max(),
                               fwd.max(), rtol=1e-3)
    # the dose includes the leakage: without transmission it is lower outside the field
    assert (out / ".atp-output.json").exists()


def test_pydicom_test_plan(phantom, tmp_path, capsys):
    """pydicom's rtplan.dcm (another program's, 20x20 jaw-only static field, 30 x 116 MU):
    its isocentre lies outside our phantom (one line naming file and field, exit 2), and
    moved onto the phantom it computes."""
    path = pydicom.data.get_testdata_file("rtplan.dcm")
    out = tmp_path / "a"
    assert main(["dose", path, "--patient", "phantom", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rtplan.dcm" in err[0] and "IsocenterPosition" in err[0]
    assert not out.exists()
    ds = pydicom.dcmread(path)
    c = phantom.target_centroid_mm()
    ds.BeamSequence[0].ControlPointSequence[0].IsocenterPosition = [float(v) for v in c]
    moved = tmp_path / "rtplan_moved.dcm"
    ds.save_as(moved)
    assert main(["dose", str(moved), "--patient", "phantom", "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["beams"] == 1 and info["kinds"] == ["static"] and info["fractions"] == 30
    assert info["total_mu"] == pytest.approx(30 * 116.0036697, rel=1e-6)
    dose = np.load(out / "dose.npy")
    # 3480 MU of a 20x20 field at ~0.01 Gy/MU near d_max: tens of Gy
    assert 15.0 < dose.max() < 60.0


def _hand_plan(path, iso, *, n_pairs=20, width=10.0):
    """An RT Plan built by hand: a 2-control-point sliding-window beam on its own 20-pair
    10 mm MLC and a 5-control-point arc, cumulative meterset weights, jaws only on the
    first control point (carried over)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel = "hand"
    edges = (np.arange(n_pairs + 1) - n_pairs / 2) * width
    fg = Dataset()
    fg.NumberOfFractionsPlanned = 10
    refs = []
    beams = []
    for number, kind in ((1, "dynamic"), (2, "arc")):
        r = Dataset()
        r.ReferencedBeamNumber = number
        r.BeamMeterset = 100.0
        refs.append(r)
        b = Dataset()
        b.BeamNumber = number
        b.BeamName = kind
        b.RadiationType = "PHOTON"
        b.TreatmentDeliveryType = "TREATMENT"
        b.SourceAxisDistance = 1000.0
        devs = []
        for t, n in (("ASYMX", 1), ("ASYMY", 1), ("MLCX", n_pairs)):
            dv = Dataset()
            dv.RTBeamLimitingDeviceType = t
            dv.NumberOfLeafJawPairs = n
            if t == "MLCX":
                dv.LeafPositionBoundaries = [float(e) for e in edges]
            devs.append(dv)
        b.BeamLimitingDeviceSequence = Sequence(devs)
        n_cp = 2 if kind == "dynamic" else 5
        b.FinalCumulativeMetersetWeight = 1.0
        cps = []
        for k in range(n_cp):
            cp = Dataset()
            cp.ControlPointIndex = k
            cp.CumulativeMetersetWeight = k / (n_cp - 1)
            pos = []
            if k == 0:
                for t, v in (("ASYMX", [-30.0, 30.0]), ("ASYMY", [-30.0, 30.0])):
                    p = Dataset()
                    p.RTBeamLimitingDeviceType = t
                    p.LeafJawPositions = v
                    pos.append(p)
                cp.GantryAngle = 0.0 if kind == "dynamic" else 340.0
                cp.BeamLimitingDeviceAngle = 0.0
                cp.PatientSupportAngle = 0.0
                cp.IsocenterPosition = [float(v) for v in iso]
            elif kind == "arc":
                cp.GantryAngle = 340.0 + 10.0 * k
            x = -25.0 + 50.0 * k / (n_cp - 1) if kind == "dynamic" else 0.0
            p = Dataset()
            p.RTBeamLimitingDeviceType = "MLCX"
            a = np.full(n_pairs, x - 10.0 if kind == "dynamic" else -20.0)
            bb = np.full(n_pairs, x + 10.0 if kind == "dynamic" else 20.0)
            p.LeafJawPositions = [float(v) for v in np.concatenate([a, bb])]
            pos.append(p)
            cp.BeamLimitingDevicePositionSequence = Sequence(pos)
            cps.append(cp)
        b.ControlPointSequence = Sequence(cps)
        b.NumberOfControlPoints = n_cp
        beams.append(b)
    fg.ReferencedBeamSequence = Sequence(refs)
    ds.FractionGroupSequence = Sequence([fg])
    ds.BeamSequence = Sequence(beams)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hand_built_sliding_window_and_arc(phantom, tmp_path):
    from atp.sequencer.rtplan import read_rt_plan

    from atp.forward import rt_plan_dose

    path = _hand_plan(tmp_path / "hand.dcm", phantom.target_centroid_mm())
    d, beams, info = read_rt_plan(path)
    assert [b.kind for b in d.beams] == ["dynamic", "arc"]
    assert d.machine.n_pairs == 20 and len(beams) == 5  # gantry 0 shared by both beams
    np.testing.assert_allclose(d.beams[0].jaw_x_mm[-1], [-30.0, 30.0])  # carried over
    assert d.total_mu == pytest.approx(2 * 100.0 * 10)
    dose, _, info = rt_plan_dose(path, phantom)
    assert np.isfinite(dose).all() and dose.max() > 1.0
    assert info["kinds"] == ["arc", "dynamic"]


def test_bad_rt_plans_are_one_line_exit_2(phantom, tmp_path, capsys):
    path = _hand_plan(tmp_path / "hand.dcm", phantom.target_centroid_mm())
    ds = pydicom.dcmread(path)
    ds.BeamSequence[1].ControlPointSequence[2].CumulativeMetersetWeight = 0.1
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    assert main(["dose", str(bad), "--patient", "phantom", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.dcm" in err[0] and "BeamSequence[1]" in err[0]
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert main(["dose", str(tmp_path / "junk.dcm"), "--patient", "phantom", "--out",
                 str(tmp_path / "o")]) == 2
    assert "junk.dcm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_closed_mlc_field_transmits_about_the_leaf_transmission():
    from atp.forward import closed_field_transmission

    r = closed_field_transmission("millennium120")
    assert 1.0 <= r["transmission_percent"] <= 2.0
    assert r["transmission_percent"] > r["machine_leaf_transmission_percent"] * 0.9


def test_grouped_forward_dose_is_the_whole_field_dose(phantom, tmp_path):
    """forward_dose_grouped (a few dose beams' jaw-field dij at a time: VMAT's reported
    dose and ``atp dose`` of an arc plan) gives forward_dose's dose, for any group size."""
    from atp.sequencer.rtplan import read_rt_plan

    from atp.forward import forward_dose, forward_dose_grouped

    d, beams, _ = read_rt_plan(_hand_plan(tmp_path / "hand.dcm", phantom.target_centroid_mm()))
    whole, dij = forward_dose(phantom, d, beams)
    for group in (1, 2, 8):
        dose, n = forward_dose_grouped(phantom, d, beams, group=group)
        assert n == dij.n_beamlets
        np.testing.assert_allclose(dose, whole, rtol=1e-5, atol=1e-6 * float(whole.max()))


def test_forward_dose_uses_the_beams_given(phantom):
    """The field dij's columns equal the planning dij's where both have the beamlet."""
    from atp import sequencer
    from atp.forward import field_influence

    eng = PencilBeamEngine()
    dij = eng.influence(phantom, [Beam(90.0)], dose_grid_factor=3)
    w = np.ones(dij.n_beamlets) * 10.0
    d = sequencer.sequence(w, dij, "imrt-sns", fractions=phantom.fractions)
    iso = dij.beamlets.isocenter_mm[0]
    f = field_influence(phantom, d, [Beam(90.0, 0.0, 0.0, tuple(iso))], engine=eng,
                        dose_grid_factor=3)
    assert f.n_beamlets >= dij.n_beamlets
    key = {(round(x, 3), round(y, 3)): i for i, (x, y) in
           enumerate(zip(f.beamlets.bev_x_mm, f.beamlets.bev_y_mm))}
    cols = [key[(round(x, 3), round(y, 3))] for x, y in
            zip(dij.beamlets.bev_x_mm, dij.beamlets.bev_y_mm)]
    diff = abs(f.matrix[:, cols] - dij.matrix).max()
    assert diff <= 1e-6 * abs(dij.matrix).max()


def test_field_influence_cache_reuses_unchanged_beams_and_keeps_only_the_latest(phantom):
    """A dose beam whose jaws did not change takes the cached beamlets (the same object,
    the same dose); a changed field is computed again and the cache keeps the latest
    call's beams only."""
    from dataclasses import replace as _replace

    from atp import sequencer
    from atp.forward import field_influence

    eng = PencilBeamEngine()
    beams = [Beam(90.0), Beam(270.0)]
    dij = eng.influence(phantom, beams, dose_grid_factor=3)
    w = np.ones(dij.n_beamlets) * 10.0
    d = sequencer.sequence(w, dij, "imrt-sns", fractions=phantom.fractions)
    fb = [Beam(g, 0.0, 0.0, tuple(iso)) for g, iso in
          zip(dij.beamlets.gantry_deg, dij.beamlets.isocenter_mm)]
    cache: dict = {}
    f1 = field_influence(phantom, d, fb, engine=eng, dose_grid_factor=3, cache=cache)
    first = dict(cache)
    assert len(first) == 2
    f2 = field_influence(phantom, d, fb, engine=eng, dose_grid_factor=3, cache=cache)
    assert cache.keys() == first.keys()
    assert all(cache[k] is first[k] for k in first)
    assert (f1.matrix != f2.matrix).nnz == 0
    b0 = d.beams[0]  # narrow the first beam's jaws: that beam is computed again
    jx = np.asarray(b0.jaw_x_mm, float) * 0.5
    d2 = _replace(d, beams=[_replace(b0, jaw_x_mm=jx)] + list(d.beams[1:]))
    field_influence(phantom, d2, fb, engine=eng, dose_grid_factor=3, cache=cache)
    assert len(cache) == 2 and len(set(cache) & set(first)) == 1


def test_per_beam_weights_are_each_beam_alone_and_dose_of_one_beam_is_bitwise(phantom):
    """forward_dose's per-beam delivered weights are delivered_weights of each beam
    alone, bit for bit (the final-dose stage reuses them); DoseInfluence.dose of weights
    on one beam's columns (its column block alone) is the whole product bit for bit."""
    from dataclasses import replace as _replace

    from atp.sequencer.deliverable import delivered_weights

    from atp import sequencer
    from atp.forward import forward_dose

    eng = PencilBeamEngine()
    beams = [Beam(90.0), Beam(200.0), Beam(270.0)]
    dij = eng.influence(phantom, beams, dose_grid_factor=3)
    w = np.ones(dij.n_beamlets) * 10.0
    d = sequencer.sequence(w, dij, "imrt-sns", fractions=phantom.fractions)
    fb = [Beam(g, 0.0, 0.0, tuple(iso)) for g, iso in
          zip(dij.beamlets.gantry_deg, dij.beamlets.isocenter_mm)]
    per: list = []
    _, f = forward_dose(phantom, d, fb, engine=eng, dose_grid_factor=3, per_beam=per)
    assert len(per) == len(d.beams) == 3
    total = delivered_weights(d, f.beamlets)
    for b, wb in zip(d.beams, per):
        alone = delivered_weights(_replace(d, beams=(b,)), f.beamlets)
        assert np.array_equal(wb, alone)
    np.testing.assert_allclose(per[0] + per[1] + per[2], total, rtol=1e-12, atol=0)
    one = per[1].astype(np.float32)
    nz = np.flatnonzero(one)
    assert nz.size and 2 * (nz[-1] + 1 - nz[0]) < one.size  # the block path is taken
    whole = f.matrix @ one
    if f.far is not None:
        whole = whole + f.far.apply(one)
    assert np.array_equal(f.dose(one).reshape(-1), whole)
