"""Objective terms of the fluence optimisation: value and gradient with respect to dose.

Every function here is pure array maths on ``xp = array_module(dose)`` so the same lines
run on NumPy (CPU) and CuPy (GPU). A term sees only the dose in its own voxels
(``d``, Gy), their voxel weights (``vw``: fraction of the voxel inside the structure,
from ``mask_to_dose_grid``) and a reference dose ``ref`` (Gy, scalar or per voxel).

Raw penalties (Gy^2 * voxel weight), before normalisation:

==============  =======================================================================
kind            penalty
==============  =======================================================================
``max``         sum vw * max(d - ref, 0)^2               (max dose; also ring / fall-off
                                                          with a per-voxel ``ref``)
``min``         sum vw * min(d - ref, 0)^2               (min dose)
``uniform``     sum vw * (d - ref)^2                     (uniform target dose)
``mean_max``    W * max(mean - ref, 0)^2                 (mean dose <= ref)
``mean_min``    W * min(mean - ref, 0)^2                 (mean dose >= ref)
``dv_max``      sum over voxels with ref < d <= D_v of vw * (d - ref)^2
                (D_v <= ref: the usual voxel-selection penalty; D_v is the current dose
                at volume fraction ``volume``, hottest first)
``dv_min``      sum over voxels with D_v <= d < ref of vw * (ref - d)^2   (D_v >= ref)
==============  =======================================================================

(W = sum vw, so ``mean_*`` scale like the voxel terms.)

Normalisation (as in the hybrid ATP paper, every term is normalised before the sum):
a term's raw penalty is divided by ``W * ref_scale^2`` where ``ref_scale`` is the
term's reference dose (its mean for per-voxel references, at least 1 Gy). For the
point-dose kinds ``max`` / ``min`` the caller may cap W (``norm_voxels_cap``) so that a
hot or cold spot in a large structure (the body) is not diluted by its volume. A term value
is therefore a dimensionless mean squared *relative* deviation, and the total objective
is ``sum_k weight_k * term_k`` (see :func:`evaluate_terms`).

Fluence smoothness is a term on the beamlet weights, not on dose:
``sum_pairs (w_i - w_j)^2 / norm`` over neighbouring beamlets of the same beam on the
beam's-eye-view grid (see :func:`smoothness_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from atp.xp import array_module

KINDS = ("max", "min", "uniform", "mean_max", "mean_min", "dv_max", "dv_min")


# --- raw penalties: (value, d value / d dose) on the term's voxels ----------------------
def _max_dose(d, vw, ref, volume):
    xp = array_module(d)
    over = xp.maximum(d - ref, 0.0)
    return xp.sum(vw * over * over), 2.0 * vw * over


def _min_dose(d, vw, ref, volume):
    xp = array_module(d)
    under = xp.minimum(d - ref, 0.0)
    return xp.sum(vw * under * under), 2.0 * vw * under


def _uniform(d, vw, ref, volume):
    xp = array_module(d)
    diff = d - ref
    return xp.sum(vw * diff * diff), 2.0 * vw * diff


def _mean(d, vw, ref, sign):
    xp = array_module(d)
    total = xp.sum(vw)
    mean = xp.sum(vw * d) / total
    dev = xp.maximum(mean - ref, 0.0) if sign > 0 else xp.minimum(mean - ref, 0.0)
    # value W*dev^2; d/dd_i = 2 W dev * vw_i / W
    return total * dev * dev, 2.0 * dev * vw


def _mean_max(d, vw, ref, volume):
    return _mean(d, vw, ref, +1)


def _mean_min(d, vw, ref, volume):
    return _mean(d, vw, ref, -1)


def dose_at_volume(d, vw, volume):
    """Dose (Gy) received by at least ``volume`` (fraction of sum(vw)) of the voxels.

    Weighted, hottest first: the smallest dose among the hottest voxels whose weights add
    up to ``volume`` of the total. Returns a 0-d array (no host transfer).
    """
    xp = array_module(d)
    order = xp.argsort(-d)
    ds = d[order]
    cum = xp.cumsum(vw[order])
    cum = cum / cum[-1]
    k = xp.searchsorted(cum, xp.asarray(volume, dtype=cum.dtype))
    k = xp.clip(k, 0, d.shape[0] - 1)
    return xp.take(ds, k)


def _dv_max(d, vw, ref, volume):
    xp = array_module(d)
    d_v = dose_at_volume(d, vw, volume)
    sel = (d > ref) & (d <= d_v)
    over = xp.where(sel, d - ref, 0.0)
    return xp.sum(vw * over * over), 2.0 * vw * over


def _dv_min(d, vw, ref, volume):
    xp = array_module(d)
    d_v = dose_at_volume(d, vw, volume)
    sel = (d < ref) & (d >= d_v)
    under = xp.where(sel, d - ref, 0.0)
    return xp.sum(vw * under * under), 2.0 * vw * under


PENALTIES = {
    "max": _max_dose, "min": _min_dose, "uniform": _uniform, "mean_max": _mean_max,
    "mean_min": _mean_min, "dv_max": _dv_max, "dv_min": _dv_min,
}

# curvature bound per voxel of each raw penalty (d^2 penalty / d dose^2 <= 2 vw), used
# for the Lipschitz constant of the gradient. mean_* terms are rank-one: 2 vw vw^T / W.
RANK_ONE = {"mean_max", "mean_min"}


@dataclass(frozen=True, eq=False)
class Term:
    """One objective term on a subset of the problem's dose rows.

    rows: int indices into the problem's dose rows (unique).
    voxel_weight: fraction of each row's voxel in the structure (0..1].
    ref_gy: reference dose, Gy (float, or an array per row for fall-off terms).
    volume: for dv_* terms, the volume fraction (0..1) of D_v.
    weight: priority weight (after the priority -> weight rule).
    norm: normalisation divisor (W * ref_scale^2), set by :func:`make_term`.
    name: readable label; goal_id: the ResolvedGoal it comes from (None: automatic).
    hard: priority-1 goal (handled by the hard-goal loop / QP constraints).
    """

    kind: str
    rows: np.ndarray
    voxel_weight: np.ndarray
    ref_gy: object
    weight: float
    norm: float
    volume: float = 1.0
    name: str = ""
    goal_id: str | None = None
    hard: bool = False
    meta: dict = field(default_factory=dict)

    def with_ref(self, ref_gy) -> Term:
        """Same term with another reference dose (normalisation kept)."""
        return replace(self, ref_gy=ref_gy)

    def with_weight(self, weight: float) -> Term:
        return replace(self, weight=float(weight))


def make_term(kind: str, rows, voxel_weight, ref_gy, weight: float, *, volume: float = 1.0,
              name: str = "", goal_id: str | None = None, hard: bool = False,
              meta: dict | None = None, norm_voxels_cap: float | None = None) -> Term:
    """Build a normalised :class:`Term` (checks kind, sizes, weights)."""
    if kind not in PENALTIES:
        raise ValueError(f"unknown objective kind '{kind}'; known: {sorted(PENALTIES)}")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    vw = np.asarray(voxel_weight, dtype=np.float32).reshape(-1)
    if rows.shape != vw.shape:
        raise ValueError("rows and voxel_weight differ in length")
    if rows.size == 0:
        raise ValueError(f"term '{name}' has no voxels")
    ref = ref_gy if np.isscalar(ref_gy) else np.asarray(ref_gy, dtype=np.float32)
    if not np.isscalar(ref) and ref.shape != rows.shape:
        raise ValueError("per-voxel ref_gy must match rows")
    ref_scale = max(float(np.mean(ref)), 1.0)
    w_total = float(np.sum(vw))
    if norm_voxels_cap is not None and kind in ("max", "min"):
        w_total = min(w_total, float(norm_voxels_cap))
    norm = w_total * ref_scale ** 2
    if not 0.0 <= volume <= 1.0:
        raise ValueError(f"volume fraction must be in [0, 1], got {volume}")
    return Term(kind, rows, vw, float(ref) if np.isscalar(ref) else ref, float(weight), norm,
                float(volume), name, goal_id, hard, dict(meta or {}))


def term_value_grad(term: Term, d, vw, ref):
    """Normalised, weighted value and gradient of one term on its voxels' dose ``d``."""
    raw, grad = PENALTIES[term.kind](d, vw, ref, term.volume)
    scale = term.weight / term.norm
    return raw * scale, grad * scale


