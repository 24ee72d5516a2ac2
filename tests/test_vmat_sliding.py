"""Sliding-window VMAT (sequencer.vmat_sliding) and the arc leaf-travel limit of a gantry
that may slow down (sequencer.machine)."""

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
from atp.sequencer.imrt import sweep_row
from atp.sequencer.machine import load_machine_file
from atp.sequencer.reweight import _mu_map, with_mu
from atp.sequencer.vmat_sliding import (
    _sector_mu,
    _sweep_positions_rows,
    sector_bounds,
    sequence_vmat_sliding,
)
from bev_lattice import beamlets_for, lattice

from atp.errors import InputError

NX, NY = 24, 14


@pytest.fixture(scope="module")
def m120():
    return load_machine("millennium120")


def _modulated_arc(n, peak=60.0):
    """Peaked (not aperture-like) maps drifting along the arc: what one aperture per
    control point cannot deliver, a sweep can."""
    X, Y = lattice(NX, NY)
    out = []
    for k in range(n):
        cx = 12.0 * np.sin(np.deg2rad(3 * k))
        f = peak * (0.4 + 0.6 * np.exp(-((X - cx) ** 2) / (2 * 12.0 ** 2)))
        out.append(f * ((np.abs(X - cx) < 40) & (np.abs(Y) < 25)))
    return out


def test_sweep_positions_deliver_the_profile_both_ways():
    rng = np.random.default_rng(3)
    prof = rng.uniform(2.0, 10.0, 9)
    edges = -20.0 + 5.0 * np.arange(10)
    speed = 1.5  # mm per MU
    total = prof.sum() + 45.0 / speed + 1.0
    t = np.linspace(0.0, total, 200001)
    dt = t[1] - t[0]
    centres = 0.5 * (edges[1:] + edges[:-1])
    for direction in (1, -1):
        left, right = _sweep_positions_rows(prof[None], [0], [prof.size], edges, [speed],
                                            direction, t)
        left, right = left[:, 0], right[:, 0]
        assert np.all(right >= left - 1e-9)
        exposure = [((left < c) & (c < right)).sum() * dt for c in centres]
        np.testing.assert_allclose(exposure, prof, rtol=0, atol=5e-3)
        # left to right starts at the left edge, right to left at the right edge
        start = edges[0] if direction > 0 else edges[-1]
        assert left[0] == pytest.approx(start) and right[0] == pytest.approx(start)


def test_sweeps_of_many_pairs_at_once_are_each_pairs_own_sweep():
    rng = np.random.default_rng(11)
    n_rows, n_x = 7, 12
    edges = -30.0 + np.cumsum(np.r_[0.0, rng.uniform(4.0, 6.0, n_x)])
    prof = rng.uniform(0.0, 8.0, (n_rows, n_x))
    prof[rng.random((n_rows, n_x)) < 0.3] = 0.0  # flat stretches and zero dips
    lo = rng.integers(0, 5, n_rows)
    hi = lo + rng.integers(1, n_x - 4, n_rows)
    speed = rng.uniform(0.5, 3.0, n_rows)
    times = np.linspace(0.0, 60.0, 301)  # past every sweep's end
    for direction in (1, -1):
        left, right = _sweep_positions_rows(prof, lo, hi, edges, speed, direction, times)
        for r in range(n_rows):  # the reference: sweep_row on the span alone
            seg, xs = prof[r, lo[r]:hi[r]], edges[lo[r]:hi[r] + 1]
            if direction < 0:
                seg, xs = seg[::-1], -xs[::-1]
            ta, tb = sweep_row(seg, np.diff(xs), speed[r])
            pos = np.repeat(xs, 2)
            a, b = np.interp(times, ta, pos), np.interp(times, tb, pos)
            ref_l, ref_r = (a, b) if direction > 0 else (-b, -a)
            np.testing.assert_allclose(left[:, r], ref_l, rtol=0, atol=1e-9)
            np.testing.assert_allclose(right[:, r], ref_r, rtol=0, atol=1e-9)


