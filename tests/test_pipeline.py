"""The planning pipeline, plan directory, re-plans and the plan/replan CLI on the phantom.

Most tests use a toy dose-influence matrix (``atp.optimizer.testing.toy_dij``; the ``toy``
and ``base_plan`` fixtures of conftest.py) so they do not depend on the dose engine's
speed; one slow test runs the real pencil-beam engine.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import atp
from atp.cli import main
from atp.pipeline import apply_settings, load_plan


def _result(plan, gid):
    return next(r for r in plan.results if r.goal.id == gid)


def test_plan_has_every_goal_dose_and_timings(base_plan, phantom):
    p = base_plan
    assert p.dose_gy.shape == phantom.grid.shape
    assert p.predicted_dose_gy.shape == phantom.grid.shape
    assert np.all(p.fluence >= 0)
    assert len(p.results) == len(p.resolved_goals) > 10
    assert p.backend == "cpu"
    for stage in ("predict dose", "resolve goals", "build problem", "optimise (cpu)",
                  "final dose", "evaluate", "total"):
        assert stage in p.timings_s
    # the plan is a real optimisation: targets get most of their prescription
    assert _result(p, "PTV_70.D95%").achieved > 0.85 * 70


def test_save_and_load_roundtrip(base_plan, tmp_path):
    out = base_plan.save(tmp_path / "plan")
    for f in ("plan.json", "dose.npy", "predicted_dose.npy", "fluence.npz", "dij.npz"):
        assert (out / f).is_file()
    data = json.loads((out / "plan.json").read_text())
    g = data["goals"][0]
    for key in ("id", "value", "achieved", "passed", "objective_value", "priority"):
        assert key in g
    assert data["backend"] == "cpu" and "timings_s" in data and "versions" in data
    assert data["dvh_metrics"]
    loaded = load_plan(out)
    np.testing.assert_allclose(loaded.dose_gy, base_plan.dose_gy)
    assert [r.goal.id for r in loaded.results] == [r.goal.id for r in base_plan.results]
    assert [r.passed for r in loaded.results] == [r.passed for r in base_plan.results]


def test_tightening_a_parotid_goal_lowers_its_mean_dose(base_plan):
    before = _result(base_plan, "Parotid_L.Dmean").achieved
    tighter = atp.replan(base_plan, set={"Parotid_L.Dmean.tolerance": -40}, warm=True)
    g = next(g for g in tighter.resolved_goals if g.id == "Parotid_L.Dmean.pred")
    assert g.tolerance_pct == -40
    assert g.value == pytest.approx(g.predicted_value * 0.6)
    after = _result(tighter, "Parotid_L.Dmean").achieved
    assert after < before - 0.5


def test_warm_replan_reuses_dij_and_is_recorded(base_plan):
    new = atp.replan(base_plan, set={"Parotid_R.Dmean.tolerance": -30}, warm=True)
    assert new.dij is base_plan.dij
    assert new.settings["replan_of"]["warm"] is True
    assert "replan" in new.timings_s
    # a sequenced plan's warm re-plan reuses its sequencing loss: one sequencing, no
    # correction rounds; a cold re-plan runs them again
    assert base_plan.delivery is not None and "sequence" in new.timings_s
    assert "deliverable correction" not in new.timings_s
    assert new.delivery is not None and new.ideal_dose_gy is not None


def test_apply_settings_errors_name_the_goal(base_plan):
    with pytest.raises(atp.InputError, match="no goal 'Nope.Dmean'"):
        apply_settings(base_plan.resolved_goals, {"Nope.Dmean.tolerance": -5})
    with pytest.raises(atp.InputError, match="field one of"):
        apply_settings(base_plan.resolved_goals, {"Parotid_L.Dmean.colour": 1})
    with pytest.raises(atp.InputError, match="not a predicted goal"):
        apply_settings(base_plan.resolved_goals, {"PTV_70.D95%.tolerance": -5})


def test_import_atp_stays_light():
    import subprocess
    import sys

    code = ("import sys, atp; heavy = [m for m in ('atp.optimizer', 'atp.predictor', "
            "'atp.sequencer', 'cvxpy', 'torch') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# --- CLI ------------------------------------------------------------------------------
def test_cli_plan_and_replan(tmp_path, toy, capsys):
    dij = tmp_path / "toy_dij.npz"
    toy.save(dij)
    out = tmp_path / "p1"
    rc = main(["plan", "phantom", "--site", "hn", "--predictor", "baseline", "--dij", str(dij),
               "--backend", "cpu", "--max-iter", "120", "--quiet", "--out", str(out)])
    assert rc in (0, 3)
    stdout = capsys.readouterr().out
    assert "plan written to" in stdout and "goals met:" in stdout
    assert (out / "plan.json").is_file()
    before = next(g for g in json.loads((out / "plan.json").read_text())["goals"]
                  if g["id"] == "Parotid_L.Dmean")["achieved"]
    out2 = tmp_path / "p2"
    rc = main(["replan", str(out), "--set", "Parotid_L.Dmean.tolerance=-40", "--warm",
               "--quiet", "--json", "--out", str(out2)])
    assert rc in (0, 3)
    summary = json.loads(capsys.readouterr().out)
    assert summary["backend"] == "cpu"
    after = next(g for g in json.loads((out2 / "plan.json").read_text())["goals"]
                 if g["id"] == "Parotid_L.Dmean")["achieved"]
    assert after < before


def test_cli_gpu_without_gpu_exits_nonzero(tmp_path, capsys):
    from atp.optimizer import registry

    if registry.get("gpu").available():
        pytest.skip("a GPU is present")
    rc = main(["plan", "phantom", "--predictor", "baseline", "--backend", "gpu",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "gpu" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_replan_bad_set_is_exit_2(tmp_path, base_plan, capsys):
    base_plan.save(tmp_path / "p")
    rc = main(["replan", str(tmp_path / "p"), "--set", "Parotid_L.Dmean.tolerance"])
    assert rc == 2
    assert "GOAL.FIELD=VALUE" in capsys.readouterr().err


def test_cli_infeasible_p1_goal_exit_3(tmp_path, toy, capsys):
    """A hard goal that cannot be met is reported with the amount it misses by."""
    gl = tmp_path / "hard.yaml"
    gl.write_text(
        "site: hn\n"
        "goals:\n"
        "  - {structure: PTV_70, metric: D95%, operator: '>=', value: 70, priority: 1}\n"
        "  - {structure: PTV_70, metric: Dmax, operator: '<=', value: 60, priority: 1}\n")
    rc = main(["plan", "phantom", "--goal-list", str(gl), "--predictor", "baseline",
               "--dij", str(_save(toy, tmp_path)), "--backend", "cpu", "--max-iter", "80",
               "--quiet", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 3
    # D95 >= 70 Gy and Dmax <= 60 Gy on the same target cannot both hold
    assert re.search(r"priority-1 goal PTV_70\.\S+ cannot be met: .*misses by", err)
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert data["summary"]["hard_unmet"]
    assert all(u["misses_by"] > 0 for u in data["summary"]["hard_unmet"])


def _save(dij, tmp_path):
    f = tmp_path / "dij.npz"
    if not f.exists():
        dij.save(f)
    return f


# --- the real engine, end to end ---------------------------------------------------------
@pytest.mark.slow
def test_pipeline_end_to_end_with_pencil_beam(phantom, tmp_path):
    plan = atp.plan(phantom, site="hn", predictor="baseline", backend="cpu", beams=5,
                    progress=False, optimizer_options={"max_iter": 100})
    assert plan.settings["dose_engine"] == "pencil-beam"
    assert plan.dij.beamlets.n_beams == 5
    assert _result(plan, "PTV_70.D95%").achieved > 0.85 * 70
    plan.save(tmp_path / "plan")
    assert (tmp_path / "plan" / "dij.npz").is_file()


@pytest.mark.slow
def test_readme_embedding_example_runs(run_readme_example):
    out = run_readme_example("embedding-example")
    assert (out / "results" / "embedded-plan" / "plan.json").is_file()


# --- sequencing is the default ------------------------------------------------------------
def test_cli_plan_is_sequenced_by_default_and_sequencer_selectable(tmp_path, toy, capsys):
    dij = _save(toy, tmp_path)
    common = ["plan", "phantom", "--predictor", "baseline", "--dij", str(dij), "--backend",
              "cpu", "--max-iter", "60", "--quiet", "--no-report"]
    rc = main(common + ["--out", str(tmp_path / "default")])
    assert rc in (0, 3)
    data = json.loads((tmp_path / "default" / "plan.json").read_text())
    assert data["delivery"]["technique"] == "imrt-sliding"
    assert data["fidelity"] is not None
    rc = main(common + ["--sequencer", "imrt-sns", "--out", str(tmp_path / "sns")])
    assert rc in (0, 3)
    data = json.loads((tmp_path / "sns" / "plan.json").read_text())
    assert data["delivery"]["technique"] == "imrt-sns"
    rc = main(common + ["--no-sequence", "--out", str(tmp_path / "ideal")])
    assert rc in (0, 3)
    data = json.loads((tmp_path / "ideal" / "plan.json").read_text())
    assert data["delivery"] is None and any("not sequenced" in n for n in data["notes"])
    capsys.readouterr()
    rc = main(common + ["--sequencer", "tomotherapy", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert "--sequencer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
