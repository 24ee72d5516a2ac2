"""Unit tests of the fast-path building blocks (torch, CPU)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atp.dose.geometry import beam_frame
from atp.grid import Grid
from optimizer.fastpath.bev import BEVProjection
from optimizer.fastpath.correction import lipschitz_estimate, unrolled_correction
from optimizer.fastpath.error_map import HotColdObjective, error_map
from optimizer.fastpath.initial_fluence import DoseMimicking, back_projection
from optimizer.fastpath.torch_dose import TorchDose


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
