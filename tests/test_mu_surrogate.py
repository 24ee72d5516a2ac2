"""The sliding-window MU term of the fluence optimisation (optimizer.objectives.MuSurrogate)."""

from __future__ import annotations

import numpy as np
import pytest
from atp.optimizer.firstorder import DeviceProblem
from atp.optimizer.objectives import make_term, mu_surrogate, mu_value_grad
from atp.optimizer.testing import _problem
from atp.sequencer.fluence import BeamFluence, FluenceSet
from atp.sequencer.imrt import sequence_sliding_window
from atp.sequencer.machine import load_machine


def _grid(n_beams=2, ny=3, nx=5, size=5.0):
    bi, bx, by = [], [], []
    for b in range(n_beams):
        for y in range(ny):
            for x in range(nx):
                bi.append(b)
                bx.append(-10.0 + size * x)
                by.append(size * y)
    return np.array(bi), np.array(bx), np.array(by)


def _value_grad(m, w):
    return mu_value_grad(w, m.D, m.D.T.tocsr(), m.S, m.S.T.tocsr(), m.beam_rows, m.tau)


def test_mu_value_and_gradient_match_finite_differences():
    bi, bx, by = _grid()
    m = mu_surrogate(bi, bx, by, (5.0, 5.0), tau=0.5)
    rng = np.random.default_rng(3)
    w = rng.uniform(1.0, 10.0, bi.size)
    v, g = _value_grad(m, w)
    # by hand: rows' sums of rises (from 0 at the left edge), log-sum-exp per beam
    rows = w.reshape(2, 3, 5)
    rise = np.maximum(np.diff(np.concatenate([np.zeros((2, 3, 1)), rows], axis=2), axis=2),
                      0.0).sum(axis=2)
    per_beam = [r.max() + 0.5 * np.log(np.exp((r - r.max()) / 0.5).sum()) for r in rise]
    assert float(v) == pytest.approx(sum(per_beam), rel=1e-9)
    for r, mu in zip(rise, per_beam):  # the soft max: the largest row, + <= tau log(rows)
        assert r.max() <= mu <= r.max() + 0.5 * np.log(3)
    eps = 1e-6
    for i in range(bi.size):
        e = np.zeros(bi.size)
        e[i] = eps
        fd = (float(_value_grad(m, w + e)[0]) - float(_value_grad(m, w - e)[0])) / (2 * eps)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_mu_of_one_row_equals_the_sliding_window_sequencer():
    profile = np.array([10.0, 20.0, 40.0, 30.0, 30.0, 60.0])  # MU, all above the floor
    edges = np.arange(7) * 5.0 - 15.0
    m = mu_surrogate(np.zeros(6, int), edges[:-1] + 2.5, np.zeros(6), (5.0, 5.0), tau=1.0)
    v, _ = _value_grad(m, profile)
    assert float(v) == pytest.approx(10 + 10 + 20 + 0 + 0 + 30)
    machine = load_machine("millennium120")
    bf = BeamFluence(0, 0.0, 0.0, 0.0, np.zeros(3), edges, profile[None, :])
    fs = FluenceSet((bf,), np.array([-2.5, 2.5]), fractions=1)
    beam = sequence_sliding_window(fs, machine).beams[0]
    travel = 30.0 / machine.mm_per_mu(1)  # the leaves' constant travel time, in MU
    assert beam.mu == pytest.approx(float(v) + travel, rel=1e-6)


def test_device_problem_adds_the_mu_term_to_objective_and_gradient():
    bi, bx, by = _grid(1, 2, 3)
    rng = np.random.default_rng(0)
    A = rng.uniform(0.0, 1.0, (8, bi.size))
    t = make_term("uniform", np.arange(8), np.ones(8), 10.0, 1.0)
    p = _problem(A, [t], np.ones(bi.size))
    w = rng.uniform(1.0, 5.0, bi.size).astype(np.float32)
    base = p.objective(w)
    p.mu = mu_surrogate(bi, bx, by, (5.0, 5.0), tau=0.1)
    p.mu_scale = 0.7
    assert p.objective(w) == pytest.approx(base + 0.7 * p.mu_value(w), rel=1e-5)
    dp = DeviceProblem.from_problem(p, np)
    f, g = dp.value_grad(w)
    assert float(f) == pytest.approx(p.objective(w), rel=1e-5)
    dp0 = DeviceProblem.from_problem(p.with_terms(p.terms), np)
    assert dp0.mu_scale == 0.7
    _, gm = _value_grad(p.mu, w)
    _, g_no = DeviceProblem(np, dp.A, dp.AT, dp.terms, dp.term_arrays, None, None, 0.0,
                            dp.n_beamlets).value_grad(w)
    np.testing.assert_allclose(g, g_no + 0.7 * gm, rtol=1e-5, atol=1e-6)
