"""Deliverability-aware fluence regulariser: quadratic smoothness on the arc's fluence maps.

A rule-based VMAT sequencer gives each control point one aperture per leaf row (a
contiguous opening with one MU), and leaves move a limited distance between neighbouring
control points. A spiky fluence cannot be reproduced that way; a smooth one can. The
penalty

    R(w) = 1/2 * sum_(j,k) c_jk (w_j - w_k)^2

runs over neighbouring beamlet pairs, built once from the dij's ``BeamletInfo``:

* along leaf travel: beamlets of the same control point and the same leaf row
  (``bev_y``) one beamlet apart in ``bev_x`` (weight ``weight_x``);
* along the arc: the same BEV position (``bev_x``, ``bev_y``) in neighbouring control
  points (beam indices b and b + 1, weight ``weight_cp``).

R = 1/2 w^T L w with L the weighted graph Laplacian of those pairs; the gradient is
L w (``grad``), computed with two gathers and two ``index_add`` on the tensors' device
(no host round trip). ``row_abs_sum`` is sum_k |L_jk| = 2 x the summed pair weights at
beamlet j: the regulariser's share of the diagonal (Jacobi / row-sum) step bound used by
:mod:`atp.optimizer.fastpath.correction`; its maximum bounds the Lipschitz constant of grad R
(Gershgorin).
"""

from __future__ import annotations

import numpy as np
import torch


def neighbour_pairs(beam_index, bev_x_mm, bev_y_mm, beamlet_size_mm=(5.0, 5.0)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, kind) beamlet index pairs: kind 0 = leaf-travel neighbours (same beam and
    row, one beamlet apart in x), kind 1 = the same BEV position in beams b and b + 1."""
    b = np.asarray(beam_index, dtype=np.int64)
    sx, sy = (float(s) for s in beamlet_size_mm)
    if b.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    x = np.asarray(bev_x_mm, dtype=np.float64)
    y = np.asarray(bev_y_mm, dtype=np.float64)
    # lattice indices from the smallest position (centres are often at half-integer
    # multiples of the size, where np.rint's ties-to-even would merge neighbours)
    ix = np.floor((x - x.min()) / sx + 0.5).astype(np.int64) + 1  # >= 1: x + 1 stays in row
    iy = np.floor((y - y.min()) / sy + 0.5).astype(np.int64)
    nx = int(ix.max()) + 2
    ny = int(iy.max()) + 1
    key = (b * ny + iy) * nx + ix
    order = np.argsort(key, kind="stable")
    skey = key[order]

    def lookup(k):
        pos = np.clip(np.searchsorted(skey, k), 0, skey.size - 1)
        hit = skey[pos] == k
        return order[pos], hit

    jx, hx = lookup(key + 1)  # right neighbour in the same row
    jc, hc = lookup(key + ny * nx)  # same position, next control point
    src = np.arange(b.size)
    i = np.concatenate([src[hx], src[hc]])
    j = np.concatenate([jx[hx], jc[hc]])
    kind = np.concatenate([np.zeros(int(hx.sum()), np.int64), np.ones(int(hc.sum()), np.int64)])
    return i, j, kind


class FluenceSmoothness:
    """R(w) = 1/2 sum c (w_i - w_j)^2 over neighbouring beamlets (see module docstring).

    beamlets: a ``BeamletInfo`` (beam_index, bev_x_mm, bev_y_mm, beamlet_size_mm).
    weight_x / weight_cp: pair weights along leaf travel / between control points.
    """

    def __init__(self, beamlets, weight_x: float = 1.0, weight_cp: float = 1.0,
                 device="cpu", dtype: torch.dtype = torch.float32) -> None:
        i, j, kind = neighbour_pairs(beamlets.beam_index, beamlets.bev_x_mm,
                                     beamlets.bev_y_mm, beamlets.beamlet_size_mm)
        self.n = int(np.asarray(beamlets.beam_index).shape[0])
        c = np.where(kind == 0, float(weight_x), float(weight_cp))
        keep = c > 0
        self.device = torch.device(device)
        self.i = torch.from_numpy(i[keep]).to(self.device)
        self.j = torch.from_numpy(j[keep]).to(self.device)
        self.c = torch.from_numpy(c[keep]).to(device=self.device, dtype=dtype)
        deg = np.zeros(self.n)
        np.add.at(deg, i[keep], c[keep])
        np.add.at(deg, j[keep], c[keep])
        self._row_abs = torch.from_numpy(2.0 * deg).to(device=self.device, dtype=dtype)

    @property
    def n_pairs(self) -> int:
        return int(self.i.shape[0])

    def differences(self, w: torch.Tensor) -> torch.Tensor:
        """(n_pairs,) w_i - w_j."""
        return w[self.i] - w[self.j]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """R(w) (differentiable in w)."""
        d = self.differences(w)
        return 0.5 * (self.c.to(w.dtype) * d * d).sum()

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        """L w = dR/dw (no autograd)."""
        f = self.c.to(w.dtype) * self.differences(w)
        g = torch.zeros_like(w)
        g.index_add_(0, self.i, f)
        g.index_add_(0, self.j, -f)
        return g

    def row_abs_sum(self) -> torch.Tensor:
        """(n_beamlets,) sum_k |L_jk| (= 2 x the pair weights at j)."""
        return self._row_abs

    def lipschitz_bound(self) -> float:
        """Upper bound of the largest eigenvalue of L (max row sum of |L|)."""
        return float(self._row_abs.max()) if self.n else 0.0


def total_variation(w: torch.Tensor, smooth: FluenceSmoothness) -> float:
    """sum |w_i - w_j| over the operator's pairs (a roughness measure for reports/tests)."""
    return float(smooth.differences(w).abs().sum())
