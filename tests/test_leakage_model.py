"""Sliding-window leaf leakage in the optimised dose (``ProblemOptions.leaf_transmission``):
``d = (1 - T) A w + T sum_b MU_b(w) L_b``, its gradient, and where the pipeline uses it."""

from __future__ import annotations

import numpy as np
import pytest
from atp.optimizer.firstorder import DeviceProblem
from atp.optimizer.objectives import beam_mu, mu_value_grad
from atp.optimizer.problem import ProblemOptions, build_problem

from atp.plans import StageTimer, prepare_goals

TOY_BEAMS = 3
T = 0.015


@pytest.fixture(scope="module")
def leaky(phantom, toy):
    resolved = list(prepare_goals(phantom, site="hn", predictor="baseline",
                                  stages=StageTimer(False, 1)).resolved)
    return build_problem(resolved, phantom, toy,
                         options=ProblemOptions(leaf_transmission=T))


def _w(p, seed=0):
    return (p.x0 * np.random.default_rng(seed).uniform(0.5, 1.5, p.n_beamlets)).astype(
        np.float32)


def test_leaky_dose_is_the_sliding_window_delivery(leaky, toy):
    p = leaky
    w = _w(p)
    m = p.mu
    mus = beam_mu(w, m.D, m.S, m.beam_rows, m.tau)
    total, _ = mu_value_grad(w, m.D, m.D.T.tocsr(), m.S, m.S.T.tocsr(), m.beam_rows, m.tau)
    assert float(mus.sum()) == pytest.approx(float(total), rel=1e-5)
    # every beamlet gets (1 - T) w_i + T MU_b: the leaves cover it for MU_b - w_i
    beams = np.unique(toy.beamlets.beam_index)
    assert p.leak[1].shape == (p.n_rows, beams.size)
    fluence = (1.0 - T) * w + T * mus[np.searchsorted(beams, toy.beamlets.beam_index)]
    np.testing.assert_allclose(p.dose_rows(w), p.A @ fluence, rtol=1e-4, atol=1e-4)
    # the MU are at least each beam's largest beamlet weight: leakage only adds dose
    assert np.all(p.dose_rows(w) >= (p.A @ w) - 1e-4)


def test_leaky_gradient_matches_finite_differences(leaky):
    p = leaky
    dp = DeviceProblem.from_problem(p, np)
    w = _w(p, 1)
    f, g = dp.value_grad(w)
    assert float(f) == pytest.approx(p.objective(w), rel=1e-5)
    rng = np.random.default_rng(2)
    big = np.argsort(-np.abs(np.asarray(g)))[:20]
    for i in rng.choice(big, 5, replace=False):
        e = np.zeros_like(w)
        h = np.float32(1e-2 * w[i])
        e[i] = h
        fp, _ = dp.value_grad(w + e)
        fm, _ = dp.value_grad(w - e)
        assert float(g[i]) == pytest.approx(float(fp - fm) / (2 * float(h)), rel=2e-2)


def test_sweep_arcs_fit_their_mu_to_the_leaky_dose_the_optimiser_planned(leaky, toy):
    """The sweep arcs' sector MU are fitted to the dose the optimiser planned, leaf
    leakage included ((1 - T) w + T MU_b per beamlet), not to the leakage-free dij @ w:
    on the problem's rows the two models agree (up to the soft maximum's temperature)."""
    from atp.pipeline import _leaky_dose

    w = _w(leaky)
    ref = _leaky_dose(toy, w, 0.015)
    rows = leaky.on_rows(ref)
    np.testing.assert_allclose(rows, leaky.dose_rows(w), rtol=0.02, atol=0.02 * rows.max())
    assert np.all(ref >= toy.dose(w) - 1e-4) and ref.sum() > toy.dose(w).sum()


def test_the_mu_fit_reproduces_the_reference_dose_it_is_given(toy):
    from atp import sequencer

    w = np.random.default_rng(3).uniform(0.5, 1.5, toy.n_beamlets) * 50.0
    one = sequencer.sequence(w, toy, "imrt-sns", fractions=30)
    two = sequencer.sequence(w, toy, "imrt-sns", fractions=30,
                             reference_dose=2.0 * toy.dose(w))
    assert two.total_mu == pytest.approx(2.0 * one.total_mu, rel=0.05)


def test_pipeline_models_leakage_for_sliding_window_only(toy):
    from atp.optimizer import registry

    from atp.pipeline import _problem_options

    cpu, qp = registry.resolve("cpu"), registry.get("qp")
    assert _problem_options({"sequence": True}, toy, cpu).leaf_transmission > 0
    assert _problem_options({"sequence": "imrt-sns"}, toy, cpu).leaf_transmission == 0
    assert _problem_options({"sequence": False}, toy, cpu).leaf_transmission == 0
    assert _problem_options({"sequence": "vmat", "technique": "vmat"}, toy,
                            cpu).leaf_transmission == 0
    assert _problem_options({"sequence": True}, toy, qp).leaf_transmission == 0
