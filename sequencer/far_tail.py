"""The far-scatter tail in the sequencer's optimisers: the reported dose, not the sparse
matrix alone.

``DoseInfluence.dose`` (what the deliverable dose, the field dose and ``atp dose``
report) is ``matrix @ w + far.apply(w)`` (:mod:`atp.dose.far_scatter`). An optimiser that
moves leaves or MU on ``matrix @ w`` alone under-estimates the dose it is judged on (an
arc's MU basis by up to ~20 % on the rows above 10 % of the maximum), so hot spots it
thinks it removed come back in the plan. The helpers here put the tail into those
optimisers' dose and gradient:

* :func:`far_rows`: the operator restricted to a set of dose-grid rows (a problem's or
  an objective's voxels; the far tail's ``R`` factor is row-separable);
* :func:`far_columns`: the far dose of many weight vectors at once (the columns of the
  control-point MU basis, :func:`atp.sequencer.reweight.mu_basis`), each group's table
  computed only for the columns that reach its node grid;
* :func:`dose_objective`: ``w -> (J, dJ/dw)`` for a dose objective ``D -> (J, dJ/dD)``
  on ``D = A w + far(w)``, with ``dJ/dw = A^T g + far.rmatvec(g)`` -- what
  :func:`atp.sequencer.aperture_refine.refine_apertures` and
  :func:`atp.sequencer.dmpo.optimise_machine_parameters` take as ``weight_value_grad``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from atp.dose.influence import DoseInfluence


def far_rows(far, rows):
    """``far`` (a FarScatter or None) whose dose is on dose-grid ``rows`` only (None:
    all rows)."""
    if far is None or rows is None:
        return far
    return replace(far, R=far.R[np.asarray(rows, dtype=np.int64)].tocsr())


def _group_table(g, mm: np.ndarray) -> np.ndarray:
    """Table values (n_cols, n_table of the group) of node masses mm (n_cols, nx, ny)."""
    gv, hv = g.gv.transpose(0, 2, 1)[None], g.hv.transpose(0, 2, 1)[None]
    x = mm[:, None]  # (n_cols, 1, nx, ny) against (L, n_tu, nx)
    s = np.matmul(np.matmul(g.gu[None], x), gv) - np.matmul(np.matmul(g.hu[None], x), hv)
    return s.reshape(mm.shape[0], -1)


def far_columns(far, weights, rows=None) -> np.ndarray:
    """``far.apply`` of every column of ``weights`` (n_beamlets, k; dense or sparse) on
    dose-grid ``rows`` (None: all): (n_rows, k) float64."""
    W = weights if sp.issparse(weights) else np.asarray(weights, np.float32)
    nodes = np.asarray((far.V @ W).toarray() if sp.issparse(W) else far.V @ W, np.float32)
    k = nodes.shape[1]
    table = np.zeros((far.R.shape[1], k), np.float32)
    for g in far.groups:
        mm = nodes[g.node_offset:g.node_offset + g.n_nodes]
        live = np.flatnonzero(np.abs(mm).max(axis=0) > 0) if mm.size else []
        if len(live) == 0:
            continue
        vals = _group_table(g, mm[:, live].T.reshape(len(live), g.nx, g.ny))
        table[g.table_offset:g.table_offset + g.n_table, live] = vals.T
    R = far.R if rows is None else far.R[np.asarray(rows, dtype=np.int64)]
    return np.asarray(R @ table, np.float64)


def dose_objective(dij: DoseInfluence, dose_value_grad, rows=None, row_matrix=None, *,
                   embed: bool = False):
    """``w -> (J, dJ/dw)`` (NumPy float64 gradient) of ``dose_value_grad`` on the reported
    dose ``dij.matrix @ w + dij.far.apply(w)``.

    dose_value_grad(D) -> (J, dJ/dD) on the flattened dose grid, or, with ``rows``, on
    those dose-grid rows only (D and dJ/dD of length ``len(rows)``; ``row_matrix``:
    ``dij.matrix[rows]`` when the caller keeps it). embed: with ``rows``, the objective
    takes the whole grid but reads only ``rows`` (the fast path's, whose
    ``objective_rows`` names them): D is 0 elsewhere and only the rows' dose is computed."""
    if rows is None:
        A = dij.matrix.tocsr()
    else:
        rows = np.asarray(rows, dtype=np.int64)
        A = (row_matrix if row_matrix is not None else dij.matrix[rows]).tocsr()
    AT = A.T  # CSC view: no copy of the matrix
    far = far_rows(dij.far, rows)
    full = np.zeros(dij.matrix.shape[0], np.float32) if embed and rows is not None else None

    def value_grad(w):
        w32 = np.asarray(w, np.float32).reshape(-1)
        d = A @ w32
        if far is not None:
            d = d + far.apply(w32)
        if full is not None:
            full[rows] = d
            j, g = dose_value_grad(full)
            g = np.asarray(g, np.float32).reshape(-1)[rows]
        else:
            j, g = dose_value_grad(d)
            g = np.asarray(g, np.float32).reshape(-1)
        grad = np.asarray(AT @ g, np.float64)
        if far is not None:
            grad += far.rmatvec(g)
        return float(j), grad

    return value_grad
