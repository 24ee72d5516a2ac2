"""Direct aperture refinement of VMAT deliveries (sequencer.aperture_refine): the
closed-form beamlet weights equal the deliverable model's, their vector-Jacobian product
matches finite differences, every point inside the leaf boxes is deliverable, and the
refinement lowers the plan objective without breaking a machine limit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.sequencer.aperture_refine import leaf_boxes, refine_apertures
from atp.sequencer.arc_model import ArcModel
from atp.sequencer.deliverable import delivered_weights
from atp.sequencer.delivery import check_delivery

from atp import sequencer


@pytest.fixture(scope="module")
def fast(phantom):
    import atp

    return atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                    fast_options={"arc_spacing_deg": 10.0, "dose_grid_factor": 3,
                                  "device": "cpu"})


@pytest.fixture(scope="module")
def raw(fast):
    """The rule-based VMAT sequencing of the fast path's fluence (no MU fit)."""
    return sequencer.sequence(fast.fluence, fast.dij, "vmat",
                              fractions=fast.patient.fractions, reweight=False)


def _models(delivery, dij):
    return [ArcModel(b, dij.beamlets, delivery.machine, delivery.fractions, 4)
            for b in delivery.beams]


def test_closed_form_weights_equal_the_deliverable_model(fast, raw):
    w = np.zeros(fast.dij.n_beamlets)
    for md in _models(raw, fast.dij):
        md.weights(md.a0, md.b0, md.v0, w)
    ref = delivered_weights(raw, fast.dij.beamlets)
    assert ref.max() > 0
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-9 * ref.max())


