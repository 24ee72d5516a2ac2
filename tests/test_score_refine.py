"""Scorecard refinement (``--refine scorecard[:N]``, atp.score_refine) on the phantom with a
toy dose-influence matrix: the total never falls below the goal-list plan's, every round
is in plan.json, a round that breaks a priority-1 goal is never kept; the option parser's
errors; ``atp batch`` re-scores (does not re-plan) when only the scorecard changes."""

from __future__ import annotations

import csv
import json
from dataclasses import replace as dc_replace

import numpy as np
import pytest

import atp
from atp import pipeline
from atp.cli import main
from atp.errors import InputError
from atp.refine_spec import RefineSpec, parse_refine
from atp.score_refine import refine_plan
from atp.scorecard import item_objective, load_scorecard

FAST = {"max_iter": 150}


@pytest.fixture(scope="module")
def toy(phantom):
    from atp.optimizer.testing import toy_dij

    return toy_dij(phantom, n_beams=5, factor=2)


@pytest.fixture(scope="module")
def goal_list_plan(phantom, toy):
    return atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, optimizer_options=FAST)


@pytest.fixture(scope="module")
def refined(goal_list_plan):
    return refine_plan(goal_list_plan, 2, "hn", replan=pipeline.replan)


def _total(plan):
    return load_scorecard("hn").evaluate(plan.patient, plan.dose_gy)["total"]


def test_total_never_below_the_goal_list_plan_and_p1_goals_kept(goal_list_plan, refined):
    rec = refined.optimizer["refine"]
    start = _total(goal_list_plan)
    assert rec["scores"][0] == pytest.approx(start, abs=1e-3)
    assert _total(refined) >= start - 1e-6
    assert rec["total"] == pytest.approx(_total(refined), abs=1e-3)
    assert rec["total"] == pytest.approx(max(s for s, k in zip(
        rec["scores"], [True, *rec["accepted"]]) if k), abs=1e-3)
    met = {r.goal.id for r in goal_list_plan.results if r.goal.priority == 1 and r.passed}
    assert met  # the phantom's cord and brainstem limits are met
    assert all(r.passed for r in refined.results if r.goal.id in met)
    # the plan keeps the goal-list plan's settings (not a re-plan)
    assert "replan_of" not in refined.settings


def test_every_round_is_recorded_in_plan_json(refined, tmp_path):
    refined.save(tmp_path / "p", report=True)
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    rec = data["optimizer"]["refine"]
    assert rec["mode"] == "scorecard" and rec["scorecard"] == "hn"
    assert rec["rounds_run"] >= 1 and len(rec["rounds"]) == rec["rounds_run"] + 1
    r1 = rec["rounds"][1]
    assert r1["n_objectives"] > 0 and r1["seconds"] > 0
    assert {"dvh"} <= {o["source"] for o in r1["objectives"]}
    assert any(o["source"].startswith("scorecard:") for o in r1["objectives"])
    assert set(r1["scores"]) == {it.id for it in load_scorecard("hn").items}
    assert "refine_scorecard" in data["timings_s"]
    assert "Scorecard refinement" in (tmp_path / "p" / "report.html").read_text()
    atp.load_plan(tmp_path / "p")  # reads back


def test_a_round_that_breaks_a_priority_1_goal_is_not_kept(goal_list_plan, phantom):
    """A re-plan (stubbed) that spares the parotids, larynx and oesophagus completely
    raises the total but takes the cord over its priority-1 limit: never kept."""
    from atp.goals import evaluate_goals

    cord = next(r for r in goal_list_plan.results if r.goal.id == "SpinalCord.D0.1cc")

    def bad_replan(plan, **kw):
        d = np.array(plan.dose_gy, copy=True)
        targets = np.any([phantom.mask(t) for t in phantom.targets], axis=0)
        for name in ("Parotid_L", "Parotid_R", "Larynx", "Esophagus"):
            if name in phantom.structures:
                d[phantom.mask(name) & ~targets] *= 0.2
        d[phantom.mask("SpinalCord")] = cord.goal.value + 0.5
        new = dc_replace(plan, dose_gy=d, optimizer=dict(plan.optimizer),
                         results=evaluate_goals(plan.resolved_goals, plan.patient, d))
        return new

    assert cord.passed and cord.goal.priority == 1
    out = refine_plan(goal_list_plan, 3, "hn", replan=bad_replan)
    rec = out.optimizer["refine"]
    assert rec["rounds"][1]["total"] > rec["rounds"][0]["total"]  # the score rose ...
    assert rec["accepted"] == [False]  # ... but the round broke the cord limit
    assert "SpinalCord.D0.1cc" in rec["rounds"][1]["broke_p1"]
    assert rec["stopped"] == "a round broke a priority-1 goal"
    assert np.array_equal(out.dose_gy, goal_list_plan.dose_gy)


