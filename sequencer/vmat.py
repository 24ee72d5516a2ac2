"""Rule-based VMAT sequencing (after the AIRT leaf sequencer, Arberet et al. 2026).

Each arc control point has its own fluence map (one ``DoseInfluence`` beam per control
point, typically every 2 degrees). All control points are processed at once (vectorised):

1. per control point and leaf pair, the contiguous run of *significant* pixels
   (> ``threshold`` x that control point's maximum) with the largest fluence sum is the
   opening; pairs without one are closed;
2. the control point's MU is the mean fluence over its opened pixels (each run's two
   edge pixels left out where runs have interior pixels: those are partly exposed);
3. sub-pixel edges: where the opening's edge pixel holds less than the MU it is only
   partly exposed (the leaf stops inside it); where it holds the MU the leaf is moved into
   the outer neighbour by that neighbour's fraction of the MU;
4. the opening is the radiation field: physical tips sit DLG/2 inside it, at least the
   minimum gap apart; closed pairs are parked behind the X1 jaw;
5. leaf travel between neighbouring control points is limited to what the leaves can do
   while the gantry turns at full speed (a forward then a backward clamp pass, which keeps
   the minimum gap), and MU per degree is clipped to the machine limits.

MU bookkeeping: control point k's MU is delivered half on each side of it (so
``cumulative_mu`` rises by (MU_k + MU_{k+1}) / 2 between k and k+1), with two extra
control points half a step before the first and after the last so no MU is lost.
"""

from __future__ import annotations

import numpy as np

from atp.errors import InputError
from sequencer.apertures import jaws_around
from sequencer.delivery import BeamDelivery, Delivery
from sequencer.fluence import FluenceSet
from sequencer.machine import Machine


def _wrap(d):
    return (np.asarray(d, dtype=np.float64) + 180.0) % 360.0 - 180.0


def group_arcs(fluence: FluenceSet, max_step_deg: float = 10.0) -> list[list[int]]:
    """Split beams (in order) into arcs: a new arc starts when couch or collimator change,
    the gantry jumps by more than ``max_step_deg`` or the rotation direction reverses."""
    arcs: list[list[int]] = []
    prev = None
    for i, b in enumerate(fluence.beams):
        if prev is not None:
            pb = fluence.beams[prev]
            step = float(_wrap(b.gantry_deg - pb.gantry_deg))
            same = (abs(_wrap(b.couch_deg - pb.couch_deg)) < 1e-6
                    and abs(_wrap(b.collimator_deg - pb.collimator_deg)) < 1e-6
                    and 0 < abs(step) <= max_step_deg)
            if same and len(arcs[-1]) >= 2:
                first = float(_wrap(fluence.beams[arcs[-1][1]].gantry_deg
                                    - fluence.beams[arcs[-1][0]].gantry_deg))
                same = np.sign(first) == np.sign(step)
            if same:
                arcs[-1].append(i)
                prev = i
                continue
        arcs.append([i])
        prev = i
    return arcs


def largest_runs(f: np.ndarray, threshold: float):
    """For maps f (n_cp, n_pairs, n_x): per (cp, pair) the [start, stop) of the run of
    pixels above ``threshold`` x the cp maximum with the largest sum; (-1, -1) if none."""
    n_cp, n_pairs, n_x = f.shape
    cpmax = f.reshape(n_cp, -1).max(axis=1)
    sig = f > (threshold * cpmax)[:, None, None]
    sig &= f > 0
    flat = np.zeros((n_cp * n_pairs, n_x + 2), dtype=np.int8)
    flat[:, 1:-1] = sig.reshape(-1, n_x)
    d = np.diff(flat, axis=1)
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)  # same order as the starts (row-major, runs alternate)
    start = np.full(n_cp * n_pairs, -1)
    stop = np.full(n_cp * n_pairs, -1)
    if rs.size:
        csum = np.concatenate([np.zeros((n_cp * n_pairs, 1)),
                               np.cumsum(f.reshape(-1, n_x), axis=1)], axis=1)
        sums = csum[rs, ce] - csum[rs, cs]
        order = np.lexsort((-sums, rs))
        first = order[np.concatenate([[True], rs[order][1:] != rs[order][:-1]])]
        start[rs[first]] = cs[first]
        stop[rs[first]] = ce[first]
    return start.reshape(n_cp, n_pairs), stop.reshape(n_cp, n_pairs)


