"""Distance baseline and mean-dose floor: contract, fitting, persistence, scoring."""

from __future__ import annotations

import numpy as np
import pytest
from atp.predictor.baseline import DistanceBaseline, MeanDosePredictor, signed_distance_mm
from atp.predictor.scoring import cohort_scores, dose_score_gy, dvh_points_gy, score_patient
from scipy import ndimage

from atp.errors import InputError
from atp.patient import Patient


def _with_dose(patient: Patient, dose: np.ndarray) -> Patient:
    meta = dict(patient.metadata)
    meta["reference_dose_gy"] = dose.astype(np.float32)
    return Patient(patient.ct_hu, patient.grid, patient.structures, patient.prescriptions,
                   patient.patient_id, meta, patient.source)


def _synthetic_dose(patient: Patient) -> np.ndarray:
    """A smooth plan-like dose: the prescription map blurred, zero outside the body."""
    rx = patient.prescription_map_gy()
    d = ndimage.gaussian_filter(rx, sigma=2.0)
    d = np.maximum(d, 0.95 * rx)
    return np.where(patient.body_mask, d, 0.0).astype(np.float32)


def test_signed_distance_signs_and_units():
    m = np.zeros((9, 9, 9), bool)
    m[3:6, 3:6, 3:6] = True
    d = signed_distance_mm(m, (2.0, 2.0, 2.0))
    assert d[4, 4, 4] < 0 and d[0, 4, 4] > 0
    assert d[2, 4, 4] == pytest.approx(2.0)  # one voxel outside, 2 mm spacing
    assert d[3, 4, 4] == pytest.approx(-2.0)  # inner border voxel


def test_shipped_baseline_on_phantom(phantom):
    dose = DistanceBaseline().load().predict(phantom)
    assert dose.shape == phantom.grid.shape and dose.dtype == np.float32
    assert np.all(dose[~phantom.body_mask] == 0) and np.all(dose >= 0)
    ptv70 = dose[phantom.mask("PTV_70")]
    assert 65.0 < np.median(ptv70) < 75.0
    assert np.median(dose[phantom.mask("PTV_56")]) < np.median(ptv70)
    # dose falls off away from the targets
    assert dose[phantom.mask("Brainstem")].mean() < np.median(ptv70)


def test_fit_learns_the_synthetic_falloff(phantom, tmp_path):
    train = [_with_dose(phantom, _synthetic_dose(phantom))]
    b = DistanceBaseline(samples_per_patient=20000, iterations=2).fit(train)
    pred = b.predict(phantom)
    ref = train[0].metadata["reference_dose_gy"]
    mean_floor = MeanDosePredictor().fit(train).predict(phantom)
    body = phantom.body_mask
    assert dose_score_gy(pred, ref, body) < 0.5 * dose_score_gy(mean_floor, ref, body)
    path = b.save(tmp_path / "b.json")
    again = DistanceBaseline().load(path).predict(phantom)
    assert np.allclose(again, pred, atol=1e-3)


def test_errors(phantom, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"knots_mm": [0, 1], "curves_fraction_of_rx": {"primary": [1]}}')
    with pytest.raises(InputError, match="bad.json"):
        DistanceBaseline().load(bad)
    with pytest.raises(InputError):
        DistanceBaseline().load(tmp_path / "missing.json")
    no_rx = Patient(phantom.ct_hu, phantom.grid, phantom.structures, (), "x")
    with pytest.raises(InputError, match="prescri"):
        DistanceBaseline().load().predict(no_rx)
    with pytest.raises(InputError, match="reference"):
        DistanceBaseline().fit([phantom])


def test_mean_dose_floor(phantom, tmp_path):
    train = [_with_dose(phantom, _synthetic_dose(phantom))]
    m = MeanDosePredictor().fit(train)
    ref = train[0].metadata["reference_dose_gy"]
    assert m.mean_dose_gy_ == pytest.approx(ref[phantom.body_mask].mean(), rel=1e-5)
    m.save(tmp_path / "m.json")
    d = MeanDosePredictor().load(tmp_path / "m.json").predict(phantom)
    assert np.all(d[~phantom.body_mask] == 0)
    assert np.allclose(d[phantom.body_mask], m.mean_dose_gy_)


def test_scores_zero_for_perfect_prediction(phantom):
    ref = _synthetic_dose(phantom)
    s = score_patient(ref, ref, phantom)
    assert s["dose_score_gy"] == 0 and s["dvh_score_gy"] == 0
    pts = dvh_points_gy(ref, phantom)
    assert ("PTV_70", "D95") in pts and ("SpinalCord", "D0.1cc") in pts
    shifted = score_patient(ref + np.float32(1.0) * phantom.body_mask, ref, phantom)
    assert shifted["dose_score_gy"] == pytest.approx(1.0, abs=1e-4)
    assert cohort_scores([s, shifted])["dose_score_gy"] == pytest.approx(0.5, abs=1e-4)


def test_organ_factor_learns_sparing(phantom):
    ref = _synthetic_dose(phantom)
    spared = phantom.mask("Parotid_L") & (phantom.prescription_map_gy() == 0)
    ref = np.where(spared, 0.5 * ref, ref).astype(np.float32)
    b = DistanceBaseline(samples_per_patient=60000, iterations=2, min_organ_samples=50).fit(
        [_with_dose(phantom, ref)])
    assert b.organ_factors_["Parotid_L"] == pytest.approx(0.5, abs=0.15)
    plain = DistanceBaseline(samples_per_patient=60000, iterations=2,
                             organ_factors=False).fit([_with_dose(phantom, ref)])
    assert plain.organ_factors_ == {}
    err = np.abs(b.predict(phantom) - ref)[spared].mean()
    err_plain = np.abs(plain.predict(phantom) - ref)[spared].mean()
    assert err < err_plain