def test_sector_mu_of_all_sectors_at_once_is_each_sectors_own(m120):
    rng = np.random.default_rng(5)
    n_s, n_x = 4, 16
    sector = np.repeat(np.arange(n_s), [3, 5, 2, 4])
    prof = rng.uniform(0.0, 30.0, (sector.size, n_x))
    cols = np.arange(n_x)
    lo = rng.integers(0, 4, sector.size)
    hi = lo + rng.integers(4, 12, sector.size)
    inspan = (cols >= lo[:, None]) & (cols < hi[:, None])
    prof = np.where(inspan, prof, 0.0)
    width = 5.0 * (hi - lo)
    theta = np.array([20.0, 24.0, 16.0, 20.0])
    lim = m120.leaf_travel_limit_per_deg_mm
    min_mu, max_mu = 0.5 * theta, 1e4 * theta
    t, floors = _sector_mu(prof, inspan, width, sector, theta, m120, 0.6, min_mu, max_mu,
                           lim)
    for j in range(n_s):
        mine = sector == j
        tj, fj = _sector_mu(prof[mine], inspan[mine], width[mine], np.zeros(mine.sum(), int),
                            theta[j:j + 1], m120, 0.6, min_mu[j:j + 1], max_mu[j:j + 1], lim)
        assert t[j] == tj[0]
        np.testing.assert_array_equal(floors[mine], fj)
        assert t[j] >= min_mu[j] and np.all(floors[mine] > 0)
    # a sector MU over the limit, or a span too long for its sector: no layout
    assert _sector_mu(prof, inspan, width, sector, theta, m120, 0.6, min_mu, 0.0 * theta,
                      lim) is None
    assert _sector_mu(prof, inspan, width, sector, theta / 50.0, m120, 0.6, min_mu,
                      max_mu, lim) is None


def test_sector_bounds_tile_the_arc_and_merge_short_ends():
    assert sector_bounds(20, 5).tolist() == [0, 5, 10, 15, 20]
    assert sector_bounds(22, 5).tolist() == [0, 5, 10, 15, 22]  # a 2-point tail merges
    assert sector_bounds(20, 5, offset=2).tolist() == [0, 7, 12, 17, 20]
    assert sector_bounds(3, 5).tolist() == [0, 3]


def test_sliding_vmat_delivers_modulated_fluence_better_than_one_aperture(m120):
    n = 40
    maps = _modulated_arc(n)
    info, w = beamlets_for(maps, 181 + 2 * np.arange(n))
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    # leaves as fast as the slowest gantry allows: the least closed-leaf floor (MU)
    sliding = sequence_vmat_sliding(fs, m120, sector_deg=10.0, passes=2,
                                    sweep_speed_factor=np.inf)
    rule = get_sequencer("vmat").sequence(fs, m120)
    assert check_delivery(sliding) == [] and check_delivery(rule) == []
    assert sliding.technique == "vmat-sliding" and len(sliding.beams) == 2
    assert [b.rotation_direction for b in sliding.beams] == ["CW", "CC"]
    for b in sliding.beams:
        assert b.kind == "arc" and b.mu_group.shape == (b.n_control_points - 1,)
        assert np.all(np.diff(b.cumulative_mu) >= 0)
        # every control point uses the dij columns of an arc control point near it
        assert set(np.unique(b.dij_beam)) <= set(range(n))
    shape = (n, NY, NX)
    ideal = w.reshape(shape).sum(axis=0)  # the arc's summed fluence

    def error(delivery):
        got = delivered_weights(delivery, info).reshape(shape).sum(axis=0)
        return np.abs(got - ideal)[ideal > 0].mean() / ideal[ideal > 0].mean()

    assert error(sliding) < 0.06
    assert error(sliding) < 0.5 * error(rule)


def test_sweeps_paced_by_the_dose_rate_trade_mu_for_beam_on_time(m120):
    """Leaves no faster than the leaf speed at the full dose rate (factor 1) move while
    the MU are delivered: more MU, no longer a beam-on time than leaves that cross in
    spurts (no limit; on patient arcs, where pairs spurt one after another, half the
    time: BENCHMARKS), and the same fluence delivered."""
    n = 24
    info, w = beamlets_for(_modulated_arc(n), 181 + 2 * np.arange(n))
    # few fractions: the closed-leaf floor (slit / leaf speed, MU) small beside the maps
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=5)
    paced = sequence_vmat_sliding(fs, m120, sector_deg=8.0, passes=1, sweep_speed_factor=1.0)
    free = sequence_vmat_sliding(fs, m120, sector_deg=8.0, passes=1,
                                 sweep_speed_factor=np.inf)
    assert check_delivery(paced) == [] and check_delivery(free) == []
    assert paced.total_mu > free.total_mu
    assert paced.delivery_time_s() < 1.02 * free.delivery_time_s()
    assert paced.meta["sweep_speed_factor"] == 1.0
    ideal = w.reshape(n, NY, NX).sum(axis=0)
    for d in (paced, free):
        got = delivered_weights(d, info).reshape(n, NY, NX).sum(axis=0)
        assert np.abs(got - ideal)[ideal > 0].mean() / ideal[ideal > 0].mean() < 0.06


