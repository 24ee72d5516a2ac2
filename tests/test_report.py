"""The HTML plan report: self-contained, with DVH, goals, colour-wash and timings."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from atp.errors import GridMismatchError
from atp.report import write_report


def _dose(patient, sigma=40.0, peak=70.0):
    c = patient.target_centroid_mm()
    pts = patient.grid.voxel_centres_mm().reshape(*patient.grid.shape, 3)
    return peak * np.exp(-((pts - c) ** 2).sum(-1) / (2 * sigma ** 2))


def test_report_is_self_contained(phantom, tmp_path):
    goals = [
        {"id": "g1", "structure": "PTV_70", "metric": "D95%", "unit": "Gy", "operator": ">=",
         "value": 66.5, "priority": 2, "achieved": 60.1, "passed": False, "margin": -6.4,
         "predicted_value": 67.0},
        {"id": "g2", "structure": "SpinalCord", "metric": "Dmax", "unit": "Gy",
         "operator": "<=", "value": 45.0, "priority": 1, "achieved": 40.2, "passed": True,
         "margin": 4.8},
    ]
    path = write_report(tmp_path, phantom, _dose(phantom), _dose(phantom, 35.0, 72.0), goals,
                        {"predict": 0.5, "optimise": 2.25},
                        delivery_summary={"technique": "vmat", "total_mu": 512.0,
                                          "beams": [{"name": "ARC1", "mu": 512.0}]},
                        fidelity={"gamma": {"criterion": "3%/3mm", "pass_rate_pct": 99.1,
                                            "n_voxels": 100, "mean_gamma": 0.2},
                                  "dvh_delta_gy": {"PTV_70": {"Dmean": 0.1}}})
    assert path == tmp_path / "report.html"
    text = path.read_text()
    # no external resources: every image is an embedded PNG
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(images) == 4  # DVH + axial, coronal, sagittal views
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FAIL" in text and "pass" in text and "SpinalCord" in text
    assert "optimise" in text and "2.250" in text
    assert "99.1" in text and "vmat" in text
    assert text.index("priority") < text.index("SpinalCord")


def test_report_rejects_wrong_grid(phantom, tmp_path):
    with pytest.raises(GridMismatchError):
        write_report(tmp_path, phantom, np.zeros((3, 3, 3)))
    assert not (tmp_path / "report.html").exists()


def test_report_accepts_goal_result_objects(phantom, tmp_path):
    from atp.goals.model import GoalResult, Metric, ResolvedGoal

    g = ResolvedGoal("g", "Parotid_L", Metric("Dmean", "Dmean", "Gy"), "<=", 26.0, 3, 1.0,
                     "organ", "user")
    r = GoalResult(g, 20.0, True, 6.0)
    text = write_report(tmp_path, phantom, _dose(phantom), goal_results=[r]).read_text()
    assert "Parotid_L" in text and "1 of 1 goals met" in text


def test_report_does_not_touch_the_host_matplotlib_backend(phantom, tmp_path, monkeypatch):
    """A host application (a TPS) keeps its backend: no pyplot, no matplotlib.use."""
    import sys

    import matplotlib

    def no_use(*a, **k):
        raise AssertionError("report.py switched the matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", no_use)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing it fails
    before = matplotlib.rcParams._get("backend")  # raw: reading it must not resolve it
    text = write_report(tmp_path, phantom, _dose(phantom)).read_text()
    assert text.count("data:image/png;base64,") == 4
    assert matplotlib.rcParams._get("backend") == before


def test_report_shows_goal_ids_notes_plan_info_and_outlines(phantom, tmp_path):
    from atp.report import dose_wash_figure, structure_colours

    goals = [{"id": "Parotid_L.Dmean.pred", "structure": "Parotid_L", "metric": "Dmean",
              "unit": "Gy", "operator": "<=", "value": 24.0, "priority": 4, "achieved": 22.0,
              "passed": True, "margin": 2.0, "note": "patient-specific <sparing>"}]
    info = {"site": "hn", "institution overlay": "example_parotid_sparing",
            "predictor": "resunet", "backend": "cpu"}
    text = write_report(tmp_path, phantom, _dose(phantom), goal_results=goals,
                        plan_info=info).read_text()
    assert "Parotid_L.Dmean.pred" in text and "patient-specific &lt;sparing&gt;" in text
    for k, v in info.items():
        assert f"<td>{k}</td><td>{v}</td>" in text
    colours = structure_colours([f"s{i}" for i in range(20)])
    assert len(set(colours.values())) == 20  # distinct colours per structure
    views = dose_wash_figure(phantom, _dose(phantom))
    assert len(views) == 3 and all(v.startswith("data:image/png;base64,") for v in views)


def test_dose_views_draw_isodose_lines_and_outlines_where_they_are(phantom, monkeypatch):
    """The outlines land on their structure (contour and image share pixel centres)."""
    from matplotlib.axes import Axes

    from atp import report
    from atp.io.dicom_export_geometry import slice_layout

    calls = []
    real = Axes.contour

    def spy(self, *args, **kw):
        calls.append((args[0].copy(), kw.get("levels"), kw.get("colors")))
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "contour", spy)
    dose = _dose(phantom)
    report.dose_wash_figure(phantom, dose)
    colours = report.structure_colours(report._structures_for_plots(phantom))
    cord = [c for c in calls if c[2] == [colours["SpinalCord"]]]
    assert cord, "the spinal cord is outlined"
    # the axial plane's cord outline is drawn from the cord's own mask plane
    layout = slice_layout(phantom.grid)
    m = layout.reorient(phantom.mask("SpinalCord"))
    assert cord[0][0].sum() > 0 and cord[0][0].max() == 1.0
    assert m.any()
    iso = [c for c in calls if c[1] and c[1][0] > 1.0]  # dose levels in Gy
    assert {round(c[1][0], 1) for c in iso} >= {round(0.95 * 70, 1), round(0.5 * 70, 1)}