def evaluate_terms(terms, device_arrays, dose_rows):
    """Total objective and its gradient with respect to the dose rows.

    terms: list of :class:`Term`; device_arrays: per term ``(rows, vw, ref)`` already in
    the array module of ``dose_rows``. Returns ``(total, grad_rows, per_term_values)``;
    values stay on the device (0-d arrays) so a loop can avoid host transfers.
    """
    xp = array_module(dose_rows)
    grad = xp.zeros_like(dose_rows)
    total = xp.zeros((), dtype=dose_rows.dtype)
    values = []
    for term, (rows, vw, ref) in zip(terms, device_arrays):
        d = dose_rows[rows]
        v, g = term_value_grad(term, d, vw, ref)
        grad[rows] += g.astype(grad.dtype, copy=False)  # rows unique within a term
        total = total + v
        values.append(v)
    return total, grad, values


# --- fluence smoothness -----------------------------------------------------------------
def smoothness_pairs(beam_index, bev_x_mm, bev_y_mm, beamlet_size_mm=(5.0, 5.0)):
    """Neighbouring beamlet pairs (i, j) of the same beam on its BEV grid.

    Beamlets are neighbours when they share a beam and differ by one beamlet step along
    x (leaf travel) or y (across leaves). Returns an (n_pairs, 2) int64 array.
    """
    beam_index = np.asarray(beam_index)
    bx = np.asarray(bev_x_mm, dtype=np.float64)
    by = np.asarray(bev_y_mm, dtype=np.float64)
    sx, sy = (float(s) for s in beamlet_size_mm)
    pairs = []
    for b in np.unique(beam_index):
        cols = np.flatnonzero(beam_index == b)
        ix = np.round((bx[cols] - bx[cols].min()) / sx).astype(np.int64)
        iy = np.round((by[cols] - by[cols].min()) / sy).astype(np.int64)
        width = int(ix.max()) + 2
        key = iy * width + ix
        lookup = dict(zip(key.tolist(), cols.tolist()))
        for dx, dy in ((1, 0), (0, 1)):
            nk = (iy + dy) * width + (ix + dx)
            for c, k in zip(cols.tolist(), nk.tolist()):
                j = lookup.get(k)
                if j is not None:
                    pairs.append((c, j))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.asarray(pairs, dtype=np.int64)


