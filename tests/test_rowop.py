"""The problem matrix with patient-grid rows as an operator (optimizer.rowop): A = [B; S B]
must be the matrix it replaces, forward and transposed, on the host and the device form."""

import numpy as np
import pytest
import scipy.sparse as sp
from atp.optimizer.rowop import InterpolatedRows, interpolated_rows


def _case(seed=0, n_vox=60, n_cols=40, n_fine=25, missing=True):
    rng = np.random.default_rng(seed)
    dij = sp.random(n_vox, n_cols, density=0.3, format="csr", dtype=np.float64,
                    random_state=seed)
    # each patient row interpolates 1-8 dose voxels with weights summing to 1
    rows, cols, vals = [], [], []
    for r in range(n_fine):
        k = int(rng.integers(1, 9))
        c = rng.choice(n_vox, size=k, replace=False)
        v = rng.random(k)
        rows += [r] * k
        cols += list(c)
        vals += list(v / v.sum())
    interp = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n_fine, n_vox))
    src = np.unique(interp.indices)
    # the problem's own dose rows: most of the sources (or all) plus others
    keep = src[: -3] if missing else src
    real = np.unique(np.concatenate([keep, rng.choice(n_vox, 10, replace=False)]))
    if missing:
        real = np.setdiff1d(real, src[-3:])
    dense = np.vstack([dij[real].toarray(), interp.toarray() @ dij.toarray()])
    return dij, real, interp, dense


