"""The AAPM TG-119 C-shape phantom as a DICOM case (``atp phantom tg119``), its goal lists
(``tg119_easy`` / ``tg119_hard``), and goals on structures the RTSTRUCT marks as targets."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pydicom
import pytest

from atp.cli import main
from atp.errors import GoalListError
from atp.goals import load_goal_list, resolve_goals
from atp.io.dicom import load_dicom
from atp.patient import Role
from atp.phantom import TG119_GEOMETRY_MM, tg119_phantom


def _disc_below(r: float, h: float) -> float:
    """Area (mm^2) of the disc of radius r about the origin with y <= h (|h| <= r)."""
    return r * r * (math.pi - math.acos(h / r)) + h * math.sqrt(r * r - h * h)


def _analytic_cc() -> dict:
    g = TG119_GEOMETRY_MM
    c_area = (_disc_below(g["target_outer"], g["target_y_max"])
              - _disc_below(g["target_inner"], g["target_y_max"]))
    return {"OuterTarget": c_area * g["target_length"] / 1000.0,
            "Core": math.pi * g["core_radius"] ** 2 * g["core_length"] / 1000.0,
            "External": g["body_x"] * g["body_y"] * g["body_z"] / 1000.0}


@pytest.fixture(scope="module")
def tg119_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("tg119") / "case"
    assert main(["phantom", "tg119", "--out", str(out)]) == 0
    return out


def test_tg119_dicom_reads_back_with_its_structures_roles_and_volumes(tg119_case):
    ref = tg119_phantom()
    p = load_dicom(tg119_case)
    assert sorted(p.structures) == ["Core", "External", "OuterTarget"]  # BODY -> External
    assert p.structures["OuterTarget"].role == Role.TARGET
    assert p.structures["Core"].role == Role.ORGAN
    assert p.structures["External"].role == Role.EXTERNAL
    assert [(rx.target, rx.dose_gy, rx.fractions) for rx in p.prescriptions] == [
        ("OuterTarget", 50.0, 25)]
    assert p.grid.shape == ref.grid.shape
    np.testing.assert_allclose(p.grid.spacing_mm, [2.5, 3.0, 3.0])
    np.testing.assert_allclose(p.ct_hu[p.body_mask], 0.0, atol=0.5)  # water
    analytic = _analytic_cc()
    for name, ref_name in (("OuterTarget", "OuterTarget"), ("Core", "Core"),
                           ("External", "BODY")):
        # contours rasterise back to the voxels they were drawn from
        np.testing.assert_array_equal(p.mask(name), ref.mask(ref_name))
        vol = p.structures[name].volume_cc(p.grid)
        # the voxelised volumes within 10 % of the analytic shapes (183 vs 174 cc, 34 vs
        # 31 cc; pyRadPlan's TG119 masks: 168 cc and 30 cc)
        assert vol == pytest.approx(analytic[name], rel=0.10), name
    # the C: target above the core's axis and on both sides, open behind it
    z0 = p.grid.shape[0] // 2
    t = p.mask("OuterTarget")[z0]
    y = p.grid.voxel_centres_mm().reshape(*p.grid.shape, 3)[z0, ..., 1]
    assert t.any() and y[t].max() <= TG119_GEOMETRY_MM["target_y_max"]
    assert not (p.mask("OuterTarget") & p.mask("Core")).any()


def test_tg119_rtstruct_interpreted_types(tg119_case):
    rs = pydicom.dcmread(next(tg119_case.glob("RS.*.dcm")))
    names = {r.ROINumber: r.ROIName for r in rs.StructureSetROISequence}
    kinds = {names[o.ReferencedROINumber]: o.RTROIInterpretedType
             for o in rs.RTROIObservationsSequence}
    assert kinds == {"OuterTarget": "PTV", "Core": "ORGAN", "BODY": "EXTERNAL"}


def test_tg119_phantom_command_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("a user's file")
    assert main(["phantom", "tg119", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not written by atp" in err
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize("site, core_d10", [("tg119_easy", 25.0), ("tg119_hard", 10.0)])
def test_tg119_goal_lists_resolve_with_the_target_default(site, core_d10):
    gl = load_goal_list(site=site)
    assert gl.beams == 9
    patient = tg119_phantom(spacing_mm=(5.0, 6.0, 6.0))
    by = {g.id: g for g in resolve_goals(gl, patient)}
    assert sorted(by) == ["Core.D10%", "OuterTarget.D10%", "OuterTarget.D95%"]
    cover, hot = by["OuterTarget.D95%"], by["OuterTarget.D10%"]
    # OuterTarget is not a TG-263 name: target kind and priority 2 come from the patient
    assert (cover.kind, cover.priority, cover.operator, cover.value) == ("target", 2, ">=", 50)
    assert (hot.kind, hot.priority, hot.operator, hot.value) == ("target", 2, "<=", 55)
    assert by["Core.D10%"].kind == "organ" and by["Core.D10%"].value == core_d10


GOALS = """\
    site: x
    goals:
      - {structure: %s, metric: D95%%, operator: ">=", value: 50}
"""


def test_a_structure_the_patient_marks_as_target_takes_the_target_defaults(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent(GOALS % "OuterTarget"))
    gl = load_goal_list(path=p)  # no priority written: loads
    patient = tg119_phantom(spacing_mm=(5.0, 6.0, 6.0))
    (g,) = resolve_goals(gl, patient)
    assert (g.kind, g.priority, g.weight) == ("target", 2, 10.0)
    # the same name as an organ on the patient: the missing priority is an error
    p.write_text(textwrap.dedent(GOALS % "Core"))
    with pytest.raises(GoalListError) as exc:
        resolve_goals(load_goal_list(path=p), patient)
    assert exc.value.line == 3 and exc.value.field == "Core.D95%.priority"
    assert "not a target" in exc.value.one_line()
    # with a priority, an organ goal on an unknown name is an organ goal, as before
    p.write_text("site: x\ngoals:\n  - {structure: Core, metric: Dmean, operator: '<=',"
                 " value: 20, priority: 3}\n")
    (g,) = resolve_goals(load_goal_list(path=p), patient)
    assert (g.kind, g.priority) == ("organ", 3)
    # a target index on a structure that turns out to be an organ: error at resolution
    p.write_text("site: x\ngoals:\n  - {structure: Core, metric: CIpaddick, operator: '>=',"
                 " value: 0.8, priority: 3}\n")
    with pytest.raises(GoalListError, match="target index"):
        resolve_goals(load_goal_list(path=p), patient)


def test_predicted_values_on_unknown_names_still_need_a_priority(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("site: x\ngoals:\n  - {structure: Core, metric: Dmean, operator: '<=',"
                 " value: predicted}\n")
    with pytest.raises(GoalListError, match="priority"):
        load_goal_list(path=p)