def difference_matrix(pairs, n_beamlets):
    """Sparse (n_pairs, n_beamlets) matrix with +1/-1 per pair (scipy CSR, float32)."""
    n = pairs.shape[0]
    rows = np.repeat(np.arange(n), 2)
    cols = pairs.reshape(-1)
    vals = np.tile(np.array([1.0, -1.0], dtype=np.float32), n)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n_beamlets), dtype=np.float32)


def smoothness_value_grad(Dw, DT, weight_over_norm):
    """Value and gradient (w.r.t. fluence) of ``weight/norm * ||D w||^2`` given Dw = D @ w."""
    xp = array_module(Dw)
    return weight_over_norm * xp.sum(Dw * Dw), (2.0 * weight_over_norm) * (DT @ Dw)


# --- sliding-window MU ------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MuSurrogate:
    """The beams' sliding-window MU as a differentiable function of the fluence.

    A leaf pair sweeping a row of the BEV fluence map delivers it with the least MU when
    the trailing leaf waits at every rise (Spirou & Chui 1994): the row needs
    ``sum_k max(f_k - f_{k-1}, 0)`` MU (``f_0 = 0``; plus the leaf travel, a constant).
    All pairs of a dynamic beam run over the same MU, so the beam needs the largest row's;
    that maximum is smoothed here by a log-sum-exp at temperature ``tau`` (fluence units;
    it overestimates by at most ``tau * log(rows)``; exact for a one-row beam).

    D: (n_steps, n_beamlets) +1/-1 rises (scipy CSR; the first beamlet of a row: +1 only).
    S: (n_leaf_rows, n_steps) sums the rises of each leaf row. beam_rows: per beam, the
    (start, stop) slice of its leaf rows (rows of one beam are contiguous).
    """

    D: object
    S: object
    beam_rows: tuple
    tau: float


