"""Optimiser maths and backends on tiny synthetic problems (no dose engine needed)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from atp.optimizer import registry
from atp.optimizer.objectives import (
    PENALTIES,
    dose_at_volume,
    evaluate_terms,
    make_term,
    smoothness_pairs,
)
from atp.optimizer.problem import build_problem
from atp.optimizer.refine import goal_score, refine, tightened_dose
from atp.optimizer.solve import optimize
from atp.optimizer.testing import problem_bank

from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.errors import BackendUnavailableError, InputError
from atp.goals.model import Metric, ResolvedGoal
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure

FIRST_ORDER = [("cpu", "lbfgs"), ("cpu", "apg")]


def installed_backends():
    out = [("cpu", {"method": "lbfgs"}), ("cpu", {"method": "apg"})]
    if registry.get("qp").is_installed():
        out.append(("qp", {}))
        if "CLARABEL" in registry.get("qp").solvers():
            out.append(("qp", {"solver": "CLARABEL"}))
    if registry.get("gpu").available():
        out.append(("gpu", {"method": "lbfgs"}))
    return out


# --- objective terms ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PENALTIES))
def test_term_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(1)
    n = 40
    d = rng.uniform(10, 70, n)
    vw = rng.uniform(0.2, 1.0, n)
    term = make_term(kind, np.arange(n), vw, 40.0, 2.5, volume=0.3)
    d32 = d.astype(np.float64)
    total, grad, _ = evaluate_terms([term], [(np.arange(n), vw, 40.0)], d32)
    eps = 1e-6
    for i in rng.choice(n, 8, replace=False):
        e = np.zeros(n)
        e[i] = eps
        fp, _, _ = evaluate_terms([term], [(np.arange(n), vw, 40.0)], d32 + e)
        fm, _, _ = evaluate_terms([term], [(np.arange(n), vw, 40.0)], d32 - e)
        assert grad[i] == pytest.approx((fp - fm) / (2 * eps), rel=1e-4, abs=1e-9)
    assert total >= 0


def test_max_term_is_zero_below_reference_and_normalised():
    t = make_term("max", [0, 1], [1.0, 1.0], 50.0, 1.0)
    d = np.array([40.0, 60.0])
    v, g, _ = evaluate_terms([t], [(np.array([0, 1]), np.ones(2), 50.0)], d)
    # (60-50)^2 / (W=2 * 50^2)
    assert float(v) == pytest.approx(100 / 5000)
    assert g[0] == 0 and g[1] > 0


def test_dose_at_volume_weighted():
    d = np.array([10.0, 20.0, 30.0, 40.0])
    vw = np.ones(4)
    assert float(dose_at_volume(d, vw, 0.25)) == 40.0
    assert float(dose_at_volume(d, vw, 0.5)) == 30.0
    assert float(dose_at_volume(d, vw, 1.0)) == 10.0
    # a hot voxel with a tiny weight does not count as 25 % of the volume
    assert float(dose_at_volume(d, np.array([1, 1, 1, 0.1]), 0.25)) == 30.0


def test_dv_penalty_selects_only_voxels_between_ref_and_dv():
    d = np.array([10.0, 20.0, 30.0, 40.0])
    t = make_term("dv_max", np.arange(4), np.ones(4), 15.0, 1.0, volume=0.5)  # D50% <= 15
    _, g, _ = evaluate_terms([t], [(np.arange(4), np.ones(4), 15.0)], d)
    # D50% = 30: voxels with 15 < d <= 30 are pushed down; the hottest (40) is let go
    assert g[0] == 0 and g[1] > 0 and g[2] > 0 and g[3] == 0


def test_smoothness_pairs_neighbours_only_within_a_beam():
    beam = [0, 0, 0, 0, 1, 1]
    x = [0, 5, 0, 5, 0, 5]
    y = [0, 0, 5, 5, 0, 0]
    pairs = {tuple(p) for p in smoothness_pairs(beam, x, y, (5.0, 5.0)).tolist()}
    assert pairs == {(0, 1), (2, 3), (0, 2), (1, 3), (4, 5)}


# --- the bank of problems with known optima, against every installed backend --------------
@pytest.mark.parametrize("backend,opts", installed_backends(),
                         ids=lambda v: v if isinstance(v, str) else str(v.get("method",
                                                                               v.get("solver", ""))))
@pytest.mark.parametrize("case", problem_bank(), ids=lambda c: c.name)
def test_bank(case, backend, opts):
    extra = {"max_iter": 5000, "tol": 1e-9} if backend in ("cpu", "gpu") else {}
    res = optimize(case.problem, backend, **opts, **extra)
    assert res.status in ("optimal", "max_iter", "inaccurate")
    assert res.objective == pytest.approx(case.optimum, rel=2e-3, abs=1e-5)
    if case.fluence is not None:
        np.testing.assert_allclose(res.fluence, case.fluence, rtol=5e-3, atol=5e-3 * max(
            1.0, float(np.max(case.fluence))))
    assert np.all(res.fluence >= 0)


# --- a small patient, built in code ---------------------------------------------------------
def small_case(hard_oar_max=None):
    """A 6x10x10 voxel patient, two 5x5 beamlet beams, a target and an organ."""
    shape = (6, 10, 10)
    g = Grid(shape, (3.0, 3.0, 3.0))
    z, y, x = np.indices(shape)
    ptv = (abs(y - 5) <= 2) & (abs(x - 5) <= 2) & (z >= 1) & (z <= 4)
    oar = (x >= 8) & (abs(y - 5) <= 2)
    cols, bi, bx, by = [], [], [], []
    for b in range(2):
        for i in range(5):
            for j in range(5):
                if b == 0:
                    prof = np.exp(-((y - (3 + j)) ** 2 + (z - (1 + i)) ** 2) / 1.5) * np.exp(
                        -0.05 * x)
                else:
                    prof = np.exp(-((x - (3 + j)) ** 2 + (z - (1 + i)) ** 2) / 1.5) * np.exp(
                        -0.05 * y)
                cols.append((prof * (prof > 0.05)).ravel() * 0.01)
                bi.append(b)
                bx.append(i * 5.0)
                by.append(j * 5.0)
    M = sp.csc_matrix(np.stack(cols, 1).astype(np.float32))
    info = BeamletInfo(bi, [0, 90], [0, 0], [0, 0], np.zeros((2, 3)), bx, by, (5.0, 5.0))
    dij = DoseInfluence(M, info, g)
    patient = Patient(np.zeros(shape), g, {
        "External": Structure("External", np.ones(shape, bool), Role.EXTERNAL),
        "PTV": Structure("PTV", ptv, Role.TARGET),
        "OAR": Structure("OAR", oar, Role.ORGAN)}, (Prescription("PTV", 60, 30),))

    def goal(gid, struct, metric, op, value, prio, weight, kind):
        return ResolvedGoal(gid, struct, metric, op, value, prio, weight, kind, "user")

    goals = [goal("PTV.Dmin", "PTV", Metric("Dmin", "Dmin", "Gy"), ">=", 57, 2, 10.0, "target"),
             goal("PTV.Dmax", "PTV", Metric("Dmax", "Dmax", "Gy"), "<=", 63, 2, 10.0, "target"),
             goal("OAR.Dmean", "OAR", Metric("Dmean", "Dmean", "Gy"), "<=", 15, 3, 1.0,
                  "organ")]
    if hard_oar_max is not None:
        goals.append(goal("OAR.Dmax", "OAR", Metric("Dmax", "Dmax", "Gy"), "<=", hard_oar_max,
                          1, 100.0, "organ"))
    return patient, dij, goals


@pytest.mark.skipif(not registry.get("qp").is_installed(), reason="cvxpy/osqp not installed")
def test_cpu_matches_qp_on_small_convex_case():
    patient, dij, goals = small_case()
    prob = build_problem(goals, patient, dij)
    assert {t.kind for t in prob.terms} <= {"max", "min", "mean_max"}  # convex terms only
    cpu = optimize(prob, "cpu", max_iter=3000, tol=1e-9)
    qp = optimize(prob, "qp")
    assert qp.status == "optimal"
    assert cpu.objective == pytest.approx(qp.objective, rel=5e-3)


def test_hard_goal_loop_meets_a_feasible_p1_goal():
    patient, dij, goals = small_case(hard_oar_max=30.0)
    prob = build_problem(goals, patient, dij)
    res = optimize(prob, "cpu", max_iter=1000)
    rep = {r["id"]: r for r in res.goal_report}
    assert rep["OAR.Dmax"]["met"], rep["OAR.Dmax"]
    assert not res.unmet_hard


def test_infeasible_p1_goal_is_reported_not_silent():
    patient, dij, goals = small_case()
    # the organ sits next to the target: a 1 Gy maximum conflicts with a hard 57 Gy minimum
    goals = [ResolvedGoal(g.id, g.structure, g.metric, g.operator, g.value,
                          1 if g.id == "PTV.Dmin" else g.priority, g.weight, g.kind, g.source)
             for g in goals]
    goals.append(ResolvedGoal("OAR.Dmax", "OAR", Metric("Dmax", "Dmax", "Gy"), "<=", 1.0, 1,
                              100.0, "organ", "user"))
    prob = build_problem(goals, patient, dij)
    res = optimize(prob, "cpu", max_iter=300, hard_rounds=2)
    assert res.unmet_hard
    assert any("not met" in m and "misses by" in m for m in res.messages)
    if registry.get("qp").is_installed():
        qp = optimize(prob, "qp")
        assert qp.status == "infeasible"
        assert any("cannot all be met" in m for m in qp.messages)


def test_attainment_by_weight_keeps_the_reference_at_the_goal():
    """``attain_weight_ids``: a min-dose coverage goal short after a solve is pursued by
    its weight (the reference moves only by the margin), and it ends nearer its value
    than without attainment."""
    patient, dij, goals = small_case()
    goals = [ResolvedGoal(g.id, g.structure, g.metric, g.operator, g.value, g.priority,
                          g.weight, g.kind, g.source) for g in goals]
    goals.append(ResolvedGoal("OAR.Dmax", "OAR", Metric("Dmax", "Dmax", "Gy"), "<=", 20.0, 2,
                              10.0, "organ", "user"))
    prob = build_problem(goals, patient, dij)
    plain = optimize(prob, "cpu", max_iter=300, attain_rounds=0)
    short = {r["id"]: r["achieved"] for r in plain.goal_report}
    assert short["PTV.Dmin"] < 57.0 * 0.99  # the organ's limit holds coverage back
    res = optimize(prob, "cpu", max_iter=300, attain_rounds=3,
                   attain_weight_ids={"PTV.Dmin"}, attain_margin=0.01)
    st = res.hard_state["PTV.Dmin"]
    assert st["weight_factor"] > 1.0
    assert st["ref_shift"] == pytest.approx(0.01 * 57.0)
    got = {r["id"]: r["achieved"] for r in res.goal_report}
    assert got["PTV.Dmin"] > short["PTV.Dmin"]


def test_a_carried_shift_is_not_kept_by_a_goal_pursued_by_weight():
    """A warm re-plan's stored state from a plan made with reference shifts: a goal now
    pursued by weight keeps only the margin's shift, so a met coverage goal does not stay
    pushed 10 Gy past its value."""
    patient, dij, goals = small_case()
    prob = build_problem(goals, patient, dij)
    carried = {"PTV.Dmin": {"weight_factor": 1.0, "ref_shift": 10.0}}
    res = optimize(prob, "cpu", max_iter=300, attain_rounds=2, hard_state=carried,
                   attain_weight_ids={"PTV.Dmin"}, attain_release=True, attain_margin=0.01)
    assert res.hard_state["PTV.Dmin"]["ref_shift"] == pytest.approx(0.57)
    assert carried["PTV.Dmin"]["ref_shift"] == 10.0  # the caller's state is not changed
    shifted = optimize(prob, "cpu", max_iter=300, attain_rounds=0, hard_state=carried)
    got = {r["id"]: r["achieved"] for r in res.goal_report}
    pushed = {r["id"]: r["achieved"] for r in shifted.goal_report}
    assert got["PTV.Dmin"] < pushed["PTV.Dmin"]


def test_goal_on_missing_structure_is_an_input_error():
    patient, dij, goals = small_case()
    goals.append(ResolvedGoal("X.Dmean", "Nope", Metric("Dmean", "Dmean", "Gy"), "<=", 1.0,
                              3, 1.0, "organ", "user"))
    with pytest.raises(InputError, match="Nope"):
        build_problem(goals, patient, dij)


def test_warm_start_converges_in_fewer_iterations():
    patient, dij, goals = small_case()
    prob = build_problem(goals, patient, dij)
    cold = optimize(prob, "cpu", tol=1e-7, max_iter=2000)
    warm = optimize(prob, "cpu", cold.fluence, tol=1e-7, max_iter=2000)
    assert warm.iterations < cold.iterations
    assert warm.objective <= cold.objective * (1 + 1e-6)


# --- registry ---------------------------------------------------------------------------
def test_registry_unknown_backend_lists_known():
    with pytest.raises(BackendUnavailableError, match="known: .*cpu"):
        registry.resolve("nope")


def test_gpu_backend_without_gpu_says_so():
    if registry.get("gpu").available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="gpu.*(GPU|not installed)"):
        registry.resolve("gpu")
    assert registry.resolve("auto").name == "cpu"


def test_registry_register_checks_attributes():
    with pytest.raises(TypeError):
        registry.register(object())


# --- refinement -------------------------------------------------------------------------
def test_margin_rule():
    assert tightened_dose(60.0) == pytest.approx(57.0)  # 5 % beats 2 Gy
    assert tightened_dose(20.0) == pytest.approx(18.0)  # 2 Gy beats 5 %
    assert tightened_dose(1.0) == 0.0


def test_refine_never_returns_a_worse_score():
    patient, dij, goals = small_case()
    prob = build_problem(goals, patient, dij)
    start = optimize(prob, "cpu", max_iter=500)
    s0 = goal_score(prob.goal_report(start.fluence), prob.bindings)
    out = refine(prob, "cpu", start, rounds=2, max_iter=300)
    s1 = goal_score(prob.goal_report(out.result.fluence), prob.bindings)
    assert s1 >= s0 - 1e-12
    assert out.scores[0] == pytest.approx(s0)
    assert len(out.accepted) == out.rounds_run


@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not registry.get("gpu").available():
        pytest.skip("no GPU")
    patient, dij, goals = small_case()
    prob = build_problem(goals, patient, dij)
    cpu = optimize(prob, "cpu", max_iter=2000, tol=1e-9)
    gpu = optimize(prob, "gpu", max_iter=2000, tol=1e-9)
    assert gpu.objective == pytest.approx(cpu.objective, rel=5e-3)
