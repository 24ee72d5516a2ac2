"""Delivery physics in the deliverable dose: leaf and jaw transmission, tongue and groove,
jaw tracking, the machine YAML fields that hold them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from atp.sequencer import (
    check_delivery,
    delivered_weights,
    fluence_set,
    get_sequencer,
    load_machine,
)
from atp.sequencer.apertures import track_jaws
from atp.sequencer.machine import load_machine_file

from atp.dose.aperture import Transmission, delivered_fraction
from atp.dose.influence import BeamletInfo
from atp.errors import InputError

T = Transmission(leaf=0.015, jaw=0.005, tongue_groove_mm=1.0)
EDGES = np.array([-10.0, -5.0, 0.0, 5.0, 10.0])  # 4 pairs of 5 mm


def _grid(xs, ys):
    X, Y = np.meshgrid(xs, ys)
    return X.ravel(), Y.ravel()


def test_closed_leaves_under_the_jaws_give_the_leaf_transmission():
    bx, by = _grid([-7.5, -2.5, 2.5, 7.5], [-7.5, -2.5, 2.5, 7.5])
    jaws = np.array([[-10.0, 10.0]])
    closed = delivered_fraction(bx, by, (5, 5), EDGES, np.zeros((1, 4)), np.zeros((1, 4)),
                                jaws, jaws, T)
    np.testing.assert_allclose(closed, 0.015)
    opened = delivered_fraction(bx, by, (5, 5), EDGES, np.full((1, 4), -30.0),
                                np.full((1, 4), 30.0), jaws, jaws, T)
    np.testing.assert_allclose(opened, 1.0)
    # no transmission: the exact open-area fraction of before
    assert not delivered_fraction(bx, by, (5, 5), EDGES, np.zeros((1, 4)),
                                  np.zeros((1, 4)), jaws, jaws, None).any()


def test_outside_the_jaws_the_jaw_transmission():
    bx, by = _grid([-7.5, -2.5, 2.5, 7.5], [-7.5, -2.5, 2.5, 7.5])
    jx, jy = np.array([[-5.0, 5.0]]), np.array([[-10.0, 10.0]])
    f = delivered_fraction(bx, by, (5, 5), EDGES, np.full((1, 4), -30.0),
                           np.full((1, 4), 30.0), jx, jy, T).reshape(4, 4)
    np.testing.assert_allclose(f[:, 1:3], 1.0)
    np.testing.assert_allclose(f[:, [0, 3]], 0.005)  # leaves open there: jaw alone
    g = delivered_fraction(bx, by, (5, 5), EDGES, np.full((1, 4), -5.0),
                           np.full((1, 4), 5.0), jx, jy, T).reshape(4, 4)
    np.testing.assert_allclose(g[:, [0, 3]], 0.005 * 0.015)  # jaw and leaf
    np.testing.assert_allclose(g[:, 1:3], 1.0)


def test_tongue_and_groove_narrows_where_neighbours_differ():
    # pair 1 (y -5..0) open -10..10, pair 2 (y 0..5) open 0..10: left half of pair 1
    # loses the 0.5 mm strip at y = 0 (half of the 1 mm tongue-and-groove width)
    bx, by = _grid([-7.5, -2.5, 2.5, 7.5], [-2.5, 2.5])
    left = np.array([[0.0, -10.0, 0.0, 0.0]])
    right = np.array([[0.0, 10.0, 10.0, 0.0]])
    jaws = np.array([[-10.0, 10.0]])
    f = delivered_fraction(bx, by, (5, 5), EDGES, left, right, jaws, jaws, T).reshape(2, 4)
    strip = 0.5 * 5.0 / 25.0  # area fraction of a 0.5 x 5 mm strip in a 5 x 5 beamlet
    blocked = 0.5 * 5.0 / 25.0  # pair 1's other boundary (y = -5) borders a closed pair
    # pair 1 (row y = -2.5): x < 0 loses both strips, x > 0 only the one at y = -5
    np.testing.assert_allclose(f[0, :2], 1.0 - (strip + blocked) * (1 - 0.015))
    np.testing.assert_allclose(f[0, 2:], 1.0 - blocked * (1 - 0.015))
    # pair 2 (row y = 2.5): x < 0 is leaf-covered; x > 0 loses the strip at y = 5
    np.testing.assert_allclose(f[1, :2], 0.015)
    np.testing.assert_allclose(f[1, 2:], 1.0 - blocked * (1 - 0.015))
    # without tongue and groove the openings are exact
    g = delivered_fraction(bx, by, (5, 5), EDGES, left, right, jaws, jaws,
                           replace(T, tongue_groove_mm=0.0)).reshape(2, 4)
    np.testing.assert_allclose(g, [[1, 1, 1, 1], [0.015, 0.015, 1, 1]])


def test_machine_yaml_holds_and_checks_the_transmission(tmp_path):
    m = load_machine("millennium120")
    assert m.transmission == Transmission(0.015, 0.005, 0.5)
    assert load_machine("hd120").leaf_transmission == pytest.approx(0.013)
    text = Path(m.source).read_text()
    p = tmp_path / "m.yaml"
    p.write_text(text.replace("leaf_transmission: 0.015", "leaf_transmission: 1.5"))
    with pytest.raises(InputError) as e:
        load_machine_file(p)
    assert e.value.field == "mlc.leaf_transmission" and "m.yaml" in str(e.value.file)
    p.write_text(text.replace("tongue_groove_mm: 0.5", "tongue_groove_mm: 6"))
    with pytest.raises(InputError, match="narrowest leaf"):
        load_machine_file(p)
    p.write_text(text.replace("  transmission: 0.005", "  transmission: -0.1"))
    with pytest.raises(InputError) as e:
        load_machine_file(p)
    assert e.value.field == "jaws.transmission"
    p.write_text(text.replace("tracking: false", "tracking: yes please"))
    with pytest.raises(InputError, match="true or false"):
        load_machine_file(p)
    p.write_text(text.replace("tracking: false", "tracking: true"))
    assert load_machine_file(p).jaw_tracking


def _sliding(technique="imrt-sliding"):
    m = load_machine("millennium120")
    X, Y = np.meshgrid((np.arange(16) - 7.5) * 5.0, (np.arange(12) - 5.5) * 5.0)
    f = 400.0 * np.exp(-((X - 10) ** 2 + Y ** 2) / 300.0) * ((np.abs(X) < 30) | (Y > 0))
    info = BeamletInfo(np.zeros(X.size, int), [0.0], [0.0], [0.0], np.zeros((1, 3)),
                       X.ravel(), Y.ravel())
    fs = fluence_set(f.ravel(), info, m.leaf_edges_mm, fractions=30)
    return get_sequencer(technique).sequence(fs, m), info


def test_deliverable_weights_carry_the_leakage():
    d, info = _sliding()
    w = delivered_weights(d, info)
    w0 = delivered_weights(d, info, transmission=Transmission())
    mu = d.total_mu
    no_tg = delivered_weights(d, info, transmission=Transmission(0.015, 0.005, 0.0))
    assert np.all(no_tg >= w0 - 1e-9)  # leakage only adds
    assert np.all(w <= no_tg + 1e-9) and w.sum() < no_tg.sum()  # T&G only removes
    # a leaf-covered beamlet under the jaws gets about the leaf transmission x beam MU
    jx, jy = d.beams[0].jaw_x_mm[0], d.beams[0].jaw_y_mm[0]
    # (whole beamlets inside the jaws; pairs done early cross the rest closed, leaving
    # the floor fluence there: the dark ones are at the field's edge rows)
    inside = ((info.bev_x_mm >= jx[0] + 2.5) & (info.bev_x_mm <= jx[1] - 2.5)
              & (info.bev_y_mm >= jy[0] + 2.5) & (info.bev_y_mm <= jy[1] - 2.5))
    dark = inside & (w0 < 1e-6 * mu)
    assert dark.any()
    np.testing.assert_allclose(w[dark], 0.015 * mu, rtol=0.05)


def test_jaw_tracking_off_and_on():
    d, info = _sliding()
    tracked = track_jaws(d)
    assert tracked.meta["jaw_tracking"] and check_delivery(tracked) == []
    b0, b1 = d.beams[0], tracked.beams[0]
    # inside the static jaws, and moving with the leaves
    assert np.all(b1.jaw_x_mm[:, 0] >= b0.jaw_x_mm[:, 0] - 1e-9)
    assert np.all(b1.jaw_x_mm[:, 1] <= b0.jaw_x_mm[:, 1] + 1e-9)
    assert np.ptp(b1.jaw_x_mm[:, 0]) > 10.0
    # the open field is untouched, the leakage falls
    none = Transmission()
    np.testing.assert_allclose(delivered_weights(tracked, info, transmission=none),
                               delivered_weights(d, info, transmission=none), atol=1e-9)
    w_off, w_on = delivered_weights(d, info), delivered_weights(tracked, info)
    assert np.all(w_on <= w_off + 1e-9) and w_on.sum() < w_off.sum() - 1.0
    # as a sequencer / machine option
    from atp import sequencer
    from atp.dose.influence import DoseInfluence
    from atp.grid import Grid

    g = Grid((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    import scipy.sparse as sp

    dij = DoseInfluence(sp.csc_matrix((1, info.n_beamlets), dtype=np.float32), info, g, g,
                        {})
    fl = np.asarray(delivered_weights(d, info, transmission=none))
    on = sequencer.sequence(fl, dij, "imrt-sliding", fractions=30, jaw_tracking=True)
    off = sequencer.sequence(fl, dij, "imrt-sliding", fractions=30)
    assert on.meta.get("jaw_tracking") and not off.meta.get("jaw_tracking")
    m_on = replace(load_machine("millennium120"), jaw_tracking=True)
    assert sequencer.sequence(fl, dij, "imrt-sliding", machine=m_on,
                              fractions=30).meta.get("jaw_tracking")
