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


@pytest.mark.parametrize("tg", [0.0, 1.0])
def test_exposure_sum_is_the_mu_weighted_per_aperture_sum(tg):
    """delivered_weight_sum (exposure integrals per leaf pair) is mu @ delivered_fraction
    to float64 rounding: random openings (closed pairs, openings outside the X jaws,
    beamlets across two pairs and past the bank, Y jaws cutting a pair), with leaf and
    jaw transmission and tongue and groove."""
    from atp.dose.aperture import Transmission, delivered_fraction, delivered_weight_sum

    rng = np.random.default_rng(3)
    edges = np.concatenate([np.arange(-40.0, -10.0, 10.0), np.arange(-10.0, 10.0, 5.0),
                            np.arange(10.0, 41.0, 10.0)])
    n_pairs, n_ap = edges.size - 1, 300
    a = rng.uniform(-60, 40, (n_ap, n_pairs))
    b = a + rng.uniform(0, 50, (n_ap, n_pairs)) * (rng.random((n_ap, n_pairs)) > 0.2)
    mu = rng.uniform(0.0, 3.0, n_ap)
    bx, by = (v.ravel() for v in np.meshgrid(np.arange(-47.5, 50, 5.0),
                                               np.arange(-47.5, 50, 5.0) + 1.3))
    t = Transmission(leaf=0.015, jaw=0.002, tongue_groove_mm=tg)
    jx, jy = np.array([-35.0, 22.0]), np.array([-18.3, 27.0])
    want = mu @ delivered_fraction(bx, by, (5.0, 5.0), edges, a, b,
                                   np.tile(jx, (n_ap, 1)), np.tile(jy, (n_ap, 1)), t)
    got = delivered_weight_sum(bx, by, (5.0, 5.0), edges, a, b, mu, jx, jy, t)
    assert want.max() > 1.0 and np.count_nonzero(want < 0.1 * want.max())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * want.max())


def test_delivered_weights_by_exposure_is_the_per_aperture_sum(phantom, monkeypatch):
    """The deliverable dose's weights summed by exposure integrals (a sliding-window
    beam's apertures share one jaw setting) equal the per-aperture sum."""
    from atp.sequencer import deliverable

    from atp import sequencer
    from atp.dose.aperture import Transmission
    from atp.dose.geometry import Beam
    from atp.dose.pencil_beam import PencilBeamEngine

    dij = PencilBeamEngine().influence(phantom, [Beam(90.0), Beam(200.0)],
                                       dose_grid_factor=3)
    w = np.random.default_rng(0).uniform(0.0, 20.0, dij.n_beamlets)
    d = sequencer.sequence(w, dij, "imrt-sliding", fractions=phantom.fractions)
    fast = deliverable.delivered_weights(d, dij.beamlets)
    bare = deliverable.delivered_weights(d, dij.beamlets, transmission=Transmission())
    monkeypatch.setattr(deliverable, "EXPOSURE_MIN_APERTURES", 10 ** 9)
    slow = deliverable.delivered_weights(d, dij.beamlets)
    assert slow.max() > 0
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-10 * slow.max())
    # no transmission: the beamlets past every opening get exactly 0, never < 0
    want = deliverable.delivered_weights(d, dij.beamlets, transmission=Transmission())
    assert bare.min() >= 0.0 and np.count_nonzero(want == 0.0)
    np.testing.assert_allclose(bare, want, rtol=1e-10, atol=1e-10 * want.max())
