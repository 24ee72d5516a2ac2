"""Moving arrays between the patient (CT) grid and a coarser dose grid.

* :func:`mask_to_dose_grid`: exact block averaging. The dose grid must be
  ``patient_grid.downsampled(f)``; each dose voxel gets the fraction (0..1, float32) of
  its ``f x f x f`` block of CT voxels that lie in the mask. Blocks that stick out of
  the CT at the far edges count the missing voxels as outside the mask.
* :func:`dose_to_patient_grid`: trilinear interpolation of the dose at every patient
  voxel centre (separable: linear along each array axis in turn, which is exactly
  trilinear). Patient voxel centres beyond the outermost dose-voxel centres take the
  edge value (nearest), so nothing outside the dose grid is invented.
  :func:`interpolation_rows` is the same map at chosen patient voxels, as a matrix.

Both work on NumPy or CuPy arrays (``array_module``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from atp.errors import GridMismatchError
from atp.grid import Grid
from atp.xp import array_module


def downsample_factor(patient_grid: Grid, dose_grid: Grid) -> int:
    """The integer f with ``dose_grid == patient_grid.downsampled(f)``, else raise."""
    ratio = np.asarray(dose_grid.spacing_mm) / np.asarray(patient_grid.spacing_mm)
    f = round(float(ratio[0]))
    if f >= 1 and np.allclose(ratio, f, rtol=1e-6) and dose_grid.same_as(
            patient_grid.downsampled(f)):
        return f
    raise GridMismatchError("the dose grid is not an integer down-sampling of the patient "
                            "grid (Grid.downsampled)", field="dose_grid")


def mask_to_dose_grid(mask, patient_grid: Grid, dose_grid: Grid):
    """Fraction of each dose voxel inside ``mask`` (float32 on ``dose_grid``), exact."""
    xp = array_module(mask)
    patient_grid.check_array(mask, field="mask")
    f = downsample_factor(patient_grid, dose_grid)
    m = xp.asarray(mask).astype(xp.float32)
    if f == 1:
        return m
    pad = [(0, n * f - s) for n, s in zip(dose_grid.shape, m.shape)]
    m = xp.pad(m, pad)
    n0, n1, n2 = dose_grid.shape
    blocks = m.reshape(n0, f, n1, f, n2, f)
    return (blocks.sum(axis=(1, 3, 5)) / float(f ** 3)).astype(xp.float32)


def _axis_weights(patient_grid: Grid, dose_grid: Grid, axis: int):
    """Per patient index along ``axis``: lower dose index and linear weight of the upper."""
    d = dose_grid.direction[:, axis]
    offset = float((patient_grid.origin_mm - dose_grid.origin_mm) @ d)
    i = np.arange(patient_grid.shape[axis], dtype=np.float64)
    j = (offset + i * patient_grid.spacing_mm[axis]) / dose_grid.spacing_mm[axis]
    n = dose_grid.shape[axis]
    j = np.clip(j, 0.0, n - 1.0)
    j0 = np.minimum(np.floor(j).astype(np.int64), max(n - 2, 0))
    w = j - j0
    if n == 1:
        j0 = np.zeros_like(j0)
        w = np.zeros_like(w)
    return j0, w


def dose_to_patient_grid(dose, dose_grid: Grid, patient_grid: Grid):
    """Trilinear interpolation of ``dose`` (dose grid) onto the patient grid, float32.

    The grids must share their axis directions (any origin/spacing).
    """
    xp = array_module(dose)
    dose_grid.check_array(dose, field="dose")
    if not np.allclose(dose_grid.direction, patient_grid.direction, atol=1e-6):
        raise GridMismatchError("dose grid and patient grid axes differ in direction",
                                field="dose_grid")
    if dose_grid.same_as(patient_grid):
        return xp.asarray(dose, dtype=xp.float32)
    out = xp.asarray(dose, dtype=xp.float32)
    for axis in range(3):
        j0, w = _axis_weights(patient_grid, dose_grid, axis)
        n = dose_grid.shape[axis]
        j1 = np.minimum(j0 + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = -1
        wx = xp.asarray(w.astype(np.float32)).reshape(shape)
        lo = xp.take(out, xp.asarray(j0), axis=axis)
        hi = xp.take(out, xp.asarray(j1), axis=axis)
        out = lo * (1.0 - wx) + hi * wx
    return out.astype(xp.float32)


def interpolation_rows(flat_index, patient_grid: Grid, dose_grid: Grid):
    """The rows of :func:`dose_to_patient_grid` at the patient voxels ``flat_index`` (C
    order): a CSR matrix (n, dose voxels) of trilinear weights, so that ``M @ d`` (d the
    dose grid's dose, flattened) is the interpolated dose at those voxels, exactly."""
    flat = np.asarray(flat_index, dtype=np.int64).reshape(-1)
    ijk = np.unravel_index(flat, patient_grid.shape)
    lo, hi, wt = [], [], []
    for axis in range(3):
        j0, w = _axis_weights(patient_grid, dose_grid, axis)
        j1 = np.minimum(j0 + 1, dose_grid.shape[axis] - 1)
        lo.append(j0[ijk[axis]])
        hi.append(j1[ijk[axis]])
        wt.append(w[ijk[axis]])
    cols, vals = [], []
    for corner in range(8):
        pick = [(corner >> a) & 1 for a in range(3)]
        idx = tuple(hi[a] if pick[a] else lo[a] for a in range(3))
        cols.append(np.ravel_multi_index(idx, dose_grid.shape))
        v = np.ones(flat.size)
        for a in range(3):
            v = v * (wt[a] if pick[a] else 1.0 - wt[a])
        vals.append(v)
    rows = np.tile(np.arange(flat.size), 8)
    m = sp.coo_matrix((np.concatenate(vals), (rows, np.concatenate(cols))),
                      shape=(flat.size, dose_grid.n_voxels))
    m = m.tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m.astype(np.float32)


def interpolation_support(mask, patient_grid: Grid, dose_grid: Grid):
    """Per dose voxel, the share of its trilinear-interpolation weight (0..1, float32)
    that lands on patient voxels inside ``mask``: the adjoint of
    :func:`dose_to_patient_grid` applied to the mask, divided by the adjoint applied to
    ones. > 0 exactly where the voxel's dose reaches some mask voxel after interpolation
    -- the dose-grid voxels a coverage goal must hold up so the interpolated dose covers
    the mask's edge (the block fraction of :func:`mask_to_dose_grid` misses the outer
    neighbours of edge voxels)."""
    xp = array_module(mask)
    patient_grid.check_array(mask, field="mask")
    if dose_grid.same_as(patient_grid):
        return xp.asarray(mask, dtype=xp.float32)
    m = xp.asarray(mask, dtype=xp.float32)
    ones = xp.ones(m.shape, dtype=xp.float32)
    for axis in range(3):
        j0, w = _axis_weights(patient_grid, dose_grid, axis)
        n = dose_grid.shape[axis]
        j1 = np.minimum(j0 + 1, n - 1)
        # adjoint of out = lo * (1 - w) + hi * w along this axis: a (n, n_patient) matrix
        adj = np.zeros((n, j0.size), np.float32)
        cols = np.arange(j0.size)
        np.add.at(adj, (j0, cols), (1.0 - w).astype(np.float32))
        np.add.at(adj, (j1, cols), w.astype(np.float32))
        adj_x = xp.asarray(adj)
        m = xp.moveaxis(xp.tensordot(adj_x, m, axes=([1], [axis])), 0, axis)
        ones = xp.moveaxis(xp.tensordot(adj_x, ones, axes=([1], [axis])), 0, axis)
    out = xp.where(ones > 0, m / xp.where(ones > 0, ones, 1.0), 0.0)
    return xp.clip(out, 0.0, 1.0).astype(xp.float32)
