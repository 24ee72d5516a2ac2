"""Goals held on the final deliverable dose (atp.final_dose, pipeline._final_dose_goals).

On the phantom with the toy dij (``atp.optimizer.testing.toy_dij``, conftest.py's ``toy``):
a priority-1 goal the sequenced dose breaks is restored by the beams' MU on the CT grid, the
scaled delivery's own deliverable dose is the reported one, and it stays within the machine
limits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from atp.sequencer import deliverable_dose
from atp.sequencer.delivery import check_delivery

import atp
from atp.final_dose import (
    FinalDoseOptions,
    _Model,
    _weighted_met,
    normalise,
    reweight_beams,
    scale_beams,
    scale_bounds,
)
from atp.goals import evaluate_goals
from atp.pipeline import _beam_doses as beam_doses
from atp.pipeline import _final_dose_goals, _sequence, patient_dose

FAST = {"max_iter": 120}


@pytest.fixture(scope="module")
def sns_plan(phantom, toy):
    """Step-and-shoot plan without the final-dose stage (the sequenced dose as it was)."""
    return atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, sequence="imrt-sns",
                    optimizer_options=dict(FAST, final_dose=False))


@pytest.fixture(scope="module")
def sliding_plan(phantom, toy):
    """Sliding-window plan without the final-dose stage and correction rounds."""
    return atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, sequence="imrt-sliding",
                    optimizer_options=dict(FAST, final_dose=False, deliverable_rounds=0))


def _recording_resequence(plan, toy, calls):
    """A ``resequence`` for :func:`_final_dose_goals` on the toy dij that records the
    fluences it is given."""
    def resequence(w):
        calls.append(w)
        out = _sequence(plan.patient, toy, w, patient_dose(toy, w), "imrt-sliding",
                        "millennium120")
        return out[0], out[1], out[2], out[3], toy, None

    return resequence


def _goal(plan, gid):
    return next(r for r in plan.results if r.goal.id == gid)


def test_beam_doses_sum_to_the_reported_dose(sns_plan, toy):
    per = beam_doses(sns_plan.delivery, toy)
    assert per.shape == (len(sns_plan.delivery.beams), *sns_plan.dose_gy.shape)
    np.testing.assert_allclose(per.sum(axis=0), sns_plan.dose_gy, atol=1e-3)


def test_beam_doses_carry_the_far_scatter_tail(sns_plan, toy):
    """With a far-scatter operator on the dij (every pencil-beam dij has one) the beams'
    doses still sum to the reported deliverable dose: the final-dose stage compares them
    with it and stands down when they differ (it did on every 9-field plan when the
    beams' doses were the sparse matrix's alone)."""
    import scipy.sparse as sp

    from atp.dose.far_scatter import FarGroup, FarScatter

    rng = np.random.default_rng(0)
    gu, gv = rng.random((2, 3, 2), np.float32), rng.random((2, 2, 2), np.float32)
    grp = FarGroup(0, 2, 2, 0, gu, gv, 0.3 * gu, 0.3 * gv)
    V = sp.random(4, toy.n_beamlets, density=0.5, random_state=1, format="csr",
                  dtype=np.float32)
    R = sp.random(toy.n_voxels, 12, density=0.3, random_state=2, format="csr",
                  dtype=np.float32) * 1e-3
    dij = replace(toy, far=FarScatter(R.tocsr(), V, (grp,)))
    reported = dij.to_patient_grid(deliverable_dose(sns_plan.delivery, dij))
    near = dij.to_patient_grid(deliverable_dose(sns_plan.delivery, replace(dij, far=None)))
    assert np.abs(reported - near).max() > 0.01 * reported.max()
    per = beam_doses(sns_plan.delivery, dij)
    np.testing.assert_allclose(per.sum(axis=0), reported, atol=1e-3)


def test_beam_doses_of_split_fields_are_their_own(sns_plan, toy):
    """Two deliveries of one gantry angle (split fields share the dij beam's columns):
    each gets its own dose, and the doses still sum to the delivery's."""
    d = sns_plan.delivery
    b0 = d.beams[0]
    half = replace(b0, cumulative_mu=b0.cumulative_mu * 0.25)
    rest = replace(b0, name=b0.name + "_2", cumulative_mu=b0.cumulative_mu * 0.75)
    split = replace(d, beams=(half, rest, *d.beams[1:]))
    per = beam_doses(split, toy)
    np.testing.assert_allclose(per.sum(axis=0), sns_plan.dose_gy, atol=1e-3)
    np.testing.assert_allclose(per[1], 3.0 * per[0], rtol=1e-4, atol=1e-5)


def test_a_broken_hard_goal_is_restored_on_the_final_dose(sns_plan, toy):
    """Tighten the cord's priority-1 limit below what the sequenced plan delivers: the
    final dose breaks it; the final-dose stage re-weights the beams' MU until it holds,
    and the reported dose is exactly the scaled delivery's deliverable dose."""
    p = sns_plan
    cord = _goal(p, "SpinalCord.D0.1cc")
    assert cord.goal.is_hard and cord.achieved > 5.0
    limit = 0.93 * cord.achieved
    goals = [replace(g, value=limit) if g.id == cord.goal.id else g for g in p.resolved_goals]
    before = next(r for r in evaluate_goals(goals, p.patient, p.dose_gy)
                  if r.goal.id == cord.goal.id)
    assert before.passed is False
    cov0 = _goal(p, "PTV_70.D95%").achieved
    delivery, dose, _, info, ideal, fluence = _final_dose_goals(
        p.patient, goals, toy, p.delivery, p.ideal_dose_gy, p.dose_gy, p.fidelity,
        FinalDoseOptions())
    assert ideal is p.ideal_dose_gy and fluence is None  # MU scaled, not re-sequenced
    after = {r.goal.id: r for r in evaluate_goals(goals, p.patient, dose)}
    assert info["kept"] is True
    assert after[cord.goal.id].passed is True
    # the beams are re-weighted: coverage stays above what scaling every beam down to
    # the new limit would leave
    uniform = cov0 * limit * (1 - FinalDoseOptions().margin) / cord.achieved
    assert after["PTV_70.D95%"].achieved > uniform
    assert len(set(info["mu_scales"])) > 1
    # what is reported is what the scaled apertures deliver, within the machine limits
    own = toy.to_patient_grid(deliverable_dose(delivery, toy))
    np.testing.assert_allclose(own, dose, atol=1e-3 * float(dose.max()))
    assert check_delivery(delivery) == []
    ratio = [b.mu / a.mu for a, b in zip(p.delivery.beams, delivery.beams)]
    np.testing.assert_allclose(ratio, info["mu_scales"], rtol=1e-4)


def test_the_stage_leaves_a_plan_alone_when_it_cannot_improve(sns_plan, toy):
    """Every dose goal already met with room (values moved far away): scales stay 1."""
    p = sns_plan
    goals = [replace(g, value=(1e3 if g.operator == "<=" else 0.0))
             if g.value is not None else g for g in p.resolved_goals]
    s, info = reweight_beams(goals, p.patient, beam_doses(p.delivery, toy))
    assert info["kept"] is False and np.all(s == 1.0)


def test_normalise_meets_coverage_only_as_far_as_hard_limits_allow(sns_plan):
    p = sns_plan
    cold = p.dose_gy * np.float32(0.9)
    res = {r.goal.id: r for r in evaluate_goals(p.resolved_goals, p.patient, cold)}
    assert res["PTV_70.D95%"].passed is False
    c, info = normalise(p.resolved_goals, p.patient, cold, FinalDoseOptions(max_normalise=1.5))
    assert info["normalised"] and c > 1.0
    assert _goal_on(p, cold * np.float32(c), "PTV_70.D95%").passed is True
    # a cord limit just above the cold plan's cord dose caps the scale below it (the
    # partial normalisation is kept only if it meets more goals; the cord stays met)
    cord = res["SpinalCord.D0.1cc"].achieved
    goals = [replace(g, value=1.02 * cord) if g.id == "SpinalCord.D0.1cc" else g
             for g in p.resolved_goals]
    c2, info2 = normalise(goals, p.patient, cold, FinalDoseOptions(max_normalise=1.5))
    cap = 1.02 * (1 - FinalDoseOptions().margin)
    assert 1.0 <= c2 <= cap + 1e-9
    assert info2.get("scale", info2.get("scale_tried")) == pytest.approx(cap, rel=1e-3)
    cord2 = next(r for r in evaluate_goals(goals, p.patient, cold * np.float32(c2))
                 if r.goal.id == "SpinalCord.D0.1cc")
    assert cord2.passed is True


def test_normalise_does_not_trade_a_met_goal_for_one_of_the_same_weight(sns_plan):
    """A normalisation that breaks a met soft limit (a mandible near-max inside the
    target) to meet coverage goals worth exactly its weight is a tie between the goal
    list's priorities: the plan is left as it is. Worth less than what it meets, the
    limit gives way."""
    p = sns_plan
    cold = p.dose_gy * np.float32(0.9)
    res = {r.goal.id: r for r in evaluate_goals(p.resolved_goals, p.patient, cold)}
    trap = "Brainstem.D0.1cc.low"  # a soft (priority-2) upper limit the scale breaks
    assert not res[trap].goal.is_hard

    def with_trap(weight):
        return [replace(g, value=1.001 * res[trap].achieved, weight=weight)
                if g.id == trap else g for g in p.resolved_goals]

    opts = FinalDoseOptions(max_normalise=1.5)
    c, _ = normalise(with_trap(1e-9), p.patient, cold, opts)
    assert c > 1.01
    after = evaluate_goals(with_trap(1e-9), p.patient, cold * np.float32(c))
    assert next(r for r in after if r.goal.id == trap).passed is False  # the scale breaks it
    gained = _weighted_met(after) - _weighted_met(
        evaluate_goals(with_trap(1e-9), p.patient, cold))
    assert gained > 0
    tie, info = normalise(with_trap(gained), p.patient, cold, opts)
    assert tie == 1.0 and info["normalised"] is False
    assert info["why"].startswith("no more goals met")
    cheaper, info = normalise(with_trap(0.5 * gained), p.patient, cold, opts)
    assert cheaper == pytest.approx(c) and info["normalised"] is True


def _goal_on(plan, dose, gid):
    return next(r for r in evaluate_goals(plan.resolved_goals, plan.patient, dose)
                if r.goal.id == gid)


def test_sliding_window_beams_are_never_scaled_below_their_leaf_speed(sliding_plan):
    """A sliding-window sweep is timed at the maximum dose rate: fewer MU would need faster
    leaves. The bounds keep check_delivery clean; a scale below them breaks it."""
    p = sliding_plan
    bounds = scale_bounds(p.delivery)
    assert all(lo >= 1.0 - 1e-9 for lo, _ in bounds)  # swept at the speed limit
    for pick in (0, 1):
        ok = scale_beams(p.delivery, [b[pick] for b in bounds])
        assert check_delivery(ok) == []
    slow = scale_beams(p.delivery, [0.9] * len(bounds))
    assert any("faster" in m for m in check_delivery(slow))


def test_sliding_window_hard_goal_is_restored_by_resequencing(sliding_plan, toy):
    """A sliding-window beam cannot take fewer MU (its leaves are timed at the maximum
    dose rate): a priority-1 goal broken on the final dose is restored by re-sequencing
    the fluence scaled per beam; the result is deliverable and is what is reported."""
    p = sliding_plan
    cord = _goal(p, "SpinalCord.D0.1cc")
    limit = 0.95 * cord.achieved
    goals = [replace(g, value=limit) if g.id == cord.goal.id else g for g in p.resolved_goals]
    calls = []
    resequence = _recording_resequence(p, toy, calls)
    delivery, dose, _, info, _ideal, fluence = _final_dose_goals(
        p.patient, goals, toy, p.delivery, p.ideal_dose_gy, p.dose_gy, p.fidelity,
        FinalDoseOptions(), fluence=p.fluence, beam_index=toy.beamlets.beam_index,
        resequence=resequence)
    assert len(calls) == 1 and info["resequenced"]["kept"] is True
    after = {r.goal.id: r for r in evaluate_goals(goals, p.patient, dose)}
    assert after[cord.goal.id].achieved < cord.achieved
    assert after[cord.goal.id].passed is True
    assert fluence is calls[0] and not np.allclose(fluence, p.fluence)
    own = toy.to_patient_grid(deliverable_dose(delivery, toy))
    np.testing.assert_allclose(own, dose, atol=1e-3 * float(dose.max()))
    assert check_delivery(delivery) == []


def test_objective_gradient_matches_finite_differences(sns_plan, toy):
    p = sns_plan
    per = beam_doses(p.delivery, toy)
    model = _Model(p.resolved_goals, p.patient, per, FinalDoseOptions(), 10.0)
    rng = np.random.default_rng(0)
    s = 1.0 + 0.05 * rng.standard_normal(per.shape[0])
    f, g = model.objective(s)
    for b in range(per.shape[0]):
        e = np.zeros_like(s)
        e[b] = 1e-6
        fd = (model.objective(s + e)[0] - model.objective(s - e)[0]) / 2e-6
        assert fd == pytest.approx(g[b], rel=1e-3, abs=1e-6 * max(1.0, abs(f)))


def test_sliding_window_soft_goal_is_met_by_resequencing(sliding_plan, toy):
    """A priority-2 upper limit a sliding-window plan misses: resequence_for="hard" leaves
    the plan as sequenced (no priority-1 goal fails); the default ("goals") re-sequences
    the fluence scaled per beam and keeps it only when it meets more goals by weight,
    every priority-1 goal it met still met."""
    p = sliding_plan
    cord = _goal(p, "SpinalCord.D0.1cc")
    goals = [replace(g, value=0.97 * cord.achieved, priority=2, weight=1e4)
             if g.id == cord.goal.id else g for g in p.resolved_goals]
    assert not any(g.is_hard and g.id == cord.goal.id for g in goals)
    calls = []
    resequence = _recording_resequence(p, toy, calls)
    args = (p.patient, goals, toy, p.delivery, p.ideal_dose_gy, p.dose_gy, p.fidelity)
    kw = {"fluence": p.fluence, "beam_index": toy.beamlets.beam_index,
          "resequence": resequence}
    _, _, _, info, _, fluence = _final_dose_goals(
        *args, FinalDoseOptions(resequence_for="hard"), **kw)
    assert calls == [] and "resequenced" not in info and fluence is p.fluence

    delivery, dose, _, info, _, fluence = _final_dose_goals(
        *args, FinalDoseOptions(), **kw)
    assert len(calls) == 1
    record = info["resequenced"]
    assert record["kept"] is True and record["weighted_met"][1] > record["weighted_met"][0]
    assert fluence is calls[0]
    before = {r.goal.id: r for r in evaluate_goals(goals, p.patient, p.dose_gy)}
    after = {r.goal.id: r for r in evaluate_goals(goals, p.patient, dose)}
    assert before[cord.goal.id].passed is False and after[cord.goal.id].passed is True
    assert all(after[g].passed for g, r in before.items() if r.goal.is_hard and r.passed)
    own = toy.to_patient_grid(deliverable_dose(delivery, toy))
    np.testing.assert_allclose(own, dose, atol=1e-3 * float(dose.max()))
    assert check_delivery(delivery) == []


def test_a_resequencing_not_tried_says_why(sns_plan, toy):
    """The final-dose record says why the fluence was not re-sequenced (plan.json)."""
    p = sns_plan
    calls = []
    _, _, _, info, _, _ = _final_dose_goals(
        p.patient, p.resolved_goals, toy, p.delivery, p.ideal_dose_gy, p.dose_gy,
        p.fidelity, FinalDoseOptions(), fluence=p.fluence,
        beam_index=toy.beamlets.beam_index, resequence=lambda w: calls.append(w))
    assert calls == [] and "resequenced" not in info
    assert isinstance(info["resequence_not_tried"], str) and info["resequence_not_tried"]


def test_resequence_for_is_checked():
    with pytest.raises(ValueError, match="resequence_for"):
        FinalDoseOptions(resequence_for="always")
