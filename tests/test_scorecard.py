"""Scorecards: the shipped H&N card's scores against hand-computed values, the file
checks (one line naming file, line and field; exit 2), and ``atp scorecard`` on a plan."""

from __future__ import annotations

import numpy as np
import pytest

from atp.cli import main
from atp.scorecard import load_scorecard


@pytest.fixture(scope="module")
def phantom_dose(phantom):
    """Uniform, hand-set dose per structure (phantom masks: PTV_70 and PTV_56 disjoint;
    the parotids overlap the mandible, so the mandible is set first)."""
    d = np.zeros(phantom.grid.shape, np.float32)
    for name, gy in (("Bone_Mandible", 10.0), ("SpinalCord", 47.0), ("Brainstem", 52.0),
                     ("Parotid_L", 23.0), ("Parotid_R", 45.0), ("Larynx", 39.5),
                     ("PTV_70", 70.0), ("PTV_56", 54.0)):
        d[phantom.mask(name)] = gy
    return d


def test_hn_scores_match_hand_computed_values(phantom, phantom_dose):
    res = load_scorecard("hn").evaluate(phantom, phantom_dose)
    s = {r["id"]: r["score"] for r in res["items"]}
    # cord D0.1cc 47 Gy between (45, 9) and (50, 3): 9 - 2/5 * 6 = 6.6
    assert s["cord_max"] == pytest.approx(6.6)
    # brainstem 52 Gy between (50, 10) and (54, 7): 10 - 2/4 * 3 = 8.5
    assert s["brainstem_max"] == pytest.approx(8.5)
    # parotid L mean 23 between (20, 5) and (26, 3): 5 - 3/6 * 2 = 4.0; R 45 > 40: 0
    assert s["parotid_L_mean"] == pytest.approx(4.0)
    assert s["parotid_R_mean"] == 0.0
    # larynx mean 39.5 between (35, 5) and (44, 3): 5 - 4.5/9 * 2 = 4.0
    assert s["larynx_mean"] == pytest.approx(4.0)
    # PTV_70 uniform 70 Gy: full D95 (12), D99 (8, beyond the last point), hot spot (5)
    assert (s["PTV70_D95"], s["PTV70_D99"], s["PTV70_hot"]) == (12.0, 8.0, 5.0)
    # PTV_56 uniform 54 Gy between (52.08, 4) and (56, 8): 4 + 1.92/3.92 * 4
    assert s["PTV56_D95"] == pytest.approx(4 + 1.92 / 3.92 * 4)
    # the phantom has no PTV_63: not scored, and its 8 points leave the maximum
    ptv63 = next(r for r in res["items"] if r["id"] == "PTV63_D95")
    assert ptv63["value"] is None and ptv63["score"] is None
    assert res["max_total"] == pytest.approx(sum(r["max"] for r in res["items"]) - 8)
    assert res["total"] == pytest.approx(sum(v for v in s.values() if v is not None))


@pytest.mark.parametrize("body, where, what", [
    (("items:\n  - id: a\n    structure: SpinalCord\n    metric: D0.1cc\n"
     "    points: [[45, 5], [40, 0]]\n    max: 5\n"), ":5", "items[0].points[1]"),
    (("items:\n  - id: a\n    structure: SpinalCord\n    metric: D7x\n"
     "    points: [[40, 5], [45, 0]]\n    max: 5\n"), ":4", "items[0].metric"),
    (("items:\n  - id: a\n    structure: SpinalCord\n    metric: Dmax\n"
     "    points: [[40, 9], [45, 0]]\n    max: 5\n"), ":5", "items[0].points[0]"),
    (("items:\n  - id: a\n    structure: SpinalCord\n    metric: Dmax\n"
     "    points: [[40, 5], [45, 0]]\n    max: 5\n    colour: red\n"), ":7",
     "items[0].colour"),
    ("title: x\n", "", "items"),
])
def test_bad_scorecard_is_exit_2_naming_file_line_and_field(tmp_path, capsys, body, where,
                                                            what):
    f = tmp_path / "card.yaml"
    f.write_text(body)
    rc = main(["scorecard", str(tmp_path), "--scorecard", str(f)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert f"{f}{where}" in err and f"field '{what}'" in err


def test_unknown_scorecard_name_is_exit_2(tmp_path, capsys):
    assert main(["scorecard", str(tmp_path), "--scorecard", "nosuchsite"]) == 2
    assert "unknown scorecard 'nosuchsite'" in capsys.readouterr().err
