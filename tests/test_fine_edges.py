"""Target edges at the patient grid's resolution (``ProblemOptions.fine_target_edges``):
coverage terms read the dose interpolated to the patient grid at target edges."""

from __future__ import annotations

import numpy as np
import pytest
from atp.optimizer.problem import ProblemOptions, build_problem

from atp.dose.resample import dose_to_patient_grid, interpolation_rows
from atp.plans import StageTimer, prepare_goals

TOY_BEAMS = 3


def test_interpolation_rows_are_the_patient_grid_interpolation(phantom):
    g = phantom.grid
    dg = g.downsampled(2)
    rng = np.random.default_rng(3)
    d = rng.uniform(0, 70, dg.shape).astype(np.float32)
    full = dose_to_patient_grid(d, dg, g).reshape(-1)
    idx = rng.choice(g.n_voxels, 4000, replace=False)
    m = interpolation_rows(idx, g, dg)
    assert m.shape == (idx.size, dg.n_voxels)
    np.testing.assert_allclose(m @ d.reshape(-1), full[idx], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def problems(phantom, toy):
    resolved = list(prepare_goals(phantom, site="hn", predictor="baseline",
                                  stages=StageTimer(False, 1)).resolved)
    on = build_problem(resolved, phantom, toy)
    off = build_problem(resolved, phantom, toy,
                        options=ProblemOptions(fine_target_edges=False))
    return resolved, on, off


def test_fine_rows_are_the_reported_dose_at_target_edges(phantom, toy, problems):
    _, on, off = problems
    fine = on.fine
    assert off.fine is None and fine is not None
    n_vox = toy.n_voxels
    assert fine.first == int(np.sum(on.rows < n_vox))
    assert np.all(on.rows[fine.first:] >= n_vox)
    # the fine rows are patient-grid target voxels, and A gives their interpolated dose
    ptv = phantom.structures[phantom.targets[0]].mask.reshape(-1)
    in_some = np.zeros_like(ptv)
    for t in phantom.targets:
        in_some |= phantom.structures[t].mask.reshape(-1)
    assert in_some[fine.voxels].all()
    w = np.random.default_rng(0).uniform(0.5, 1.5, on.n_beamlets).astype(np.float32)
    d_pat = dose_to_patient_grid((toy.matrix @ w).reshape(toy.dose_grid.shape),
                                 toy.dose_grid, phantom.grid).reshape(-1)
    np.testing.assert_allclose(on.dose_rows(w)[fine.first:], d_pat[fine.voxels],
                               rtol=1e-4, atol=1e-3)


def test_coverage_is_measured_as_on_the_patient_grid(phantom, toy, problems):
    """A coverage goal's dose-grid measurement comes closer to the patient grid's (what
    the plan is judged on) with the fine edges; the target's volume is unchanged."""
    from atp.goals.evaluate import evaluate_goals

    resolved, on, off = problems
    w = on.x0
    d_pat = dose_to_patient_grid((toy.matrix @ w).reshape(toy.dose_grid.shape),
                                 toy.dose_grid, phantom.grid)
    truth = {r.goal.id: r.achieved for r in evaluate_goals(resolved, phantom, d_pat)}
    cov = [b for b in on.bindings if b.goal.kind == "target" and b.goal.operator == ">="
           and b.measurable and b.goal.metric.kind == "D"]
    assert cov
    for b_on in cov:
        b_off = next(b for b in off.bindings if b.goal.id == b_on.goal.id)
        err_on = abs(on.measure(b_on, on.dose_rows(w)) - truth[b_on.goal.id])
        err_off = abs(off.measure(b_off, off.dose_rows(w)) - truth[b_on.goal.id])
        assert err_on <= err_off + 1e-6
        assert err_on < 0.5
        n_pat = phantom.structures[b_on.goal.structure].mask.sum()
        assert float(b_on.structure_vw.sum()) == pytest.approx(n_pat / 8.0, rel=1e-6)


def test_dmpo_far_operator_on_fine_rows(phantom, toy, problems):
    from test_far_tail import synthetic_far

    from atp.vmatplan import problem_far

    _, on, _ = problems
    far = synthetic_far(toy.n_voxels, on.n_beamlets, seed=7)
    op = problem_far(far, on)
    w = np.random.default_rng(1).uniform(0.5, 1.5, on.n_beamlets).astype(np.float32)
    full = far.apply(w)
    d_pat = dose_to_patient_grid(full.reshape(toy.dose_grid.shape), toy.dose_grid,
                                 phantom.grid).reshape(-1)
    got = op.apply(w)
    np.testing.assert_allclose(got[:on.fine.first], full[on.rows[:on.fine.first]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[on.fine.first:], d_pat[on.fine.voxels], rtol=1e-4,
                               atol=1e-5)
    g = np.random.default_rng(2).normal(size=on.n_rows).astype(np.float32)
    v = np.random.default_rng(4).normal(size=on.n_beamlets).astype(np.float32)
    assert float(g @ op.apply(v)) == pytest.approx(float(op.rmatvec(g) @ v), rel=1e-3)
