"""Radiological depth by exact voxel traversal (Siddon's method, vectorised over rays).

For each ray (source -> a point), the parameters ``t`` (mm travelled from the source) at
which it crosses every voxel boundary plane of the CT are computed for all rays at once;
sorting them (a stable merge of three monotone runs) gives the exact segments the ray
spends in each voxel (Siddon 1985, Med Phys 12:252; the incremental form of Jacobs et al.
1998 visits the same segments). The radiological path is the running sum of
``segment length * relative electron density``, a piecewise-linear function of ``t``
that this module samples at any requested distances, exactly (no step-size error along
the ray).

Which rays: the engine (``PencilBeamEngine(depth_method=...)``) offers two uses.
``"voxel"`` (default) traces one ray from the source to every dose-voxel centre: exact
for the voxelised CT at that point. ``"fan"`` traces a regular BEV fan of rays (as
matRad does) and reads each voxel's depth by trilinear interpolation in (u, v, s):
exact along each ray, interpolated across rays. On a real head-and-neck CT the fan's
lateral interpolation is not harmless: Siddon depth is a discontinuous function of the
lateral ray position (a ray that slips past a bone or air-cavity edge changes every
voxel it crosses), and on OpenKBP pt_1 (gantry 40 deg) a 1 mm fan differed from the
per-voxel depths by up to 5.7 mm (99th percentile 3.4 mm), a 2.5 mm fan by up to
12.6 mm. In a water box both agree to < 0.5 mm. The per-voxel trace costs about the
same number of rays as a fan on a 2x dose grid, so it is the default.

Works on NumPy or CuPy arrays alike (``xp = array_module(density)``).
"""

from __future__ import annotations

import numpy as np

from atp.grid import Grid
from atp.xp import array_module

_ROW_STRIDE_MM = 1.0e5  # offset separating rays in the flattened interpolation


def _entry_exit(p0, d, shape, xp):
    """Per ray, parameter range [t_in, t_out] inside the box [-0.5, n-0.5] (index space)."""
    t_in = xp.full(p0.shape[0], -xp.inf)
    t_out = xp.full(p0.shape[0], xp.inf)
    for a in range(3):
        lo, hi = -0.5, shape[a] - 0.5
        da = d[:, a]
        nz = da != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t0 = (lo - p0[:, a]) / da
            t1 = (hi - p0[:, a]) / da
        tmin = xp.where(nz, xp.minimum(t0, t1), -xp.inf)
        tmax = xp.where(nz, xp.maximum(t0, t1), xp.inf)
        # parallel to this axis: inside or never
        outside = (~nz) & ((p0[:, a] < lo) | (p0[:, a] > hi))
        tmin = xp.where(outside, xp.inf, tmin)
        tmax = xp.where(outside, -xp.inf, tmax)
        t_in = xp.maximum(t_in, tmin)
        t_out = xp.minimum(t_out, tmax)
    t_in = xp.maximum(t_in, 0.0)
    return t_in, t_out


