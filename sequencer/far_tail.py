"""The far-scatter tail in the sequencer's optimisers: the reported dose, not the sparse
matrix alone.

``DoseInfluence.dose`` (what the deliverable dose, the field dose and ``atp dose``
report) is ``matrix @ w + far.apply(w)`` (:mod:`atp.dose.far_scatter`). An optimiser that
moves leaves or MU on ``matrix @ w`` alone under-estimates the dose it is judged on (an
arc's MU basis by up to ~20 % on the rows above 10 % of the maximum), so hot spots it
thinks it removed come back in the plan.

The operator itself gives what those optimisers need
(:class:`atp.dose.far_scatter.FarScatter`: ``restrict_rows``, the dose on a problem's or
an objective's rows; ``apply_many``, the far dose of many weight vectors at once, such as
the columns of the control-point MU basis, :func:`atp.sequencer.reweight.mu_basis`;
``rmatvec``, the gradient). This module holds the sequencer's glue,
:func:`dose_objective`: ``w -> (J, dJ/dw)`` for a dose objective ``D -> (J, dJ/dD)`` on
``D = A w + far(w)``, with ``dJ/dw = A^T g + far.rmatvec(g)`` -- what
:func:`atp.sequencer.aperture_refine.refine_apertures` and
:func:`atp.sequencer.dmpo.optimise_machine_parameters` take as ``weight_value_grad``.
"""

from __future__ import annotations

import numpy as np

from atp.dose.influence import DoseInfluence


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
    far = None if dij.far is None else dij.far.restrict_rows(rows)
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
