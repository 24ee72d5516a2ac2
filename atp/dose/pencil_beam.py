"""The finite-size pencil-beam photon engine (registered as ``"pencil-beam"``).

For each beam:

1. beamlets on the BEV grid that see the target(s) plus a margin
   (:mod:`atp.dose.beamlets`);
2. the dose-grid voxels inside the body whose BEV position lies within the lateral
   cutoff of some beamlet; their BEV coordinates (u, v) at the isocentre plane and
   axial distance s from the source (:class:`~atp.dose.geometry.BeamFrame`);
3. radiological depth of every such voxel by exact voxel traversal of the CT's relative
   electron density (:mod:`atp.dose.raytrace`): one ray from the source to each
   dose-voxel centre (``depth_method="voxel"``, default), or a regular BEV fan of rays
   (``ray_spacing_mm`` at the isocentre plane) read by trilinear interpolation
   (``depth_method="fan"``; faster on fine grids, but see raytrace for its error);
4. dose per MU of each (voxel, beamlet) pair from the kernel
   (:mod:`atp.dose.beam_model`: primary, two phantom-scatter Gaussians, head scatter and
   electron contamination, the off-axis fluence at the beamlet centre, lateral widths
   scaled by 1 / the mean density over the last 20 mm of the voxel's ray (primary) and
   by the transport-weighted density of :func:`_transport_density` (phantom scatter),
   read from the same ray trace): the separable erf form lets one voxel's contribution
   to a ``(2K+1) x (2K+1)`` window of neighbouring beamlets come from 2(2K+2) erf calls
   per Gaussian component;
5. sparsification: entries below ``threshold`` x the beam's peak (the largest dose per MU
   any beamlet of the beam gives any voxel, taken analytically as the kernel with a
   beamlet centred on the voxel) are dropped; the default 1e-4 keeps the scatter
   component out to about 2 sigma (see BENCHMARKS.md for the dose it discards);
6. far scatter: the widest Gaussian beyond a 40-60 mm taper (20-40 mm above threshold
   2e-4) is not in the sparse matrix but in a low-rank operator on a coarse grid,
   ``DoseInfluence.far`` (:mod:`atp.dose.far_scatter`); which entries the matrix keeps
   is still decided on the whole kernel.

Units: matrix entries are Gy per MU of one beamlet (calibration: 0.01 Gy/MU for a
10 x 10 cm^2 field at SSD 100 cm, d_max, in water), so the optimiser's fluence is MU per
beamlet. Rows are the voxels of ``patient.grid.downsampled(dose_grid_factor)`` (C order);
voxels outside the body (the EXTERNAL structure, or CT > -500 HU) get no dose.

Backends: ``device="cpu"`` (NumPy/SciPy) or ``device="gpu"`` (CuPy): the ray tracing and
kernel superposition run the same lines with ``xp = array_module(...)``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from atp.dose.aperture import aperture_dose
from atp.dose.beam_model import PhotonBeamModel, erf_for
from atp.dose.beamlets import select_beamlets
from atp.dose.density import hu_to_density
from atp.dose.far_scatter import (
    OFF_AXIS_DEPTH_MM,
    FarScatterOptions,
    assemble,
    build_group,
    taper,
)
from atp.dose.geometry import Beam, BeamFrame, resolve_beams
from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.dose.raytrace import sample_cumulative, trace_cumulative
from atp.dose.resample import mask_to_dose_grid
from atp.errors import BackendUnavailableError, InputError, StructureError
from atp.grid import Grid
from atp.xp import cupy_or_none, host_map, to_numpy

_SQRT2 = math.sqrt(2.0)
DEFAULT_THRESHOLD = 1e-4
ENGINE_VERSION = "3"
DEFAULT_FAR_SCATTER = FarScatterOptions()


def _pair(size) -> tuple[float, float]:
    if np.ndim(size) == 0:
        size = (size, size)
    bx, by = (float(v) for v in size)
    if not (np.isfinite(bx) and np.isfinite(by) and bx > 0 and by > 0):
        raise InputError(f"beamlet size must be positive mm, got {size!r}",
                         field="beamlet_size_mm")
    return bx, by


def crop_to_matter(density: np.ndarray, grid: Grid, min_density: float = 0.01):
    """Smallest box holding every voxel denser than ``min_density`` (air is dropped:
    at most a few mm of air, < 0.01 mm water-equivalent, is lost from each ray)."""
    occupied = density > min_density
    if not occupied.any():
        return density, grid
    lo, hi = [], []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        idx = np.flatnonzero(occupied.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    sub = density[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    g = Grid(sub.shape, grid.spacing_mm, grid.index_to_patient(np.array(lo, float)),
             grid.direction)
    return np.ascontiguousarray(sub), g


class PencilBeamEngine:
    """Finite-size pencil-beam engine for 6 MV photons (see module docstring).

    model: PhotonBeamModel, a path to a beam-model JSON, or None (built-in 6 MV).
    hu_table: HU -> density calibration CSV path or (hu, density) arrays, None = built in.
    depth_method: "voxel" (one exact ray per dose voxel) or "fan" (interpolated fan).
    ray_spacing_mm: fan only: lateral spacing of traced rays at the isocentre plane;
    None = half the dose grid's smallest voxel size, at least 2 mm.
    lateral_cutoff_mm: kernel radius (mm at depth) beyond which nothing is computed.
    device: "cpu" or "gpu" (CuPy; BackendUnavailableError when absent).
    far_scatter: FarScatterOptions (default) to split the wide scatter Gaussian into a
    tapered near part in the sparse matrix and the far tail in a low-rank operator
    (:mod:`atp.dose.far_scatter`, ``DoseInfluence.far``); None keeps the whole wide
    Gaussian in the sparse matrix, cut by the window and threshold (engine version 2).
    """

    name = "pencil-beam"

    def __init__(self, model=None, *, hu_table=None, ray_spacing_mm: float | None = None,
                 lateral_cutoff_mm: float = 60.0, device: str = "cpu",
                 depth_method: str = "voxel", chunk_entries: int = 4_000_000,
                 far_scatter: FarScatterOptions | None = DEFAULT_FAR_SCATTER) -> None:
        if depth_method not in ("voxel", "fan"):
            raise InputError(f"depth_method must be 'voxel' or 'fan', got {depth_method!r}",
                             field="depth_method")
        self.depth_method = depth_method
        self.model = model
        self.hu_table = hu_table
        self.ray_spacing_mm = ray_spacing_mm
        self.lateral_cutoff_mm = lateral_cutoff_mm
        self.device = device
        self.chunk_entries = chunk_entries
        if far_scatter is not None and not isinstance(far_scatter, FarScatterOptions):
            raise InputError("far_scatter must be FarScatterOptions or None",
                             field="far_scatter")
        self.far_scatter = far_scatter

    # --- helpers -----------------------------------------------------------------------
    def _model(self) -> PhotonBeamModel:
        if isinstance(self.model, PhotonBeamModel):
            return self.model
        return PhotonBeamModel.load(self.model)

    def _xp(self):
        if self.device == "cpu":
            return np
        if self.device == "gpu":
            cp = cupy_or_none()
            if cp is None:
                raise BackendUnavailableError("device 'gpu' needs CuPy and a CUDA device; "
                                              "install atp[gpu] or use device='cpu'")
            return cp
        raise InputError(f"unknown device {self.device!r} (cpu or gpu)", field="device")

    # --- the protocol ------------------------------------------------------------------
    def influence(self, patient, beams, *, beamlet_size_mm=5.0, dose_grid_factor: int = 2,
                  margin_mm: float = 5.0, threshold: float = DEFAULT_THRESHOLD,
                  targets=None, progress=None) -> DoseInfluence:
        """Dose-influence matrix (Gy/MU per beamlet) of ``beams`` for ``patient``.

        targets: structure names whose BEV projection selects beamlets (default: all
        targets of the patient). progress: optional callable(beam_index, n_beams).
        """
        t0 = time.perf_counter()
        xp = self._xp()
        model = self._model()
        bx, by = _pair(beamlet_size_mm)
        if int(dose_grid_factor) != dose_grid_factor or dose_grid_factor < 1:
            raise InputError(f"dose grid factor must be a positive integer, got "
                             f"{dose_grid_factor!r}", field="dose_grid_factor")
        if not (0.0 <= float(threshold) < 1.0):
            raise InputError(f"threshold must be in [0, 1), got {threshold!r}",
                             field="threshold")
        if not (np.isfinite(margin_mm) and margin_mm >= 0):
            raise InputError(f"margin must be >= 0 mm, got {margin_mm!r}", field="margin_mm")
        beams = resolve_beams(patient, beams)
        names = list(targets) if targets is not None else list(patient.targets)
        if not names:
            raise StructureError("patient has no target to aim the beamlets at",
                                 file=patient.source, field="targets")
        tmask = np.zeros(patient.grid.shape, dtype=bool)
        for n in names:
            tmask |= patient.mask(n)
        if not tmask.any():
            raise StructureError(f"target(s) {names} are empty", file=patient.source,
                                 field="targets")
        tpts = patient.grid.index_to_patient(np.argwhere(tmask))
        half_diag = 0.5 * float(np.linalg.norm(patient.grid.spacing_mm))

        grid = patient.grid
        dose_grid = grid.downsampled(int(dose_grid_factor)) if dose_grid_factor > 1 else grid
        body = mask_to_dose_grid(patient.body_mask, grid, dose_grid).reshape(-1) > 0
        rows_all = np.flatnonzero(body)
        centres = dose_grid.index_to_patient(
            np.stack(np.unravel_index(rows_all, dose_grid.shape), axis=1).astype(np.float64))
        density = hu_to_density(patient.ct_hu, self.hu_table, source=patient.source)
        density, dgrid = crop_to_matter(density, grid)
        density_x = xp.asarray(density)
        ray_ds = 0.5 * float(np.min(grid.spacing_mm))
        ray_h = (float(self.ray_spacing_mm) if self.ray_spacing_mm is not None
                 else max(2.0, 0.5 * float(np.min(dose_grid.spacing_mm))))

        frames = [beam.frame() for beam in beams]
        sels = [select_beamlets(f, tpts, (bx, by), margin_mm, half_diag) for f in frames]
        col0 = np.cumsum([0] + [ix.size for ix, _ in sels])
        n_all = int(col0[-1])
        far_opts = (self.far_scatter.for_threshold(float(threshold))
                    if self.far_scatter is not None else None)
        groups = _far_groups(beams, far_opts.group_deg) if far_opts is not None else []
        middle = {g[len(g) // 2]: g for g in groups}
        mats, beam_index, bev_x, bev_y, far_parts = [], [], [], [], []

        def one(b):
            (ix, iy) = sels[b]
            return self._beam_matrix(xp, model, frames[b], ix, iy, (bx, by), centres,
                                     rows_all, density_x, dgrid, ray_ds, ray_h,
                                     float(threshold), dose_grid.n_voxels,
                                     far_opts=far_opts, far_data=b in middle)

        # beams are independent: on the CPU in threads (NumPy releases the GIL), in order
        per_beam = (host_map(one, range(len(beams))) if xp is np
                    else [one(b) for b in range(len(beams))])
        for b, (ix, iy) in enumerate(sels):
            mat, far = per_beam[b]
            mats.append(mat)
            if far is not None:
                members = [m for m in middle[b] if sels[m][0].size]
                if members:
                    off_c = (float(model.off_axis_exponent(
                        np.float64(OFF_AXIS_DEPTH_MM)))
                        if (model.horn_per_mm2 or model.softening_per_mm3) else 0.0)
                    far_parts.append(build_group(
                        far_opts, *far,
                        np.concatenate([(sels[m][0] + 0.5) * bx for m in members]),
                        np.concatenate([(sels[m][1] + 0.5) * by for m in members]),
                        off_c, np.concatenate([np.arange(col0[m], col0[m + 1])
                                               for m in members]),
                        bx * by, dose_grid.n_voxels, n_all))
            beam_index.append(np.full(ix.size, b, dtype=np.int32))
            bev_x.append((ix + 0.5) * bx)
            bev_y.append((iy + 0.5) * by)
            if progress is not None:
                progress(b + 1, len(beams))
        matrix = _stack_csc(mats, dose_grid.n_voxels)
        far_op = assemble(far_parts, dose_grid.n_voxels, n_all)
        info = BeamletInfo(np.concatenate(beam_index),
                           [bm.gantry_deg for bm in beams],
                           [bm.collimator_deg for bm in beams],
                           [bm.couch_deg for bm in beams],
                           [bm.isocenter_mm for bm in beams],
                           np.concatenate(bev_x), np.concatenate(bev_y), (bx, by))
        meta = {
            "engine": self.name, "engine_version": ENGINE_VERSION,
            "beam_model": model.name, "units": "Gy/MU",
            "calibration": "0.01 Gy/MU, 10x10 cm2 field, SSD 100 cm, d_max, water",
            "threshold": float(threshold),
            "threshold_rule": "entries < threshold x the beam's peak dose per MU dropped",
            "lateral_cutoff_mm": self.lateral_cutoff_mm,
            "depth_method": self.depth_method,
            "ray_spacing_mm": ray_h if self.depth_method == "fan" else None,
            "dose_grid_factor": int(dose_grid_factor), "margin_mm": float(margin_mm),
            "targets": names, "patient_id": patient.patient_id, "device": self.device,
            "far_scatter": None if far_opts is None else {
                "node_mm": far_opts.node_mm, "table_mm": far_opts.table_mm,
                "level_step": far_opts.level_step, "taper_mm": [far_opts.inner_mm,
                                                                far_opts.outer_mm],
                "group_deg": far_opts.group_deg, "far_cutoff_mm": far_opts.far_cutoff_mm,
                "groups": 0 if far_op is None else len(far_op.groups),
                "nnz": 0 if far_op is None else far_op.nnz},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return DoseInfluence(matrix, info, dose_grid, grid, meta, far=far_op)

    def aperture_dose(self, dij: DoseInfluence, apertures):
        """Dose (Gy, dose grid) of MLC apertures; see :func:`atp.dose.aperture.aperture_dose`."""
        return aperture_dose(dij, apertures)

    # --- one beam ----------------------------------------------------------------------
    def _beam_matrix(self, xp, model: PhotonBeamModel, frame: BeamFrame, ix, iy, size,
                     centres, rows_all, density, dgrid: Grid, ray_ds: float,
                     ray_h: float, threshold: float, n_rows: int, far_opts=None,
                     far_data: bool = False):
        """(sparse matrix of the beam, far-scatter voxel data or None): with
        ``far_data`` and far scatter on, (rows, u, v, amplitude, sigma) of the wide
        component at every voxel in the window (:func:`atp.dose.far_scatter.build_group`).
        """
        bx, by = size
        n_cols = ix.size
        if n_cols == 0:
            return sp.csc_matrix((n_rows, 0), dtype=np.float32), None
        sad = frame.sad_mm
        u, v, s = frame.project(centres)
        cut = float(self.lateral_cutoff_mm)
        far = far_opts if model.scatter else None
        # the group's middle beam traces the voxels its far scatter reaches
        cut_sel = max(cut, far.far_cutoff_mm) if far is not None and far_data else cut
        r_iso = cut_sel * sad / s
        sel = ((u >= ix.min() * bx - r_iso) & (u <= (ix.max() + 1) * bx + r_iso)
               & (v >= iy.min() * by - r_iso) & (v <= (iy.max() + 1) * by + r_iso)
               & (s > 1.0))
        if not sel.any():
            return sp.csc_matrix((n_rows, n_cols), dtype=np.float32), None
        u, v, s, rows = u[sel], v[sel], s[sel], rows_all[sel]
        lengths = (float(model.density_length_mm), _scatter_window(model))
        if self.depth_method == "voxel":
            depth, rhos = self._voxel_depth(xp, frame, centres[sel], density, dgrid,
                                            lengths)
        else:
            depth, rhos = self._radiological_depth(xp, frame, u, v, s, density, dgrid,
                                                   ray_ds, ray_h, lengths)
        # lateral width factors (primary, phantom scatter)
        lat = model.lateral_scales(rhos, depth, xp)
        u, v, s = xp.asarray(u), xp.asarray(v), xp.asarray(s)

        # per-voxel kernel coefficients
        scale = sad / s
        base = model.gy_per_mu_scale * scale * scale
        comps = [(base * a, sig * scale) for a, sig in model.components(depth, xp, lat)]
        far_out = (rows, u, v, comps[-1][0], comps[-1][1]) if far is not None and far_data \
            else None
        if cut_sel > cut:  # the sparse matrix: voxels within the kernel window only
            r_n = cut * sad / s
            near = ((u >= ix.min() * bx - r_n) & (u <= (ix.max() + 1) * bx + r_n)
                    & (v >= iy.min() * by - r_n) & (v <= (iy.max() + 1) * by + r_n))
            keep = xp.flatnonzero(near)
            if keep.size == 0:
                return sp.csc_matrix((n_rows, n_cols), dtype=np.float32), far_out
            u, v, s, depth = u[keep], v[keep], s[keep], depth[keep]
            rows = rows[to_numpy(keep)]
            comps = [(c[keep], sg[keep]) for c, sg in comps]
        off_c = model.off_axis_exponent(depth, xp)  # exp(c (uc^2 + vc^2)) per beamlet
        use_off = bool(model.horn_per_mm2 or model.softening_per_mm3)
        erf = erf_for(xp)
        peak = 0.0
        for c, sg in comps:  # beamlet centred on the voxel: the largest entry possible
            f1 = erf(bx / (2 * _SQRT2 * sg)) * erf(by / (2 * _SQRT2 * sg))
            peak = peak + c * f1
        floor = threshold * float(xp.max(peak)) if threshold > 0 else 0.0

        # beamlet lookup: (iy, ix) -> column
        ix0, iy0 = int(ix.min()), int(iy.min())
        lut = np.full((int(iy.max()) - iy0 + 1, int(ix.max()) - ix0 + 1), -1, dtype=np.int64)
        lut[iy - iy0, ix - ix0] = np.arange(n_cols)
        r_max = cut * sad / float(np.min(to_numpy(s)))  # widest window, iso-plane mm
        kx = math.ceil(r_max / bx) + 1
        ky = math.ceil(r_max / by) + 1
        n = u.shape[0]
        nwx, nwy = 2 * kx + 1, 2 * ky + 1
        per = nwx * nwy
        chunk = max(1, self.chunk_entries // per)
        lut_w = lut.shape[1]
        lut_flat = xp.asarray(lut.reshape(-1))
        out_r, out_c, out_v = [], [], []
        for a in range(0, n, chunk):
            sl = slice(a, a + chunk)
            uu, vv = u[sl], v[sl]
            cx = xp.floor(uu / bx).astype(xp.int64)
            cy = xp.floor(vv / by).astype(xp.int64)
            # beamlet-grid index of every window position, and whether it is on the grid
            bxi = cx[:, None] + xp.arange(-kx, kx + 1)[None, :] - ix0  # (m, nwx)
            byi = cy[:, None] + xp.arange(-ky, ky + 1)[None, :] - iy0
            okx = ((bxi >= 0) & (bxi < lut_w)).astype(xp.float32)
            oky = ((byi >= 0) & (byi < lut.shape[0])).astype(xp.float32)
            ex = (cx[:, None] + xp.arange(-kx, kx + 2)[None, :]) * bx  # beamlet edges
            ey = (cy[:, None] + xp.arange(-ky, ky + 2)[None, :]) * by
            if use_off:  # off-axis fluence at each beamlet centre (separable)
                cc = off_c[sl][:, None].astype(xp.float32)
                xc = (ex[:, :-1] + 0.5 * bx).astype(xp.float32)
                yc = (ey[:, :-1] + 0.5 * by).astype(xp.float32)
                okx = okx * xp.exp(cc * xc * xc)
                oky = oky * xp.exp(cc * yc * yc)
            # erf arguments in float32 (the matrix is float32): distance to each edge
            dxe = (uu[:, None] - ex).astype(xp.float32)
            dye = (vv[:, None] - ey).astype(xp.float32)
            if far is not None:  # the wide Gaussian's near part (far_scatter.py)
                tx = taper(dxe[:, :-1] - 0.5 * bx, far.inner_mm, far.outer_mm, xp)
                ty = taper(dye[:, :-1] - 0.5 * by, far.inner_mm, far.outer_mm, xp)
            fxs, fys = [], []
            for c, sg in comps:
                k = (1.0 / (_SQRT2 * sg[sl])).astype(xp.float32)[:, None]
                exf = _erf32(dxe * k, xp)
                eyf = _erf32(dye * k, xp)
                fx = (0.5 * (exf[:, :-1] - exf[:, 1:])) * okx
                fy = (0.5 * c[sl]).astype(xp.float32)[:, None] * (eyf[:, :-1] - eyf[:, 1:])
                fxs.append(fx)
                fys.append(fy * oky)
            # shrink the window to offsets where some entry can pass the threshold:
            # val[i, x, y] <= sum_k fx_k[i, x] * max_y fy_k[i, y] (and symmetrically)
            bound_x = sum(fx * xp.max(fy, axis=1, keepdims=True) for fx, fy in zip(fxs, fys))
            bound_y = sum(fy * xp.max(fx, axis=1, keepdims=True) for fx, fy in zip(fxs, fys))
            lim = floor if floor > 0 else 0.0
            kxs = to_numpy(xp.flatnonzero(xp.max(bound_x, axis=0) > lim))
            kys = to_numpy(xp.flatnonzero(xp.max(bound_y, axis=0) > lim))
            if kxs.size == 0 or kys.size == 0:
                continue
            x_lo, x_hi = int(kxs[0]), int(kxs[-1]) + 1
            y_lo, y_hi = int(kys[0]), int(kys[-1]) + 1
            # sum over components of the outer products fx_k fy_k^T: one batched
            # (window_x x K) @ (K x window_y) product per voxel (BLAS, ~6x faster than
            # adding K broadcast products)
            val = xp.matmul(xp.stack([fx[:, x_lo:x_hi] for fx in fxs], axis=2),
                            xp.stack([fy[:, y_lo:y_hi] for fy in fys], axis=1))
            if far is not None:
                # which entries to keep is decided on the whole kernel (as without far
                # scatter); the matrix stores the wide Gaussian times the taper, the far
                # operator the rest: val -= fx_w fy_w^T - (fx_w tx)(fy_w ty)^T
                fw = fxs[-1][:, x_lo:x_hi]
                gw = fys[-1][:, y_lo:y_hi]
                tw = tx[:, x_lo:x_hi].astype(xp.float32)
                val_s = val - xp.matmul(xp.stack([fw, -fw * tw], axis=2),
                                        xp.stack([gw, gw * ty[:, y_lo:y_hi].astype(
                                            xp.float32)], axis=1))
            else:
                val_s = val
            wy = y_hi - y_lo
            per_w = (x_hi - x_lo) * wy
            hit = xp.flatnonzero((val > lim).reshape(-1))
            vi = hit // per_w
            rem = hit - vi * per_w
            xi = rem // wy + x_lo
            yi = rem - (rem // wy) * wy + y_lo
            col = lut_flat[byi[vi, yi] * lut_w + bxi[vi, xi]]
            good = col >= 0
            out_r.append(rows[a + to_numpy(vi[good])])
            out_c.append(to_numpy(col[good]))
            out_v.append(to_numpy(val_s.reshape(-1)[hit[good]]))
        if not out_r:
            return sp.csc_matrix((n_rows, n_cols), dtype=np.float32), far_out
        r = np.concatenate(out_r)
        c = np.concatenate(out_c)
        vals = np.concatenate(out_v).astype(np.float32)
        return (sp.csc_matrix((vals, (r, c)), shape=(n_rows, n_cols), dtype=np.float32),
                far_out)

    def _voxel_depth(self, xp, frame: BeamFrame, points_mm, density, dgrid: Grid,
                     lengths_mm):
        """Water-equivalent depth (mm) at points by one exact ray per point, and the mean
        density over the last ``L`` mm of each ray for each L of ``lengths_mm``
        (:func:`_mean_density`)."""
        vec = np.asarray(points_mm, dtype=np.float64) - frame.source_mm
        length = np.linalg.norm(vec, axis=1)
        # chunks of rays that are close in the BEV and in depth cross few planes: order
        # by 20 mm BEV blocks, then by distance from the source
        u, v, _ = frame.project(points_mm)
        order = np.lexsort((length, np.floor(v / 20.0), np.floor(u / 20.0)))
        ls = length[order]
        traced = trace_cumulative(density, dgrid, frame.source_mm,
                                  vec[order] / ls[:, None], t_stop=ls, chunk=1024)
        offs = [np.asarray(_window_offsets(L), float) for L in lengths_mm]
        q = np.concatenate([ls[:, None]] + [np.maximum(ls[:, None] - o[None, :], 0.0)
                                            for o in offs], axis=1)
        both = sample_cumulative(traced, xp.asarray(q))
        order_x = xp.asarray(order)
        depth = xp.empty_like(both[:, 0])
        depth[order_x] = both[:, 0]
        rhos, j = [], 1
        for L, o in zip(lengths_mm, offs):
            up = both[:, j:j + o.size]
            j += o.size
            rho = xp.empty_like(depth)
            rho[order_x] = (_mean_density(both[:, 0], up[:, 0], L, xp) if o.size == 1
                            else _transport_density(both[:, 0], up, o, -L, xp))
            rhos.append(rho)
        return depth, rhos

    def _radiological_depth(self, xp, frame: BeamFrame, u, v, s, density, dgrid: Grid,
                            ray_ds: float, h: float, lengths_mm):
        """Water-equivalent depth (mm) at BEV points (u, v, s) by a traced ray fan, and
        the mean density over the last L mm (along the axis, each L of ``lengths_mm``)
        of each fan ray,
        computed per ray and then interpolated (:func:`_mean_density`)."""
        u0, v0 = u.min() - h, v.min() - h
        nu = int(np.ceil((u.max() + h - u0) / h)) + 1
        nv = int(np.ceil((v.max() + h - v0) / h)) + 1
        s0 = s.min() - ray_ds
        ns = int(np.ceil((s.max() + ray_ds - s0) / ray_ds)) + 1
        gu = u0 + h * np.arange(nu)
        gv = v0 + h * np.arange(nv)
        pu, pv = np.meshgrid(gu, gv, indexing="ij")
        pts = frame.iso_plane_point(pu.reshape(-1), pv.reshape(-1))
        vec = pts - frame.source_mm
        length = np.linalg.norm(vec, axis=1)
        dirs = vec / length[:, None]
        s_grid = s0 + ray_ds * np.arange(ns)
        t_query = xp.asarray(s_grid[None, :] * (length / frame.sad_mm)[:, None])
        traced = trace_cumulative(density, dgrid, frame.source_mm, dirs)
        table = sample_cumulative(traced, t_query).reshape(nu, nv, ns)
        coords = xp.asarray(np.stack([(u - u0) / h, (v - v0) / h, (s - s0) / ray_ds]))
        if xp is np:
            map_coordinates = ndimage.map_coordinates
        else:  # pragma: no cover - GPU only
            from cupyx.scipy.ndimage import map_coordinates  # optional (atp[gpu])
        depth = map_coordinates(table, coords, order=1, mode="nearest")
        rhos = []
        for L in lengths_mm:
            if L < 0:  # transport weighting: the same offsets, read along the fan ray
                o = np.asarray(_window_offsets(L), float)
                m = np.maximum(np.round(o / ray_ds).astype(int), 0)
                up = xp.stack([_shift(table, int(k), xp) for k in m], axis=-1)
                rho = _transport_density(table.reshape(-1), up.reshape(-1, m.size),
                                         m * ray_ds, -L, xp).reshape(table.shape)
            else:
                m = max(1, round(L / ray_ds))
                rho = _mean_density(table, _shift(table, m, xp), m * ray_ds, xp)
            rhos.append(map_coordinates(rho, coords, order=1, mode="nearest"))
        return depth, rhos


_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741,
                                       -0.284496736, 0.254829592))


def _erf32(x, xp):
    """erf of a float32 array (Abramowitz & Stegun 7.1.26, |error| < 5e-7 in float32):
    2.5x faster than scipy's erf on this CPU; the beamlet entries are float32 anyway and
    adjacent beamlets' differences telescope, so a field's dose keeps that accuracy."""
    a = xp.abs(x)
    t = 1.0 / (1.0 + _ERF_P * a)
    y = _ERF_A[0] * t
    for coef in _ERF_A[1:]:
        y = (y + coef) * t
    y *= xp.exp(-a * a)
    return xp.copysign(1.0 - y, x)


def _mean_density(depth, upstream, length_mm: float, xp):
    """Mean relative density over the last ``length_mm`` of a ray (depth and upstream
    depth in mm of water). Within ``length_mm`` of the body's entry only the path in
    matter counts (the water the model was fitted in has no air above it); at the very
    surface it is 1."""
    span = xp.minimum(length_mm, xp.maximum(depth, 1e-3))
    return xp.where(depth > 1e-3, (depth - upstream) / span, 1.0)


# upstream offsets (mm along the ray) at which the radiological path is sampled for the
# transport-weighted density: fine near the point, coarser further up (x 1/lambda)
_TRANSPORT_OFFSETS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 2.8,
                      3.6, 4.6, 6.0)


def _scatter_window(model: PhotonBeamModel) -> float:
    """The phantom-scatter density window: ``-lambda`` (transport weighting, see
    :func:`_transport_density`) when the model sets ``scatter_transport_length_mm``, else
    the box length ``scatter_density_length_mm``."""
    lam = float(model.scatter_transport_length_mm)
    return -lam if lam > 0 else float(model.scatter_density_length_mm)


def _window_offsets(length_mm: float) -> tuple[float, ...]:
    """Upstream offsets (mm) sampled for a window: ``(L,)`` for a box of length L > 0,
    the transport offsets scaled by lambda for ``-lambda``."""
    if length_mm > 0:
        return (float(length_mm),)
    return tuple(-length_mm * f for f in _TRANSPORT_OFFSETS)


def _shift(table, m: int, xp):
    """``table`` moved ``m`` steps down its last axis (zeros before the ray's start)."""
    if m <= 0:
        return table
    up = xp.zeros_like(table)
    if m < table.shape[-1]:
        up[..., m:] = table[..., :-m]
    return up


def _transport_density(depth, upstream, offsets_mm, lam_mm: float, xp):
    """Effective density for lateral transport from the upstream path: ``sqrt(E[r^2])``,
    the lateral width factor ``S = 1 / sqrt(E[r^2])``.

    The energy reaching a point comes from radiological distance tau upstream with
    probability ``exp(-tau / lambda) / lambda`` (stopped at the body's entry). A
    contribution that crossed geometric length t for its tau is spread laterally by
    ``t / tau = 1 / r`` (O'Connor), so its central dose in a field narrower than the
    spread falls as ``r^2``; ``S`` is the single width whose central dose matches that
    mixture. Uniform density rho gives 1 / rho; past an air gap only the contributions
    from beyond the gap are stretched, and they fade with the water crossed since.

    depth: (n,) radiological depth of the points; upstream: (n, K) radiological depth
    at ``offsets_mm`` (K,) upstream along each ray (0 outside the body): the ray is
    taken as linear between samples."""
    d = depth[:, None]
    tau = xp.minimum(d - upstream, d)  # radiological distance upstream, (n, K)
    x = xp.asarray(np.asarray(offsets_mm, float))[None, :]
    e = xp.exp(-tau / lam_mm)
    w = xp.maximum(e[:, :-1] - e[:, 1:], 0.0)  # probability of each segment (0 in air)
    # a segment that reaches the body's entry: matter of the mean density so far (1 in
    # the first segment) up to the entry
    rho0 = xp.where(x[:, :-1] > 0, tau[:, :-1] / xp.maximum(x[:, :-1], 1e-6), 1.0)
    x1 = xp.where(tau[:, 1:] >= d - 1e-3,
                  xp.minimum(x[:, 1:], x[:, :-1] + (tau[:, 1:] - tau[:, :-1])
                             / xp.maximum(rho0, 1e-3)), x[:, 1:])
    r = (tau[:, :-1] + tau[:, 1:]) / xp.maximum(x[:, :-1] + x1, 1e-6)
    m = xp.sum(w * r * r, axis=1)
    # beyond the last sample: the mean density of the sampled path goes on
    r_tail = tau[:, -1] / float(offsets_mm[-1])
    m = m + xp.maximum(e[:, -1] - xp.exp(-depth / lam_mm), 0.0) * r_tail * r_tail
    norm = -xp.expm1(-depth / lam_mm)
    ok = depth > 1e-3
    return xp.where(ok, xp.sqrt(m / xp.where(ok, norm, 1.0)), 1.0)


def _far_groups(beams, group_deg: float) -> list[list[int]]:
    """Runs of consecutive beams with one isocentre, couch and collimator whose gantry
    angles lie within ``group_deg`` of the run's first (an arc's neighbouring control
    points); every other beam is its own group."""
    groups: list[list[int]] = []
    for b, beam in enumerate(beams):
        if groups:
            first = beams[groups[-1][0]]
            dg = abs((beam.gantry_deg - first.gantry_deg + 180.0) % 360.0 - 180.0)
            if (dg < group_deg - 1e-9 and beam.couch_deg == first.couch_deg
                    and beam.collimator_deg == first.collimator_deg
                    and np.allclose(beam.isocenter_mm, first.isocenter_mm)):
                groups[-1].append(b)
                continue
        groups.append([b])
    return groups


def _stack_csc(mats, n_rows: int) -> sp.csc_matrix:
    """Columns of several CSC matrices side by side (plain concatenation, no copies of
    sorted structure beyond one pass)."""
    data = np.concatenate([m.data for m in mats]).astype(np.float32, copy=False)
    indices = np.concatenate([m.indices.astype(np.int32, copy=False) for m in mats])
    ptrs, off = [np.zeros(1, dtype=np.int64)], 0
    for m in mats:
        ptrs.append(m.indptr[1:].astype(np.int64) + off)
        off += m.nnz
    indptr = np.concatenate(ptrs)
    if off < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    n_cols = sum(m.shape[1] for m in mats)
    return sp.csc_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def default_engine() -> PencilBeamEngine:
    """The engine with its defaults (``ATP_DOSE_DEVICE=gpu`` selects CuPy)."""
    return PencilBeamEngine(device=os.environ.get("ATP_DOSE_DEVICE", "cpu"))


__all__ = [
    "DEFAULT_THRESHOLD",
    "Beam",
    "PencilBeamEngine",
    "crop_to_matter",
    "default_engine",
]
