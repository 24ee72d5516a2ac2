"""Unit tests of the fast-path building blocks (torch, CPU)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from atp.optimizer.fastpath.bev import BEVProjection
from atp.optimizer.fastpath.correction import lipschitz_estimate, unrolled_correction
from atp.optimizer.fastpath.error_map import HotColdObjective, error_map
from atp.optimizer.fastpath.initial_fluence import DoseMimicking, back_projection
from atp.optimizer.fastpath.torch_dose import RowDose, TorchDose

from atp.dose.geometry import beam_frame
from atp.grid import Grid


def random_dij(n_vox=300, n_bl=40, seed=0):
    rng = np.random.default_rng(seed)
    return sp.random(n_vox, n_bl, density=0.2, random_state=rng, dtype=np.float32).tocsc()


def test_torch_dose_matches_scipy_and_gradient_is_transpose():
    a = random_dij()
    op = TorchDose(a)
    w = torch.rand(a.shape[1], dtype=torch.float32, requires_grad=True)
    d = op(w)
    assert np.allclose(d.detach().numpy(), a @ w.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = torch.rand(a.shape[0])
    (d * g).sum().backward()
    assert np.allclose(w.grad.numpy(), a.T @ g.numpy(), rtol=1e-5, atol=1e-6)


def test_row_dose_is_the_full_map_on_its_rows():
    a = random_dij()
    rows = np.sort(np.random.default_rng(2).choice(a.shape[0], 70, replace=False))
    op = RowDose(a[rows].tocsc(), rows, a.shape[0])
    assert op.shape == a.shape
    w = torch.rand(a.shape[1], dtype=torch.float32, requires_grad=True)
    d = op(w)
    full = a @ w.detach().numpy()
    np.testing.assert_allclose(d.detach().numpy()[rows], full[rows], rtol=1e-5, atol=1e-6)
    off = np.setdiff1d(np.arange(a.shape[0]), rows)
    assert np.all(d.detach().numpy()[off] == 0)
    # for a field that is 0 off the rows (an error map of J on them) A.T g is exact ...
    g = torch.zeros(a.shape[0])
    g[rows] = torch.rand(rows.size)
    np.testing.assert_allclose(op.transpose_apply(g).numpy(), a.T @ g.numpy(), rtol=1e-5,
                               atol=1e-6)
    (d * g).sum().backward()  # ... and so is autograd through op(w)
    np.testing.assert_allclose(w.grad.numpy(), a.T @ g.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        RowDose(a[rows].tocsc(), rows[:-1], a.shape[0])
    # restricting a TorchDose slices its kept CSR: the same operator, no conversion
    full_op = TorchDose(a)
    sliced = full_op.restrict_rows(rows, a[rows].tocsc())
    assert sliced.sub.host_csr.shape == (rows.size, a.shape[1])
    v = torch.rand(a.shape[1])
    assert torch.equal(sliced(v), op(v))
    assert torch.equal(sliced.transpose_apply(g), op.transpose_apply(g))
    with pytest.raises(ValueError, match="csr has shape"):
        TorchDose(a, csr=full_op.host_csr[rows])


def test_correction_on_the_objectives_rows_equals_the_full_map():
    n = 300
    rx = torch.zeros(n)
    rx[:60] = 60.0
    oar = torch.zeros(n)
    oar[100:150] = 1.0
    d0 = 30.0 + 40.0 * torch.rand(n, generator=torch.Generator().manual_seed(4))
    obj = HotColdObjective(rx, (rx > 0).float(), 3.0, 1.0, {"Parotid_L": oar},
                           {"Parotid_L": 0.2}, d0)
    a = random_dij(n_vox=n)
    rows = obj.voxel_support().numpy()
    assert rows.tolist() == list(range(60)) + list(range(100, 150))
    full, sub = TorchDose(a), RowDose(a[rows].tocsc(), rows, a.shape[0])
    w0 = torch.rand(a.shape[1])
    step = 0.5 / lipschitz_estimate(full, torch.ones(300))
    w_full = unrolled_correction(w0, full, obj, 15, step)
    w_rows = unrolled_correction(w0, sub, obj, 15, step)
    np.testing.assert_allclose(w_rows.numpy(), w_full.numpy(), rtol=1e-4, atol=1e-6)


def make_objective(n=50, sparing=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rx = torch.zeros(n, dtype=torch.float64)
    rx[:20] = 60.0
    tw = (rx > 0).to(torch.float64)
    oar = torch.zeros(n, dtype=torch.float64)
    oar[30:45] = 1.0
    d0 = 30.0 + 40.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    return HotColdObjective(rx, tw, 3.0, 1.0, {"Parotid_L": oar}, sparing or {}, d0), d0


def test_error_map_matches_finite_differences():
    obj, d0 = make_objective(sparing={"Parotid_L": 0.2})
    dose = d0 + torch.randn(d0.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(3))
    e = error_map(dose, obj)
    h = 1e-5
    for i in [0, 5, 19, 25, 31, 44, 49]:
        dp, dm = dose.clone(), dose.clone()
        dp[i] += h
        dm[i] -= h
        fd = (obj(dp) - obj(dm)) / (2 * h)
        assert float(e[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_error_map_hot_costs_more_than_cold_and_zero_sparing_vanishes():
    obj, d0 = make_objective()
    dose = torch.full_like(d0, 60.0)
    dose[0] = 62.0  # 2 Gy hot
    dose[1] = 58.0  # 2 Gy cold
    e = error_map(dose, obj)
    assert e[0] > 0 > e[1] and abs(float(e[0])) > abs(float(e[1]))
    assert torch.all(e[20:] == 0)  # no target, no sparing -> no error outside the PTV
    obj0, _ = make_objective(sparing={"Parotid_L": 0.0})
    assert torch.equal(error_map(d0, obj0)[30:45], torch.zeros(15, dtype=torch.float64))
    with pytest.raises(ValueError):
        HotColdObjective(obj.rx_gy, obj.target_weight, lam_hot=1.0, lam_cold=2.0)
    with pytest.raises(KeyError):
        HotColdObjective(obj.rx_gy, obj.target_weight, sparing={"Liver": 0.1},
                         baseline_dose=d0)


def test_unrolled_correction_lowers_objective_and_keeps_fluence_nonnegative():
    a = random_dij(seed=4)
    op = TorchDose(a)
    target = torch.from_numpy((a @ np.ones(a.shape[1], np.float32)).astype(np.float32))
    v = torch.ones(a.shape[0])
    obj = DoseMimicking(target, v)
    w0 = back_projection(op, target, v)
    lip = lipschitz_estimate(op, v)
    w = unrolled_correction(w0, op, obj, 50, obj.norm / lip)
    assert float(obj(op(w))) < 0.5 * float(obj(op(w0)))
    assert torch.all(w >= 0)


def test_bev_projection_of_point_dose_lands_where_geometry_says():
    grid = Grid((41, 41, 41), (2.0, 2.0, 2.0), (-40.0, -40.0, -40.0))
    point = np.array([10.0, -6.0, 14.0])  # LPS mm
    idx = np.round(grid.patient_to_index(point)).astype(int)
    dose = np.zeros(grid.shape, np.float32)
    dose[tuple(idx)] = 1.0
    u = np.arange(-40, 41, 2.0)
    gantries = [0.0, 90.0, 210.0]
    proj = BEVProjection(grid, gantries, (0.0, 0.0, 0.0), u, u, n_samples=201,
                         half_depth_mm=60.0)(torch.from_numpy(dose))
    for c, g in enumerate(gantries):
        pu, pv, _ = beam_frame(g, 0.0, 0.0, (0, 0, 0)).project(grid.index_to_patient(idx))
        iv, iu = np.unravel_index(int(torch.argmax(proj[c])), proj[c].shape)
        assert abs(u[iu] - pu) <= 2.0 and abs(u[iv] - pv) <= 2.0, (g, u[iu], pu, u[iv], pv)


def test_bev_projection_is_differentiable_and_linear():
    grid = Grid((10, 12, 14), (3.0, 3.0, 3.0), (-15.0, -18.0, -21.0))
    gen = torch.Generator().manual_seed(0)
    d1 = torch.rand(grid.shape, generator=gen)
    d2 = torch.rand(grid.shape, generator=gen)
    u = np.arange(-20, 21, 5.0)
    bev = BEVProjection(grid, [0.0, 45.0], (0, 0, 0), u, u, n_samples=16, half_depth_mm=30)
    assert torch.allclose(bev(2 * d1 + d2), 2 * bev(d1) + bev(d2), atol=1e-5)
    x = d1.clone().requires_grad_(True)
    bev(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# --- deliverability smoothness, diagonal steps, OAR guard -----------------------------------
def toy_beamlets(n_cp=4, nx=6, ny=3, size=5.0, drop=()):
    """BeamletInfo of n_cp control points with an nx x ny beamlet grid each (minus
    ``drop`` column indices)."""
    from atp.dose.influence import BeamletInfo

    b, x, y = np.meshgrid(np.arange(n_cp), np.arange(nx) * size - 12.5,
                          np.arange(ny) * size - 5.0, indexing="ij")
    keep = np.setdiff1d(np.arange(b.size), np.asarray(drop, int))
    return BeamletInfo(b.reshape(-1)[keep], np.arange(n_cp) * 4.0, np.zeros(n_cp),
                       np.zeros(n_cp), np.zeros((n_cp, 3)), x.reshape(-1)[keep],
                       y.reshape(-1)[keep], (size, size))


def test_smoothness_pairs_are_leaf_travel_and_control_point_neighbours():
    from atp.optimizer.fastpath.smoothness import neighbour_pairs

    info = toy_beamlets(n_cp=3, nx=4, ny=2, drop=[1])  # cp 0 loses its (x 0, row 1)
    i, j, kind = neighbour_pairs(info.beam_index, info.bev_x_mm, info.bev_y_mm,
                                 info.beamlet_size_mm)
    bi, bx, by = info.beam_index, info.bev_x_mm, info.bev_y_mm
    x = kind == 0
    assert np.all(bi[i[x]] == bi[j[x]]) and np.all(by[i[x]] == by[j[x]])
    assert np.allclose(bx[j[x]] - bx[i[x]], 5.0)
    c = kind == 1
    assert np.all(bi[j[c]] == bi[i[c]] + 1)
    assert np.all(bx[i[c]] == bx[j[c]]) and np.all(by[i[c]] == by[j[c]])
    # 3 cps x 2 rows x 3 x-pairs, minus the one pair through the (edge) hole; 2 cp steps
    # x 8 positions, minus the hole's 1; half-integer centres (-12.5, -7.5, ...) must not
    # merge (np.rint rounds ties to even)
    assert int(x.sum()) == 3 * 2 * 3 - 1 and int(c.sum()) == 2 * 8 - 1


def test_smoothness_gradient_matches_finite_differences_and_row_sums_bound_it():
    from atp.optimizer.fastpath.smoothness import FluenceSmoothness

    info = toy_beamlets()
    reg = FluenceSmoothness(info, weight_x=1.0, weight_cp=0.5, dtype=torch.float64)
    w = torch.rand(info.n_beamlets, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(0))
    g = reg.grad(w)
    wa = w.clone().requires_grad_(True)
    reg(wa).backward()
    assert torch.allclose(g, wa.grad, atol=1e-12)
    h = 1e-6
    for k in [0, 7, 30, info.n_beamlets - 1]:
        e = torch.zeros_like(w)
        e[k] = h
        fd = (reg(w + e) - reg(w - e)) / (2 * h)
        assert float(g[k]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    # Laplacian: constant fluence has zero gradient; max |L| row sum bounds its spectrum
    assert torch.allclose(reg.grad(torch.ones_like(w)), torch.zeros_like(w))
    lap = torch.stack([reg.grad(torch.eye(info.n_beamlets, dtype=torch.float64)[k])
                       for k in range(info.n_beamlets)])
    assert float(torch.linalg.eigvalsh(lap).max()) <= reg.lipschitz_bound() + 1e-9
    assert torch.allclose(lap.abs().sum(1), reg.row_abs_sum())


def toy_arc_dij(info, n_vox=200, seed=5):
    rng = np.random.default_rng(seed)
    return sp.random(n_vox, info.n_beamlets, density=0.3, random_state=rng,
                     dtype=np.float32).tocsc()


def test_smoothness_lowers_total_variation_of_the_fluence():
    from atp.optimizer.fastpath.correction import balanced_weight, curvature_row_sums, diagonal_step
    from atp.optimizer.fastpath.smoothness import FluenceSmoothness, total_variation

    info = toy_beamlets(n_cp=6, nx=8, ny=4)
    a = toy_arc_dij(info)
    op = TorchDose(a)
    target = torch.from_numpy(a @ np.random.default_rng(1).random(a.shape[1]).astype(
        np.float32))
    v = torch.ones(a.shape[0])
    obj = DoseMimicking(target, v)
    reg = FluenceSmoothness(info)
    r = curvature_row_sums(op, v / obj.norm)
    w0 = back_projection(op, target, v)
    out = {}
    for strength in (0.0, 1.0):
        mu = balanced_weight(r, reg, strength)
        out[strength] = unrolled_correction(w0, op, obj, 80, diagonal_step(r, reg, mu),
                                            regulariser=reg, reg_weight=mu)
        assert torch.all(out[strength] >= 0)
    assert total_variation(out[1.0], reg) < 0.7 * total_variation(out[0.0], reg)
    # still a dose-mimicking solution: much better than the back-projection
    assert float(obj(op(out[1.0]))) < float(obj(op(w0)))


def test_diagonal_step_bounds_the_curvature_and_converges():
    from atp.optimizer.fastpath.correction import curvature_row_sums, diagonal_step
    from atp.optimizer.fastpath.smoothness import FluenceSmoothness

    info = toy_beamlets(n_cp=3, nx=5, ny=2)
    a = toy_arc_dij(info, n_vox=120)
    op = TorchDose(a)
    v = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(2))
    reg = FluenceSmoothness(info)
    mu = 0.3
    p = diagonal_step(curvature_row_sums(op, v), reg, mu).double()
    ad = torch.from_numpy(a.toarray()).double()
    lap = torch.stack([reg.grad(torch.eye(info.n_beamlets)[k]) for k in
                       range(info.n_beamlets)]).double()
    hess = ad.T @ (v.double()[:, None] * ad) + mu * lap
    ph = torch.sqrt(p)[:, None] * hess * torch.sqrt(p)[None, :]
    assert float(torch.linalg.eigvalsh(ph).max()) <= 1.0 + 1e-5
    # and it drives dose mimicking down faster than the 1/L step in the same steps
    target = torch.from_numpy((a @ np.ones(a.shape[1], np.float32)).astype(np.float32))
    obj = DoseMimicking(target, v)
    w0 = back_projection(op, target, v)
    r = curvature_row_sums(op, v / obj.norm)
    w_diag = unrolled_correction(w0, op, obj, 30, diagonal_step(r))
    w_lip = unrolled_correction(w0, op, obj, 30, obj.norm / lipschitz_estimate(op, v))
    assert float(obj(op(w_diag))) <= 1.05 * float(obj(op(w_lip)))
    assert float(obj(op(w_diag))) < 0.5 * float(obj(op(w0)))


def test_oar_guard_matches_finite_differences_and_zero_slider_is_no_slider():
    obj, d0 = make_objective()
    guarded = HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, obj.oar_weights,
                               {}, d0, guard_weight=0.5)
    same = HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, obj.oar_weights,
                            {"Parotid_L": 0.0}, d0, guard_weight=0.5)
    dose = d0 + 2.0 * torch.randn(d0.shape, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(4))
    assert float(guarded(dose)) == float(same(dose))
    assert torch.equal(error_map(d0, guarded)[30:45], torch.zeros(15, dtype=torch.float64))
    e = error_map(dose, guarded)
    assert float(e[30:45].abs().sum()) > 0  # above D0 somewhere: the guard pushes back
    h = 1e-5
    for i in [0, 31, 38, 44]:
        dp, dm = dose.clone(), dose.clone()
        dp[i] += h
        dm[i] -= h
        fd = (guarded(dp) - guarded(dm)) / (2 * h)
        assert float(e[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError):
        HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, obj.oar_weights,
                         guard_weight=0.5)  # the guard needs D0


def test_closed_form_error_map_equals_autograd():
    obj, d0 = make_objective(sparing={"Parotid_L": 0.2})
    obj.guard_weight = 0.0
    dose = d0 + torch.randn(d0.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(5))
    j, e = obj.value_and_grad(dose)
    d = dose.clone().requires_grad_(True)
    ref = obj(d)
    (g,) = torch.autograd.grad(ref, d)
    assert float(j) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(e, g, rtol=1e-10, atol=1e-12)
    # error_map takes the closed form when the objective has one, autograd otherwise
    torch.testing.assert_close(error_map(dose, obj), g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(error_map(dose, lambda x: obj(x)), g, rtol=1e-10,
                               atol=1e-12)


def test_coverage_term_is_an_extra_cold_hinge_with_exact_gradients():
    obj, d0 = make_objective()
    cov = HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, coverage_weight=4.0,
                           coverage_level=0.95)
    dose = torch.zeros_like(d0)
    dose[:20] = 58.0  # between 0.95 Rx (57 Gy) and Rx: only the ordinary cold term
    torch.testing.assert_close(cov(dose), obj(dose))
    dose[0], dose[1] = 55.0, 62.0  # 2 Gy below the coverage level; 2 Gy hot
    j, e = cov.value_and_grad(dose)
    d = dose.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cov(d), d)
    torch.testing.assert_close(e, g, rtol=1e-10, atol=1e-12)
    assert float(j) == pytest.approx(float(cov(dose)), rel=1e-12)
    # voxel 0: cold 5 Gy below Rx (weight 1) plus 2 Gy below the level (weight 4)
    assert float(e[0]) == pytest.approx(-(1.0 * 5.0 + 4.0 * 2.0) / 20)
    assert float(e[1]) == pytest.approx(3.0 * 2.0 / 20)
    assert torch.equal(cov.voxel_support(), obj.voxel_support())
    for bad in ({"coverage_weight": -1.0}, {"coverage_level": 0.0},
                {"coverage_level": 1.2}):
        with pytest.raises(ValueError, match="coverage"):
            HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, **bad)


def test_organ_maximum_is_an_absolute_hinge_with_exact_gradients():
    obj, d0 = make_objective()
    cord = torch.zeros_like(d0)
    cord[45:50] = 1.0  # 5 voxels, limit 45 Gy, hinge at 0.9 x 45 = 40.5 Gy
    mx = HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0,
                          max_limits={"SpinalCord": (cord, 45.0)}, max_weight=8.0,
                          max_level=0.9)
    dose = torch.full_like(d0, 40.0)
    dose[:20] = 60.0
    torch.testing.assert_close(mx(dose), obj(dose))  # everything below the hinge
    dose[45], dose[46] = 42.5, 80.0  # 2 Gy and 39.5 Gy over
    j, e = mx.value_and_grad(dose)
    d = dose.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mx(d), d)
    torch.testing.assert_close(e, g, rtol=1e-10, atol=1e-12)
    assert float(j) == pytest.approx(float(mx(dose)), rel=1e-12)
    assert float(e[45]) == pytest.approx(8.0 * 2.0 / 5) and float(e[47]) == 0.0
    assert float(e[46]) == pytest.approx(8.0 * 39.5 / 5)
    assert set(mx.voxel_support().tolist()) == set(range(20)) | set(range(45, 50))
    off = HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0,
                           max_limits={"SpinalCord": (cord, 45.0)}, max_weight=0.0)
    torch.testing.assert_close(off(dose), obj(dose))
    assert torch.equal(off.voxel_support(), obj.voxel_support())
    for bad in ({"max_weight": -1.0}, {"max_level": 0.0}, {"max_level": 1.5}):
        with pytest.raises(ValueError, match="max_"):
            HotColdObjective(obj.rx_gy, obj.target_weight, 3.0, 1.0, **bad)


def test_bev_sample_points_follow_the_rays_of_the_beam_frame():
    from atp.optimizer.fastpath.bev import bev_sample_points

    grid = Grid((10, 12, 14), (3.0, 2.0, 2.5), (-15.0, -12.0, -17.0))
    u, v = np.array([-10.0, 0.0, 10.0]), np.array([-5.0, 5.0])
    pts = bev_sample_points(grid, [30.0, 200.0], 0.0, 0.0, (1.0, 2.0, -3.0), u, v,
                            n_samples=5, half_depth_mm=40.0)
    assert pts.shape == (2, 2, 3, 5, 3) and pts.dtype == torch.float32
    shape = np.asarray(grid.shape, float)
    for c, g in enumerate((30.0, 200.0)):
        fr = beam_frame(g, 0.0, 0.0, (1.0, 2.0, -3.0))
        for iv, vv in enumerate(v):
            for iu, uu in enumerate(u):
                pix = fr.iso_plane_point(uu, vv)
                for k, s in enumerate(np.linspace(fr.sad_mm - 40, fr.sad_mm + 40, 5)):
                    p = fr.source_mm + (pix - fr.source_mm) * s / fr.sad_mm
                    want = (2 * grid.patient_to_index(p) / (shape - 1) - 1)[::-1]
                    np.testing.assert_allclose(pts[c, iv, iu, k].numpy(), want, atol=2e-5)