def _limit_travel(x: np.ndarray, step_mm: np.ndarray) -> np.ndarray:
    """Clamp (n_cp, n_pairs) so |x[k+1] - x[k]| <= step_mm[k]: forward then backward."""
    x = x.copy()
    for k in range(1, x.shape[0]):
        x[k] = np.clip(x[k], x[k - 1] - step_mm[k - 1], x[k - 1] + step_mm[k - 1])
    for k in range(x.shape[0] - 2, -1, -1):
        x[k] = np.clip(x[k], x[k + 1] - step_mm[k], x[k + 1] + step_mm[k])
    return x


def sequence_arc(maps: np.ndarray, x_edges_mm: np.ndarray, gantry_deg: np.ndarray,
                 machine: Machine, fractions: int = 1, threshold: float = 0.1):
    """Sequence one arc. ``maps`` (n_cp, n_pairs, n_x) MU on the leaf-pair grid.

    Returns dict(a, b (n_cp, n_pairs) physical tips, jaw_x, jaw_y (2,), mu (n_cp,)
    total-course MU per control point, open (n_cp, n_pairs) bool).
    """
    m = machine
    f = np.asarray(maps, dtype=np.float64)
    n_cp, _, n_x = f.shape
    start, stop = largest_runs(f, threshold)
    op = start >= 0
    cols = np.arange(n_x)
    inside = (cols >= start[..., None]) & (cols < stop[..., None])
    # MU: mean fluence over the opened pixels, leaving out each run's two edge pixels
    # (partly exposed, handled by sub-pixel leaf positions) where the runs have interiors
    core = (cols > start[..., None]) & (cols < stop[..., None] - 1)
    use = np.where(core.any(axis=(1, 2))[:, None, None], core, inside)
    npix = use.sum(axis=(1, 2))
    mu = np.where(npix > 0, (f * use).sum(axis=(1, 2)) / np.maximum(npix, 1), 0.0)

    # sub-pixel edges (in pixel units), then mm
    fp = np.pad(f, ((0, 0), (0, 0), (1, 1)))  # fp[..., j + 1] == f[..., j]
    s, e = np.where(op, start, 0), np.where(op, stop, 1)
    mu_ = np.maximum(mu, 1e-30)[:, None]
    take = np.take_along_axis
    f_in_l = np.minimum(take(fp, (s + 1)[..., None], 2)[..., 0] / mu_, 1.0)
    f_out_l = np.minimum(take(fp, s[..., None], 2)[..., 0] / mu_, 1.0)
    f_in_r = np.minimum(take(fp, e[..., None], 2)[..., 0] / mu_, 1.0)
    f_out_r = np.minimum(take(fp, (e + 1)[..., None], 2)[..., 0] / mu_, 1.0)
    left = np.where(f_in_l < 1.0, s + 1.0 - f_in_l, s - f_out_l)
    right = np.where(f_in_r < 1.0, e - 1.0 + f_in_r, e + f_out_r)
    single = (e - s) == 1
    w = np.minimum(f_in_l, 1.0)
    left = np.where(single & (w < 1.0), s + (1.0 - w) / 2, left)
    right = np.where(single & (w < 1.0), s + (1.0 + w) / 2, right)
    pix = float(x_edges_mm[1] - x_edges_mm[0])
    left_mm = x_edges_mm[0] + left * pix
    right_mm = x_edges_mm[0] + right * pix

    jx, jy = jaws_around(left_mm, right_mm, op, m)
    half, g = m.dosimetric_leaf_gap_mm / 2.0, m.min_leaf_gap_mm
    a = left_mm + half
    b = right_mm - half
    mid = 0.5 * (a + b)
    narrow = (b - a) < g
    a = np.where(narrow, mid - g / 2, a)
    b = np.where(narrow, mid + g / 2, b)
    park_b = jx[0] - half - 1.0
    a = np.where(op, a, park_b - g)
    b = np.where(op, b, park_b)
    lo, hi = m.leaf_position_range_mm
    a = np.clip(a, lo, hi - g)
    b = np.clip(b, lo + g, hi)

    dg = np.abs(_wrap(np.diff(gantry_deg)))
    step = m.max_leaf_travel_per_deg_mm * dg
    a = _limit_travel(a, step)
    b = _limit_travel(b, step)

    # MU per degree: control point k covers half a step on each side
    cover = np.zeros(n_cp)
    if n_cp > 1:
        cover[:-1] += dg / 2
        cover[1:] += dg / 2
        cover[0] += dg[0] / 2
        cover[-1] += dg[-1] / 2
    else:
        cover[:] = 2.0
    mu = np.clip(mu, m.min_mu_per_deg * cover * fractions, m.max_mu_per_deg * cover * fractions)
    return {"a": a, "b": b, "jaw_x": jx, "jaw_y": jy, "mu": mu, "open": op}