def test_sector_mu_is_one_free_mu_per_sector(m120):
    n = 24
    info, w = beamlets_for(_modulated_arc(n), 181 + 2 * np.arange(n))
    d = sequence_vmat_sliding(fluence_set(w, info, m120.leaf_edges_mm, fractions=30), m120,
                              sector_deg=8.0, passes=1)
    (beam,) = d.beams
    M, v0 = _mu_map(beam)
    assert M.shape == (beam.n_control_points - 1, beam.mu_group.max() + 1)
    np.testing.assert_allclose(M @ v0, np.diff(beam.cumulative_mu), rtol=1e-9, atol=1e-9)
    doubled = with_mu(d, 2.0 * v0)
    np.testing.assert_allclose(delivered_weights(doubled, info),
                               2.0 * delivered_weights(d, info), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(doubled.beams[0].leaf_a_mm, beam.leaf_a_mm)


def test_sliding_vmat_options_are_checked(m120):
    info, w = beamlets_for(_modulated_arc(6), 181 + 2 * np.arange(6))
    fs = fluence_set(w, info, m120.leaf_edges_mm)
    for bad in ({"sector_deg": 0.0}, {"passes": 0}, {"samples_per_cp": 0},
                {"max_sweep_fraction": 1.0}, {"threshold": 1.0},
                {"travel_per_deg_mm": 10 * m120.leaf_travel_limit_per_deg_mm},
                {"sweep_speed_factor": 0.0}):
        with pytest.raises(InputError):
            sequence_vmat_sliding(fs, m120, **bad)
    assert "vmat-sliding" in __import__("sequencer").sequencer_names()


def test_arc_travel_limit_follows_the_slowest_gantry(m120, tmp_path):
    assert m120.min_gantry_speed_deg_s == 0.5
    assert m120.leaf_travel_limit_per_deg_mm == pytest.approx(
        m120.max_leaf_speed_mm_s / 0.5)
    assert m120.max_leaf_travel_per_deg_mm == pytest.approx(
        m120.max_leaf_speed_mm_s / m120.max_gantry_speed_deg_s)
    text = Path(m120.source).read_text()
    no_min = tmp_path / "constant_speed.yaml"
    no_min.write_text(text.replace("  min_gantry_speed_deg_s: 0.5\n", ""))
    constant = load_machine_file(no_min)
    assert constant.min_gantry_speed_deg_s is None
    assert constant.leaf_travel_limit_per_deg_mm == constant.max_leaf_travel_per_deg_mm
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("min_gantry_speed_deg_s: 0.5", "min_gantry_speed_deg_s: 9"))
    with pytest.raises(InputError, match="min_gantry_speed_deg_s"):
        load_machine_file(bad)
    # an arc whose leaves outrun even the slowest gantry is reported
    info, w = beamlets_for(_modulated_arc(8), 181 + 2 * np.arange(8))
    d = sequence_vmat_sliding(fluence_set(w, info, m120.leaf_edges_mm), m120, sector_deg=8)
    b = d.beams[0]
    a = np.array(b.leaf_a_mm)
    a[1:] = a[1:] - 10 * m120.leaf_travel_limit_per_deg_mm  # 10 x the allowed travel
    broken = replace(d, beams=(replace(b, leaf_a_mm=a, leaf_b_mm=a + 5.0),))
    assert any("slowest" in s for s in check_delivery(broken))


def test_sector_slices_add_up_to_each_sectors_fluence():
    from atp.sequencer.vmat import sector_slices

    rng = np.random.default_rng(3)
    maps = rng.uniform(0.0, 5.0, size=(10, 4, 7))
    out = sector_slices(maps, 4)  # sectors of 4, 4 and 2 control points
    for s, (i0, i1) in enumerate([(0, 4), (4, 8), (8, 10)]):
        total = maps[i0:i1].sum(axis=0)
        h = total.max() / (i1 - i0)
        sl = out[i0:i1]
        assert np.allclose(sl.sum(axis=0), total)
        assert sl.min() >= 0.0 and sl.max() <= h + 1e-12
        # nested: in delivery order the slices shrink (even sector) or grow (odd sector)
        seq = sl if s % 2 == 0 else sl[::-1]
        assert np.all(np.diff(seq, axis=0) <= 1e-12)
    assert np.array_equal(sector_slices(maps, 1), maps)


def test_sector_spread_delivers_modulated_fluence_better_than_one_aperture(m120):
    n = 40
    maps = _modulated_arc(n)
    info, w = beamlets_for(maps, 181 + 2 * np.arange(n))
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    shape = (n, NY, NX)
    ideal = w.reshape(shape).sum(axis=0)

    def error(delivery):
        assert check_delivery(delivery) == []
        got = delivered_weights(delivery, info).reshape(shape).sum(axis=0)
        return np.abs(got - ideal)[ideal > 0].mean() / ideal[ideal > 0].mean()

    one = get_sequencer("vmat", passes=1).sequence(fs, m120)
    spread = get_sequencer("vmat", passes=1, sector_cps=4).sequence(fs, m120)
    assert spread.meta["sector_cps"] == 4
    assert error(spread) < 0.7 * error(one)  # 0.16 vs 0.25 here
    with pytest.raises(InputError, match="sector_cps"):
        get_sequencer("vmat", sector_cps=0).sequence(fs, m120)