def mu_surrogate(beam_index, bev_x_mm, bev_y_mm, beamlet_size_mm, tau: float) -> MuSurrogate:
    """Build :class:`MuSurrogate` for beamlets on per-beam BEV grids (x = leaf travel)."""
    beam_index = np.asarray(beam_index)
    bx = np.asarray(bev_x_mm, dtype=np.float64)
    by = np.asarray(bev_y_mm, dtype=np.float64)
    sx, sy = (float(s) for s in beamlet_size_mm)
    d_rows, d_cols, d_vals, step_row, beam_rows = [], [], [], [], []
    n_steps = n_rows = 0
    for b in np.unique(beam_index):
        cols = np.flatnonzero(beam_index == b)
        ix = np.round((bx[cols] - bx[cols].min()) / sx).astype(np.int64)
        iy = np.round((by[cols] - by[cols].min()) / sy).astype(np.int64)
        start = n_rows
        for y in np.unique(iy):
            sel = cols[iy == y][np.argsort(ix[iy == y], kind="stable")]
            xs = np.sort(ix[iy == y])
            prev, last = -10, -1
            for c, x in zip(sel.tolist(), xs.tolist()):
                d_rows.append(n_steps)
                d_cols.append(c)
                d_vals.append(1.0)
                if x == prev + 1:  # a rise from the left neighbour (else from 0)
                    d_rows.append(n_steps)
                    d_cols.append(last)
                    d_vals.append(-1.0)
                step_row.append(n_rows)
                n_steps += 1
                prev, last = x, c
            n_rows += 1
        beam_rows.append((start, n_rows))
    n = beam_index.size
    D = sp.csr_matrix((np.asarray(d_vals, np.float32), (d_rows, d_cols)),
                      shape=(n_steps, n), dtype=np.float32)
    S = sp.csr_matrix((np.ones(n_steps, np.float32), (step_row, np.arange(n_steps))),
                      shape=(n_rows, n_steps), dtype=np.float32)
    return MuSurrogate(D, S, tuple(beam_rows), float(tau))


def mu_forward(w, D, S, beam_rows, tau):
    """The smoothed sliding-window MU of each beam at fluence ``w`` and what its gradient
    needs: ``(mu, p, active)`` with ``mu`` one value per beam, ``p`` each leaf row's
    soft-max weight in its beam's MU and ``active`` the rising steps (``w``'s array
    module). :func:`mu_backward` turns per-beam coefficients into the gradient."""
    xp = array_module(w)
    steps = D @ w
    row_mu = S @ xp.maximum(steps, 0.0)
    mu = xp.zeros(len(beam_rows), dtype=row_mu.dtype)
    p = xp.zeros_like(row_mu)
    for k, (a, b) in enumerate(beam_rows):
        r = row_mu[a:b]
        m = xp.max(r)
        e = xp.exp((r - m) / tau)
        s = xp.sum(e)
        mu[k] = m + tau * xp.log(s)
        p[a:b] = e / s
    return mu, p, steps > 0


def mu_backward(coef, p, active, DT, ST, beam_rows, dtype):
    """The gradient w.r.t. fluence of ``sum_b coef[b] * MU_b`` from :func:`mu_forward`'s
    ``p`` and ``active`` (``coef``: one number per beam, or one for every beam)."""
    xp = array_module(p)
    coef = xp.broadcast_to(xp.asarray(coef, dtype=p.dtype), (len(beam_rows),))
    g_row = p.copy()
    for k, (a, b) in enumerate(beam_rows):
        g_row[a:b] *= coef[k]
    g_steps = (ST @ g_row) * active
    return DT @ g_steps.astype(dtype)


def mu_value_grad(w, D, DT, S, ST, beam_rows, tau, coef=None):
    """Sum over beams of the smoothed sliding-window MU at fluence ``w`` and its gradient
    (``D``, ``S`` and their transposes in ``w``'s array module); ``coef`` (one number
    per beam, ``w``'s array module): the sum of ``coef[b] * MU_b`` instead."""
    xp = array_module(w)
    mu, p, active = mu_forward(w, D, S, beam_rows, tau)
    c = xp.ones(len(beam_rows), mu.dtype) if coef is None else coef
    return xp.sum(c * mu), mu_backward(c, p, active, DT, ST, beam_rows, w.dtype)


def beam_mu(w, D, S, beam_rows, tau):
    """Each beam's smoothed sliding-window MU at fluence ``w`` (``w``'s array module)."""
    return mu_forward(w, D, S, beam_rows, tau)[0]
