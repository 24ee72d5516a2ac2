"""Planar contours (patient mm) -> boolean mask on a :class:`~atp.grid.Grid`.

Each contour is a closed polygon, an ``(N, 3)`` array of patient coordinates (mm, LPS)
lying in a plane of constant array-axis-0 index (a CT slice). Rule:

* Slice: the contour's mean axis-0 index is rounded to the nearest slice; every point
  must lie within half a slice thickness of that slice and the slice must be on the
  grid, otherwise :class:`~atp.errors.InputError`.
* In-plane: a voxel is inside when its *centre* is inside by the **even-odd rule**
  over all contours of that slice together. Holes (an inner contour inside an outer
  one), several islands per slice and keyhole contours therefore all work, and a
  region covered by two contours counts as outside (the DICOM RTSTRUCT convention).
* Ties: a centre exactly on an edge uses half-open intervals (a crossing at column
  position x counts for centres with column > x; an edge spans rows r0 <= r < r1), so
  two polygons sharing an edge never both claim the voxel.

The crossing test is a vectorised scanline: for every voxel row the crossings of all
edges are found at once, scattered into a per-row difference array, and a cumulative
sum along the row gives the crossing count left of each voxel centre; its parity is
the mask. Cost is O(rows x edges + rows x columns) per slice, independent of how much
of the slice the structure covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from atp.errors import InputError
from atp.grid import Grid

SLICE_TOLERANCE = 0.5  # slices: how far a contour point may lie from its slice


def contour_slice_index(points_mm: np.ndarray, grid: Grid, *, file=None,
                        field: str | None = None) -> tuple[int, np.ndarray]:
    """(slice index, in-plane (row, col) continuous indices (N, 2)) of one contour."""
    pts = np.asarray(points_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"contour must be (N, 3) points in mm, got shape {pts.shape}",
                         file=file, field=field)
    if not np.all(np.isfinite(pts)):
        raise InputError("contour has NaN/inf coordinates", file=file, field=field)
    idx = grid.patient_to_index(pts)
    k = int(np.rint(idx[:, 0].mean()))
    off = np.abs(idx[:, 0] - k)
    if np.max(off) > SLICE_TOLERANCE + 1e-3:
        raise InputError(
            f"contour is not on a CT slice: its points lie up to {np.max(off):.2f} slice "
            f"thicknesses from the nearest slice (allowed {SLICE_TOLERANCE})",
            file=file, field=field)
    if not 0 <= k < grid.shape[0]:
        z_mm = float(np.mean(pts @ grid.direction[:, 0]))
        raise InputError(f"contour at {z_mm:.2f} mm along the slice normal lies outside "
                         f"the CT's {grid.shape[0]} slices", file=file, field=field)
    return k, idx[:, 1:]


def _scatter_crossings(diff: np.ndarray, poly_rc: np.ndarray, n_cols: int) -> None:
    """Add the scanline crossings of one closed polygon into ``diff`` (rows, cols+1)."""
    r0, c0 = poly_rc[:, 0], poly_rc[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    n_rows = diff.shape[0]
    lo = np.maximum(np.ceil(np.minimum(r0, r1)), 0)
    hi = np.minimum(np.ceil(np.maximum(r0, r1)) - 1, n_rows - 1)  # rows with r < max
    keep = (r0 != r1) & (hi >= lo)
    if not np.any(keep):
        return
    r0, c0, r1, c1, lo, hi = (a[keep] for a in (r0, c0, r1, c1, lo, hi))
    counts = (hi - lo + 1).astype(np.int64)
    edge = np.repeat(np.arange(counts.size), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    rows = lo[edge] + (np.arange(edge.size) - start)
    t = (rows - r0[edge]) / (r1[edge] - r0[edge])
    x = c0[edge] + t * (c1[edge] - c0[edge])
    col = np.clip(np.floor(x).astype(np.int64) + 1, 0, n_cols)
    np.add.at(diff, (rows.astype(np.int64), col), 1)


def rasterize_slice(polygons_rc: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of polygons given in continuous (row, col) voxel indices."""
    n_rows, n_cols = shape
    polys = [p for p in (np.asarray(q, dtype=np.float64) for q in polygons_rc)
             if p.ndim == 2 and p.shape[0] >= 3]
    out = np.zeros(shape, dtype=bool)
    if not polys:
        return out
    # only the band of rows the polygons span needs a scanline
    lo = max(int(np.ceil(min(p[:, 0].min() for p in polys))), 0)
    hi = min(int(np.ceil(max(p[:, 0].max() for p in polys))), n_rows)
    if hi <= lo:
        return out
    diff = np.zeros((hi - lo, n_cols + 1), dtype=np.int32)
    for poly in polys:
        _scatter_crossings(diff, poly - np.array([lo, 0.0]), n_cols)
    out[lo:hi] = (np.cumsum(diff[:, :n_cols], axis=1) & 1).astype(bool)
    return out


def rasterize_contours(contours: Sequence[np.ndarray], grid: Grid, *, file=None,
                       field: str | None = None) -> np.ndarray:
    """Boolean mask (grid.shape) of closed planar contours, each (N, 3) patient mm.

    Contours with fewer than 3 points enclose nothing and are ignored. Raises
    InputError (naming ``file`` / ``field``) for contours off the grid's slices.
    """
    per_slice: dict[int, list[np.ndarray]] = {}
    for pts in contours:
        pts = np.asarray(pts, dtype=np.float64)
        if pts.ndim == 2 and pts.shape[0] < 3:
            continue
        k, rc = contour_slice_index(pts, grid, file=file, field=field)
        per_slice.setdefault(k, []).append(rc)
    mask = np.zeros(grid.shape, dtype=bool)
    for k, polys in per_slice.items():
        mask[k] = rasterize_slice(polys, grid.shape[1:])
    return mask


__all__ = ["SLICE_TOLERANCE", "contour_slice_index", "rasterize_contours",
           "rasterize_slice"]
