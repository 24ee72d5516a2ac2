"""Beam geometry: IEC 61217 frames, beam lists, isocentre and angle validation."""

from __future__ import annotations

import numpy as np
import pytest

from atp.dose.geometry import (
    Beam,
    arc_control_points,
    beam_frame,
    default_isocenter,
    equispaced_beams,
    resolve_beams,
)
from atp.errors import InputError, StructureError


@pytest.mark.parametrize("gantry, src", [(0, (0, -1000, 0)), (90, (1000, 0, 0)),
                                         (180, (0, 1000, 0)), (270, (-1000, 0, 0))])
def test_source_position_iec(gantry, src):
    f = beam_frame(gantry, isocenter_mm=(0, 0, 0))
    np.testing.assert_allclose(f.source_mm, src, atol=1e-9)


def test_bev_axes_and_collimator():
    f = beam_frame(0)
    np.testing.assert_allclose(f.x_axis, [1, 0, 0], atol=1e-12)  # leaf travel: patient left
    np.testing.assert_allclose(f.y_axis, [0, 0, 1], atol=1e-12)  # across pairs: superior
    f90 = beam_frame(0, collimator_deg=90)
    np.testing.assert_allclose(f90.x_axis, [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(f90.y_axis, [-1, 0, 0], atol=1e-12)
    fc = beam_frame(90, couch_deg=90)  # couch turned: gantry 90 beam comes from the feet
    np.testing.assert_allclose(fc.source_mm, [0, 0, -1000], atol=1e-9)


def test_projection_roundtrip_and_divergence():
    f = beam_frame(40, 10, 0, isocenter_mm=(5, -3, 2))
    p = f.iso_plane_point(12.0, -7.0)
    u, v, s = f.project(p)
    assert u == pytest.approx(12.0) and v == pytest.approx(-7.0) and s == pytest.approx(1000)
    # a point 100 mm further from the source on the same ray projects to the same (u, v)
    ray = (p - f.source_mm) / np.linalg.norm(p - f.source_mm)
    u2, v2, s2 = f.project(p + 100 * ray)
    assert u2 == pytest.approx(12.0) and v2 == pytest.approx(-7.0) and s2 > 1000


def test_beam_lists():
    b = equispaced_beams(9)
    assert [x.gantry_deg for x in b] == pytest.approx([i * 40.0 for i in range(9)])
    arc = arc_control_points(181, 179, 2.0)
    assert len(arc) == 179
    assert arc[0].gantry_deg == pytest.approx(182.0)
    full = arc_control_points(0, 0)
    assert len(full) == 180
    ccw = arc_control_points(10, 350, 10, direction="ccw")
    assert [x.gantry_deg for x in ccw] == pytest.approx([5.0, 355.0])


@pytest.mark.parametrize("kw", [{"gantry_deg": 360}, {"gantry_deg": -1},
                                {"gantry_deg": 0, "couch_deg": 400},
                                {"gantry_deg": float("nan")}, {"gantry_deg": "x"}])
def test_bad_angles(kw):
    with pytest.raises(InputError):
        Beam(**kw)


def test_bad_beam_lists():
    with pytest.raises(InputError):
        equispaced_beams(0)
    with pytest.raises(InputError):
        arc_control_points(0, 90, 0)
    with pytest.raises(InputError):
        arc_control_points(0, 90, 2, direction="up")


def test_isocentre(phantom):
    iso = default_isocenter(phantom)
    np.testing.assert_allclose(iso, phantom.target_centroid_mm("PTV_70"))
    beams = resolve_beams(phantom, equispaced_beams(3))
    assert all(np.allclose(b.isocenter_mm, iso) for b in beams)
    with pytest.raises(InputError, match="outside the CT"):
        resolve_beams(phantom, [Beam(0, isocenter_mm=(0, 0, 5000))])
    with pytest.raises(InputError):
        resolve_beams(phantom, [])


def test_no_target(phantom):
    from atp.patient import Patient

    p = Patient(phantom.ct_hu, phantom.grid, {"External": phantom.structure("External")})
    with pytest.raises(StructureError):
        default_isocenter(p)
