"""The far-scatter operator: the wide scatter Gaussian's long tail, on a coarse grid.

The beam model's widest Gaussian (phantom scatter, head scatter and electron
contamination share it, sigma ~80 mm at the isocentre plane; :mod:`atp.dose.beam_model`)
reaches 20 cm and more, far beyond the sparse matrix's lateral window and below its
threshold: each beamlet's share at a distant voxel is tiny, but a 20 x 20 cm field sums
thousands of them (the sparse matrix alone gave a 20 x 20 cm output factor of 1.017
against the model's 1.064). Storing those entries would multiply the matrix; they are
smooth in both the voxel and the beamlet, so they are computed through a low-rank
factorisation instead:

    dose_far = R @ T(V @ w)

* ``V`` (sparse, nodes x beamlets): each beamlet's weight (times the off-axis fluence
  factor at its centre, taken at 10 cm depth) spread bilinearly onto a node grid of
  ``node_mm`` pitch in the beam's eye view at the isocentre plane (mass and first
  moment kept exactly; the second grows by node^2 / 6 per axis, 0.2 % of sigma^2 at
  10 mm and sigma 70 mm);
* ``T`` (per beam, dense and separable): the node masses convolved with the wide
  Gaussian *times (1 - taper)*, evaluated on a table of BEV points (``table_mm``
  pitch) for a set of sigma levels (geometric, ``level_step`` apart; each voxel reads
  the nearest level, so its sigma is off by at most half a step). The taper
  ``tau(x) tau(y)`` (1 within ``inner_mm``, cos^2 to 0 at ``outer_mm`` of iso-plane
  distance from the beamlet centre) is the part the sparse matrix keeps: the engine
  multiplies its wide component by the same taper, so near and far add to the whole
  Gaussian without double counting;
* ``R`` (sparse, dose voxels x table points, 4 entries per voxel and beam): the voxel's
  amplitude (calibration, inverse square, depth term of the wide component at its
  radiological depth) times its bilinear weights in the table, at its own sigma level
  (its depth, divergence and density scaling).

Beams whose geometry differs by less than ``group_deg`` of gantry (an arc's neighbouring
control points, same isocentre, couch and collimator) share one node grid and table in
the middle control point's frame and depths (the far tail moves by ~r sin(delta), a
few mm against sigma ~ 80 mm), which keeps an arc's operator to ~4 entries per voxel
per group. Limits: only voxels inside the sparse matrix's lateral window (the
beamlets' extent + ``lateral_cutoff_mm``) get far scatter; the off-axis softening with
depth is taken at 10 cm for this component.

Everything that turns a dij into dose (``DoseInfluence.dose``: the deliverable,
aperture and forward doses, ``atp dose``) adds it, and so do the sequencer's optimisers
(MU fits, DMPO, aperture refinement) through :meth:`FarScatter.restrict_rows` (their
voxels), :meth:`FarScatter.apply_many` (many weight vectors at once, e.g. an MU basis)
and :meth:`FarScatter.rmatvec` (the gradient). The fluence optimiser's own dose products
use the sparse matrix alone, i.e. the kernel up to the taper (40-60 mm: about where
the 60 mm window and the 1e-4 threshold cut it before this operator, so the optimiser
sees what it saw; which entries the matrix keeps is decided on the whole kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from atp.errors import InputError
from atp.xp import to_numpy

NODE_MM = 10.0
TABLE_MM = 10.0
LEVEL_STEP = 1.03
INNER_MM = 40.0
OUTER_MM = 60.0
OFF_AXIS_DEPTH_MM = 100.0
FAR_CUTOFF_MM = 150.0


def taper(x, inner_mm: float, outer_mm: float, xp=np):
    """1 for |x| <= inner, cos^2 down to 0 at |x| >= outer (smooth, even)."""
    a = xp.abs(x)
    t = xp.clip((a - inner_mm) / max(outer_mm - inner_mm, 1e-9), 0.0, 1.0)
    return xp.cos(0.5 * math.pi * t) ** 2


@dataclass(frozen=True, eq=False)
class FarGroup:
    """One beam's (or group of control points') node grid and table factors.

    gu/hu: (L, n_tu, nx), gv/hv: (L, n_tv, ny): Gaussian density at the level's sigma
    between table point and node, without (g) and with (h) the taper."""

    node_offset: int
    nx: int
    ny: int
    table_offset: int
    gu: np.ndarray
    gv: np.ndarray
    hu: np.ndarray
    hv: np.ndarray

    @property
    def n_nodes(self) -> int:
        return self.nx * self.ny

    @property
    def n_table(self) -> int:
        return self.gu.shape[0] * self.gu.shape[1] * self.gv.shape[1]


@dataclass(frozen=True, eq=False)
class FarScatter:
    """Low-rank far-scatter operator: ``dose = R @ T(V @ w)`` (see module docstring).

    R: (n_voxels, n_table) CSR float32, V: (n_nodes, n_beamlets) CSR float32."""

    R: sp.csr_matrix
    V: sp.csr_matrix
    groups: tuple

    def __post_init__(self) -> None:
        n_nodes = sum(g.n_nodes for g in self.groups)
        n_table = sum(g.n_table for g in self.groups)
        if self.V.shape[0] != n_nodes or self.R.shape[1] != n_table:
            raise InputError(f"far-scatter factors disagree: V has {self.V.shape[0]} "
                             f"nodes (groups {n_nodes}), R {self.R.shape[1]} table points "
                             f"(groups {n_table})", field="far")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.R.shape[0], self.V.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.R.nnz + self.V.nnz
                   + sum(2 * (g.gu.size + g.gv.size) for g in self.groups))

    @property
    def nbytes(self) -> int:
        b = sum(a.nbytes for m in (self.R, self.V) for a in (m.data, m.indices, m.indptr))
        return int(b + sum(2 * (g.gu.nbytes + g.gv.nbytes) for g in self.groups))

    def restrict_rows(self, rows) -> FarScatter:
        """This operator with its dose on dose-grid ``rows`` only (None: all rows, self):
        ``R`` is row-separable, so the rows' dose is that of the whole operator. What
        an optimiser on a subset of voxels (a problem's or an objective's rows) uses."""
        if rows is None:
            return self
        return replace(self, R=self.R[np.asarray(rows, dtype=np.int64)].tocsr())

    def _tables(self, nodes: np.ndarray) -> np.ndarray:
        """T of each column of node masses ``nodes`` (n_nodes, k) float32: the table
        values (n_table, k) float32; a group's table is computed only for the columns
        with a node mass on its grid (the others stay 0)."""
        table = np.zeros((self.R.shape[1], nodes.shape[1]), dtype=np.float32)
        for g in self.groups:
            mm = nodes[g.node_offset:g.node_offset + g.n_nodes]
            live = np.flatnonzero(np.any(mm != 0, axis=0))
            if live.size == 0:
                continue
            x = mm[:, live].T.reshape(live.size, 1, g.nx, g.ny)  # against (L, n_tu, nx)
            s = (np.matmul(np.matmul(g.gu[None], x), g.gv.transpose(0, 2, 1)[None])
                 - np.matmul(np.matmul(g.hu[None], x), g.hv.transpose(0, 2, 1)[None]))
            table[g.table_offset:g.table_offset + g.n_table, live] = \
                s.reshape(live.size, -1).T
        return table

    def apply_many(self, weights, rows=None) -> np.ndarray:
        """Far-scatter dose (Gy) of every column of beamlet weights ``weights``
        (n_beamlets, k; dense or sparse) on dose-grid ``rows`` (None: all): (n_rows, k)
        float32. Column j is ``apply(weights[:, j])[rows]``."""
        if sp.issparse(weights):
            nodes = (self.V @ weights).toarray()
        else:
            nodes = self.V @ np.asarray(weights, dtype=np.float32)
        table = self._tables(np.asarray(nodes, dtype=np.float32))
        R = self.R if rows is None else self.R[np.asarray(rows, dtype=np.int64)]
        return np.asarray(R @ table, dtype=np.float32)

    def apply(self, weights) -> np.ndarray:
        """Far-scatter dose (Gy, flattened dose grid) of beamlet weights."""
        w = np.asarray(weights, dtype=np.float32).reshape(-1, 1)
        return self.apply_many(w)[:, 0]

    def rmatvec(self, g) -> np.ndarray:
        """Adjoint: ``d(g . apply(w)) / dw`` for a per-voxel vector ``g``."""
        t = np.asarray(self.R.T @ np.asarray(g, dtype=np.float32).reshape(-1), np.float32)
        m = np.empty(self.V.shape[0], dtype=np.float32)
        for gr in self.groups:
            tt = t[gr.table_offset:gr.table_offset + gr.n_table].reshape(
                gr.gu.shape[0], gr.gu.shape[1], gr.gv.shape[1])
            mm = (np.matmul(np.matmul(gr.gu.transpose(0, 2, 1), tt), gr.gv).sum(axis=0)
                  - np.matmul(np.matmul(gr.hu.transpose(0, 2, 1), tt), gr.hv).sum(axis=0))
            m[gr.node_offset:gr.node_offset + gr.n_nodes] = mm.reshape(-1)
        return np.asarray(self.V.T @ m, dtype=np.float32)

    # --- combining and persistence -------------------------------------------------------
    @staticmethod
    def hstack(parts, n_rows: int) -> FarScatter | None:
        """The operator of dijs placed side by side (``parts``: (FarScatter or None,
        n_beamlets) each); None when no part has one."""
        if all(f is None for f, _ in parts):
            return None
        rs, vs, groups = [], [], []
        node_off = table_off = 0
        for f, n_cols in parts:
            if f is None:
                vs.append(sp.csr_matrix((0, n_cols), dtype=np.float32))
                continue
            rs.append(f.R)
            vs.append(f.V)
            for g in f.groups:
                groups.append(FarGroup(g.node_offset + node_off, g.nx, g.ny,
                                       g.table_offset + table_off, g.gu, g.gv, g.hu, g.hv))
            node_off += f.V.shape[0]
            table_off += f.R.shape[1]
        R = sp.hstack(rs, format="csr", dtype=np.float32) if rs else \
            sp.csr_matrix((n_rows, 0), dtype=np.float32)
        V = sp.block_diag(vs, format="csr", dtype=np.float32)
        return FarScatter(R, V, tuple(groups))

    def to_arrays(self, prefix: str = "far_") -> dict:
        out = {}
        for name, m in (("R", self.R), ("V", self.V)):
            out[f"{prefix}{name}_data"] = m.data.astype(np.float32)
            out[f"{prefix}{name}_indices"] = m.indices
            out[f"{prefix}{name}_indptr"] = m.indptr
            out[f"{prefix}{name}_shape"] = np.array(m.shape, dtype=np.int64)
        out[f"{prefix}groups"] = np.array([[g.node_offset, g.nx, g.ny, g.table_offset,
                                            g.gu.shape[0], g.gu.shape[1], g.gv.shape[1]]
                                           for g in self.groups], dtype=np.int64).reshape(-1, 7)
        for k in ("gu", "gv", "hu", "hv"):
            out[f"{prefix}{k}"] = (np.concatenate([getattr(g, k).reshape(-1)
                                                   for g in self.groups])
                                   if self.groups else np.zeros(0, np.float32))
        return out

    @classmethod
    def from_arrays(cls, d, prefix: str = "far_") -> FarScatter:
        def mat(name):
            return sp.csr_matrix((d[f"{prefix}{name}_data"], d[f"{prefix}{name}_indices"],
                                  d[f"{prefix}{name}_indptr"]),
                                 shape=tuple(int(s) for s in d[f"{prefix}{name}_shape"]))

        flat = {k: np.asarray(d[f"{prefix}{k}"], dtype=np.float32)
                for k in ("gu", "gv", "hu", "hv")}
        pos = {"u": 0, "v": 0}
        groups = []
        for no, nx, ny, to, nl, ntu, ntv in np.asarray(d[f"{prefix}groups"]).reshape(-1, 7):
            su, sv = int(nl * ntu * nx), int(nl * ntv * ny)
            a, b = pos["u"], pos["v"]
            groups.append(FarGroup(int(no), int(nx), int(ny), int(to),
                                   flat["gu"][a:a + su].reshape(nl, ntu, nx),
                                   flat["gv"][b:b + sv].reshape(nl, ntv, ny),
                                   flat["hu"][a:a + su].reshape(nl, ntu, nx),
                                   flat["hv"][b:b + sv].reshape(nl, ntv, ny)))
            pos["u"] += su
            pos["v"] += sv
        return cls(mat("R"), mat("V"), tuple(groups))


@dataclass(frozen=True)
class FarScatterOptions:
    """Grid pitches (mm at the isocentre plane), sigma level ratio, taper radii and the
    gantry span within which neighbouring beams share one group."""

    node_mm: float = NODE_MM
    table_mm: float = TABLE_MM
    level_step: float = LEVEL_STEP
    inner_mm: float = INNER_MM
    outer_mm: float = OUTER_MM
    group_deg: float = 10.0
    far_cutoff_mm: float = FAR_CUTOFF_MM
    # with a sparsification threshold above this, the taper moves in to
    # (inner, outer) x ``high_threshold_taper``: the matrix keeps fewer tail entries
    high_threshold: float = 2e-4
    high_threshold_taper: tuple = (20.0, 40.0)

    def __post_init__(self) -> None:
        lo, hi = self.high_threshold_taper
        if not (self.node_mm > 0 and self.table_mm > 0 and self.level_step > 1.0
                and 0.0 <= self.inner_mm < self.outer_mm and 0.0 <= lo < hi
                and self.group_deg >= 0 and self.far_cutoff_mm >= 0):
            raise InputError("far-scatter options: pitches > 0, level_step > 1, "
                             "0 <= inner < outer, group_deg >= 0, far cutoff >= 0",
                             field="far_scatter")

    def for_threshold(self, threshold: float) -> FarScatterOptions:
        """These options with the taper the sparse matrix's threshold allows: the
        tapered part must be kept by the threshold, so above ``high_threshold`` (the
        arc's 3e-4) the taper moves in to ``high_threshold_taper``."""
        if threshold <= self.high_threshold:
            return self
        return replace(self, inner_mm=self.high_threshold_taper[0],
                       outer_mm=self.high_threshold_taper[1])


def _gauss(d, sig):
    return np.exp(-0.5 * (d / sig) ** 2) / (math.sqrt(2.0 * math.pi) * sig)


def build_group(opts: FarScatterOptions, rows, u, v, amp, sigma, bev_x, bev_y, off_c,
                cols, area_mm2: float, n_rows: int, n_cols: int):
    """One group's (R part, V part, FarGroup without offsets) from the voxel data of its
    middle beam (rows, iso-plane u, v, amplitude Gy/MU per unit Gaussian mass, iso-plane
    sigma; xp arrays or numpy) and its member beamlets (centres bev_x, bev_y, global
    column indices ``cols``; ``off_c``: the off-axis exponent per mm^2)."""
    u, v, amp, sigma = (to_numpy(a).astype(np.float64) for a in (u, v, amp, sigma))
    rows = np.asarray(rows, dtype=np.int64)
    bev_x = np.asarray(bev_x, float)
    bev_y = np.asarray(bev_y, float)
    h, t = float(opts.node_mm), float(opts.table_mm)
    # node grid and bilinear spreading of each beamlet (V)
    x0 = math.floor(bev_x.min() / h) * h
    y0 = math.floor(bev_y.min() / h) * h
    nx = math.floor((bev_x.max() - x0) / h) + 2
    ny = math.floor((bev_y.max() - y0) / h) + 2
    fx = (bev_x - x0) / h
    fy = (bev_y - y0) / h
    ix = np.minimum(np.floor(fx).astype(np.int64), nx - 2)
    iy = np.minimum(np.floor(fy).astype(np.int64), ny - 2)
    ax, ay = fx - ix, fy - iy
    fl = np.exp(off_c * (bev_x ** 2 + bev_y ** 2))
    vr, vc, vv = [], [], []
    for dx, wx in ((0, 1.0 - ax), (1, ax)):
        for dy, wy in ((0, 1.0 - ay), (1, ay)):
            vr.append((ix + dx) * ny + iy + dy)
            vc.append(cols)
            vv.append(wx * wy * fl)
    V = sp.csr_matrix((np.concatenate(vv).astype(np.float32),
                       (np.concatenate(vr), np.concatenate(vc))),
                      shape=(nx * ny, n_cols), dtype=np.float32)
    xn = x0 + h * np.arange(nx)
    yn = y0 + h * np.arange(ny)
    # table grid and sigma levels
    u0 = math.floor(u.min() / t) * t
    v0 = math.floor(v.min() / t) * t
    ntu = math.floor((u.max() - u0) / t) + 2
    ntv = math.floor((v.max() - v0) / t) + 2
    tu = u0 + t * np.arange(ntu)
    tv = v0 + t * np.arange(ntv)
    lg = np.log(sigma)
    step = math.log(opts.level_step)
    k = np.rint((lg - lg.min()) / step).astype(np.int64)
    used, li = np.unique(k, return_inverse=True)
    sig_l = np.exp(lg.min() + step * used)
    du = tu[:, None] - xn[None, :]
    dv = tv[:, None] - yn[None, :]
    gu = np.stack([_gauss(du, s) for s in sig_l]).astype(np.float32)
    gv = np.stack([_gauss(dv, s) for s in sig_l]).astype(np.float32)
    hu = gu * taper(du, opts.inner_mm, opts.outer_mm)[None].astype(np.float32)
    hv = gv * taper(dv, opts.inner_mm, opts.outer_mm)[None].astype(np.float32)
    # R: amplitude x bilinear weights at the voxel's level
    pu = (u - u0) / t
    pv = (v - v0) / t
    ju = np.minimum(np.floor(pu).astype(np.int64), ntu - 2)
    jv = np.minimum(np.floor(pv).astype(np.int64), ntv - 2)
    bu, bv = pu - ju, pv - jv
    base = li.astype(np.int64) * (ntu * ntv)
    rr, rc, rv = [], [], []
    a = amp * area_mm2
    for du_, wu in ((0, 1.0 - bu), (1, bu)):
        for dv_, wv in ((0, 1.0 - bv), (1, bv)):
            rr.append(rows)
            rc.append(base + (ju + du_) * ntv + jv + dv_)
            rv.append(a * wu * wv)
    R = sp.csr_matrix((np.concatenate(rv).astype(np.float32),
                       (np.concatenate(rr), np.concatenate(rc))),
                      shape=(n_rows, used.size * ntu * ntv), dtype=np.float32)
    return R, V, FarGroup(0, nx, ny, 0, gu, gv, hu, hv)


def assemble(parts, n_rows: int, n_cols: int) -> FarScatter | None:
    """FarScatter of per-group (R, V, FarGroup) triples (V over all columns)."""
    if not parts:
        return None
    groups, node_off, table_off = [], 0, 0
    for R, V, g in parts:
        groups.append(FarGroup(node_off, g.nx, g.ny, table_off, g.gu, g.gv, g.hu, g.hv))
        node_off += V.shape[0]
        table_off += R.shape[1]
    R = sp.hstack([p[0] for p in parts], format="csr", dtype=np.float32)
    V = sp.vstack([p[1] for p in parts], format="csr", dtype=np.float32)
    return FarScatter(R, V, tuple(groups))


__all__ = ["FarGroup", "FarScatter", "FarScatterOptions", "assemble", "build_group",
           "taper"]
