"""The far-scatter tail in the sequencer's optimisers (sequencer.far_tail and the
FarScatter API they use): the far dose of many weight vectors at once
(``FarScatter.apply_many``) equals ``far.apply`` of each, the operator restricted to rows
(``FarScatter.restrict_rows``) gives those rows of the dose, and ``dose_objective``'s
gradient is that of the reported dose ``A w + far(w)`` (finite differences), on a
synthetic low-rank operator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from atp.sequencer.far_tail import dose_objective

from atp.dose.far_scatter import FarGroup, FarScatter


def synthetic_far(n_voxels: int, n_beamlets: int, seed: int = 0) -> FarScatter:
    """Two groups of random non-negative factors (nodes 3x2 and 2x2, two sigma levels)."""
    rng = np.random.default_rng(seed)
    groups, node, table = [], 0, 0
    for nx, ny, ntu, ntv in ((3, 2, 3, 2), (2, 2, 2, 3)):
        f = [rng.random((2, n, m)).astype(np.float32) for n, m in
             ((ntu, nx), (ntv, ny), (ntu, nx), (ntv, ny))]
        f[2] *= 0.3  # the tapered part is smaller: the far dose stays positive
        f[3] *= 0.3
        groups.append(FarGroup(node, nx, ny, table, *f))
        node += nx * ny
        table += 2 * ntu * ntv
    V = sp.random(node, n_beamlets, density=0.5, random_state=seed, format="csr",
                  dtype=np.float32)
    R = sp.random(n_voxels, table, density=0.3, random_state=seed + 1, format="csr",
                  dtype=np.float32)
    return FarScatter(R, V, tuple(groups))


def test_apply_many_equals_apply_of_each_column_and_rows_restrict():
    far = synthetic_far(200, 30)
    W = np.random.default_rng(2).random((30, 5)).astype(np.float32)
    W[:, 3] = 0.0  # a column reaching no node
    cols = far.apply_many(W)
    assert cols.shape == (200, 5) and cols.dtype == np.float32 and np.abs(cols).max() > 0
    for j in range(5):
        np.testing.assert_allclose(cols[:, j], far.apply(W[:, j]), rtol=1e-4,
                                   atol=1e-5 * np.abs(cols).max())
    assert not cols[:, 3].any()
    rows = np.array([3, 7, 50, 199])
    np.testing.assert_allclose(far.apply_many(sp.csr_matrix(W), rows), cols[rows],
                               rtol=1e-5, atol=1e-6)
    part = far.restrict_rows(rows)
    assert part.shape == (rows.size, 30) and far.restrict_rows(None) is far
    np.testing.assert_allclose(part.apply(W[:, 0]), far.apply(W[:, 0])[rows], rtol=1e-5)
    np.testing.assert_allclose(part.apply_many(W), cols[rows], rtol=1e-5, atol=1e-6)
    # a NaN weight is not skipped as "no mass": it reaches the dose
    w = W[:, 0].copy()
    w[int(np.argmax(np.diff(far.V.tocsc().indptr)))] = np.nan  # a beamlet with nodes
    assert np.isnan(far.apply(w)).any()


class _Dij:
    """The two attributes of a DoseInfluence that ``dose_objective`` reads."""

    def __init__(self, matrix, far):
        self.matrix, self.far = matrix, far


def test_dose_objective_is_the_reported_dose_and_its_gradient():
    n_vox, n_w = 200, 30
    rng = np.random.default_rng(3)
    A = sp.random(n_vox, n_w, density=0.2, random_state=4, format="csr", dtype=np.float32)
    far = synthetic_far(n_vox, n_w, seed=5)
    ref = rng.random(n_vox)
    w = rng.random(n_w)
    full = A @ w.astype(np.float32) + far.apply(w)
    for rows in (None, np.arange(0, n_vox, 3)):
        r_ref = ref if rows is None else ref[rows]

        def dose_vg(d, r_ref=r_ref):
            r = np.asarray(d, np.float64) - r_ref
            return float(np.sum(r * r)), 2.0 * r

        f = dose_objective(_Dij(A, far), dose_vg, rows=rows)
        j, g = f(w)
        d = full if rows is None else full[rows]
        assert j == pytest.approx(dose_vg(d)[0], rel=1e-5)
        for k in range(0, n_w, 5):
            e = np.zeros(n_w)
            e[k] = 1e-2
            fd = (f(w + e)[0] - f(w - e)[0]) / 2e-2
            assert fd == pytest.approx(g[k], rel=2e-3, abs=1e-4 * np.abs(g).max())
        # the tail is in the gradient: without it the gradient differs
        g_near = dose_objective(_Dij(A, None), dose_vg, rows=rows)(w)[1]
        assert np.abs(g - g_near).max() > 0.05 * np.abs(g).max()
