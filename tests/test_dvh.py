"""DVH metrics against independent computations (numpy percentile, hand counts)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atp import dvh
from atp.errors import GridMismatchError, StructureError


@pytest.fixture
def ramp():
    """A 10x10x10 dose that increases by 0.1 Gy per voxel (0 .. 99.9 Gy), full mask."""
    dose = (np.arange(1000, dtype=np.float64) * 0.1).reshape(10, 10, 10)
    return dose, np.ones_like(dose, dtype=bool)


def test_dose_at_volume_pct_is_openkbp_percentile():
    rng = np.random.default_rng(0)
    dose = rng.gamma(4.0, 10.0, size=(12, 13, 14))
    mask = rng.random(dose.shape) < 0.3
    roi = dose[mask]
    for x in (99, 95, 50, 2, 1, 0, 100):
        assert dvh.dose_at_volume_pct(dose, mask, x) == pytest.approx(
            np.percentile(roi, 100 - x), abs=1e-12)


def test_dose_at_volume_hand_values(ramp):
    dose, mask = ramp
    assert dvh.dose_at_volume_pct(dose, mask, 100) == 0.0  # minimum
    assert dvh.dose_at_volume_pct(dose, mask, 0) == pytest.approx(99.9)  # maximum
    # 1000 samples 0..99.9: the 50th percentile interpolates samples 499/500
    assert dvh.dose_at_volume_pct(dose, mask, 50) == pytest.approx(49.95)


def test_dose_at_volume_cc_rounds_to_whole_voxels(ramp):
    dose, mask = ramp
    # voxel 0.05 cc: 0.1 cc = 2 voxels of 1000 -> percentile 99.8
    assert dvh.dose_at_volume_cc(dose, mask, 0.1, 0.05) == pytest.approx(
        np.percentile(dose.ravel(), 100 - 100 * 2 / 1000))
    # 0.03 cc with 0.05 cc voxels rounds to 1 voxel (at least one voxel always)
    assert dvh.voxels_for_volume(0.03, 0.05) == 1
    assert dvh.voxels_for_volume(0.001, 0.05) == 1
    # more volume than the structure: the minimum
    assert dvh.dose_at_volume_cc(dose, mask, 1000.0, 0.05) == 0.0


def test_volume_at_dose(ramp):
    dose, mask = ramp
    # voxels with dose >= 90 Gy: 900..999 -> 100 voxels (dose exactly 90 counts)
    assert dvh.volume_at_dose_pct(dose, mask, 90.0) == pytest.approx(10.0)
    assert dvh.volume_at_dose_cc(dose, mask, 90.0, 0.027) == pytest.approx(100 * 0.027)
    assert dvh.volume_at_dose_pct(dose, mask, 200.0) == 0.0


def test_mean_max_min(ramp):
    dose, mask = ramp
    sub = mask.copy()
    sub[5:] = False  # doses 0 .. 49.9
    assert dvh.mean_dose(dose, sub) == pytest.approx(24.95)
    assert dvh.max_dose(dose, sub) == pytest.approx(49.9)
    assert dvh.min_dose(dose, sub) == 0.0


def test_cumulative_dvh(ramp):
    dose, mask = ramp
    h = dvh.cumulative_dvh(dose, mask, voxel_volume_cc=0.001, bin_width_gy=10.0)
    assert h.dose_gy[0] == 0.0 and h.volume_fraction[0] == 1.0
    assert np.all(np.diff(h.volume_fraction) <= 0)
    # level 50 Gy: voxels 500..999
    k = int(np.flatnonzero(h.dose_gy == 50.0)[0])
    assert h.volume_fraction[k] == pytest.approx(0.5)
    assert h.volume_cc[k] == pytest.approx(0.5)
    assert h.structure_volume_cc == pytest.approx(1.0)


def test_empty_mask_names_structure():
    dose = np.ones((4, 4, 4))
    with pytest.raises(StructureError, match="Parotid_L"):
        dvh.mean_dose(dose, np.zeros_like(dose, dtype=bool), "Parotid_L")
    with pytest.raises(StructureError, match="Cord"):
        dvh.dose_at_volume_cc(dose, np.zeros_like(dose, dtype=bool), 0.1, 0.01, "Cord")


def test_shape_mismatch():
    with pytest.raises(GridMismatchError):
        dvh.mean_dose(np.ones((4, 4, 4)), np.ones((4, 4, 5), dtype=bool), "x")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 80, allow_nan=False), min_size=1, max_size=60),
       st.floats(0, 100), st.floats(0, 100))
def test_dvh_monotone_and_consistent(values, x1, x2):
    dose = np.array(values, dtype=np.float64).reshape(-1, 1, 1)
    mask = np.ones_like(dose, dtype=bool)
    lo, hi = sorted((x1, x2))
    # more volume -> less dose; more dose -> less volume
    assert dvh.dose_at_volume_pct(dose, mask, hi) <= dvh.dose_at_volume_pct(dose, mask, lo)
    assert dvh.volume_at_dose_pct(dose, mask, hi * 0.8) <= \
        dvh.volume_at_dose_pct(dose, mask, lo * 0.8)
    assert dvh.min_dose(dose, mask) <= dvh.mean_dose(dose, mask) + 1e-9
    assert dvh.mean_dose(dose, mask) <= dvh.max_dose(dose, mask) + 1e-9
    # the cumulative DVH agrees with V x Gy at its dose levels
    h = dvh.cumulative_dvh(dose, mask, 0.001, bin_width_gy=5.0)
    for d, f in zip(h.dose_gy, h.volume_fraction):
        assert 100 * f == pytest.approx(dvh.volume_at_dose_pct(dose, mask, d))
