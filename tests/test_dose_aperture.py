"""Aperture -> beamlet weights: exact open-area fractions."""

from __future__ import annotations

import numpy as np
import pytest

from atp.dose.aperture import Aperture, aperture_beamlet_weights, apertures_to_weights
from atp.dose.influence import BeamletInfo
from atp.errors import InputError


def _grid_beamlets():
    # beam 0: 4 x 2 beamlets of 5 mm, centres x = -7.5..7.5, y = -2.5, 2.5; beam 1: one
    xs, ys = np.meshgrid([-7.5, -2.5, 2.5, 7.5], [-2.5, 2.5])
    bx = np.append(xs.ravel(), 0.0)
    by = np.append(ys.ravel(), 0.0)
    bi = np.array([0] * 8 + [1])
    return BeamletInfo(bi, [0.0, 90.0], [0.0, 0.0], [0.0, 0.0], np.zeros((2, 3)), bx, by)


def test_full_open_and_closed():
    b = _grid_beamlets()
    edges = np.array([-5.0, 0.0, 5.0])
    w = aperture_beamlet_weights(b, 0, edges, [-10, -10], [10, 10], 3.0)
    np.testing.assert_allclose(w, [3.0] * 8 + [0.0])
    w0 = aperture_beamlet_weights(b, 0, edges, [1.0, 1.0], [1.0, 1.0], 3.0)
    assert not w0.any()


def test_partial_coverage_exact():
    b = _grid_beamlets()
    edges = np.array([-5.0, 0.0, 5.0])
    # lower pair open -6..1 ; upper pair closed
    w = aperture_beamlet_weights(b, 0, edges, [-6.0, 0.0], [1.0, 0.0], 2.0)
    # lower row (y=-2.5): beamlet x in [-10,-5]: overlap 1 mm -> 0.2; [-5,0]: full; [0,5]: 1mm
    np.testing.assert_allclose(w[:4], [2 * 0.2, 2.0, 2 * 0.2, 0.0])
    np.testing.assert_allclose(w[4:8], 0.0)


def test_leaf_pairs_not_aligned_with_beamlets():
    b = _grid_beamlets()
    # one 10 mm leaf pair covering y in [-2.5, 7.5]: half of the lower row, all upper
    w = aperture_beamlet_weights(b, 0, [-2.5, 7.5], [-10.0], [10.0], 1.0)
    np.testing.assert_allclose(w[:4], 0.5)
    np.testing.assert_allclose(w[4:8], 1.0)


def test_sum_of_apertures():
    b = _grid_beamlets()
    aps = [Aperture(0, np.array([-5.0, 0.0, 5.0]), np.array([-10.0, -10.0]),
                    np.array([0.0, 0.0]), 1.0),
           {"beam_index": 1, "leaf_edges_y_mm": [-2.5, 2.5], "left_mm": [-2.5],
            "right_mm": [0.0], "mu": 4.0}]
    w = apertures_to_weights(b, aps)
    np.testing.assert_allclose(w, [1, 1, 0, 0, 1, 1, 0, 0, 2.0])


@pytest.mark.parametrize("args", [
    ([0.0, -1.0], [0.0], [1.0], 1.0),       # edges not increasing
    ([0.0, 5.0], [2.0], [1.0], 1.0),        # left beyond right
    ([0.0, 5.0], [0.0, 0.0], [1.0], 1.0),   # wrong count
    ([0.0, 5.0], [0.0], [1.0], -1.0),       # negative MU
])
def test_bad_apertures(args):
    with pytest.raises(InputError):
        aperture_beamlet_weights(_grid_beamlets(), 0, *args)
    with pytest.raises(InputError):
        aperture_beamlet_weights(_grid_beamlets(), 5, [0.0, 5.0], [0.0], [1.0], 1.0)
