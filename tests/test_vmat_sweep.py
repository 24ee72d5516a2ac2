"""VMAT by sweep arcs (``atp plan --technique vmat``, the default method): sector beams
optimised as static fields, each sector's map delivered by one leaf sweep while the
gantry turns through it (atp.vmatplan.sweep_beams, atp.sequencer.vmat_sliding)."""

from __future__ import annotations

import numpy as np
import pytest
from arc_plan_checks import assert_dciodvfy_clean, assert_rt_plan_recomputes
from atp.sequencer import check_delivery

from atp.errors import InputError


@pytest.fixture(scope="module")
def sweep_plan(phantom, tmp_path_factory):
    import atp

    p = atp.plan(phantom, predictor="baseline", technique="vmat", progress=False,
                 dose_grid_factor=3, optimizer_options={"max_iter": 60},
                 vmat_options={"sector_deg": 30.0, "cps_per_sector": 3})
    out = tmp_path_factory.mktemp("sweep") / "plan"
    p.save(out, report=False, dicom=True)
    return p, out


def test_sweep_beams_are_sector_centres_in_delivery_order():
    from atp.vmatplan import VmatOptions, sweep_beams

    one = sweep_beams(VmatOptions())
    assert [b.gantry_deg for b in one[:3]] == [190.0, 210.0, 230.0] and len(one) == 18
    assert {b.collimator_deg for b in one} == {0.0}
    two = sweep_beams(VmatOptions(arcs=2, collimator_deg=10.0, sector_deg=30.0))
    assert len(two) == 24
    # the second arc turns back, its sectors shifted by half a sector, collimator -10
    assert [b.gantry_deg for b in two[12:15]] == [210.0, 180.0, 150.0]
    assert {b.collimator_deg for b in two[12:]} == {350.0}


def test_sweep_options_are_checked():
    from atp.vmatplan import VmatOptions

    for bad, field in (({"method": "smart"}, "vmat.method"),
                       ({"sector_deg": 25.0}, "vmat.sector_deg"),
                       ({"sector_deg": 2.0}, "vmat.sector_deg"),
                       ({"cps_per_sector": 0}, "vmat.cps_per_sector"),
                       ({"arcs": 3}, "vmat.arcs"),
                       ({"arcs": 2}, "vmat.collimator_deg")):
        with pytest.raises(InputError) as e:
            VmatOptions.from_dict(bad)
        assert e.value.field == field
    # each method's own arcs and collimator, recorded concretely
    assert VmatOptions().to_dict()["arcs"] == 1
    assert VmatOptions(method="dmpo").to_dict()["collimator_deg"] == 15.0


def test_sweep_plan_is_one_deliverable_arc(sweep_plan):
    p, _ = sweep_plan
    d = p.delivery
    assert d.technique == "vmat-sliding" and len(d.beams) == 1
    b = d.beams[0]
    assert b.kind == "arc" and b.arc_length_deg == pytest.approx(360.0)
    assert b.n_control_points == 12 * 3 + 1  # 12 sectors of 30 deg, 3 points each
    assert check_delivery(d) == []
    assert p.settings["technique"] == "vmat" and p.settings["vmat"]["method"] == "sweep"
    assert p.settings["sequence"] == "vmat-sliding"
    assert 0 < d.meta["mu_per_cgy"] < 10
    # every control point its own dose beam in the reported dose
    assert d.meta["dose_beamlets"] == "jaw field"


def test_sweep_plan_records_its_pace_and_beam_on_time(sweep_plan):
    p, _ = sweep_plan
    d = p.delivery
    assert d.meta["sweep_speed_factor"] == 2.0 and d.meta["samples_per_cp"] == 3
    assert 0 < d.delivery_time_s() < 600


@pytest.mark.slow
def test_sweep_rt_plan_recomputes_to_the_plan_dose(sweep_plan, tmp_path, capsys):
    p, out = sweep_plan
    assert_rt_plan_recomputes(p, out, tmp_path, capsys)


@pytest.mark.slow
def test_sweep_rt_plan_passes_dciodvfy(sweep_plan):
    assert_dciodvfy_clean(sweep_plan[1])


def test_sweep_influence_takes_each_beamlet_at_the_angle_its_sweep_passes_it(phantom):
    """dij_angles 1: the sectors' centre beams exactly (columns in row-major order);
    dij_angles 2: a beamlet in the first half of its row takes the first sub-sector's
    column in a left-to-right sector and the second one's in a right-to-left sector."""
    from atp.dose import registry as engines
    from atp.dose.geometry import Beam
    from atp.vmatplan import VmatOptions, sweep_beams, sweep_influence

    def by_position(d, beam):
        b = d.beamlets
        cols = b.columns_of_beam(beam)
        order = np.lexsort((b.bev_x_mm[cols], b.bev_y_mm[cols]))
        return cols[order], b.bev_x_mm[cols[order]], b.bev_y_mm[cols[order]]

    eng = engines.get("pencil-beam")
    o1 = VmatOptions(sector_deg=60.0, dij_angles=1)
    d1 = sweep_influence("pencil-beam", phantom, o1, dose_grid_factor=3)
    ref = eng.influence(phantom, sweep_beams(o1), dose_grid_factor=3)
    assert d1.beamlets.n_beams == 6
    np.testing.assert_allclose(d1.beamlets.gantry_deg, [210, 270, 330, 30, 90, 150])
    for s in (0, 3):
        c1, x1, y1 = by_position(d1, s)
        c0, x0, y0 = by_position(ref, s)
        np.testing.assert_array_equal(x1, x0)
        np.testing.assert_array_equal(y1, y0)
        assert abs(d1.matrix[:, c1] - ref.matrix[:, c0]).max() == 0

    o2 = VmatOptions(sector_deg=60.0, dij_angles=2)
    d2 = sweep_influence("pencil-beam", phantom, o2, dose_grid_factor=3)
    for s, (first, second) in ((0, (195.0, 225.0)), (1, (255.0, 285.0))):
        subs = eng.influence(phantom, [Beam(first), Beam(second)], dose_grid_factor=3)
        cols, x, y = by_position(d2, s)
        mid = np.unique(y)[np.unique(y).size // 2]  # a middle leaf row
        row = y == mid
        left = x[row] < np.median(x[row])
        want = 0 if s % 2 == 0 else 1  # sector 1 sweeps right to left
        sc, sx, sy = by_position(subs, want)
        compared = 0
        for c, bx in zip(cols[row][left], x[row][left]):
            k = np.flatnonzero((sy == mid) & (sx == bx))
            if k.size:  # the beamlet was selected at that angle
                assert abs(d2.matrix[:, c] - subs.matrix[:, sc[k[0]]]).max() == 0
                compared += 1
        assert compared >= 2


def test_vmat_settings_saved_before_sweep_arcs_are_dmpo():
    """A plan.json ``vmat`` without a method (saved before sweep arcs) re-plans as DMPO."""
    from atp.pipeline import _vmat_of

    old = {"arcs": 2, "spacing_deg": 6.0, "collimator_deg": 15.0, "jaw_tracking": False,
           "sector_cps": 4, "dmpo_rounds": 3, "dmpo": {}, "start": "sequence", "cg": {}}
    assert _vmat_of({"vmat": old}).method == "dmpo"
    assert _vmat_of({"vmat": {"method": "sweep", "arcs": 1}}).method == "sweep"
    assert _vmat_of({}) is None