def sequence_vmat(fluence: FluenceSet, machine: Machine, *, threshold: float = 0.1,
                  arcs: list[list[int]] | None = None) -> Delivery:
    """VMAT: every arc (``arcs``: lists of beam positions in ``fluence.beams``; default
    :func:`group_arcs`) sequenced by the rule-based method of the module docstring."""
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}", field="threshold")
    arcs = group_arcs(fluence) if arcs is None else arcs
    beams = []
    for n, idx in enumerate(arcs):
        bfs = [fluence.beams[i] for i in idx]
        if len(bfs) < 2:
            raise InputError(f"arc {n + 1} has {len(bfs)} control point; an arc needs >= 2 "
                             "beams at neighbouring gantry angles", field="beams")
        n_x = {bf.fluence_mu.shape[1] for bf in bfs}
        x0 = {round(float(bf.x_edges_mm[0]), 6) for bf in bfs}
        if len(n_x) > 1 or len(x0) > 1:
            # bring every control point onto the arc's common x grid
            lo = min(float(bf.x_edges_mm[0]) for bf in bfs)
            pix = bfs[0].pixel_mm
            nx = round((max(float(bf.x_edges_mm[-1]) for bf in bfs) - lo) / pix)
            maps = np.zeros((len(bfs), bfs[0].fluence_mu.shape[0], nx))
            for k, bf in enumerate(bfs):
                off = round((float(bf.x_edges_mm[0]) - lo) / pix)
                maps[k, :, off:off + bf.fluence_mu.shape[1]] = bf.fluence_mu
            x_edges = lo + pix * np.arange(nx + 1)
        else:
            maps = np.stack([bf.fluence_mu for bf in bfs])
            x_edges = bfs[0].x_edges_mm
        gantry = np.array([bf.gantry_deg for bf in bfs])
        r = sequence_arc(maps, x_edges, gantry, machine, fluence.fractions, threshold)
        dg = _wrap(np.diff(gantry))
        g_all = np.concatenate([[gantry[0] - dg[0] / 2], gantry, [gantry[-1] + dg[-1] / 2]]) % 360
        a = np.concatenate([r["a"][:1], r["a"], r["a"][-1:]])
        b = np.concatenate([r["b"][:1], r["b"], r["b"][-1:]])
        mu = r["mu"]
        inc = np.concatenate([[mu[0] / 2], (mu[:-1] + mu[1:]) / 2, [mu[-1] / 2]])
        cum = np.concatenate([[0.0], np.cumsum(inc)])
        dij = np.concatenate([[bfs[0].beam_index], [bf.beam_index for bf in bfs],
                              [bfs[-1].beam_index]])
        n_cp = g_all.size
        direction = "CW" if dg[0] > 0 else "CCW"
        beams.append(BeamDelivery(
            f"ARC{n + 1}_{direction}", "arc", g_all, bfs[0].collimator_deg, bfs[0].couch_deg,
            bfs[0].isocenter_mm, a, b, np.tile(r["jaw_x"], (n_cp, 1)),
            np.tile(r["jaw_y"], (n_cp, 1)), cum, dij, n_segments=len(bfs)))
    return Delivery("vmat", machine, tuple(beams), fluence.fractions,
                    {"threshold": threshold})
