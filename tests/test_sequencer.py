"""Sequencer: machine models, fluence maps, IMRT/VMAT sequencing, deliverable dose.

Synthetic beamlet lattices built in code; the "dij" is the identity (one voxel per
beamlet) so delivered weights can be compared with the ideal fluence directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from atp.sequencer import (
    check_delivery,
    deliverable_dose,
    delivered_weights,
    fluence_set,
    get_sequencer,
    load_machine,
    sequencer_names,
)
from atp.sequencer.deliverable import aperture_open_fraction
from atp.sequencer.fidelity import fidelity
from atp.sequencer.imrt import xia_verhey_segments
from atp.sequencer.machine import available_machines, load_machine_file
from atp.sequencer.vmat import group_arcs, largest_runs
from bev_lattice import beamlets_for, lattice

from atp.dose.aperture import Transmission
from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.errors import BackendUnavailableError, InputError
from atp.gamma import gamma_index
from atp.grid import Grid

NX, NY = 20, 14


def smooth_maps(n, scale=2000.0, seed=0):
    rng = np.random.default_rng(seed)
    X, Y = lattice(NX, NY)
    out = []
    for _ in range(n):
        c = rng.uniform(-10, 10, 2)
        f = scale * np.exp(-((X - c[0]) ** 2 / (2 * 25.0 ** 2) + (Y - c[1]) ** 2 / (2 * 15.0 ** 2)))
        out.append(f * ((np.abs(X - c[0]) < 35) & (np.abs(Y - c[1]) < 25)))
    return out


def arc_maps(n, level=40.0):
    """Two-level (aperture-like) maps whose opening drifts smoothly along the arc."""
    X, Y = lattice(NX, NY)
    ys = Y[:, 0]
    out = []
    for k in range(n):
        th = np.deg2rad(2 * k)
        cx, rx = 10 * np.cos(th), 25 + 8 * np.sin(2 * th)
        half = rx * np.sqrt(np.clip(1 - (ys / 30.0) ** 2, 0, None))
        lo, hi = cx - half, cx + half
        frac = np.clip(np.minimum(X + 2.5, hi[:, None]) - np.maximum(X - 2.5, lo[:, None]),
                       0, 5) / 5
        out.append(level * frac)
    return out


@pytest.fixture(scope="module")
def m120():
    return load_machine("millennium120")


# --- machine models -------------------------------------------------------------------

def test_shipped_machines_geometry():
    assert set(available_machines()) >= {"millennium120", "hd120"}
    m = load_machine("Millennium120")
    assert m.n_pairs == 60
    w = m.leaf_widths_mm
    assert np.allclose(w[:10], 10) and np.allclose(w[10:50], 5) and np.allclose(w[50:], 10)
    assert m.leaf_edges_mm[0] == -200 and m.leaf_edges_mm[-1] == 200
    h = load_machine("hd120")
    assert h.n_pairs == 60 and np.allclose(h.leaf_widths_mm[14:46], 2.5)
    assert np.allclose(h.leaf_widths_mm[:14], 5) and h.leaf_edges_mm[-1] == 110


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_machine_validation_names_file_field_line(tmp_path):
    from pathlib import Path

    text = Path(load_machine("millennium120").source).read_text()
    bad = text.replace("max_leaf_speed_mm_s: 25.0", "max_leaf_speed_mm_s: -3")
    with pytest.raises(InputError) as e:
        load_machine_file(_write(tmp_path, bad))
    assert e.value.field == "mlc.max_leaf_speed_mm_s" and "bad.yaml" in e.value.file
    assert e.value.line is not None and "max_leaf_speed" in bad.splitlines()[e.value.line - 1]
    with pytest.raises(InputError, match="leaf_widths_mm"):
        load_machine_file(_write(tmp_path, text.replace("[5.0, 40]", "[5.0, 0]")))
    with pytest.raises(InputError, match="x1_range_mm"):
        load_machine_file(_write(tmp_path, text.replace("[-200.0, 20.0]", "[30.0, 20.0]", 1)))
    with pytest.raises(InputError, match="missing"):
        load_machine_file(_write(tmp_path, text.replace("  min_leaf_gap_mm: 0.5\n", "")))
    with pytest.raises(InputError, match="unknown machine"):
        load_machine("agility")


def test_dynamic_dose_rate_is_validated(tmp_path):
    from pathlib import Path

    text = Path(load_machine("millennium120").source).read_text()
    assert load_machine("millennium120").sliding_dose_rate_mu_min == 600.0  # the maximum
    with_rate = text.replace("  max_dose_rate_mu_min: 600.0\n",
                             "  max_dose_rate_mu_min: 600.0\n  dynamic_dose_rate_mu_min: 300\n")
    m = load_machine_file(_write(tmp_path, with_rate))
    assert m.sliding_dose_rate_mu_min == 300.0
    assert np.isclose(m.mm_per_mu(30), 2.0 * load_machine("millennium120").mm_per_mu(30))
    for bad, why in (("800", "must not exceed"), ("0", "must be >"), ("fast", "a number")):
        with pytest.raises(InputError, match=why) as e:
            load_machine_file(_write(tmp_path, with_rate.replace(
                "dynamic_dose_rate_mu_min: 300", f"dynamic_dose_rate_mu_min: {bad}")))
        assert e.value.field == "delivery.dynamic_dose_rate_mu_min"


def test_sliding_window_at_a_lower_dose_rate_needs_fewer_mu(m120):
    """Crossing the field costs width x rate / leaf speed MU: at half the dose rate the
    sweep delivers the same fluence with fewer MU, within the leaf speed at that rate,
    and takes longer."""
    from dataclasses import replace

    maps = smooth_maps(3, scale=600.0)
    info, w = beamlets_for(maps, [0, 120, 240])
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    slow = replace(m120, dynamic_dose_rate_mu_min=300.0)
    fast_d = get_sequencer("imrt-sliding").sequence(fs, m120)
    slow_d = get_sequencer("imrt-sliding").sequence(fs, slow)
    assert check_delivery(slow_d) == [] and check_delivery(fast_d) == []
    # the slow sequence is too fast for the leaves at the maximum dose rate
    assert any("leaves faster" in x for x in check_delivery(replace(slow_d, machine=m120)))
    for b_fast, b_slow in zip(fast_d.beams, slow_d.beams):
        assert b_slow.mu < b_fast.mu
    assert slow_d.total_mu < 0.9 * fast_d.total_mu
    assert slow_d.delivery_time_s() > fast_d.delivery_time_s()
    shape = (3, NY, NX)
    for d in (fast_d, slow_d):
        wd = delivered_weights(d, info)
        g = gamma_index(w.reshape(shape), wd.reshape(shape), (1e6, 5.0, 5.0))
        assert g.pass_rate_pct >= 95.0


# --- fluence maps ---------------------------------------------------------------------

def test_fluence_maps_onto_leaf_pairs(m120):
    X, _ = lattice(NX, NY)
    f = np.zeros_like(X)
    f[3, 4] = 10.0  # one beamlet
    info, w = beamlets_for([f], [0.0])
    fs = fluence_set(w, info, m120.leaf_edges_mm)
    pairs = fs.beams[0].fluence_mu
    assert pairs.shape == (60, NX)
    assert np.isclose(pairs.sum() * 5.0, f.sum() * 5.0)  # 5 mm pairs == 5 mm rows
    # HD120: the 5 mm row is split over two 2.5 mm pairs with the same value
    h = load_machine("hd120")
    ph = fluence_set(w, info, h.leaf_edges_mm).beams[0].fluence_mu
    assert np.count_nonzero(ph) == 2 and np.allclose(ph[ph > 0], 10.0)
    with pytest.raises(InputError, match="weights"):
        fluence_set(-w, info, m120.leaf_edges_mm)


def test_outer_10mm_pairs_average_two_rows(m120):
    from atp.sequencer.fluence import rows_to_leaf_pairs

    bev = np.array([[4.0], [8.0]])
    out = rows_to_leaf_pairs(bev, np.array([-117.5, -112.5]), 5.0, m120.leaf_edges_mm)
    assert np.isclose(out[8, 0], 6.0) and np.count_nonzero(out) == 1


# --- algorithms -----------------------------------------------------------------------

def test_xia_verhey_reproduces_levels():
    rng = np.random.default_rng(3)
    lev = rng.integers(0, 9, size=(6, 9))
    total = np.zeros_like(lev)
    for weight, rows in xia_verhey_segments(lev):
        for p, run in enumerate(rows):
            if run is not None:
                total[p, run[0]:run[1]] += weight
    assert np.array_equal(total, lev)


def test_largest_runs_picks_biggest_region():
    f = np.array([[[0, 5, 5, 0, 9, 9, 9, 0], [0.5, 0, 0, 0, 0, 0, 0, 0], [0] * 8]], float)
    s, e = largest_runs(f, 0.1)
    assert (s[0, 0], e[0, 0]) == (4, 7)
    assert (s[0, 1], e[0, 1]) == (-1, -1)  # 0.5 < 10 % of 9: not significant
    assert s[0, 2] == -1


def test_aperture_fraction_matches_engine(m120):
    from atp.dose.aperture import aperture_beamlet_weights

    info, _ = beamlets_for(smooth_maps(1), [0.0])
    rng = np.random.default_rng(1)
    left = rng.uniform(-40, 10, 60)
    right = left + rng.uniform(0, 40, 60)
    mine = aperture_open_fraction(info.bev_x_mm, info.bev_y_mm, info.beamlet_size_mm,
                                  m120.leaf_edges_mm, left[None], right[None])[0] * 7.0
    theirs = aperture_beamlet_weights(info, 0, m120.leaf_edges_mm, left, right, 7.0)
    assert np.allclose(mine, theirs)


@pytest.mark.parametrize("name", ["imrt-sns", "imrt-sliding"])
def test_imrt_delivers_the_fluence(m120, name):
    maps = smooth_maps(3)
    info, w = beamlets_for(maps, [0, 120, 240])
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    d = get_sequencer(name).sequence(fs, m120)
    assert check_delivery(d) == []
    assert d.technique == name and len(d.beams) == 3
    wd = delivered_weights(d, info)
    shape = (3, NY, NX)
    g = gamma_index(w.reshape(shape), wd.reshape(shape), (1e6, 5.0, 5.0))
    assert g.pass_rate_pct >= 95.0
    assert abs(wd.sum() / w.sum() - 1) < 0.05
    if name == "imrt-sns":
        assert all(b.kind == "static" and b.n_segments >= 3 for b in d.beams)
        # step-and-shoot MU = sum of segment MU
        assert np.isclose(d.beams[0].mu, sum(np.diff(d.beams[0].cumulative_mu)))
    else:
        assert all(b.kind == "dynamic" for b in d.beams)
        # sliding window needs at least the largest row's sum of rises
        fmax = fs.beams[0].fluence_mu
        rises = np.maximum(np.diff(np.pad(fmax, ((0, 0), (1, 0))), axis=1), 0).sum(axis=1)
        assert d.beams[0].mu >= rises.max() - 1e-6


def test_vmat_two_level_maps_are_reproduced(m120):
    n = 60
    maps = arc_maps(n)
    info, w = beamlets_for(maps, 181 + 2 * np.arange(n))
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    assert group_arcs(fs) == [list(range(n))]
    d = get_sequencer("vmat").sequence(fs, m120)
    assert check_delivery(d) == []
    (arc,) = d.beams
    assert arc.kind == "arc" and arc.n_control_points == n + 2
    assert arc.rotation_direction == "CW" and np.isclose(arc.arc_length_deg, 2 * n)
    assert np.isclose(arc.meterset_weights[-1], 1.0)
    wd = delivered_weights(d, info)
    shape = (n, NY, NX)
    g = gamma_index(w.reshape(shape).sum(0)[None], wd.reshape(shape).sum(0)[None],
                    (5.0, 5.0, 5.0))
    assert g.pass_rate_pct >= 95.0
    assert abs(wd.sum() / w.sum() - 1) < 0.02


def test_vmat_multiple_arcs_and_limits(m120):
    n = 30
    maps = arc_maps(n) + arc_maps(n)[::-1]
    gantry = np.concatenate([181 + 2 * np.arange(n), 179 - 2 * np.arange(n)])
    info, w = beamlets_for(maps, gantry)
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    d = get_sequencer("vmat").sequence(fs, m120)
    assert [b.rotation_direction for b in d.beams] == ["CW", "CC"]
    assert check_delivery(d) == []


def test_vmat_enforces_leaf_travel(m120):
    """Openings jumping across the field every control point must be slowed down."""
    X, _ = lattice(NX, NY)
    maps = [np.where((X > 20) if k % 2 else (X < -20), 50.0, 0.0) for k in range(20)]
    info, w = beamlets_for(maps, 2 * np.arange(20))
    d = get_sequencer("vmat").sequence(fluence_set(w, info, m120.leaf_edges_mm), m120)
    assert check_delivery(d) == []
    travel = np.abs(np.diff(d.beams[0].leaf_b_mm, axis=0)).max()
    assert travel <= m120.max_leaf_travel_per_deg_mm * 2 + 1e-9


def test_check_delivery_reports_violations(m120):
    maps = smooth_maps(1)
    info, w = beamlets_for(maps, [0.0])
    d = get_sequencer("imrt-sns").sequence(fluence_set(w, info, m120.leaf_edges_mm), m120)
    b = d.beams[0]
    bad_a = np.array(b.leaf_a_mm)
    bad_a[0, 30] = b.leaf_b_mm[0, 30] + 1.0  # crossing leaves
    from dataclasses import replace

    broken = replace(d, beams=(replace(b, leaf_a_mm=bad_a),))
    assert any("gap" in s for s in check_delivery(broken))


def test_registry_names_and_errors():
    assert {"imrt-sns", "imrt-sliding", "vmat"} <= set(sequencer_names())
    assert get_sequencer("imrt-sns", levels=5).levels == 5
    with pytest.raises(BackendUnavailableError, match="known: .*vmat"):
        get_sequencer("tomotherapy")


def test_deliverable_dose_and_fidelity(m120):
    maps = smooth_maps(2)
    info, w = beamlets_for(maps, [0, 180])
    # a small dose grid: every beamlet hits one voxel of a (2, NY, NX) grid
    grid = Grid((2, NY, NX), (5.0, 5.0, 5.0))
    dij = DoseInfluence(sp.identity(w.size, format="csc") * 1e-3, info, grid)
    d = get_sequencer("imrt-sns").sequence(fluence_set(w, info, m120.leaf_edges_mm), m120)
    dose = deliverable_dose(d, dij)
    ideal = dij.dose(w)
    assert dose.shape == grid.shape
    mask = ideal > 0.2 * ideal.max()
    rep = fidelity(ideal, dose, grid.spacing_mm, {"high": mask, "empty": np.zeros_like(mask)})
    assert rep["gamma"]["pass_rate_pct"] >= 95.0
    assert set(rep["dvh_delta_gy"]) == {"high"}
    assert abs(rep["dvh_delta_gy"]["high"]["Dmean"]) < 0.05 * ideal[mask].mean()
    summary = d.summary()
    assert summary["beams"][0]["segments"] == d.beams[0].n_segments
    assert summary["delivery_time_s_per_fraction"] > 0


def test_gamma_detects_a_shift_and_a_scale():
    _, y, x = np.meshgrid(np.arange(10), np.arange(20), np.arange(20), indexing="ij")
    ref = np.exp(-((x - 10) ** 2 + (y - 10) ** 2) / 30.0) * 60
    same = gamma_index(ref, ref, (2, 2, 2))
    assert same.pass_rate_pct == 100.0
    shifted = np.roll(ref, 1, axis=2)  # 2 mm shift: within 3 mm
    assert gamma_index(ref, shifted, (2, 2, 2)).pass_rate_pct == 100.0
    far = np.roll(ref, 3, axis=2)  # 6 mm shift
    assert gamma_index(ref, far, (2, 2, 2)).pass_rate_pct < 80.0
    assert gamma_index(ref, ref * 1.1, (2, 2, 2)).pass_rate_pct < 100.0


def test_sequence_api_from_dij(m120):
    from atp import sequencer

    maps = arc_maps(12)
    info, w = beamlets_for(maps, 181 + 2 * np.arange(12))
    grid = Grid((12, NY, NX), (5.0, 5.0, 5.0))
    dij = DoseInfluence(sp.identity(w.size, format="csc"), info, grid)
    assert sequencer.default_technique(dij) == "vmat"
    d = sequencer.sequence(w, dij, fractions=30)
    assert d.technique == "vmat" and d.fractions == 30 and check_delivery(d) == []
    d2 = sequencer.sequence(w, dij, "imrt-sns", machine="hd120", levels=4)
    assert d2.machine.name == "HD120" and d2.meta["levels"] == 4
    info9, w9 = beamlets_for(smooth_maps(9), np.arange(9) * 40.0)
    dij9 = DoseInfluence(sp.identity(w9.size, format="csc"),
                         info9, Grid((9, NY, NX), (5.0, 5.0, 5.0)))
    assert sequencer.default_technique(dij9) == "imrt-sliding"


def test_reweight_mu_gets_closer_to_the_reference(m120):
    from atp.sequencer.reweight import reweight_mu

    n = 24
    rng = np.random.default_rng(5)
    maps = [m * rng.uniform(0.5, 1.5, m.shape) for m in arc_maps(n)]  # modulated
    info, w = beamlets_for(maps, 181 + 2 * np.arange(n))
    grid = Grid((n, NY, NX), (5.0, 5.0, 5.0))
    dij = DoseInfluence(sp.identity(w.size, format="csc"), info, grid)
    d = get_sequencer("vmat").sequence(fluence_set(w, info, m120.leaf_edges_mm, 30), m120)
    d2 = reweight_mu(d, dij, dij.dose(w))
    assert check_delivery(d2) == [] and d2.meta["mu_reweighted"]
    assert np.array_equal(d2.beams[0].leaf_a_mm, d.beams[0].leaf_a_mm)
    err = [np.linalg.norm(deliverable_dose(x, dij) - dij.dose(w)) for x in (d, d2)]
    assert err[1] < err[0]
    sliding = get_sequencer("imrt-sliding").sequence(
        fluence_set(w, info, m120.leaf_edges_mm, 30), m120)
    assert reweight_mu(sliding, dij, dij.dose(w)) is sliding


def test_sliding_window_pairs_that_finish_early_leave_the_field(m120):
    """A leaf pair whose sweep needs few MU must not wait at its last edge with its
    minimum gap open while the other pairs finish: it crosses on at full speed and ends
    closed behind the X2 jaw, so the pixel at its end gets no more than its fluence."""
    X, _ = lattice(NX, NY)
    f = np.zeros((NY, NX))
    f[:, 4:10] = 40.0  # every row: a short, low plateau on the left ...
    f[6:8, 4:16] = np.linspace(100.0, 3000.0, 12)  # ... two rows need many MU
    info, w = beamlets_for([f], [0])
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    d = get_sequencer("imrt-sliding").sequence(fs, m120)
    assert check_delivery(d) == []
    beam = d.beams[0]
    open_w = delivered_weights(d, info, transmission=Transmission())
    short = (np.abs(info.bev_y_mm) > 20) & (np.abs(info.bev_x_mm - X[0, 9]) < 1)
    # the last plateau pixel of the short rows: its own 40 MU plus at most the floor of
    # the gap passing on, not the gap's share (2 of 5 mm) of the remaining ~3000 MU
    # (1376 MU when the pair waited there)
    assert np.all(open_w[short] < 40.0 + d.meta["floor_mu"]), open_w[short]
    beyond = (np.abs(info.bev_y_mm) > 20) & (info.bev_x_mm > X[0, 10])
    assert open_w[beyond].max() < 0.05 * f.max()  # crossed at full speed: the floor
    half = m120.dosimetric_leaf_gap_mm / 2.0
    pairs = np.flatnonzero(np.abs(m120.leaf_centres_mm) > 22.5)
    pairs = pairs[np.abs(m120.leaf_centres_mm[pairs]) < NY * 2.5]
    assert np.all(beam.leaf_a_mm[-1, pairs] - half >= beam.jaw_x_mm[-1, 1] - 1e-6)


def test_wide_fields_keep_the_bank_span(m120):
    """Openings far to one side with closed pairs elsewhere: parking respects the span."""
    xs = -95.0 + 5.0 * np.arange(40)  # -95 .. 100 mm
    X, Y = np.meshgrid(xs, (np.arange(6) - 2.5) * 5.0)
    f = np.where((X > 60) & (np.abs(Y) < 8), 50.0, 0.0)
    n = 6
    info = BeamletInfo(np.repeat(np.arange(n), X.size), 2.0 * np.arange(n), np.zeros(n),
                       np.zeros(n), np.zeros((n, 3)), np.tile(X.ravel(), n),
                       np.tile(Y.ravel(), n))
    w = np.tile(f.ravel(), n)
    for tech in ("imrt-sns", "imrt-sliding", "vmat"):
        d = get_sequencer(tech).sequence(fluence_set(w, info, m120.leaf_edges_mm, 30), m120)
        assert check_delivery(d) == [], tech


def test_vmat_second_pass_delivers_the_residual(m120):
    n = 20
    X, Y = lattice(NX, NY)
    # two intensity levels per control point: a wide low plateau with a narrow high core
    maps = [np.where(np.abs(X) < 30, 20.0, 0.0) + np.where(np.abs(X - 5 * np.sin(k)) < 8,
                                                          60.0, 0.0) * (np.abs(Y) < 20)
            for k in range(n)]
    info, w = beamlets_for(maps, 181 + 2 * np.arange(n))
    fs = fluence_set(w, info, m120.leaf_edges_mm, fractions=30)
    one = get_sequencer("vmat", passes=1).sequence(fs, m120)
    two = get_sequencer("vmat", passes=2).sequence(fs, m120)
    assert len(one.beams) == 1 and len(two.beams) == 2
    assert [b.rotation_direction for b in two.beams] == ["CW", "CC"]
    assert check_delivery(two) == []
    err = [np.abs(delivered_weights(d, info) - w).sum() for d in (one, two)]
    assert err[1] < 0.7 * err[0]
