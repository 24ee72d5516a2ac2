"""The far-scatter operator (atp/dose/far_scatter.py) and the large-field output factor
through the engine's dij."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf
from square_field import square_field_cax

from atp.dose.beam_model import PhotonBeamModel
from atp.dose.commission import output_factor, water_phantom
from atp.dose.far_scatter import FarScatter, FarScatterOptions, assemble, build_group, taper
from atp.dose.geometry import Beam
from atp.dose.influence import DoseInfluence
from atp.dose.pencil_beam import PencilBeamEngine


def _group(opts, sigma=75.0):
    ix = np.arange(-20, 20)
    gx, gy = np.meshgrid((ix + 0.5) * 5.0, (ix + 0.5) * 5.0, indexing="ij")
    bxc, byc = gx.ravel(), gy.ravel()
    u = np.linspace(-150.0, 150.0, 31)
    v = np.full_like(u, 10.0)
    n = bxc.size
    far = assemble([build_group(opts, np.arange(u.size), u, v, np.ones_like(u),
                                np.full_like(u, sigma), bxc, byc, 0.0, np.arange(n), 25.0,
                                u.size, n)], u.size, n)
    return far, u, v, bxc, byc


def test_far_operator_is_the_tapered_gaussian_tail_and_its_adjoint():
    opts = FarScatterOptions()
    far, u, v, bxc, byc = _group(opts)
    w = np.random.default_rng(0).random(bxc.size).astype(np.float32)

    def box(x, c, s):
        return 0.5 * (erf((x - c + 2.5) / (math.sqrt(2) * s))
                      - erf((x - c - 2.5) / (math.sqrt(2) * s)))

    exact = np.array([np.sum(w * box(uu, bxc, 75.0) * box(vv, byc, 75.0)
                             * (1.0 - taper(uu - bxc, opts.inner_mm, opts.outer_mm)
                                * taper(vv - byc, opts.inner_mm, opts.outer_mm)))
                      for uu, vv in zip(u, v)])
    got = far.apply(w)
    assert np.max(np.abs(got / exact - 1.0)) < 0.01
    g = np.random.default_rng(1).normal(size=u.size).astype(np.float32)
    assert float(g @ far.apply(w)) == pytest.approx(float(far.rmatvec(g) @ w), rel=1e-4)


def test_far_operator_saves_and_stacks(tmp_path):
    far, *_ = _group(FarScatterOptions())
    back = FarScatter.from_arrays(far.to_arrays())
    w = np.ones(far.shape[1], np.float32)
    assert np.array_equal(back.apply(w), far.apply(w))
    both = FarScatter.hstack([(far, far.shape[1]), (None, 3), (far, far.shape[1])],
                             far.shape[0])
    w2 = np.concatenate([w, np.full(3, 7.0, np.float32), 2 * w])
    assert np.allclose(both.apply(w2), 3 * far.apply(w), rtol=1e-5)


@pytest.fixture(scope="module")
def water():
    return water_phantom((360.0, 220.0, 360.0), (10.0, 10.0, 10.0), target_half_mm=10.0)


def _iso_dose(patient, side, far_scatter):
    half = side / 2
    dij = PencilBeamEngine(far_scatter=far_scatter).influence(
        patient, [Beam(0, isocenter_mm=(0.0, 100.0, 0.0))], dose_grid_factor=1,
        margin_mm=half, beamlet_size_mm=5.0)
    y, cax, _ = square_field_cax(dij, half)
    return float(np.interp(100.0, y, cax)), dij


def test_large_field_output_factor_through_the_dij_matches_the_model(water, tmp_path):
    model = PhotonBeamModel.load()
    d10, _ = _iso_dose(water, 100.0, FarScatterOptions())
    d20, dij = _iso_dose(water, 200.0, FarScatterOptions())
    assert dij.far is not None and dij.meta["far_scatter"]["groups"] == 1
    assert d20 / d10 == pytest.approx(output_factor(model, 200.0), rel=0.015)
    # without the far operator the sparse matrix alone misses it (the test can fail)
    n10, _ = _iso_dose(water, 100.0, None)
    n20, _ = _iso_dose(water, 200.0, None)
    assert n20 / n10 < 0.975 * output_factor(model, 200.0)
    # the operator travels with the saved dij
    dij.save(tmp_path / "d.npz")
    back = DoseInfluence.load(tmp_path / "d.npz")
    w = np.ones(dij.n_beamlets, np.float32)
    assert np.allclose(back.dose(w), dij.dose(w), rtol=1e-6)
    assert back.dose(w).sum() > (back.matrix @ w).sum() * 1.01
