"""Plan-quality indices on hand-built volumes with known answers."""

import numpy as np
import pytest

from atp import metrics


@pytest.fixture
def box():
    """Target: a 4x4x4 cube (64 voxels) in a 20^3 grid."""
    target = np.zeros((20, 20, 20), dtype=bool)
    target[8:12, 8:12, 8:12] = True
    return target


def test_perfect_conformity(box):
    dose = np.where(box, 60.0, 10.0)
    assert metrics.rtog_ci(dose, box, 60.0) == 1.0
    assert metrics.paddick_ci(dose, box, 60.0) == 1.0


def test_spill_and_miss(box):
    # isodose: a 4x4x6 block overlapping the target in 4x4x3 = 48 voxels
    iso = np.zeros_like(box)
    iso[8:12, 8:12, 9:15] = True  # 96 voxels
    dose = np.where(iso, 70.0, 5.0)
    assert metrics.rtog_ci(dose, box, 60.0) == pytest.approx(96 / 64)
    assert metrics.paddick_ci(dose, box, 60.0) == pytest.approx(48 * 48 / (64 * 96))
    body = np.zeros_like(box)
    body[:, :, :13] = True  # isodose inside the body: 4x4x4 = 64 voxels
    assert metrics.rtog_ci(dose, box, 60.0, body_mask=body) == pytest.approx(64 / 64)
    assert metrics.paddick_ci(dose * 0, box, 60.0) == 0.0


def test_homogeneity_index(box):
    rng = np.random.default_rng(1)
    dose = np.zeros(box.shape)
    dose[box] = rng.normal(60.0, 2.0, size=box.sum())
    roi = dose[box]
    d2, d98, d50 = (np.percentile(roi, q) for q in (98, 2, 50))
    assert metrics.homogeneity_index(dose, box) == pytest.approx((d2 - d98) / d50)
    assert metrics.homogeneity_index(np.where(box, 60.0, 0.0), box) == 0.0


def test_gradient_index(box):
    dose = np.zeros(box.shape)
    half = np.zeros_like(box)
    half[6:14, 6:14, 6:14] = True  # 512 voxels get >= 50 % of Rx
    dose[half] = 35.0
    dose[box] = 70.0
    assert metrics.gradient_index(dose, 70.0) == pytest.approx(512 / 64)
    assert metrics.gradient_index(np.zeros(box.shape), 70.0) == float("inf")


def test_structure_metrics_on_phantom(phantom):
    dose = phantom.prescription_map_gy().astype(np.float64)
    table = metrics.structure_metrics(phantom, dose)
    top = phantom.prescriptions[0]
    row = table[top.target]
    assert row["D95%"] == pytest.approx(top.dose_gy)
    assert row["HI"] == pytest.approx(0.0)
    # a dose equal to the prescription map: the top isodose is exactly the top target
    assert row["CI"] == pytest.approx(1.0) and row["CIpaddick"] == pytest.approx(1.0)
    assert row["V100%Rx"] == pytest.approx(100.0)
    assert set(table) >= set(phantom.structures) - {
        n for n, s in phantom.structures.items() if s.n_voxels == 0}
