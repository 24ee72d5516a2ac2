"""VMAT by direct machine-parameter optimisation (sequencer.dmpo, atp.vmatplan): every
optimised control point is deliverable (leaf travel per degree at full gantry speed, MU
per degree, minimum gap, leaf range, bank span), the projection onto the machine's leaf
polytope is feasible and a projection, the leaf/MU gradient of the goal-list objective
matches finite differences, DMPO lowers the objective, and the VMAT plan of
``atp.plan(technique='vmat')`` exports an RT Plan that ``atp dose`` recomputes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from arc_plan_checks import assert_dciodvfy_clean, assert_rt_plan_recomputes
from atp.sequencer.arc_model import ArcModel
from atp.sequencer.delivery import check_delivery
from atp.sequencer.dmpo import (
    DmpoOptions,
    LeafLimits,
    machine_limit_report,
    optimise_machine_parameters,
    project_leaves,
    repair,
)
from atp.sequencer.machine import load_machine

from atp import sequencer
from atp.errors import InputError


# --- the machine polytope (no dose) ---------------------------------------------------
def _limits(n_cp=30, spacing=4.0, machine="millennium120"):
    m = load_machine(machine)
    g = (180.0 + spacing * (np.arange(n_cp) + 0.5)) % 360.0
    return m, LeafLimits.of(g, m)


def test_projection_is_feasible_idempotent_and_no_farther_than_the_repair():
    m, lim = _limits()
    rng = np.random.default_rng(1)
    n_cp, n_pairs = 30, m.n_pairs
    for trial in range(5):
        a = rng.normal(-20, 25, size=(n_cp, n_pairs))
        b = a + rng.normal(5, 20, size=(n_cp, n_pairs))  # some crossed, some far apart
        pa, pb = project_leaves(a, b, lim, sweeps=40)
        assert lim.violation(pa, pb) <= 1e-9
        assert (pb - pa).min() >= m.min_leaf_gap_mm - 1e-9
        steps = np.abs(np.diff(pa, axis=0)).max(axis=1)
        assert np.all(steps <= lim.step + 1e-9)
        # a projection: a feasible point stays where it is
        qa, qb = project_leaves(pa, pb, lim)
        np.testing.assert_allclose(qa, pa, atol=1e-9)
        np.testing.assert_allclose(qb, pb, atol=1e-9)
        # and it moves the point no farther than the (feasible, not nearest) repair
        ra, rb = repair(a, b, lim)
        d_proj = np.sum((pa - a) ** 2 + (pb - b) ** 2)
        d_rep = np.sum((ra - a) ** 2 + (rb - b) ** 2)
        assert d_proj <= d_rep * (1 + 1e-6)


def test_limits_use_the_full_gantry_speed_travel():
    m, lim = _limits(spacing=4.0)
    np.testing.assert_allclose(lim.step, 4.0 * m.max_leaf_travel_per_deg_mm)
    assert m.max_leaf_travel_per_deg_mm < m.leaf_travel_limit_per_deg_mm


def test_bad_options_are_input_errors():
    with pytest.raises(InputError):
        DmpoOptions(iterations=-1)
    with pytest.raises(InputError):
        DmpoOptions(mu_weight=-0.1)
    from atp.vmatplan import VmatOptions

    with pytest.raises(InputError, match="unknown DMPO option"):
        VmatOptions(dmpo={"iters": 3})
    with pytest.raises(InputError):
        VmatOptions(collimator_deg=90.0)


# --- stage level: a small dual-arc problem on the phantom --------------------------------
@pytest.fixture(scope="module")
def arc_case(phantom):
    """Two arcs (10 deg control points) (collimator +-15 deg) on the phantom, CT/3 dose grid, the
    goal-list problem optimised, rule-based sequencing with the MU fitted."""
    from atp.optimizer.problem import build_problem, structure_fractions
    from atp.optimizer.solve import optimize
    from atp.predictor import registry as predictors

    from atp.dose.arc import ARC_THRESHOLD
    from atp.dose.pencil_beam import PencilBeamEngine
    from atp.goals import load_goal_list, resolve_goals, with_control_structures
    from atp.vmatplan import VmatOptions, goal_objective, vmat_arcs

    opts = VmatOptions(method="dmpo", spacing_deg=10.0)
    pred = predictors.get("baseline").predict(phantom)
    resolved = list(resolve_goals(load_goal_list(site="hn"), phantom, pred))
    # the objective these tests were written with: the mandible at its priority's weight
    # (the shipped list weighs it 10.5 since 2026-12-05). Which start DMPO takes lower in
    # 15 iterations depends on the objective: with 10.5 the sequencer's start ends lower
    # (1.73 vs 2.32), as it did on train pt_100 (BENCHMARKS: start=cg not the default)
    resolved = [replace(g, weight=10.0) if g.id == "Bone_Mandible.D0.1cc" else g
                for g in resolved]
    patient = with_control_structures(phantom, resolved)
    dij = PencilBeamEngine().influence(patient, vmat_arcs(opts), dose_grid_factor=3,
                                       threshold=ARC_THRESHOLD)
    problem = build_problem(resolved, patient, dij,
                            fractions=structure_fractions(patient, dij))
    res = optimize(problem, "cpu", None, max_iter=60, hard_rounds=1)
    delivery = sequencer.sequence(res.fluence, dij, "vmat", fractions=patient.fractions,
                                  passes=1)
    return {"dij": dij, "problem": problem, "res": res, "delivery": delivery,
            "J": goal_objective(problem, res.hard_state, far=dij.far), "patient": patient}


@pytest.fixture(scope="module")
def optimised(arc_case):
    out, info = optimise_machine_parameters(arc_case["delivery"], arc_case["dij"].beamlets,
                                            arc_case["J"], DmpoOptions(iterations=15))
    return out, info


def test_two_arcs_with_opposed_collimators(arc_case):
    d = arc_case["delivery"]
    assert [b.rotation_direction for b in d.beams] == ["CW", "CC"]
    assert sorted(round(float(b.collimator_deg)) for b in d.beams) == [15, 345]


def assert_machine_feasible(d, start=None):
    """Every control point of the VMAT delivery ``d`` within the machine's limits: leaf
    travel per degree at full gantry speed, minimum gap, leaf range, bank span, MU per
    degree, the dose rate (the gantry never has to slow below its slowest speed), and
    jaws inside their ranges (and, given the sequenced ``start``, where it put them:
    DMPO keeps the jaws)."""
    m = d.machine
    assert check_delivery(d) == []
    for k, b in enumerate(d.beams):
        dg = np.abs((np.diff(b.gantry_deg) + 180.0) % 360.0 - 180.0)
        travel = np.maximum(np.abs(np.diff(b.leaf_a_mm, axis=0)),
                            np.abs(np.diff(b.leaf_b_mm, axis=0))).max(axis=1)
        # leaf travel: what the leaves do while the gantry turns at full speed
        assert np.all(travel <= m.max_leaf_travel_per_deg_mm * dg + 1e-6)
        assert (b.leaf_b_mm - b.leaf_a_mm).min() >= m.min_leaf_gap_mm - 1e-9
        lo, hi = m.leaf_position_range_mm
        assert b.leaf_a_mm.min() >= lo - 1e-9 and b.leaf_b_mm.max() <= hi + 1e-9
        for x in (b.leaf_a_mm, b.leaf_b_mm):
            assert (x.max(axis=1) - x.min(axis=1)).max() <= m.max_leaf_span_mm + 1e-9
        dmu = np.diff(b.cumulative_mu) / d.fractions
        assert dmu.min() >= 0
        mu_deg = dmu / dg
        assert mu_deg.max() <= m.max_mu_per_deg * (1 + 1e-9)
        assert mu_deg.min() >= m.min_mu_per_deg * (1 - 1e-9)
        # dose rate: at the maximum dose rate the gantry need not slow below its minimum
        gantry_speed = dg / np.maximum(dmu / (m.max_dose_rate_mu_min / 60.0), 1e-12)
        assert np.all(np.minimum(gantry_speed, m.max_gantry_speed_deg_s)
                      >= m.slowest_gantry_speed_deg_s * (1 - 1e-9))
        for jaws, rngs in ((b.jaw_x_mm, (m.jaw_x1_range_mm, m.jaw_x2_range_mm)),
                           (b.jaw_y_mm, (m.jaw_y1_range_mm, m.jaw_y2_range_mm))):
            for i, (j_lo, j_hi) in enumerate(rngs):
                assert j_lo - 1e-9 <= jaws[:, i].min() and jaws[:, i].max() <= j_hi + 1e-9
        if start is not None:
            np.testing.assert_array_equal(b.jaw_x_mm, start.beams[k].jaw_x_mm)
            np.testing.assert_array_equal(b.jaw_y_mm, start.beams[k].jaw_y_mm)
    rep = machine_limit_report(d)
    assert all(r["max_travel_per_deg_mm"] <= r["travel_limit_per_deg_mm"] + 1e-6
               for r in rep.values())


def test_every_optimised_control_point_is_deliverable(arc_case, optimised):
    d, info = optimised
    assert info["kept"]
    assert_machine_feasible(d, arc_case["delivery"])


def test_a_bad_control_point_fails_the_feasibility_check(arc_case):
    """The check above can fail: one control point's leaves jump, or its MU exceed the
    MU per degree."""
    d = arc_case["delivery"]
    b0 = d.beams[0]
    a = b0.leaf_a_mm.copy()
    a[3] -= 60.0
    with pytest.raises(AssertionError):
        assert_machine_feasible(replace(d, beams=(replace(b0, leaf_a_mm=a),) + d.beams[1:]))
    cum = b0.cumulative_mu.copy()
    cum[4:] += 10.0 * d.machine.max_mu_per_deg * d.fractions * 10.0
    with pytest.raises(AssertionError):
        assert_machine_feasible(replace(d, beams=(replace(b0, cumulative_mu=cum),)
                                        + d.beams[1:]))


def test_the_leaves_and_mu_moved_and_the_objective_fell(arc_case, optimised):
    d0 = arc_case["delivery"]
    d, info = optimised
    h = info["history"]
    assert h[-1] < h[0]
    assert all(b <= a for a, b in itertools.pairwise(h))  # monotone: Armijo steps only
    moved = max(float(np.abs(b1.leaf_a_mm - b0.leaf_a_mm).max()) for b0, b1 in
                zip(d0.beams, d.beams))
    assert moved > 1.0
    # the reported objective is the objective of the returned delivery's dose
    w = sequencer.delivered_weights(d, arc_case["dij"].beamlets)
    assert arc_case["J"](w)[0] == pytest.approx(info["plan_objective_after"], rel=1e-4)


def test_dmpo_objective_is_the_reported_dose(arc_case, optimised):
    """The goal-list objective DMPO drives reads the dose the plan reports (sparse matrix
    plus the far-scatter tail): on the optimised delivery it equals the goal terms
    evaluated on ``deliverable_dose``; the sparse matrix alone falls short of it."""
    from atp.optimizer.objectives import evaluate_terms
    from atp.optimizer.solve import apply_state

    from atp.vmatplan import goal_objective

    dij, problem, res = arc_case["dij"], arc_case["problem"], arc_case["res"]
    assert dij.far is not None
    d, _ = optimised
    w = sequencer.delivered_weights(d, dij.beamlets)
    reported = np.asarray(sequencer.deliverable_dose(d, dij), np.float64).reshape(-1)
    rows = problem.on_rows(reported)
    model = goal_objective(problem, res.hard_state, dtype=np.float64, far=dij.far)
    near = goal_objective(problem, res.hard_state, dtype=np.float64)
    p = apply_state(problem, res.hard_state)
    arrays = [(t.rows, t.voxel_weight, t.ref_gy) for t in p.terms]
    j_rep = float(evaluate_terms(p.terms, arrays, rows)[0])
    assert model(w)[0] == pytest.approx(j_rep, rel=1e-4)
    assert abs(near(w)[0] - j_rep) > 1e-3 * j_rep  # the gap the tail closes
    # the dose itself: the tail is a visible part of it above 10 % of the maximum
    sparse = np.asarray(dij.matrix @ w.astype(np.float32), np.float64)
    hi = reported > 0.1 * reported.max()
    assert (reported[hi] - sparse[hi]).max() > 0.01 * reported.max()


def test_goal_objective_gradient_matches_finite_differences(arc_case):
    """The full chain: leaf tips and MU -> delivered weights -> dose -> goal-list J.
    Tongue and groove off: the tip gradient leaves its strips out (aperture_refine)."""
    from atp.vmatplan import goal_objective

    dij = arc_case["dij"]
    J = goal_objective(arc_case["problem"], arc_case["res"].hard_state, dtype=np.float64,
                       far=dij.far)
    d = arc_case["delivery"]
    m = replace(d.machine, tongue_groove_mm=0.0)
    md = ArcModel(d.beams[0], dij.beamlets, m, d.fractions, 4)

    def j_of(a, b, v):
        w = np.zeros(dij.n_beamlets)
        md.weights(a, b, v, w)
        return J(w)

    a, b, v = md.a0.copy(), md.b0.copy(), md.v0.copy()
    _, g_w = j_of(a, b, v)
    ga, gb, gv = md.grad(a, b, v, g_w)
    # the pairs whose tips matter most, away from kinks (beamlet edges, jaws)
    cand = np.argwhere((b - a > 6.0) & (np.abs(ga) > 0.05 * np.abs(ga).max()))
    assert cand.shape[0] >= 5
    checked = 0
    for k, p in cand[:: max(1, cand.shape[0] // 8)]:
        for arr, g in ((a, ga), (b, gb)):
            eps = 1e-3
            arr[k, p] += eps
            jp = j_of(a, b, v)[0]
            arr[k, p] -= 2 * eps
            jm = j_of(a, b, v)[0]
            arr[k, p] += eps
            fd = (jp - jm) / (2 * eps)
            assert fd == pytest.approx(g[k, p], rel=0.05, abs=1e-3 * np.abs(g).max())
            checked += 1
    assert checked >= 10
    for k in np.argsort(-np.abs(gv))[:5]:
        eps = 1e-3 * max(v[k], 1.0)
        v[k] += eps
        jp = j_of(a, b, v)[0]
        v[k] -= 2 * eps
        jm = j_of(a, b, v)[0]
        v[k] += eps
        # rel 2e-3: the dose-volume terms' sorted voxel sets make J piecewise smooth; its
        # central differences move by ~1e-3 relative between eps 1e-3 and 1e-4 here
        assert (jp - jm) / (2 * eps) == pytest.approx(gv[k], rel=2e-3)


def test_a_start_outside_the_travel_limit_is_refused(arc_case):
    d = arc_case["delivery"]
    b0 = d.beams[0]
    a = b0.leaf_a_mm.copy()
    a[3] -= 60.0  # one control point's bank A jumps 60 mm
    bad = replace(d, beams=(replace(b0, leaf_a_mm=a),) + d.beams[1:])
    with pytest.raises(ValueError, match="breaks the DMPO leaf limits"):
        optimise_machine_parameters(bad, arc_case["dij"].beamlets, arc_case["J"],
                                    DmpoOptions(iterations=1))


# --- planning floor: atp.plan(technique='vmat'), RT Plan export, `atp dose` ---------------
@pytest.fixture(scope="module")
def vmat_plan(phantom, tmp_path_factory):
    import atp

    p = atp.plan(phantom, predictor="baseline", technique="vmat", progress=False,
                 dose_grid_factor=3, optimizer_options={"max_iter": 60},
                 vmat_options={"method": "dmpo", "spacing_deg": 10.0,
                               "dmpo": {"iterations": 10}})
    out = tmp_path_factory.mktemp("vmat") / "plan"
    p.save(out, report=False, dicom=True)
    return p, out


def test_vmat_plan_is_dmpo_optimised_and_deliverable(vmat_plan):
    p, _ = vmat_plan
    d = p.delivery
    assert d.technique == "vmat" and len(d.beams) == 2
    assert d.meta["dmpo_kept"]
    assert d.meta["dmpo_objective_after"] < d.meta["dmpo_objective_before"]
    assert d.summary()["dmpo_iterations"] >= 1
    assert_machine_feasible(d)
    assert p.settings["technique"] == "vmat"
    assert 0 < d.meta["mu_per_cgy"] < 10


@pytest.mark.slow
def test_vmat_rt_plan_recomputes_to_the_plan_dose(vmat_plan, tmp_path, capsys):
    p, out = vmat_plan
    assert_rt_plan_recomputes(p, out, tmp_path, capsys)


@pytest.mark.slow
def test_vmat_rt_plan_passes_dciodvfy(vmat_plan):
    assert_dciodvfy_clean(vmat_plan[1])


def test_cli_bad_vmat_options_are_one_line_exit_2(tmp_path, capsys):
    from atp.cli import main

    for argv, needle in ((["--technique", "vmat", "--vmat", "spacing=6"], "spacing"),
                         (["--technique", "vmat", "--vmat", "dmpo.iters=3"], "iters"),
                         (["--technique", "vmat", "--vmat", "spacing_deg=30"], "spacing_deg"),
                         (["--vmat", "spacing_deg=6"], "--technique vmat"),
                         (["--fast", "--technique", "vmat"], "--fast")):
        out = tmp_path / f"p{len(needle)}{argv[-1][:4]}"
        assert main(["plan", "phantom", "--out", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_span_projection_is_the_nearest_row_within_the_span():
    from atp.sequencer.dmpo import _span_project

    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 60.0, size=(6, 9))
    x[0] = np.linspace(-10, 10, 9)  # already within the span: unchanged
    out = _span_project(x, 50.0)
    assert np.array_equal(out[0], x[0])
    assert np.all(out.max(axis=1) - out.min(axis=1) <= 50.0 + 1e-6)
    for row, got in zip(x[1:], out[1:]):  # brute force over the clip window
        grid = np.linspace(row.min() - 1, row.max() + 1, 4001)
        best = min(((row - np.clip(row, lo, lo + 50.0)) ** 2).sum() for lo in grid)
        assert ((row - got) ** 2).sum() <= best + 1e-3


def test_dmpo_rounds_raise_a_short_goals_weight_and_stay_deliverable(arc_case):
    """DMPO under optimize()'s attainment rules: a coverage goal the goal check reports
    short gets its weight doubled each round, DMPO continues from its last delivery,
    and every control point stays deliverable."""
    from atp.vmatplan import VmatOptions, dmpo_step

    p, res = arc_case["problem"], arc_case["res"]
    gid = next(b.goal.id for b in p.bindings if b.term_indices and b.goal.priority <= 3
               and b.goal.metric.kind == "D" and b.goal.operator == ">=")
    seen = []

    def check(w):
        seen.append(float(np.sum(w)))
        return [{"id": gid, "achieved": 0.0, "met": False, "violation": 1.0, "hard": False}]

    start = res.hard_state.get(gid, {}).get("weight_factor", 1.0)
    d, info = dmpo_step(p, res, arc_case["dij"], arc_case["delivery"],
                        VmatOptions(method="dmpo", spacing_deg=10.0, dmpo_rounds=2,
                                    dmpo={"iterations": 5}),
                        solve_options={"goal_check": check, "attain_weight_ids": (gid,)})
    assert info["solves"] == 3 and len(seen) == 3  # the first solve, then two rounds
    assert info["hard_state"][gid]["weight_factor"] == min(4.0 * start, 16.0)
    assert info["iterations"] > 5
    assert_machine_feasible(d)


# --- column generation: DMPO's start (sequencer.vmat_cg) ---------------------------------
def test_best_runs_is_the_most_negative_contiguous_sum():
    from atp.sequencer.vmat_cg import best_runs

    rng = np.random.default_rng(5)
    G = rng.normal(0.3, 1.0, size=(40, 12))
    G[3] = np.abs(G[3])  # no negative run: closed
    i, j, s = best_runs(G)
    for r in range(G.shape[0]):
        sums = [(G[r, a:b + 1].sum(), a, b) for a in range(12) for b in range(a, 12)]
        best = min(sums)
        if best[0] >= 0:
            assert i[r] == j[r] == -1 and s[r] == 0
        else:
            assert s[r] == pytest.approx(best[0])
            assert G[r, i[r]:j[r] + 1].sum() == pytest.approx(best[0])


def test_column_generation_options_are_checked():
    from atp.sequencer.vmat_cg import ColumnGenOptions

    from atp.vmatplan import VmatOptions

    for bad in ((8, 3, 1), (4, 2), (), (2, 4, 1)):  # levels
        with pytest.raises(InputError):
            ColumnGenOptions(levels=bad)
    for bad in ({"priced_levels": 0}, {"unpriced": "nearest"}, {"travel_fraction": 0.0}):
        with pytest.raises(InputError):
            ColumnGenOptions(**bad)
    with pytest.raises(InputError, match="vmat start"):
        VmatOptions(start="leaf-sweep")


def test_column_generation_builds_a_deliverable_arc_better_than_the_sequencer(arc_case):
    """The apertures priced on the goal-list gradient (levels 8, 4, 2; the last level
    interpolated) with their MU solved: every control point within the machine's limits,
    the objective far below the rule-based sequencing's, and DMPO lowers it further."""
    from atp.sequencer.deliverable import delivered_weights
    from atp.sequencer.vmat_cg import column_generation

    dij, d, J = arc_case["dij"], arc_case["delivery"], arc_case["J"]
    out, info = column_generation(d, dij.beamlets, J)
    assert_machine_feasible(out, d)
    j_seq = J(delivered_weights(d, dij.beamlets, n_sub=4))[0]
    j_cg = J(delivered_weights(out, dij.beamlets, n_sub=4))[0]
    assert j_cg == pytest.approx(info["objective"], rel=1e-6)
    assert j_cg < 0.1 * j_seq
    _, i_seq = optimise_machine_parameters(d, dij.beamlets, J, DmpoOptions(iterations=15))
    _, i_cg = optimise_machine_parameters(out, dij.beamlets, J, DmpoOptions(iterations=15))
    # DMPO improves the column-generation start too. Which start ends lower after 15
    # iterations depends on the case (here, since the solvers iterate on the grouped
    # scatter tail, the sequencer's: 1.81 vs 2.43, from 76.8 and 3.53; train pt_100 the
    # same; BENCHMARKS: start=cg is not the default), so it is not asserted
    assert i_cg["objective_after"] < j_cg
    assert i_seq["objective_after"] < j_seq