def test_item_objective_aims_at_the_next_better_score_point():
    card = load_scorecard("hn")
    items = {it.id: it for it in card.items}
    # parotid mean 30 Gy (between 26 -> 3 and 40 -> 0): next better point 26 Gy, aimed
    # 1 Gy below it, within AIRTP's margin (max(0.85 x 30, 30 - 7) = 25.5)
    o = item_objective(items["parotid_L_mean"], 30.0)
    assert (o["kind"], o["dose_gy"], o["next_point"]) == ("mean_max", 25.5, [26.0, 3.0])
    # slope 3/14 per Gy at score 2.357: 60 + (3/14) x 20 / (1 + e^(2.357/3))
    assert o["priority"] == pytest.approx(60 + 3 / 14 * 20 / (1 + np.exp(
        items["parotid_L_mean"].score(30.0) / 3)), abs=0.01)
    # cord D0.1cc 47 Gy: next better point 45 -> 44 Gy, a max objective
    o = item_objective(items["cord_max"], 47.0)
    assert (o["kind"], o["dose_gy"]) == ("max", 44.0)
    # coverage D95% 64 Gy of PTV_70: next better point 65.1, a lower dose-volume objective
    o = item_objective(items["PTV70_D95"], 64.0)
    assert (o["kind"], o["volume"], o["dose_gy"]) == ("dv_min", 0.95, 65.1)
    # full score: a holding objective at the edge of the full score (cord 40 Gy)
    o = item_objective(items["cord_max"], 39.0)
    assert (o["kind"], o["dose_gy"], o["hold"]) == ("max", 40.0, True)
    o = item_objective(items["PTV70_D95"], 70.5)
    assert (o["kind"], o["dose_gy"], o["hold"]) == ("dv_min", 70.0, True)


@pytest.mark.parametrize("value, spec", [
    (None, RefineSpec("dvh", 0)), (3, RefineSpec("dvh", 3)), ("2", RefineSpec("dvh", 2)),
    ("dvh:4", RefineSpec("dvh", 4)), ("scorecard", RefineSpec("scorecard", 3)),
    ("scorecard:5", RefineSpec("scorecard", 5))])
def test_refine_values(value, spec):
    assert parse_refine(value) == spec


@pytest.mark.parametrize("value", ["scorecard:x", "scorecard:", "foo:2", "dvh", "-1",
                                   "scorecard:21", "dvh:2.5", True])
def test_bad_refine_values_raise_naming_the_option(value):
    with pytest.raises(InputError) as e:
        parse_refine(value)
    assert e.value.field == "--refine"


@pytest.mark.parametrize("extra, field", [
    (["--refine", "scorecard:x"], "--refine"), (["--refine", "banana"], "--refine"),
    (["--refine", "scorecard:2", "--scorecard", "nosuchcard"], "--scorecard")])
def test_bad_refine_options_are_one_line_exit_2_nothing_written(tmp_path, capsys, extra,
                                                               field):
    out = tmp_path / "out"
    rc = main(["plan", "phantom", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and field in err
    assert not out.exists()


def test_old_integer_refine_setting_still_loads(goal_list_plan, tmp_path):
    goal_list_plan.save(tmp_path / "p", report=False)
    pj = tmp_path / "p" / "plan.json"
    data = json.loads(pj.read_text())
    for value in (2, "scorecard:3"):
        data["settings"]["refine"] = value
        pj.write_text(json.dumps(data))
        assert atp.load_plan(tmp_path / "p").settings["refine"] == value


# --- atp batch: a new scorecard re-scores, it does not re-plan ------------------------------
def test_batch_rescored_not_replanned_when_only_the_scorecard_changes(tmp_path, toy):
    toy.save(tmp_path / "toy.npz")
    (tmp_path / "cohort.csv").write_text("patient,name\nphantom,a\n")
    card = tmp_path / "card.yaml"
    card.write_text("scorecard: mine\nitems:\n  - id: cord\n    structure: SpinalCord\n"
                    "    metric: D0.1cc\n    points: [[0, 7], [100, 0]]\n    max: 7\n")
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "cohort.csv"), "--out", str(out), "--dij",
            str(tmp_path / "toy.npz"), "--predictor", "baseline", "--backend", "cpu",
            "--max-iter", "100", "--no-sequence", "--no-report", "--quiet", "--workers", "1"]
    assert main([*args, "--scorecard", "hn"]) in (0, 3)
    mtime = (out / "a" / "plan.json").stat().st_mtime_ns
    with open(out / "summary.csv", newline="") as fh:
        before = next(csv.DictReader(fh))
    assert main([*args, "--scorecard", str(card)]) in (0, 3)
    batch = json.loads((out / "batch.json").read_text())
    assert batch["planned_now"] == 0 and batch["resumed"] == ["a"]
    assert (out / "a" / "plan.json").stat().st_mtime_ns == mtime
    with open(out / "summary.csv", newline="") as fh:
        after = next(csv.DictReader(fh))
    assert float(after["score_max"]) == 7.0 != float(before["score_max"])
    assert "score:cord" in after and "score:cord_max" not in after


def test_batch_options_hash_holds_the_scorecard_only_when_it_shapes_the_plan(tmp_path):
    from atp.batch import options_hash, plan_scorecard

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x: 1\n")
    b.write_text("x: 2\n")
    plain = {"site": "hn", "refine": None}
    scored = {"site": "hn", "refine": "scorecard:2"}
    assert options_hash(plain, plan_scorecard(plain, str(a))) == \
        options_hash(plain, plan_scorecard(plain, str(b)))
    assert options_hash(scored, plan_scorecard(scored, str(a))) != \
        options_hash(scored, plan_scorecard(scored, str(b)))


def test_batch_with_refine_scorecard_records_the_start_and_final_totals(tmp_path, toy):
    toy.save(tmp_path / "toy.npz")
    (tmp_path / "cohort.csv").write_text("patient,name\nphantom,a\n")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "cohort.csv"), "--out", str(out), "--dij",
                 str(tmp_path / "toy.npz"), "--predictor", "baseline", "--backend", "cpu",
                 "--max-iter", "100", "--no-sequence", "--no-report", "--quiet",
                 "--workers", "1", "--refine", "scorecard:1"]) in (0, 3)
    with open(out / "summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["score_total"]) >= float(row["refine:score_start"])
    assert row["refine:rounds_kept"] in ("0", "1")
    assert json.loads((out / "a" / "plan.json").read_text())["settings"]["refine"] == \
        "scorecard:1"