@pytest.mark.parametrize("missing", [False, True])
def test_operator_is_the_stacked_matrix(missing):
    dij, real, interp, dense = _case(missing=missing)
    op = interpolated_rows(dij, real, interp)
    assert isinstance(op, InterpolatedRows) and op.shape == dense.shape
    assert (op.B.shape[0] - op.top > 0) == missing  # absent sources: extra rows of B
    rng = np.random.default_rng(1)
    w = rng.random(dense.shape[1]).astype(np.float32)
    y = rng.random(dense.shape[0]).astype(np.float32)
    np.testing.assert_allclose(op @ w, dense @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(op.T @ y, dense.T @ y, rtol=1e-5, atol=1e-6)
    Y = rng.random((dense.shape[0], 3)).astype(np.float32)
    np.testing.assert_allclose(op.T @ Y, dense.T @ Y, rtol=1e-5, atol=1e-6)
    X = sp.random(dense.shape[1], 4, density=0.5, format="csr", random_state=2)
    got = op @ X
    assert sp.issparse(got)
    np.testing.assert_allclose(got.toarray(), dense @ X.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(op.tocsr().toarray(), dense, rtol=1e-6, atol=1e-7)
    op64 = op.astype(np.float64)
    assert (op64 @ w).dtype == np.float64


def test_device_form_matches_the_host_bitwise():
    dij, real, interp, _ = _case(seed=3)
    op = interpolated_rows(dij, real, interp)
    dev = op.on(np)
    rng = np.random.default_rng(4)
    w = rng.random(op.shape[1]).astype(np.float32)
    y = rng.random(op.shape[0]).astype(np.float32)
    assert np.array_equal(dev @ w, op @ w)
    np.testing.assert_allclose(dev.T @ y, op.T @ y, rtol=1e-6)


def test_fine_problem_uses_the_operator_with_fewer_non_zeros(phantom):
    """On the phantom with a CT/2 dose grid, the target-edge rows make A an operator whose
    stored non-zeros are fewer than the matrix it stands for, with the same products."""
    from atp.optimizer.problem import build_problem, structure_fractions
    from atp.predictor import registry as predictors

    from atp.dose.geometry import Beam
    from atp.dose.pencil_beam import PencilBeamEngine
    from atp.goals import load_goal_list, resolve_goals, with_control_structures

    pred = predictors.get("baseline").predict(phantom)
    resolved = list(resolve_goals(load_goal_list(site="hn"), phantom, pred))
    patient = with_control_structures(phantom, resolved)
    beams = [Beam(gantry_deg=g) for g in (0.0, 120.0, 240.0)]
    dij = PencilBeamEngine().influence(patient, beams, dose_grid_factor=2)
    p = build_problem(resolved, patient, dij, fractions=structure_fractions(patient, dij))
    assert p.fine is not None and isinstance(p.A, InterpolatedRows)
    M = p.A.tocsr()
    assert p.A.nnz < M.nnz
    w = p.x0
    np.testing.assert_allclose(p.A @ w, M @ w, rtol=1e-4, atol=1e-4 * float(np.max(M @ w)))
    # the patient rows are the interpolation of the dose-grid dose, as the report's dose is
    d_grid = dij.matrix @ w
    np.testing.assert_allclose((p.A @ w)[p.fine.first:], p.fine.interp @ d_grid, rtol=1e-4,
                               atol=1e-4 * float(np.max(d_grid)))


def _tail_case(seed=5, n_rows=80, side=6, beams=2):
    """A dij-like matrix: ``beams`` beams of side x side beamlets of 5 mm, each column a
    peak plus a smooth, low tail."""
    rng = np.random.default_rng(seed)
    ix, iy = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    bev_x = np.tile((ix.ravel() - 2 + 0.5) * 5.0, beams)  # beamlet indices -2 .. side - 3
    bev_y = np.tile((iy.ravel() - 2 + 0.5) * 5.0, beams)
    beam = np.repeat(np.arange(beams), side * side).astype(np.int32)
    pos = rng.random((n_rows, 2)) * side * 5.0 - 10.0
    r = np.hypot(pos[:, None, 0] - bev_x[None], pos[:, None, 1] - bev_y[None])
    dense = (np.exp(-r / 3.0) + 0.004 * np.exp(-r / 40.0)).astype(np.float32)
    dense[dense < 1e-4] = 0
    return sp.csr_matrix(dense), beam, bev_x, bev_y


def test_tail_grouped_is_its_factors_and_near_the_matrix():
    """TailGrouped: the products are N + R_c P^T's (forward, transposed, device form), the
    entries at or above the cut exactly A's, exact for a fluence uniform over each group,
    and close to A otherwise."""
    from atp.optimizer.rowop import TailGrouped, beamlet_groups, tail_grouped
    A, beam, bx, by = _tail_case()
    groups = beamlet_groups(beam, bx, by, (5.0, 5.0), 2)
    assert groups.max() + 1 == 2 * 9 and np.all(np.bincount(groups) == 4)
    cut = np.full(A.shape[1], 0.01, np.float32)
    op = tail_grouped(A, cut, groups)
    assert isinstance(op, TailGrouped) and op.shape == A.shape
    assert op.nnz < A.nnz
    dense_N = op.N.toarray()
    Ad = A.toarray()
    assert np.array_equal(dense_N[Ad >= 0.01], Ad[Ad >= 0.01])
    assert not np.any(dense_N[Ad < 0.01])
    M = dense_N + op.Rc.toarray() @ op.P.toarray().T
    rng = np.random.default_rng(6)
    w = rng.random(A.shape[1]).astype(np.float32)
    y = rng.random(A.shape[0]).astype(np.float32)
    np.testing.assert_allclose(op @ w, M @ w, rtol=1e-5)
    np.testing.assert_allclose(op.T @ y, M.T @ y, rtol=1e-5)
    dev = op.on(np)
    assert np.array_equal(dev @ w, op @ w)
    np.testing.assert_allclose(dev.T @ y, op.T @ y, rtol=1e-6)
    u = rng.random(groups.max() + 1).astype(np.float32)[groups]  # uniform per group
    np.testing.assert_allclose(op @ u, A @ u, rtol=1e-5)
    exact = A @ w
    assert np.max(np.abs(op @ w - exact)) < 0.01 * np.max(exact)


def test_problem_iterates_on_the_grouped_tail_and_measures_on_the_exact_rows(phantom):
    """build_problem keeps A exact and gives the first-order solvers Problem.fast (its
    scatter tail grouped), within 0.5 % of A w's maximum; threshold 0 turns it off."""
    from atp.optimizer.firstorder import DeviceProblem
    from atp.optimizer.problem import ProblemOptions, build_problem, structure_fractions
    from atp.predictor import registry as predictors

    from atp.dose.geometry import Beam
    from atp.dose.pencil_beam import PencilBeamEngine
    from atp.goals import load_goal_list, resolve_goals, with_control_structures

    pred = predictors.get("baseline").predict(phantom)
    resolved = list(resolve_goals(load_goal_list(site="hn"), phantom, pred))
    patient = with_control_structures(phantom, resolved)
    beams = [Beam(gantry_deg=g) for g in (0.0, 120.0, 240.0)]
    dij = PencilBeamEngine().influence(patient, beams, dose_grid_factor=2)
    fr = structure_fractions(patient, dij)
    p = build_problem(resolved, patient, dij, fractions=fr)
    assert isinstance(p.A, InterpolatedRows) and isinstance(p.fast, InterpolatedRows)
    assert p.fast.nnz < p.A.nnz and p.fast.shape == p.A.shape
    w = p.x0 * np.random.default_rng(7).uniform(0.5, 1.5, p.x0.size).astype(np.float32)
    exact = p.A @ w
    assert np.max(np.abs(p.fast @ w - exact)) < 5e-3 * float(np.max(exact))
    dp = DeviceProblem.from_problem(p, np)
    np.testing.assert_allclose(dp.A @ w, p.fast @ w, rtol=1e-5, atol=1e-6)
    assert p.with_terms(p.terms).fast is p.fast
    off = build_problem(resolved, patient, dij, fractions=fr,
                        options=ProblemOptions(dij_tail_threshold=0.0))
    assert off.fast is None
    with pytest.raises(ValueError, match="dij_tail_group"):
        ProblemOptions(dij_tail_group=0)


def test_arcs_iterate_on_the_exact_rows():
    """The grouped tail was measured on static fields: VMAT plans keep the exact rows."""
    from atp.pipeline import _problem_options
    static = _problem_options({"sequence": "imrt-sliding", "technique": "imrt"}, None, None)
    arc = _problem_options({"sequence": "vmat-sliding", "technique": "vmat"}, None, None)
    assert static.dij_tail_threshold > 0 and static.leaf_transmission > 0
    assert arc.dij_tail_threshold == 0.0 and arc.leaf_transmission > 0
    assert _problem_options({"technique": "vmat"}, None, None).dij_tail_threshold == 0.0


def test_warm_problem_reuses_the_row_operators_while_the_rows_are_the_same(phantom):
    """build_problem on the same dij with the same rows (a warm re-plan's tolerance
    tweak) reuses A, its fine rows and Problem.fast (the same objects); other tail
    options build them again, and only the latest are kept."""
    from dataclasses import replace as _replace

    from atp.optimizer.problem import ProblemOptions, build_problem, structure_fractions
    from atp.predictor import registry as predictors

    from atp.dose.geometry import Beam
    from atp.dose.pencil_beam import PencilBeamEngine
    from atp.goals import load_goal_list, resolve_goals, with_control_structures

    pred = predictors.get("baseline").predict(phantom)
    resolved = list(resolve_goals(load_goal_list(site="hn"), phantom, pred))
    patient = with_control_structures(phantom, resolved)
    dij = PencilBeamEngine().influence(patient, [Beam(gantry_deg=0.0), Beam(180.0)],
                                       dose_grid_factor=2)
    fr = structure_fractions(patient, dij)
    p1 = build_problem(resolved, patient, dij, fractions=fr)
    tweaked = [_replace(g, value=0.9 * g.value) if g.id.startswith("Parotid_L.Dmean")
               else g for g in resolved]
    p2 = build_problem(tweaked, patient, dij, fractions=fr)
    assert p2.A is p1.A and p2.fast is p1.fast
    off = build_problem(resolved, patient, dij, fractions=fr,
                        options=ProblemOptions(dij_tail_threshold=0.0))
    assert off.fast is None and off.A is not p1.A
    again = build_problem(resolved, patient, dij, fractions=fr)  # the latest key only
    assert again.A is not p1.A and again.fast is not p1.fast
    np.testing.assert_array_equal(again.A @ p1.x0, p1.A @ p1.x0)
