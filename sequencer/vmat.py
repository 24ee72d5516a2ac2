"""Rule-based VMAT sequencing (after the AIRT leaf sequencer, Arberet et al. 2026).

Each arc control point has its own fluence map (one ``DoseInfluence`` beam per control
point, typically every 2 degrees). All control points are processed at once (vectorised):

1. per control point and leaf pair, the contiguous run of *significant* pixels
   (> ``threshold`` x that control point's maximum) with the largest fluence sum is the
   opening; pairs without one are closed;
2. the control point's MU is the mean fluence over its opened pixels (each run's two
   edge pixels left out where runs have interior pixels: those are partly exposed);
   with ``mu_relative_pass`` (default) steps 1-2 are repeated with "significant" meaning
   at least half that MU (the least-squares choice of one aperture for a given MU), which
   suits modulated (optimised, not aperture-shaped) fluence better;
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
from atp.sequencer.apertures import jaws_around, limit_bank_span
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.fluence import FluenceSet
from atp.sequencer.machine import Machine

from atp.errors import InputError


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


def control_point_cover_deg(gantry_deg) -> np.ndarray:
    """Degrees of arc each control point's MU is spread over: half a step on each side
    (the end points: their one step), so MU/degree limits become per-point MU bounds."""
    g = np.asarray(gantry_deg, dtype=np.float64)
    if g.size < 2:
        return np.full(g.size, 2.0)
    dg = np.abs(_wrap(np.diff(g)))
    cover = np.zeros(g.size)
    cover[:-1] += dg / 2
    cover[1:] += dg / 2
    cover[0] += dg[0] / 2
    cover[-1] += dg[-1] / 2
    return cover


def largest_runs(f: np.ndarray, threshold: float):
    """For maps f (n_cp, n_pairs, n_x): per (cp, pair) the [start, stop) of the run of
    pixels above ``threshold`` (scalar or per cp) x the cp maximum with the largest sum;
    (-1, -1) if none."""
    n_cp, n_pairs, n_x = f.shape
    cpmax = f.reshape(n_cp, -1).max(axis=1)
    sig = f > (np.broadcast_to(threshold, cpmax.shape) * cpmax)[:, None, None]
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


def limit_travel(x: np.ndarray, step_mm: np.ndarray) -> np.ndarray:
    """Clamp (n_cp, n_pairs) so |x[k+1] - x[k]| <= step_mm[k]: forward then backward."""
    x = x.copy()
    for k in range(1, x.shape[0]):
        x[k] = np.clip(x[k], x[k - 1] - step_mm[k - 1], x[k - 1] + step_mm[k - 1])
    for k in range(x.shape[0] - 2, -1, -1):
        x[k] = np.clip(x[k], x[k + 1] - step_mm[k], x[k + 1] + step_mm[k])
    return x


def sequence_arc(maps: np.ndarray, x_edges_mm: np.ndarray, gantry_deg: np.ndarray,
                 machine: Machine, fractions: int = 1, threshold: float = 0.1,
                 mu_relative_pass: bool = False):
    """Sequence one arc. ``maps`` (n_cp, n_pairs, n_x) MU on the leaf-pair grid.

    Returns dict(a, b (n_cp, n_pairs) physical tips, jaw_x, jaw_y (2,), mu (n_cp,)
    total-course MU per control point, open (n_cp, n_pairs) bool).
    """
    m = machine
    f = np.asarray(maps, dtype=np.float64)
    n_x = f.shape[2]
    cols = np.arange(n_x)

    def aperture_and_mu(thr):
        start, stop = largest_runs(f, thr)
        inside = (cols >= start[..., None]) & (cols < stop[..., None])
        # MU: mean fluence over the opened pixels, leaving out each run's two edge pixels
        # (partly exposed, handled by sub-pixel leaf positions) where runs have interiors
        core = (cols > start[..., None]) & (cols < stop[..., None] - 1)
        use = np.where(core.any(axis=(1, 2))[:, None, None], core, inside)
        npix = use.sum(axis=(1, 2))
        mu = np.where(npix > 0, (f * use).sum(axis=(1, 2)) / np.maximum(npix, 1), 0.0)
        return start, stop, mu

    start, stop, mu = aperture_and_mu(np.full(f.shape[0], threshold))
    if mu_relative_pass:
        # second pass: a pixel is worth opening when it holds at least half the MU (the
        # least-squares choice for one aperture of that MU); never below ``threshold``
        cpmax = np.maximum(f.reshape(f.shape[0], -1).max(axis=1), 1e-30)
        start, stop, mu = aperture_and_mu(np.maximum(threshold, 0.5 * mu / cpmax))
    op = start >= 0

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
    a, b, op = limit_bank_span(a, b, op, m)
    span = m.max_leaf_span_mm - 1.0
    # closed pairs: behind the X1 jaw, but within the bank-span limit of the open leaves
    park_b = np.full(a.shape[0], jx[0] - half - 1.0)
    park_b = np.maximum(park_b, np.max(np.where(op, b, -np.inf), axis=1) - span)
    park_b = np.maximum(park_b, np.max(np.where(op, a, -np.inf), axis=1) + g - span)
    a = np.where(op, a, park_b[:, None] - g)
    b = np.where(op, b, park_b[:, None])
    lo, hi = m.leaf_position_range_mm
    a = np.clip(a, lo, hi - g)
    b = np.clip(b, lo + g, hi)

    dg = np.abs(_wrap(np.diff(gantry_deg)))
    step = m.max_leaf_travel_per_deg_mm * dg
    a = limit_travel(a, step)
    b = limit_travel(b, step)

    cover = control_point_cover_deg(gantry_deg)
    mu = np.clip(mu, m.min_mu_per_deg * cover * fractions, m.max_mu_per_deg * cover * fractions)
    return {"a": a, "b": b, "jaw_x": jx, "jaw_y": jy, "mu": mu, "open": op}


def arc_fluence(result: dict, x_edges_mm: np.ndarray, machine: Machine) -> np.ndarray:
    """Fluence (n_cp, n_pairs, n_x) MU that a :func:`sequence_arc` result delivers at its
    control points: MU x the open fraction of every pixel (radiation field = tips widened
    by DLG/2, clipped to the jaws; pairs partly outside the Y jaws scaled by their overlap)."""
    half = machine.dosimetric_leaf_gap_mm / 2.0
    jx, jy = result["jaw_x"], result["jaw_y"]
    left = np.maximum(result["a"] - half, jx[0])[..., None]
    right = np.minimum(result["b"] + half, jx[1])[..., None]
    lo, hi = x_edges_mm[:-1], x_edges_mm[1:]
    frac_x = np.clip(np.minimum(right, hi) - np.maximum(left, lo), 0.0, None) / (hi - lo)
    e = machine.leaf_edges_mm
    frac_y = np.clip(np.minimum(e[1:], jy[1]) - np.maximum(e[:-1], jy[0]), 0.0, None) / np.diff(e)
    return frac_x * frac_y[None, :, None] * result["mu"][:, None, None]


def _arc_beam(name, r, bfs, gantry, order):
    """BeamDelivery of one sequenced arc; ``order``: fluence control points in delivery
    order (reversed for a counter-clockwise return arc)."""
    g = gantry[order]
    a, b, mu = r["a"][order], r["b"][order], r["mu"][order]
    dg = _wrap(np.diff(g))
    g_all = np.concatenate([[g[0] - dg[0] / 2], g, [g[-1] + dg[-1] / 2]]) % 360
    a = np.concatenate([a[:1], a, a[-1:]])
    b = np.concatenate([b[:1], b, b[-1:]])
    inc = np.concatenate([[mu[0] / 2], (mu[:-1] + mu[1:]) / 2, [mu[-1] / 2]])
    cum = np.concatenate([[0.0], np.cumsum(inc)])
    idx = np.array([bfs[i].beam_index for i in order])
    dij = np.concatenate([idx[:1], idx, idx[-1:]])
    n_cp = g_all.size
    direction = "CW" if dg[0] > 0 else "CCW"
    return BeamDelivery(f"{name}_{direction}", "arc", g_all, bfs[0].collimator_deg,
                        bfs[0].couch_deg, bfs[0].isocenter_mm, a, b,
                        np.tile(r["jaw_x"], (n_cp, 1)), np.tile(r["jaw_y"], (n_cp, 1)), cum,
                        dij, n_segments=len(bfs))


def arc_maps(bfs) -> tuple[np.ndarray, np.ndarray]:
    """The control points' fluence maps of one arc on a common x grid: (maps (n_cp,
    n_pairs, n_x) MU, x_edges_mm (n_x + 1,))."""
    n_x = {bf.fluence_mu.shape[1] for bf in bfs}
    x0 = {round(float(bf.x_edges_mm[0]), 6) for bf in bfs}
    if len(n_x) == 1 and len(x0) == 1:
        return np.stack([bf.fluence_mu for bf in bfs]), bfs[0].x_edges_mm
    lo = min(float(bf.x_edges_mm[0]) for bf in bfs)
    pix = bfs[0].pixel_mm
    nx = round((max(float(bf.x_edges_mm[-1]) for bf in bfs) - lo) / pix)
    maps = np.zeros((len(bfs), bfs[0].fluence_mu.shape[0], nx))
    for k, bf in enumerate(bfs):
        off = round((float(bf.x_edges_mm[0]) - lo) / pix)
        maps[k, :, off:off + bf.fluence_mu.shape[1]] = bf.fluence_mu
    return maps, lo + pix * np.arange(nx + 1)


def arc_inputs(fluence: FluenceSet, idx: list[int], number: int):
    """(beam fluences, maps (n_cp, n_pairs, n_x) MU, x_edges_mm, gantry_deg) of arc
    ``number`` (1-based, for messages) made of ``fluence.beams[idx]``; an InputError when
    it has fewer than two control points."""
    bfs = [fluence.beams[i] for i in idx]
    if len(bfs) < 2:
        raise InputError(f"arc {number} has {len(bfs)} control point; an arc needs >= 2 "
                         "beams at neighbouring gantry angles", field="beams")
    maps, x_edges = arc_maps(bfs)
    return bfs, maps, x_edges, np.array([bf.gantry_deg for bf in bfs])


def sector_slices(maps: np.ndarray, sector_cps: int) -> np.ndarray:
    """Maps (n_cp, n_pairs, n_x) with each sector of ``sector_cps`` neighbouring control
    points delivering the sector's summed fluence ``F`` as nested intensity slices:
    control point j of a k-point sector gets ``clip(F - j M / k, 0, M / k)`` (``M`` the
    sector's maximum), so the slices add up to ``F`` exactly and each is one aperture at
    MU ``M / k`` (SmartArc's coarse-sector fluence spread over its control points,
    Bzdusek et al., Med Phys 36 (2009) 2328). Odd sectors take the slices in reverse
    order (largest to smallest, then smallest to largest), so neighbouring sectors meet
    at similar apertures and the leaves travel little between them."""
    k_max = int(sector_cps)
    f = np.asarray(maps, dtype=np.float64)
    if k_max <= 1:
        return f
    out = np.zeros_like(f)
    for s, i0 in enumerate(range(0, f.shape[0], k_max)):
        idx = np.arange(i0, min(i0 + k_max, f.shape[0]))
        total = f[idx].sum(axis=0)
        top = float(total.max())
        k = idx.size
        if top <= 0.0:
            continue
        h = top / k
        order = idx if s % 2 == 0 else idx[::-1]
        for j, cp in enumerate(order):
            out[cp] = np.clip(total - j * h, 0.0, h)
    return out


def sequence_vmat(fluence: FluenceSet, machine: Machine, *, threshold: float = 0.1,
                  arcs: list[list[int]] | None = None, mu_relative_pass: bool = True,
                  passes: int = 2, sector_cps: int = 1) -> Delivery:
    """VMAT: every arc (``arcs``: lists of beam positions in ``fluence.beams``; default
    :func:`group_arcs`) sequenced by the rule-based method of the module docstring.

    passes: arcs delivered per optimised arc (default 2, the usual head-and-neck
    choice; 1 is AIRT's single arc). Pass p > 1 sequences what the earlier passes left
    undelivered (the positive residual of the fluence, :func:`arc_fluence`) as one more
    arc, alternating direction (clockwise, counter-clockwise, ...), so a modulated
    fluence is split over several apertures per gantry angle; it stops early when no
    residual pixel exceeds ``threshold`` x the fluence maximum. sector_cps: > 1 spreads
    each sector of that many control points' summed fluence over them as nested slices
    (:func:`sector_slices`) before the first pass; 1: every control point its own map.
    """
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}", field="threshold")
    if int(passes) < 1:
        raise InputError(f"passes must be >= 1, got {passes}", field="passes")
    if int(sector_cps) != sector_cps or sector_cps < 1:
        raise InputError(f"sector_cps must be a positive integer, got {sector_cps!r}",
                         field="sector_cps")
    arcs = group_arcs(fluence) if arcs is None else arcs
    beams = []
    for n, idx in enumerate(arcs):
        bfs, maps, x_edges, gantry = arc_inputs(fluence, idx, n + 1)
        maps = sector_slices(maps, sector_cps)
        residual = maps
        for p in range(int(passes)):
            if p > 0 and residual.max() <= threshold * maps.max():
                break  # nothing significant left to deliver
            r = sequence_arc(residual, x_edges, gantry, machine, fluence.fractions,
                             threshold, mu_relative_pass)
            order = np.arange(len(bfs)) if p % 2 == 0 else np.arange(len(bfs))[::-1]
            name = f"ARC{n + 1}" if passes == 1 else f"ARC{n + 1}.{p + 1}"
            beams.append(_arc_beam(name, r, bfs, gantry, order))
            if p + 1 < passes:
                residual = np.clip(residual - arc_fluence(r, x_edges, machine), 0.0, None)
    return Delivery("vmat", machine, tuple(beams), fluence.fractions,
                    {"threshold": threshold, "mu_relative_pass": mu_relative_pass,
                     "passes": int(passes), "sector_cps": int(sector_cps)})