def trace_cumulative(density, grid: Grid, source_mm, directions, *, t_stop=None,
                     chunk: int = 4096):
    """Exact cumulative radiological path along rays.

    density: relative electron density on ``grid`` (3-D, numpy or cupy).
    source_mm: (3,) ray origin in LPS mm. directions: (n_rays, 3) unit vectors (LPS).
    t_stop: optional (n_rays,) mm: each ray is followed only this far (the path beyond
    is not needed); only the boundary planes a chunk of rays can cross are generated,
    so passing rays sorted by t_stop saves work.
    Returns a list of (t_mm, cum_mm) pairs of arrays of shape (n_rays_chunk, n_break):
    break points (mm from the source, non-decreasing per row, padded with the exit
    point) and the water-equivalent path length (mm) accumulated up to each of them.
    """
    xp = array_module(density)
    shape = density.shape
    direction = xp.asarray(grid.direction)
    spacing = xp.asarray(grid.spacing_mm)
    src = xp.asarray(np.asarray(source_mm, dtype=np.float64))
    p0 = (src - xp.asarray(grid.origin_mm)) @ direction / spacing  # index coords of source
    dirs = xp.asarray(directions, dtype=xp.float64)
    flat_density = density.reshape(-1)
    out = []
    for start in range(0, dirs.shape[0], chunk):
        d_idx = (dirs[start:start + chunk] @ direction) / spacing  # index units per mm
        n = d_idx.shape[0]
        p0n = xp.broadcast_to(p0, (n, 3))
        t_in, t_out = _entry_exit(p0n, d_idx, shape, xp)
        if t_stop is not None:
            t_out = xp.minimum(t_out, xp.asarray(t_stop[start:start + chunk],
                                                 dtype=xp.float64))
        hit = t_out > t_in
        # rays that miss the volume: an empty interval at t = 0
        t_in = xp.where(hit, t_in, 0.0)
        t_out = xp.where(hit, t_out, 0.0)
        parts = [t_in[:, None], t_out[:, None]]
        any_hit = bool(xp.any(hit))
        for a in range(3):
            k_lo, k_hi = 0, shape[a]
            if any_hit:  # planes this chunk can cross along axis a
                x_in = p0[a] + t_in * d_idx[:, a]
                x_out = p0[a] + t_out * d_idx[:, a]
                lo = float(xp.min(xp.where(hit, xp.minimum(x_in, x_out), xp.inf)))
                hi = float(xp.max(xp.where(hit, xp.maximum(x_in, x_out), -xp.inf)))
                k_lo = max(0, int(np.floor(lo + 0.5)))
                k_hi = min(shape[a], int(np.ceil(hi + 0.5)))
            planes = xp.arange(k_lo, k_hi + 1, dtype=xp.float64) - 0.5
            da = d_idx[:, a:a + 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (planes[None, :] - p0[a]) / da
            t = xp.where(da < 0, t[:, ::-1], t)  # ascending within the run
            # crossings outside (t_in, t_out) (and NaN/inf when parallel) become t_out:
            # zero-length segments at the end of the sorted row
            inside = (t > t_in[:, None]) & (t < t_out[:, None])
            parts.append(xp.where(inside, t, t_out[:, None]))
        t_all = xp.concatenate(parts, axis=1)
        # a few monotone runs per row: NumPy's stable sort (timsort) merges them cheaply
        t_all = xp.sort(t_all, axis=1, kind="stable") if xp is np else xp.sort(t_all, axis=1)
        lo, hi = t_all[:, :-1], t_all[:, 1:]
        length = hi - lo
        mid = lo + 0.5 * length
        flat = None
        for a in range(3):  # voxel index of each segment's midpoint, axis by axis
            ia = (mid * d_idx[:, a:a + 1] + (p0[a] + 0.5))
            ia = xp.clip(ia, 0.0, shape[a] - 0.5).astype(xp.int32)  # floor (>= 0)
            flat = ia if flat is None else flat * shape[a] + ia
        seg = length * flat_density[flat]
        cum = xp.concatenate([xp.zeros((n, 1)), xp.cumsum(seg, axis=1)], axis=1)
        out.append((t_all, cum))
    return out


def sample_cumulative(traced, t_query):
    """Radiological depth (mm water) at distances ``t_query`` (n_rays, n_samples) mm.

    ``traced`` is the output of :func:`trace_cumulative` (chunks in ray order). Before
    the first break point the depth is 0, after the last it is the total path.
    """
    xp = array_module(t_query)
    res = []
    row0 = 0
    for t_all, cum in traced:
        n, _m = t_all.shape
        tq = t_query[row0:row0 + n]
        row0 += n
        finite = xp.isfinite(t_all)
        last = xp.max(xp.where(finite, t_all, -xp.inf), axis=1)
        last = xp.where(xp.isfinite(last), last, 0.0)
        # rows are sorted with the +inf padding at the end: replacing it by the last
        # finite break keeps each row non-decreasing
        tb = xp.where(finite, t_all, last[:, None])
        offs = (xp.arange(n, dtype=xp.float64) * _ROW_STRIDE_MM)[:, None]
        xb = (tb + offs).reshape(-1)
        q = xp.clip(tq, tb[:, :1], last[:, None]) + offs
        res.append(xp.interp(q.reshape(-1), xb, cum.reshape(-1)).reshape(tq.shape))
    return xp.concatenate(res, axis=0)

