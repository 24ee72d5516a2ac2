"""Test helpers: a bank of small problems with known optima, and a toy dose model.

Like cvxpy's ``solver_test_helpers``: every installed backend is run against
:func:`problem_bank`, each entry with an optimum derived by hand. :func:`toy_dij` is a
crude parallel-beam pencil model (exponential depth dose from the body surface, Gaussian
lateral profile) used by unit tests that must not depend on the real dose engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from atp.optimizer.objectives import make_term
from atp.optimizer.problem import Problem

from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.grid import Grid


@dataclass
class BankCase:
    name: str
    problem: Problem
    optimum: float  # known optimal objective value
    fluence: np.ndarray | None = None  # known optimal fluence, where unique


def _problem(A, terms, x0, smooth_pairs=None, smooth_weight=0.0, smooth_norm=1.0):
    A = sp.csr_matrix(np.asarray(A, dtype=np.float32))
    grid = Grid((A.shape[0], 1, 1), (1.0, 1.0, 1.0))
    pairs = np.zeros((0, 2), np.int64) if smooth_pairs is None else np.asarray(smooth_pairs)
    return Problem(A, np.arange(A.shape[0]), terms, np.asarray(x0, np.float32), grid,
                   pairs, smooth_weight, smooth_norm)


def problem_bank() -> list[BankCase]:
    """Small problems whose optima are known in closed form."""
    cases = []
    # 1. feasible: three voxels, one beamlet each, uniform 60 Gy -> objective 0, w = 60.
    A = np.eye(3)
    t = make_term("uniform", [0, 1, 2], [1, 1, 1], 60.0, 1.0, name="PTV.uniform")
    cases.append(BankCase("feasible-uniform", _problem(A, [t], np.ones(3)), 0.0,
                          np.full(3, 60.0)))

    # 2. trade-off: one beamlet gives the target 1 Gy/MU and the organ 0.5 Gy/MU.
    #    f(w) = a (w-60)^2 / 3600 + b (0.5 w - 20)_+^2 / 400 ; stationary point below.
    a, b = 1.0, 4.0
    A = np.array([[1.0], [0.5]])
    tt = make_term("uniform", [0], [1.0], 60.0, a, name="PTV")
    to = make_term("max", [1], [1.0], 20.0, b, name="OAR")
    # d/dw: 2a(w-60)/3600 + 2b*0.5*(0.5w-20)/400 = 0
    w = (a * 60 / 3600 + b * 0.5 * 20 / 400) / (a / 3600 + b * 0.25 / 400)
    f = a * (w - 60) ** 2 / 3600 + b * max(0.5 * w - 20, 0) ** 2 / 400
    cases.append(BankCase("tradeoff-1d", _problem(A, [tt, to], [1.0]), f, np.array([w])))

    # 3. bound active: beamlet 1 reaches only the organ -> its optimal weight is 0.
    A = np.array([[1.0, 0.0], [0.2, 1.0]])
    tt = make_term("uniform", [0], [1.0], 50.0, 1.0, name="PTV")
    to = make_term("max", [1], [1.0], 5.0, 1.0, name="OAR")
    # w1 = 0; organ dose 0.2 w0; f(w0) = (w0-50)^2/2500 + (0.2 w0 - 5)_+^2/25
    w0 = (50 / 2500 + 0.2 * 5 / 25) / (1 / 2500 + 0.04 / 25)
    f = (w0 - 50) ** 2 / 2500 + max(0.2 * w0 - 5, 0) ** 2 / 25
    cases.append(BankCase("bound-active", _problem(A, [tt, to], [1.0, 1.0]), f,
                          np.array([w0, 0.0])))

    # 4. min dose vs mean dose with the bound active: beamlet 0 gives the organ five
    #    times more dose per Gy of target than beamlet 1, so at the optimum w0 = 0 and
    #    f(w1) = [40^2 + (w1-40)_-^2] / 3200 + (m - 1)_+^2 with m = 0.05 w1 (mean of
    #    0 and 0.1 w1): stationary at w1 (1/1600 + 0.005) = 40/1600 + 0.1.
    A = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.1]])
    tmin = make_term("min", [0, 1], [1, 1], 40.0, 1.0, name="PTV.min")
    tmean = make_term("mean_max", [2, 3], [1, 1], 1.0, 1.0, name="OAR.mean")
    w1 = (40 / 1600 + 0.1) / (1 / 1600 + 0.005)
    f = (40 ** 2 + (w1 - 40) ** 2) / 3200 + max(0.05 * w1 - 1, 0) ** 2
    cases.append(BankCase("min-vs-mean", _problem(A, [tmin, tmean], [1.0, 1.0]), f,
                          np.array([0.0, w1])))

    # 5. smoothness: two beamlets on one voxel each wanting 10 and 30 Gy, coupled by
    #    s (w0-w1)^2: stationary point w0 = 20 - 10/(1+2 s c), symmetric.
    A = np.eye(2)
    t0 = make_term("uniform", [0], [1.0], 10.0, 1.0, name="v0")
    t1 = make_term("uniform", [1], [1.0], 30.0, 1.0, name="v1")
    s = 0.01  # smoothness weight / norm
    # f = (w0-10)^2/100 + (w1-30)^2/900 + s (w0 - w1)^2
    H = np.array([[2 / 100 + 2 * s, -2 * s], [-2 * s, 2 / 900 + 2 * s]])
    g = np.array([2 * 10 / 100, 2 * 30 / 900])
    wopt = np.linalg.solve(H, g)
    f = (wopt[0] - 10) ** 2 / 100 + (wopt[1] - 30) ** 2 / 900 + s * (wopt[0] - wopt[1]) ** 2
    cases.append(BankCase("smoothness", _problem(A, [t0, t1], [1.0, 1.0], [[0, 1]], s, 1.0),
                          f, wopt))
    return cases


def toy_dij(patient, *, n_beams: int = 5, factor: int = 2, beamlet_mm: float = 10.0,
            mu_per_mm: float = 0.005, margin_mm: float = 10.0, gy_per_mu: float = 0.01):
    """A crude coplanar parallel-beam dose-influence matrix for tests (not a dose engine).

    Beams rotate about the patient z axis through the centroid of the highest target.
    Beamlet (u, z) centres lie on a ``beamlet_mm`` grid covering the targets' projection
    plus ``margin_mm``; each deposits ``gy_per_mu * exp(-mu * depth)`` times a Gaussian
    lateral profile (sigma = beamlet_mm / 2), depth measured from the body surface along
    the beam. Returns an :class:`atp.dose.influence.DoseInfluence` on the grid
    downsampled by ``factor``.
    """
    pg = patient.grid
    dg = pg.downsampled(factor) if factor > 1 else pg
    pts = dg.voxel_centres_mm()
    body = _block_any(patient.body_mask, factor, dg.shape).reshape(-1)
    tmask = np.zeros(pg.shape, bool)
    for t in patient.targets:
        tmask |= patient.mask(t)
    tdg = _block_any(tmask, factor, dg.shape).reshape(-1)
    iso = patient.target_centroid_mm()
    rel = pts - iso
    cols, beam_index, bx, by = [], [], [], []
    gantries = [360.0 * i / n_beams for i in range(n_beams)]
    sigma = beamlet_mm / 2.0
    for b, g in enumerate(gantries):
        th = math.radians(g)
        direction = np.array([math.sin(th), -math.cos(th), 0.0])  # source -> patient
        lateral = np.array([math.cos(th), math.sin(th), 0.0])
        s = rel @ direction
        u = rel @ lateral
        z = rel[:, 2]
        # depth from the body surface along the beam, per (u, z) ray: s - min s on ray
        key = np.stack([np.round(u / dg.spacing_mm.min()), np.round(z / 1.0)], 1)
        _, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        s_body = np.where(body, s, np.inf)
        entry = np.full(inv.max() + 1, np.inf)
        np.minimum.at(entry, inv, s_body)
        depth = np.clip(s - entry[inv], 0.0, None)
        depth[~np.isfinite(depth)] = 0.0
        tu, tz = u[tdg], z[tdg]
        us = np.arange(np.floor((tu.min() - margin_mm) / beamlet_mm),
                       np.ceil((tu.max() + margin_mm) / beamlet_mm) + 1) * beamlet_mm
        zs = np.arange(np.floor((tz.min() - margin_mm) / beamlet_mm),
                       np.ceil((tz.max() + margin_mm) / beamlet_mm) + 1) * beamlet_mm
        att = gy_per_mu * np.exp(-mu_per_mm * depth) * body
        for zc in zs:
            pz = np.exp(-0.5 * ((z - zc) / sigma) ** 2)
            for uc in us:
                col = att * pz * np.exp(-0.5 * ((u - uc) / sigma) ** 2)
                col[col < 0.01 * gy_per_mu] = 0.0
                if not np.any(col[tdg] > 0):
                    continue
                cols.append(sp.csc_matrix(col.astype(np.float32).reshape(-1, 1)))
                beam_index.append(b)
                bx.append(uc)
                by.append(zc)
    M = sp.hstack(cols, format="csc")
    info = BeamletInfo(beam_index, gantries, np.zeros(n_beams), np.zeros(n_beams),
                       np.tile(iso, (n_beams, 1)), bx, by, (beamlet_mm, beamlet_mm))
    return DoseInfluence(M, info, dg, pg, {"engine": "toy", "note": "tests only"})


def _block_any(mask, factor, shape):
    if factor == 1:
        return mask
    out = np.zeros(shape, bool)
    for i in range(factor):
        for j in range(factor):
            for k in range(factor):
                sub = mask[i::factor, j::factor, k::factor]
                out[:sub.shape[0], :sub.shape[1], :sub.shape[2]] |= sub
    return out