def test_leaf_and_mu_gradients_match_finite_differences(fast, raw):
    """Exact with leaf transmission; the tip gradient leaves out the tongue-and-groove
    strips (documented in sequencer.aperture_refine), so they are switched off here."""
    from dataclasses import replace

    dij = fast.dij
    m = replace(raw.machine, tongue_groove_mm=0.0)
    assert m.leaf_transmission > 0
    md = _models(replace(raw, machine=m), dij)[0]
    target = np.random.default_rng(0).normal(size=dij.n_beamlets) * 50.0

    def j_of(a, b, v):
        w = np.zeros(dij.n_beamlets)
        md.weights(a, b, v, w)
        return 0.5 * float(np.sum((w - target) ** 2)), w - target

    a, b, v = md.a0.copy(), md.b0.copy(), md.v0.copy()
    _, g_w = j_of(a, b, v)
    ga, gb, gv = md.grad(a, b, v, g_w)
    open_pairs = np.argwhere(b - a > 6.0)
    assert open_pairs.shape[0] > 20
    checked = 0
    for k, p in open_pairs[:: max(1, open_pairs.shape[0] // 12)]:
        for arr, g in ((a, ga), (b, gb)):
            eps = 1e-4  # mm: central differences also at tips sitting on a beamlet edge
            arr[k, p] += eps
            jp = j_of(a, b, v)[0]
            arr[k, p] -= 2 * eps
            jm = j_of(a, b, v)[0]
            arr[k, p] += eps
            fd = (jp - jm) / (2 * eps)
            assert g[k, p] == pytest.approx(fd, rel=1e-3, abs=1e-6 * np.abs(ga).max())
            checked += abs(fd) > 0
    assert checked >= 8  # the check saw real, non-zero derivatives
    for k in np.flatnonzero(v > 0)[:4]:
        eps = 1e-3
        v[k] += eps
        jp = j_of(a, b, v)[0]
        v[k] -= 2 * eps
        jm = j_of(a, b, v)[0]
        v[k] += eps
        assert gv[k] == pytest.approx((jp - jm) / (2 * eps), rel=1e-5)


def test_every_point_inside_the_leaf_boxes_is_deliverable(raw):
    from dataclasses import replace

    rng = np.random.default_rng(1)
    m = raw.machine
    for beam in raw.beams:
        a, b = beam.leaf_a_mm[1:-1], beam.leaf_b_mm[1:-1]
        a_lo, a_hi, b_lo, b_hi = leaf_boxes(a, b, beam.gantry_deg[1:-1], m)
        assert np.all(a_lo <= a) and np.all(a <= a_hi) and np.all(b_lo <= b)
        assert np.all(b <= b_hi)
        assert (a_hi - a_lo).max() > 1.0  # the boxes leave room to move
        for corner in range(4):  # random points and the extreme corners
            u = rng.random(a.shape) if corner < 2 else np.full(a.shape, corner - 2.0)
            a2 = a_lo + u * (a_hi - a_lo)
            b2 = b_lo + (1 - u) * (b_hi - b_lo)
            moved = replace(beam, leaf_a_mm=np.concatenate([a2[:1], a2, a2[-1:]]),
                            leaf_b_mm=np.concatenate([b2[:1], b2, b2[-1:]]))
            assert check_delivery(replace(raw, beams=(moved,))) == []


def test_refinement_lowers_the_objective_within_machine_limits(fast, raw):
    from atp.sequencer.far_tail import dose_objective

    # the objective of the reported dose (sparse matrix + far-scatter tail)
    fp, dij = fast.attachments["fastpath"], fast.dij
    assert dij.far is not None
    before = fp.objective_value(sequencer.deliverable_dose(raw, dij))
    # on the objective's own rows (as the fast path runs it): the same J
    rows, row_matrix = fp.objective_rows_matrix({})
    objective = dose_objective(dij, fp.objective_value_grad({}), rows, row_matrix,
                               embed=True)
    w0 = sequencer.delivered_weights(raw, dij.beamlets)
    assert objective(w0)[0] == pytest.approx(before, rel=1e-4)
    np.testing.assert_allclose(objective(w0)[1],
                               dose_objective(dij, fp.objective_value_grad({}))(w0)[1],
                               rtol=1e-3, atol=1e-5 * np.abs(objective(w0)[1]).max())
    out, info = refine_apertures(raw, dij.beamlets, objective, rounds=2, iterations=8)
    after = fp.objective_value(sequencer.deliverable_dose(out, dij))
    assert check_delivery(out) == []
    assert info["kept"] and out.meta["apertures_refined"]
    assert after < 0.9 * before
    assert info["objective_before"] == pytest.approx(before, rel=1e-3)
    assert info["objective_after"] == pytest.approx(after, rel=1e-3)
    moved = max(np.abs(o.leaf_a_mm - r.leaf_a_mm).max() for o, r in zip(out.beams, raw.beams))
    assert moved > 0.5  # the leaves moved, not only the MU


def test_refinement_only_takes_vmat(fast):
    imrt = sequencer.sequence(fast.fluence, fast.dij, "imrt-sns",
                              fractions=fast.patient.fractions, reweight=False)
    with pytest.raises(ValueError, match="VMAT"):
        refine_apertures(imrt, fast.dij.beamlets, lambda w: (0.0, np.zeros_like(w)))


def test_fast_path_option_runs_and_records_the_refinement(phantom, fast):
    import atp

    plan = atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                    dij=fast.dij, predicted_dose=fast.predicted_dose_gy,
                    fast_options={"arc_spacing_deg": 10.0, "device": "cpu",
                                  "fastpath_options": {"aperture_iterations": 5,
                                                       "aperture_rounds": 1}})
    info = plan.optimizer["aperture_refinement"]
    assert len(info) == 1 and info[0]["iterations"] <= 5
    assert plan.timings_s["aperture refinement"] > 0
    assert check_delivery(plan.delivery) == []
    j = plan.attachments["fastpath"].objective_value
    assert j(sequencer.deliverable_dose(plan.delivery, plan.dij)) <= \
        j(sequencer.deliverable_dose(fast.delivery, fast.dij)) + 1e-6


@pytest.mark.parametrize("spare", [{}, {"Parotid_L": 0.2}])
def test_weight_objective_on_the_objective_rows_equals_the_whole_matrix(fast, spare):
    """weight_value_grad computes A w on the rows J reads only; J and A^T dJ/dD must be
    those of the whole dose-influence matrix."""
    from atp.optimizer.fastpath.error_map import value_and_error_map

    fp = fast.attachments["fastpath"]
    obj = fp.objective(spare)
    rows = obj.voxel_support()
    assert 0 < rows.numel() < fp.op.shape[0]  # a real restriction
    w = np.random.default_rng(2).random(fp.op.shape[1]) * 2.0
    j, g = fp.weight_value_grad(spare)(w)
    wt = torch.as_tensor(w, dtype=torch.float32)
    j_full, e = value_and_error_map(fp.op(wt), obj)
    assert torch.count_nonzero(e).item() > 0
    assert set(torch.nonzero(e).reshape(-1).tolist()) <= set(rows.tolist())
    g_full = fp.op.transpose_apply(e).numpy()
    assert j == pytest.approx(float(j_full), rel=1e-5)
    np.testing.assert_allclose(g, g_full, rtol=1e-4, atol=1e-6 * np.abs(g_full).max())
