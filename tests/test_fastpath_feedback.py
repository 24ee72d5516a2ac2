"""Fast-path pieces that aim the plan at the deliverable dose on the patient grid:
target voxels by interpolation support, correction against a sequencing offset, and
control-point MU optimisation; the removed experimental options of old plans."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.dose.resample import (
    dose_to_patient_grid,
    interpolation_support,
    mask_to_dose_grid,
)

ARC = {"arc_spacing_deg": 10.0, "dose_grid_factor": 3}


@pytest.fixture(scope="module")
def fast(phantom):
    import atp

    return atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                    fast_options=dict(ARC, device="cpu"))


def test_interpolation_support_covers_the_mask_after_interpolation(phantom, fast):
    grid, dgrid = phantom.grid, fast.dij.dose_grid
    mask = phantom.mask("PTV_70")
    support = interpolation_support(mask, grid, dgrid)
    block = mask_to_dose_grid(mask.astype(np.float32), grid, dgrid)
    assert support.shape == dgrid.shape and 0.0 <= support.min() and support.max() <= 1.0
    # a dose of 1 on every supporting voxel interpolates to exactly 1 on the whole mask ...
    ones = (support > 0).astype(np.float32)
    assert dose_to_patient_grid(ones, dgrid, grid)[mask].min() == pytest.approx(1.0)
    # ... which the block fraction (voxels touching the mask) does not achieve
    touching = (block > 0).astype(np.float32)
    assert dose_to_patient_grid(touching, dgrid, grid)[mask].min() < 0.99
    assert np.all(support[block > 0] > 0)  # every touching voxel supports the mask
    # and the support is only those voxels plus neighbours: it is inside a 1-voxel dilation
    from scipy.ndimage import binary_dilation

    assert not np.any((support > 0) & ~binary_dilation(block > 0, np.ones((3, 3, 3))))


def test_fast_path_targets_the_interpolation_support(fast):
    from atp.optimizer.fastpath.chain import target_prescription_map

    fp = fast.attachments["fastpath"]
    grid, dgrid = fp.patient.grid, fp.dij.dose_grid
    rx = target_prescription_map(fp.patient, dgrid)
    np.testing.assert_array_equal(fp.rx.numpy(), rx)
    # every voxel the PTV_70 interpolation support reaches carries 70 Gy (the highest Rx)
    ptv70 = interpolation_support(fp.patient.mask("PTV_70"), grid, dgrid).reshape(-1) > 0
    assert np.all(rx[ptv70] == 70.0)
    # more voxels than the optimiser's block-fraction rule (>= 5 % of the voxel inside)
    inside = np.zeros(rx.shape, bool)
    for presc in fp.patient.prescriptions:
        block = mask_to_dose_grid(fp.patient.mask(presc.target).astype(np.float32), grid,
                                  dgrid)
        inside |= block.reshape(-1) > 0.05
    assert (rx > 0).sum() > inside.sum() and np.all(rx[inside] > 0)


def test_correction_with_zero_offset_is_the_plain_correction(fast):
    fp = fast.attachments["fastpath"]
    # a start or an offset always takes the exact steps (the correction network, when
    # shipped, only corrects the initial fluence without offset)
    a = fp.run({}, start=fp.w_init.numpy())
    b = fp.run({}, dose_offset_gy=np.zeros(fp.dij.dose_grid.shape, np.float32))
    np.testing.assert_allclose(b.fluence_mu, a.fluence_mu, rtol=1e-6, atol=1e-9)
    # an offset that adds dose everywhere makes the correction deliver less fluence
    c = fp.run({}, dose_offset_gy=np.full(fp.dij.dose_grid.shape, 5.0, np.float32))
    assert c.fluence_mu.sum() < a.fluence_mu.sum()
    # starting from the corrected fluence with 0 steps returns it unchanged
    d = fp.run({}, start=a.fluence_mu, steps=0)
    np.testing.assert_array_equal(d.fluence_mu, a.fluence_mu)


def test_mu_basis_is_the_deliverable_dose_and_with_mu_round_trips(fast):
    from dataclasses import replace

    from atp.sequencer.reweight import mu_basis, with_mu

    from atp import sequencer

    # the MU basis is the reported dose: sparse matrix plus the far-scatter tail
    delivery, dij = fast.delivery, fast.dij
    assert dij.far is not None
    now = np.asarray(sequencer.deliverable_dose(delivery, dij)).reshape(-1)
    rows = np.flatnonzero(now > 0.1 * now.max())
    B, v0, lo, hi = mu_basis(delivery, dij, rows)
    np.testing.assert_allclose(B @ v0, now[rows], rtol=1e-4, atol=1e-4 * now.max())
    # without the tail the basis falls short of the reported dose (the gap it closes)
    near = mu_basis(delivery, replace(dij, far=None), rows)[0] @ v0
    assert (now[rows] - near).max() > 0.01 * now.max()
    assert np.all(lo <= v0 + 1e-9) and np.all(v0 <= hi + 1e-9)
    doubled = with_mu(delivery, 2.0 * v0)
    d2 = np.asarray(sequencer.deliverable_dose(doubled, dij)).reshape(-1)
    np.testing.assert_allclose(d2, 2.0 * now, rtol=1e-4, atol=1e-4 * now.max())
    for a, b in zip(delivery.beams, doubled.beams):  # leaves untouched
        np.testing.assert_array_equal(a.leaf_a_mm, b.leaf_a_mm)
        np.testing.assert_array_equal(a.leaf_b_mm, b.leaf_b_mm)
    with pytest.raises(ValueError):
        with_mu(delivery, v0[:-1])


def test_control_point_mu_lower_the_objective_within_machine_limits(fast):

    from atp.sequencer.reweight import mu_basis, optimise_mu

    from atp import sequencer

    # on the reported dose (the MU basis carries the far-scatter tail)
    fp, dij = fast.attachments["fastpath"], fast.dij
    raw = sequencer.sequence(fast.fluence, dij, "vmat", fractions=fp.patient.fractions)
    out, info = optimise_mu(raw, dij, fp.objective_value_grad({}), max_iter=30)
    j = fp.objective_value
    before = j(sequencer.deliverable_dose(raw, dij))
    after = j(sequencer.deliverable_dose(out, dij))
    assert info["kept"] and after < before and out.meta["mu_optimised"]
    assert info["objective_before"] == pytest.approx(before, rel=1e-4)
    rows = np.arange(dij.dose_grid.n_voxels)
    _, v, lo, hi = mu_basis(out, dij, rows[:10])
    assert np.all(v >= lo - 1e-6) and np.all(v <= hi + 1e-6)
    # on J's own rows (what the fast path passes): the same objective, exactly
    support = fp.objective_rows({})
    assert support is not None and 0 < support.size < dij.dose_grid.n_voxels
    out2, info2 = optimise_mu(raw, dij, fp.objective_value_grad({}), max_iter=30,
                              rows=support)
    assert info2["objective_before"] == pytest.approx(before, rel=1e-4)
    after2 = j(sequencer.deliverable_dose(out2, dij))
    assert info2["kept"] and after2 < before
    assert info2["objective_after"] == pytest.approx(after2, rel=1e-3)
    # the rows' matrix kept by the FastPath (selected once for every pass and slider)
    # gives the same basis; a matrix of other rows is refused
    rows, row_matrix = fp.objective_rows_matrix({})
    np.testing.assert_array_equal(rows, support)
    assert fp.objective_rows_matrix({})[1] is row_matrix
    B1, v1, _, _ = mu_basis(raw, dij, rows)
    B2, v2, _, _ = mu_basis(raw, dij, rows, row_matrix=row_matrix)
    np.testing.assert_array_equal(B2, B1)
    np.testing.assert_array_equal(v2, v1)
    with pytest.raises(ValueError, match="row_matrix"):
        mu_basis(raw, dij, rows[:-1], row_matrix=row_matrix)
    with pytest.raises(ValueError, match="row_matrix"):
        optimise_mu(raw, dij, fp.objective_value_grad({}), row_matrix=row_matrix)
    # the plan records the MU step and its effect
    assert fast.optimizer["control_point_mu"] and fast.timings_s["control-point MU"] > 0


def test_oar_minus_targets_drops_target_voxels_from_the_oar_hinges(fast):
    from atp.optimizer.fastpath.chain import FastPath

    fp0 = fast.attachments["fastpath"]
    args = (fp0.patient, fast.dij, fast.predicted_dose_gy)
    support = FastPath(*args, device="cpu", oar_minus_targets="support").prepare()
    for name, w in fp0.oar_w.items():
        assert torch.equal(fp0.oar_hinge_w[name], w)  # default: the whole OAR
        assert torch.all(support.oar_hinge_w[name][support.rx > 0] == 0)
        outside = support.rx == 0
        assert torch.equal(support.oar_hinge_w[name][outside], w[outside])
    assert support.oar_w.keys() == fp0.oar_w.keys()  # features and mimicking keep the OARs
    for bad in ("all", "core"):  # 'core' (voxels half inside a target): not kept
        with pytest.raises(ValueError, match="oar_minus_targets"):
            FastPath(*args, oar_minus_targets=bad)


def test_old_plans_with_removed_options_load_and_respare_at_their_off_values(
        fast, phantom, tmp_path):
    import json

    import atp
    from atp.errors import InputError

    out = fast.save(tmp_path / "old", report=False)
    pj = out / "plan.json"
    data = json.loads(pj.read_text())
    recorded = data["settings"]["fastpath_options"]
    for key in ("goal_weight", "hot_margin", "target_min_fraction", "target_voxels"):
        assert key not in recorded  # no longer written
    # a plan written before the removal recorded them at their "off" values
    off = {"goal_weight": 0.0, "hot_margin": 0.0, "target_min_fraction": 0.0,
           "target_voxels": "support"}
    data["settings"]["fastpath_options"] = {**recorded, **off}
    pj.write_text(json.dumps(data))
    again = atp.respare(atp.load_plan(out, patient=phantom), {})
    np.testing.assert_allclose(again.fluence, fast.fluence, rtol=1e-5,
                               atol=1e-6 * float(fast.fluence.max()))
    # one that used them cannot be re-spared: one line naming the option
    for key, value in (("goal_weight", 1.0), ("hot_margin", 0.05),
                       ("target_voxels", "block"), ("target_min_fraction", 0.05),
                       ("oar_minus_targets", "core")):
        data["settings"]["fastpath_options"] = {**recorded, **off, key: value}
        pj.write_text(json.dumps(data))
        loaded = atp.load_plan(out, patient=phantom)  # the plan itself still loads
        with pytest.raises(InputError, match=f"fastpath_options.{key}") as err:
            atp.respare(loaded, {})
        assert "removed" in str(err.value) and "\n" not in str(err.value)


def test_vmat_passes_sets_the_arcs_of_the_delivery(phantom, fast):
    import atp
    from atp.errors import InputError

    assert fast.settings["vmat_passes"] == 2
    assert len(fast.delivery.beams) <= 2
    three = atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij,
                     fast=True, progress=False,
                     fast_options={"device": "cpu", "vmat_passes": 3})
    assert three.settings["vmat_passes"] == 3
    assert len(fast.delivery.beams) < len(three.delivery.beams) <= 3
    assert atp.respare(three, {"Parotid_L": 0.1}).settings["vmat_passes"] == 3
    with pytest.raises(InputError, match="vmat_passes"):
        atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij, fast=True,
                 progress=False, fast_options={"device": "cpu", "vmat_passes": 0})


def test_sliding_window_vmat_in_the_fast_path(phantom, fast):
    import atp
    from atp import sequencer
    from atp.errors import InputError

    opts = {"device": "cpu", "vmat_sequencer": "vmat-sliding", "sector_deg": 20.0}
    sw = atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij, fast=True,
                  progress=False, fast_options=opts)
    assert sw.settings["sequence"] == "vmat-sliding" and sw.settings["sector_deg"] == 20.0
    assert sw.delivery.technique == "vmat-sliding"
    assert sequencer.check_delivery(sw.delivery) == []
    assert all(b.mu_group is not None for b in sw.delivery.beams)
    # the control-point MU step scales whole sectors (one free MU each) and keeps J lower
    (mu,) = sw.optimizer["control_point_mu"]
    assert mu["objective_after"] <= mu["objective_before"]
    # a respared plan keeps the sequencer
    assert atp.respare(sw, {"Parotid_L": 0.1}).delivery.technique == "vmat-sliding"
    with pytest.raises(InputError, match="vmat_sequencer"):
        atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij, fast=True,
                 progress=False, fast_options={"device": "cpu", "vmat_sequencer": "imrt"})
    with pytest.raises(InputError, match="sector_deg"):
        atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij, fast=True,
                 progress=False, fast_options={**opts, "sector_deg": -1.0})


def test_organ_maximum_term_takes_the_goal_lists_near_max_limits(phantom, fast):
    import atp

    mx = fast  # on by default (max_weight 4)
    limits = mx.attachments["fastpath"].max_limits
    # the hn goal list: cord D0.1cc <= 45 (P1); brainstem <= 54 (P1) and <= 50 (P3); not
    # the mandible D2% <= 73.5 Gy, above Rx
    assert {n: lim for n, (_, lim) in limits.items()} == {"SpinalCord": 45.0,
                                                          "Brainstem": 50.0}
    block = mask_to_dose_grid(phantom.mask("SpinalCord").astype(np.float32),
                              phantom.grid, fast.dij.dose_grid).reshape(-1)
    w = limits["SpinalCord"][0].numpy()
    support = interpolation_support(phantom.mask("SpinalCord"), phantom.grid,
                                    fast.dij.dose_grid).reshape(-1)
    np.testing.assert_array_equal(w, support)  # weights: the interpolation share
    assert np.all(w[block > 0] > 0) and (w > 0).sum() > (block > 0).sum()
    assert w.max() <= 1.0 and w.min() >= 0.0
    assert mx.settings["fastpath_options"]["max_weight"] == 4.0
    rows = set(mx.attachments["fastpath"].objective_rows({}).tolist())
    assert set(np.flatnonzero(w).tolist()) <= rows
    # max_weight 0 leaves the term out: no limits, J's rows without the organs' support
    off = atp.plan(phantom, predicted_dose=fast.predicted_dose_gy, dij=fast.dij, fast=True,
                   progress=False,
                   fast_options={"device": "cpu", "fastpath_options": {"max_weight": 0.0}})
    assert not off.attachments["fastpath"].max_limits
    assert off.settings["fastpath_options"]["max_weight"] == 0.0


def test_fast_path_operator_reuses_the_dijs_csr(fast):
    # the plan's own operator holds the dij's CSR: no second CSC -> CSR conversion
    assert fast.attachments["fastpath"].op.host_csr is fast.dij.csr
