"""Property-based: whatever the fluence, sequenced leaf positions obey the machine model
(minimum gap, leaf range, bank span, jaw ranges, leaf speed between control points,
MU per degree on arcs)."""

from __future__ import annotations

import numpy as np
from atp.sequencer import check_delivery, fluence_set, get_sequencer, load_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atp.dose.influence import BeamletInfo

MACHINES = {n: load_machine(n) for n in ("millennium120", "hd120")}


def info_for(maps, gantry, x0_mm, y0_mm):
    n, ny, nx = maps.shape
    xs = x0_mm + 5.0 * np.arange(nx)
    ys = y0_mm + 5.0 * np.arange(ny)
    X, Y = np.meshgrid(xs, ys)
    return BeamletInfo(np.repeat(np.arange(n), X.size), np.asarray(gantry) % 360,
                       np.zeros(n), np.zeros(n), np.zeros((n, 3)), np.tile(X.ravel(), n),
                       np.tile(Y.ravel(), n)), maps.reshape(-1)


common = settings(max_examples=25, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])


@common
@given(maps=arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 6),
                                         st.integers(1, 8)),
                   elements=st.one_of(st.just(0.0), st.floats(0.0, 3000.0))),
       technique=st.sampled_from(["imrt-sns", "imrt-sliding"]),
       machine=st.sampled_from(sorted(MACHINES)),
       fractions=st.integers(1, 40),
       x0=st.floats(-90.0, 40.0), y0=st.sampled_from([-97.5, -12.5, 2.5, 52.5]))
def test_imrt_leaves_obey_machine(maps, technique, machine, fractions, x0, y0):
    m = MACHINES[machine]
    info, w = info_for(maps, np.arange(maps.shape[0]) * 40.0, x0, y0)
    d = get_sequencer(technique).sequence(
        fluence_set(w, info, m.leaf_edges_mm, fractions=fractions), m)
    assert check_delivery(d) == []
    for b in d.beams:
        assert np.all(np.isfinite(b.leaf_a_mm)) and np.all(np.isfinite(b.leaf_b_mm))


@common
@given(maps=arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 6),
                                         st.integers(1, 8)),
                   elements=st.one_of(st.just(0.0), st.floats(0.0, 500.0))),
       machine=st.sampled_from(sorted(MACHINES)),
       step=st.sampled_from([1.0, 2.0, -2.0, 4.0]),
       fractions=st.integers(1, 40),
       threshold=st.floats(0.0, 0.9),
       x0=st.floats(-90.0, 40.0), y0=st.sampled_from([-97.5, -12.5, 2.5, 52.5]))
def test_vmat_leaves_obey_machine(maps, machine, step, fractions, threshold, x0, y0):
    m = MACHINES[machine]
    gantry = 181.0 + step * np.arange(maps.shape[0])
    info, w = info_for(maps, gantry, x0, y0)
    d = get_sequencer("vmat", threshold=threshold).sequence(
        fluence_set(w, info, m.leaf_edges_mm, fractions=fractions), m)
    assert check_delivery(d) == []
    assert 1 <= len(d.beams) <= 2  # default: up to two passes (arcs)
    for arc in d.beams:
        assert arc.n_control_points == maps.shape[0] + 2
        assert np.all(np.diff(arc.cumulative_mu) >= 0)


# Wide fields (up to 22.5 cm along leaf travel, wider than the 15 cm bank span of both
# MLC models): openings at both ends of a field must still be deliverable.
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps=arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 8),
                                         st.integers(32, 45)),
                   elements=st.one_of(st.just(0.0), st.floats(0.0, 500.0))),
       technique=st.sampled_from(["imrt-sns", "imrt-sliding", "vmat"]),
       machine=st.sampled_from(sorted(MACHINES)),
       x0=st.floats(-110.0, -60.0))
def test_wide_fields_obey_the_bank_span(maps, technique, machine, x0):
    m = MACHINES[machine]
    if technique == "vmat":
        gantry = 181.0 + 2.0 * np.arange(maps.shape[0])
    else:
        gantry = np.arange(maps.shape[0]) * 40.0
    info, w = info_for(maps, gantry, x0, -12.5)
    d = get_sequencer(technique).sequence(fluence_set(w, info, m.leaf_edges_mm, fractions=30),
                                          m)
    assert check_delivery(d) == []


def test_step_and_shoot_split_keeps_the_fluence():
    """A segment open at both ends of a 20 cm field is split, with the same MU each."""
    from atp.sequencer.imrt import split_for_bank_span

    m = MACHINES["millennium120"]
    edges = -100.0 + 5.0 * np.arange(41)
    segs = [(3, [(0, 2), None, (37, 40), (10, 30)])]
    out = split_for_bank_span(segs, edges, m)
    assert len(out) >= 2 and all(w == 3 for w, _ in out)
    opened = [sorted(p for p, r in enumerate(rows) if r is not None) for _, rows in out]
    assert sorted(p for o in opened for p in o) == [0, 2, 3]  # each pair opened once
    for _, rows in out:
        assert all(r in (None, segs[0][1][p]) for p, r in enumerate(rows))


def test_wide_sliding_window_becomes_split_fields():
    m = MACHINES["millennium120"]
    maps = np.zeros((1, 4, 44))  # 22 cm along leaf travel; openings at both ends
    maps[0, :2, :6] = 50.0
    maps[0, 2:, 38:] = 50.0
    info, w = info_for(maps, [0.0], -110.0, -12.5)
    d = get_sequencer("imrt-sliding").sequence(fluence_set(w, info, m.leaf_edges_mm,
                                                           fractions=30), m)
    assert check_delivery(d) == []
    assert len(d.beams) == 2 and {b.name for b in d.beams} == {"IMRT01_G000_1",
                                                               "IMRT01_G000_2"}
    assert all(b.gantry_deg[0] == 0.0 for b in d.beams)
    uniform = np.full((1, 4, 44), 50.0)  # the same width swept in step: no split needed
    info, w = info_for(uniform, [0.0], -110.0, -12.5)
    d = get_sequencer("imrt-sliding").sequence(fluence_set(w, info, m.leaf_edges_mm,
                                                           fractions=30), m)
    assert check_delivery(d) == [] and len(d.beams) == 1


def test_denormal_fluence_is_an_empty_field():
    m = MACHINES["hd120"]
    info, w = info_for(np.array([[[5e-324]]]), [0.0], 0.0, -97.5)
    d = get_sequencer("imrt-sns").sequence(fluence_set(w, info, m.leaf_edges_mm), m)
    assert check_delivery(d) == [] and d.beams[0].cumulative_mu[-1] == 0.0
