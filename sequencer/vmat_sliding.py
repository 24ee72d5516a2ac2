"""Sliding-window VMAT: every arc sector's fluence delivered by one unidirectional sweep.

After the arc-sector sequencing of Craft et al. (Med Phys 2012, "Multicriteria VMAT
optimization"): the arc's control points (one fluence map each, every few degrees) are
grouped into sectors of consecutive control points; a sector's maps are summed and that
sum is delivered while the gantry turns through the sector by a sliding window (Spirou &
Chui 1994, :func:`atp.sequencer.imrt.sweep_row`): per leaf pair both leaves cross the pair's
span once, the trailing leaf waiting at rises of the profile, the leading one at falls.
Where the rule-based sequencer (:mod:`atp.sequencer.vmat`) gives each control point one
aperture (one MU per map, the rest of its modulation lost), a sweep reproduces any
profile along leaf travel up to the floor its closed-leaf slit leaves; what it gives up
is angle: a pixel's fluence is delivered where the window passes it inside the sector,
not spread over the sector's control points.

Per sector (MU and leaf travel are both per degree, because an arc's leaf-speed limit is
``travel_per_deg_mm``, by default ``machine.leaf_travel_limit_per_deg_mm``: the gantry
slows down while the leaves sweep):

1. per leaf pair, the span between its first and last pixel above ``threshold`` x the
   sector's largest summed fluence (outside it the pair delivers nothing); sweep
   directions alternate from sector to sector (left to right, then right to left), and a
   pair's span is widened to where the neighbouring sector's sweep starts or ends, so
   every pair ends one sector where it starts the next;
2. the sector's MU ``T`` (delivered at a constant MU per degree) is the least for which
   every pair can cross its span within the sector at a leaf speed the gantry allows:
   a pair of span W mm at speed v mm per MU needs W / v + P MU, P the sum of its profile's
   rises; the closed leaves (min gap + DLG wide) leave a floor of (gap + DLG) / v MU
   along the span, so the profile is max(fluence, floor);
   no sweeping leaf faster than ``sweep_speed_factor`` x the leaf speed at the arc's
   full dose rate (:func:`_sweep_mm_per_mu`: unlimited, the pairs would cross in spurts
   one after another, each holding the dose rate, and the beam-on time grows);
3. each pair then gets the slowest speed that still ends its sweep within ``T``
   (every pair sweeps the whole sector; none waits closed in the field);
4. pairs with no fluence in a sector travel closed as far behind the X1 jaw as they can
   between where they stop and where they start again, no faster than the sector's
   own time allows (its MU at the full dose rate, its widest sweep at full leaf speed);
   pairs with no fluence in the whole arc stay there;
5. leaf positions are sampled ``samples_per_cp`` times per control point of the sector
   (linear in between, as the machine moves them), each sample using the dose-influence
   columns of the nearest control point of the sector.

Arcs: consecutive beams of one collimator and couch angle at most ``max(10,
sector_deg)`` degrees apart, turning one way (:func:`atp.sequencer.vmat.group_arcs`), so
an arc planned with one beam per sector (``atp plan --technique vmat``,
:func:`atp.vmatplan.sweep_beams`) is one arc of one-beam sectors.

Sectors: ``sector_deg`` degrees (rounded to whole control points); sectors grow by whole
control points until every sweep fits: no pair's span needing more than
``max_sweep_fraction`` of the sector's leaf travel, and the sector's MU within the
machine's MU per degree. ``passes`` > 1 delivers 1 / passes of every map per
pass, alternating the gantry direction, with the sector boundaries of pass q shifted by
q / passes of a sector so the passes' angular errors differ.

The MU step (:mod:`atp.sequencer.reweight`) may scale each sector's MU as a whole
(``BeamDelivery.mu_group``): leaf travel per degree is unchanged, so the delivery stays
within the machine limits.
"""

from __future__ import annotations

import numpy as np
from atp.sequencer.apertures import jaws_around
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.fluence import FluenceSet
from atp.sequencer.machine import Machine
from atp.sequencer.vmat import _wrap, arc_inputs, control_point_cover_deg, group_arcs, limit_travel

from atp.errors import InputError

#: sweeping leaves' top speed, x the leaf speed at the arc's full dose rate (train pt_10,
#: one 18-sector arc: 1 -> 6.4 MU/cGy, 133 s beam-on; 2 -> 4.3, 152 s; 4 -> 3.2, 191 s;
#: unlimited -> 2.5, 250 s)
SWEEP_SPEED_FACTOR = 2.0


def sector_bounds(n_cp: int, sector_cps: int, offset: int = 0) -> np.ndarray:
    """Control-point indices [b_0 = 0, ..., b_n = n_cp] splitting an arc into sectors of
    ``sector_cps`` control points, the first boundary ``offset`` points in; a first or
    last sector shorter than half a sector is merged into its neighbour."""
    k = max(int(sector_cps), 1)
    first = int(offset) % k or k
    b = list(np.unique(np.r_[0, np.arange(first, n_cp, k), n_cp]))
    if len(b) > 2 and b[1] - b[0] < (k + 1) // 2:
        del b[1]
    if len(b) > 2 and b[-1] - b[-2] < (k + 1) // 2:
        del b[-2]
    return np.asarray(b, dtype=np.int64)


def _rises(profile: np.ndarray) -> np.ndarray:
    """Sum of the positive steps of each row, zero before and after: MU a sweep waits."""
    pad = np.pad(profile, ((0, 0), (1, 1)))
    return np.maximum(np.diff(pad, axis=1), 0.0).sum(axis=1)


class _Sectors:
    """The sector layout of one pass: per-sector fluence, spans and boundaries."""

    def __init__(self, maps, bounds, threshold):
        n_s = bounds.size - 1
        self.bounds = bounds
        self.sum = np.stack([maps[bounds[j]:bounds[j + 1]].sum(axis=0) for j in range(n_s)])
        top = self.sum.reshape(n_s, -1).max(axis=1)
        has = self.sum > np.maximum(threshold * top, 1e-12)[:, None, None]
        self.on = has.any(axis=2)  # (n_s, n_pairs): pair has fluence in the sector
        n_x = maps.shape[2]
        first = np.where(self.on, np.argmax(has, axis=2), np.nan)
        last = np.where(self.on, n_x - np.argmax(has[..., ::-1], axis=2), np.nan)
        self.direction = np.where(np.arange(n_s) % 2 == 0, 1, -1)
        # boundary edge index where each pair ends sector j and starts j + 1 (NaN: the
        # pair has no fluence on either side)
        bnd = np.full((n_s + 1,) + self.on.shape[1:], np.nan)
        bnd[0] = first[0] if self.direction[0] > 0 else last[0]
        bnd[n_s] = last[-1] if self.direction[-1] > 0 else first[-1]
        for j in range(n_s - 1):
            if self.direction[j] > 0:
                bnd[j + 1] = np.fmax(last[j], last[j + 1])
            else:
                bnd[j + 1] = np.fmin(first[j], first[j + 1])
        self.boundary = bnd

    def spans(self):
        """(lo, hi) edge indices of every pair's sweep in every sector, (n_sectors,
        n_pairs) each (valid where ``on``)."""
        b0 = np.nan_to_num(self.boundary[:-1], nan=0.0)
        b1 = np.nan_to_num(self.boundary[1:], nan=0.0)
        return np.minimum(b0, b1).astype(np.int64), np.maximum(b0, b1).astype(np.int64)


def _sector_mu(profile, inspan, width_mm, sector, theta_deg, m: Machine,
               max_sweep_fraction, min_mu, max_mu, travel_per_deg_mm: float,
               mm_per_mu: float = np.inf):
    """(T per sector, floor per row), or None when a sector's sweep does not fit.

    Rows are the sweeping leaf pairs of every sector (``sector`` (N,) their sector
    index; ``profile`` / ``inspan`` (N, n_x), ``width_mm`` (N,)); ``theta_deg``,
    ``min_mu``, ``max_mu`` per sector. T is the least sector MU (>= ``min_mu``) in which
    every sweeping pair of the sector crosses its span at a speed the gantry allows, and
    a row's floor c (MU) the one of the slowest speed that still ends within T. None when
    a span needs more than ``max_sweep_fraction`` of its sector's leaf travel or a T more
    than ``max_mu``. Every sector is solved at once (the same bisections, one per
    sector or row, on stacked arrays)."""
    theta = np.asarray(theta_deg, dtype=np.float64)
    n_s = theta.size
    reach = travel_per_deg_mm * theta  # mm a leaf can travel in each sector
    slit = m.min_leaf_gap_mm + m.dosimetric_leaf_gap_mm
    if np.any(width_mm + slit > max_sweep_fraction * reach[sector]):
        return None
    used = np.zeros(n_s, dtype=bool)
    used[sector] = True

    def need(c):  # MU the rows need with floor c (c = slit / speed)
        return width_mm * c / slit + _rises(np.where(inspan, np.maximum(profile,
                                                                         c[:, None]), 0.0))

    floor_min = slit / mm_per_mu  # the leaves no faster than mm_per_mu

    def fits(t):  # per sector: every row of it ends its sweep within t
        late = need(np.maximum(slit * t[sector] / reach[sector], floor_min)) > t[sector]
        return np.bincount(sector, weights=late, minlength=n_s) == 0

    lo = np.zeros(n_s)
    np.maximum.at(lo, sector, _rises(profile))
    hi = np.maximum(2.0 * lo, 1e-9)
    grow = used & ~fits(hi)
    while grow.any():
        lo, hi = np.where(grow, hi, lo), np.where(grow, 2.0 * hi, hi)
        grow = used & ~fits(hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        ok = fits(mid)
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    t = np.maximum(hi, min_mu)
    if np.any(used & (t > max_mu)):
        return None
    # every row at the top speed (the least closed-leaf floor); rows done before T wait
    # closed at the end of their sweep, behind the far jaw
    t_row = t[sector]
    c_lo = np.maximum(slit * t_row / reach[sector], floor_min)  # floor at the top speed
    c_hi = np.maximum(t_row * slit / width_mm, c_lo)  # need(c_hi) >= t
    for _ in range(50):
        mid = 0.5 * (c_lo + c_hi)
        ok = need(mid) <= t_row
        c_lo = np.where(ok, mid, c_lo)
        c_hi = np.where(ok, c_hi, mid)
    return t, c_lo


def _sweep_mm_per_mu(m: Machine, fractions: int, speed_factor: float) -> float:
    """The fastest a sweeping leaf may travel, mm per total-course MU: ``speed_factor`` x
    the machine's leaf speed at the arc's full dose rate. At 1 every leaf moves while the
    MU are delivered (as a static sliding window) and the beam-on time is the MU at the
    full dose rate; larger factors need fewer MU, the machine lowering the dose rate
    while leaves move faster (inf: only the leaf travel per degree limits them, fewest
    MU, but pairs then cross in spurts at full leaf speed one after another, each spurt
    holding the dose rate, and the beam-on time grows)."""
    if not speed_factor > 0:
        raise InputError(f"sweep_speed_factor must be > 0, got {speed_factor}",
                         field="sweep_speed_factor")
    return (speed_factor * m.max_leaf_speed_mm_s / (m.dose_rate_mu_min("arc") / 60.0)
            / max(int(fractions), 1))


def _sweep_positions_rows(profile, lo, hi, edges_mm, speed, direction, times):
    """Radiation-field edges (left, right) mm at ``times`` (MU) of many leaf pairs'
    sweeps at once, left to right (direction 1) or right to left (-1, the mirror image):
    row r sweeps ``profile[r, lo[r]:hi[r]]`` (MU per pixel; (R, n_x), anything outside
    the span ignored) across edges ``edges_mm[lo[r]:hi[r] + 1]`` at ``speed[r]`` mm per
    MU. Returns (left, right), each (len(times), R) mm.

    The trajectories of :func:`atp.sequencer.imrt.sweep_row` with every row on the full
    edge grid: pixels outside a row's span add no wait and no travel, so the row's
    breakpoint times stay non-decreasing and the breakpoints of its span are exactly
    those ``sweep_row`` gives for the span alone."""
    prof = np.asarray(profile, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    edges = np.asarray(edges_mm, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    n_rows, n_x = prof.shape
    if direction < 0:  # the mirror image: sweep the flipped rows left to right
        left_m, right_m = _sweep_positions_rows(prof[:, ::-1], n_x - hi, n_x - lo,
                                                -edges[::-1], speed, 1, times)
        return -right_m, -left_m
    cols = np.arange(n_x)
    inspan = (cols >= lo[:, None]) & (cols < hi[:, None])
    ext = np.zeros((n_rows, n_x + 2))
    ext[:, 1:-1] = np.where(inspan, prof, 0.0)
    d = np.diff(ext, axis=1)  # rise at each of the n_x + 1 edges
    move = np.zeros((n_rows, n_x + 1))
    move[:, :-1] = np.where(inspan, np.diff(edges)[None] / np.asarray(speed)[:, None], 0.0)
    travelled = np.zeros((n_rows, n_x + 1))
    travelled[:, 1:] = np.cumsum(move, axis=1)[:, :-1]
    xs = np.repeat(edges, 2)
    out = []
    for wait in (np.maximum(d, 0.0), np.maximum(-d, 0.0)):  # trailing (A), leading (B)
        leave = np.cumsum(wait, axis=1) + travelled
        bp = np.stack([leave - wait, leave], axis=2).reshape(n_rows, -1)
        # the breakpoint at or before each time, kept inside the row's span
        span = float(max(bp.max(initial=0.0), times.max(initial=0.0))) + 1.0
        shift = span * np.arange(n_rows)[:, None]
        k = np.searchsorted((bp + shift).ravel(), (times[None] + shift).ravel(),
                            side="right").reshape(n_rows, -1)
        k = k - 1 - bp.shape[1] * np.arange(n_rows)[:, None]
        k = np.clip(k, 2 * lo[:, None], 2 * hi[:, None])
        rows = np.arange(n_rows)[:, None]
        t0, t1 = bp[rows, k], bp[rows, k + 1]
        frac = np.clip((times[None] - t0) / np.where(t1 > t0, t1 - t0, 1.0), 0.0, 1.0)
        out.append((xs[k] + frac * (xs[k + 1] - xs[k])).T)
    return out[0], out[1]


def _pass_layout(maps, x_edges, gantry, m, sector_cps, offset, max_sweep_fraction,
                 fractions, threshold, travel_per_deg_mm, sweep_speed_factor=SWEEP_SPEED_FACTOR):
    """(sectors, per-sector (theta deg, T MU, rows, floors, (lo, hi))) with sectors grown
    until every sweep fits."""
    n_cp, _, n_x = maps.shape
    cover = control_point_cover_deg(gantry)
    cols = np.arange(n_x)
    k = int(sector_cps)
    while True:
        sec = _Sectors(maps, sector_bounds(n_cp, k, offset), threshold)
        n_s = sec.bounds.size - 1
        theta = np.array([cover[sec.bounds[j]:sec.bounds[j + 1]].sum() for j in range(n_s)])
        min_mu = m.min_mu_per_deg * theta * fractions
        max_mu = m.max_mu_per_deg * theta * fractions
        sector, rows = np.nonzero(sec.on)  # every sweeping (sector, pair), sector-major
        lo_all, hi_all = sec.spans()
        lo, hi = lo_all[sector, rows], hi_all[sector, rows]
        inspan = (cols >= lo[:, None]) & (cols < hi[:, None])
        profile = np.where(inspan, sec.sum[sector, rows], 0.0)
        width = x_edges[hi] - x_edges[lo]
        got = _sector_mu(profile, inspan, width, sector, theta, m, max_sweep_fraction,
                         min_mu, max_mu, travel_per_deg_mm, _sweep_mm_per_mu(m, fractions, sweep_speed_factor))
        if got is not None:
            t, floors = got
            plans = []
            for j in range(n_s):
                mine = sector == j
                if not mine.any():
                    plans.append((float(theta[j]), float(min_mu[j]), rows[mine], None, None))
                else:
                    plans.append((float(theta[j]), float(t[j]), rows[mine], floors[mine],
                                  (lo[mine], hi[mine])))
            return sec, plans
        if k >= n_cp:
            raise InputError(
                "sliding-window VMAT: even one sector spanning the whole arc cannot sweep "
                f"this fluence ({travel_per_deg_mm:.2f} mm leaf travel and "
                f"{m.max_mu_per_deg:g} MU per degree): use more passes", field="passes")
        k += 1


def sequence_arc_sliding(maps, x_edges_mm, gantry_deg, beam_index, machine: Machine, *,
                         fractions: int = 1, sector_cps: int = 10, offset: int = 0,
                         samples_per_cp: int = 2, max_sweep_fraction: float = 0.6,
                         threshold: float = 0.05, travel_per_deg_mm: float | None = None,
                         sweep_speed_factor: float = SWEEP_SPEED_FACTOR):
    """One pass over one arc, in the order given. ``maps`` (n_cp, n_pairs, n_x) MU on
    the leaf-pair grid; ``beam_index`` (n_cp,) the dij beam of each control point.

    Returns dict(gantry (n,) deg, a, b (n, n_pairs) physical tips, jaw_x, jaw_y (2,),
    cumulative_mu (n,), dij_beam (n,), mu_group (n - 1,), sector_cps (int)).
    """
    m = machine
    maps = np.asarray(maps, dtype=np.float64)
    x_edges = np.asarray(x_edges_mm, dtype=np.float64)
    gantry = np.asarray(gantry_deg, dtype=np.float64)
    n_pairs = maps.shape[1]
    travel_per_deg_mm = float(travel_per_deg_mm or m.leaf_travel_limit_per_deg_mm)
    sec, plans = _pass_layout(maps, x_edges, gantry, m, sector_cps, offset,
                              max_sweep_fraction, fractions, threshold, travel_per_deg_mm,
                              sweep_speed_factor)
    n_s = sec.bounds.size - 1
    # position along the arc (deg, increasing in delivery order) of every control point
    step = np.abs(_wrap(np.diff(gantry)))
    phi = np.concatenate([[0.0], np.cumsum(step)])
    half_before = np.concatenate([[step[0] / 2], step / 2])
    half_after = np.concatenate([step / 2, [step[-1] / 2]])
    sign = np.sign(_wrap(gantry[1] - gantry[0])) or 1.0

    # jaws around every sweep span of the pass; idle pairs park behind X1
    span_lo = np.full(sec.on.shape, np.nan)
    span_hi = np.full(sec.on.shape, np.nan)
    for j, (_, _, rows, _, lohi) in enumerate(plans):
        if rows.size:
            span_lo[j, rows] = x_edges[lohi[0]]
            span_hi[j, rows] = x_edges[lohi[1]]
    jx, jy = jaws_around(span_lo, span_hi, sec.on, m)
    park = jx[0] - 1.0  # right radiation edge of a closed pair, behind the X1 jaw
    span_limit = m.max_leaf_span_mm - 1.0
    half = m.dosimetric_leaf_gap_mm / 2.0
    bnd_mm = np.where(np.isnan(sec.boundary), np.nan,
                      x_edges[np.nan_to_num(sec.boundary, nan=0).astype(np.int64)])

    gantry_out, left_out, right_out, mu_out, dij_out, group_out = [], [], [], [], [], []
    mu_before = 0.0
    for j, (theta, t_mu, rows, floors, lohi) in enumerate(plans):
        c0, c1 = int(sec.bounds[j]), int(sec.bounds[j + 1])
        n_samples = samples_per_cp * (c1 - c0)
        u = np.linspace(0.0, 1.0, n_samples + 1)
        start = phi[c0] - half_before[c0]
        end = phi[c1 - 1] + half_after[c1 - 1]
        at = start + u * (end - start)
        near = c0 + np.argmin(np.abs(at[:, None] - phi[None, c0:c1]), axis=1)
        # idle pairs: closed, as far behind X1 as reachable between the boundaries
        p0 = np.where(np.isnan(bnd_mm[j]), park, bnd_mm[j])
        p1 = np.where(np.isnan(bnd_mm[j + 1]), park, bnd_mm[j + 1])
        times = u * t_mu
        left = np.full((u.size, n_pairs), np.nan)
        right = np.full((u.size, n_pairs), np.nan)
        if rows.size:  # every sweeping pair at once, each at its own speed
            prof = np.maximum(sec.sum[j][rows], floors[:, None])  # its span: >= floor
            speed = (m.min_leaf_gap_mm + m.dosimetric_leaf_gap_mm) / floors
            left[:, rows], right[:, rows] = _sweep_positions_rows(
                prof, lohi[0], lohi[1], x_edges, speed, sec.direction[j], times)
        # park no further from the sweeping leaves than one bank's span allows
        # (radiation edge pos of a closed pair: tips b = pos - DLG/2, a = b - min gap)
        park_u = np.full(u.size, park)
        if rows.size:
            top_b = np.nanmax(right[:, rows], axis=1) - half
            top_a = np.nanmax(left[:, rows], axis=1) + half
            park_u = np.maximum.reduce([park_u, top_b - span_limit + half,
                                        top_a - span_limit + half + m.min_leaf_gap_mm])
        # idle pairs travel no faster than the sector's own time allows (its MU at the
        # arc dose rate, the gantry at full speed, its widest sweep at full leaf speed),
        # so parking never sets the pace of the arc
        widest = float((x_edges[lohi[1]] - x_edges[lohi[0]]).max()) if rows.size else 0.0
        t_sector = max(t_mu / fractions / (m.dose_rate_mu_min("arc") / 60.0),
                       theta / m.max_gantry_speed_deg_s, widest / m.max_leaf_speed_mm_s)
        travel = min(travel_per_deg_mm * theta, m.max_leaf_speed_mm_s * t_sector)
        pos = np.maximum.reduce([np.broadcast_to(park_u[:, None], (u.size, n_pairs)),
                                 p0[None] - travel * u[:, None],
                                 p1[None] - travel * (1.0 - u[:, None])])
        idle = np.isnan(left)
        left[idle] = pos[idle]
        right[idle] = pos[idle]
        keep = slice(None) if j == 0 else slice(1, None)
        gantry_out.append(at[keep])
        left_out.append(left[keep])
        right_out.append(right[keep])
        mu_out.append(mu_before + times[keep])
        dij_out.append(np.asarray(beam_index)[near[keep]])
        group_out.append(np.full(n_samples, j))
        mu_before += t_mu
    phi_all = np.concatenate(gantry_out)
    a = np.concatenate(left_out) + half
    b = np.concatenate(right_out) - half
    # what one carriage cannot reach is cut off (the dose is computed from these tips)
    a = np.maximum(a, a.max(axis=1, keepdims=True) - span_limit)
    b = np.minimum(b, b.min(axis=1, keepdims=True) + span_limit)
    a = np.minimum(a, b - m.min_leaf_gap_mm)  # closed or nearly: the min gap
    lo_r, hi_r = m.leaf_position_range_mm
    a = np.clip(a, lo_r, hi_r - m.min_leaf_gap_mm)
    b = np.clip(b, lo_r + m.min_leaf_gap_mm, hi_r)
    step_mm = travel_per_deg_mm * np.abs(_wrap(np.diff(phi_all)))
    a = limit_travel(a, step_mm)
    b = limit_travel(b, step_mm)
    b = np.maximum(b, a + m.min_leaf_gap_mm)
    return {"gantry": (gantry[0] + sign * phi_all) % 360.0, "a": a, "b": b,
            "jaw_x": jx, "jaw_y": jy, "cumulative_mu": np.concatenate(mu_out),
            "dij_beam": np.concatenate(dij_out), "mu_group": np.concatenate(group_out),
            "sector_cps": int(np.diff(sec.bounds).max()) if n_s else 0}


def sequence_vmat_sliding(fluence: FluenceSet, machine: Machine, *, sector_deg: float = 20.0,
                          passes: int = 2, samples_per_cp: int = 2,
                          max_sweep_fraction: float = 0.6, threshold: float = 0.05,
                          travel_per_deg_mm: float | None = None,
                          arcs: list[list[int]] | None = None,
                          sweep_speed_factor: float = SWEEP_SPEED_FACTOR) -> Delivery:
    """Sliding-window VMAT of every arc (``arcs``: beam positions in ``fluence.beams``;
    default :func:`atp.sequencer.vmat.group_arcs`); see the module docstring."""
    if not sector_deg > 0:
        raise InputError(f"sector_deg must be > 0, got {sector_deg}", field="sector_deg")
    if int(passes) < 1:
        raise InputError(f"passes must be >= 1, got {passes}", field="passes")
    if int(samples_per_cp) < 1:
        raise InputError(f"samples_per_cp must be >= 1, got {samples_per_cp}",
                         field="samples_per_cp")
    if travel_per_deg_mm is not None and not (
            0 < travel_per_deg_mm <= machine.leaf_travel_limit_per_deg_mm + 1e-9):
        raise InputError(f"travel_per_deg_mm must be in (0, "
                         f"{machine.leaf_travel_limit_per_deg_mm:g}] for this machine, got "
                         f"{travel_per_deg_mm}", field="travel_per_deg_mm")
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}", field="threshold")
    if not 0.0 < max_sweep_fraction < 1.0:
        raise InputError(f"max_sweep_fraction must be in (0, 1), got {max_sweep_fraction}",
                         field="max_sweep_fraction")
    m = machine
    # control points up to one sector apart belong to one arc (sweep arcs are planned
    # with one beam per sector, atp.vmatplan.sweep_beams)
    arcs = group_arcs(fluence, max(10.0, float(sector_deg) * (1 + 1e-6))) \
        if arcs is None else arcs
    beams, used = [], []
    for n, idx in enumerate(arcs):
        bfs, maps, x_edges, gantry = arc_inputs(fluence, idx, n + 1)
        step = float(np.median(np.abs(_wrap(np.diff(gantry)))))
        k = max(1, round(sector_deg / max(step, 1e-9)))
        index = np.array([bf.beam_index for bf in bfs])
        for p in range(int(passes)):
            order = np.arange(len(bfs)) if p % 2 == 0 else np.arange(len(bfs))[::-1]
            r = sequence_arc_sliding(maps[order] / passes, x_edges, gantry[order],
                                     index[order], m, fractions=fluence.fractions,
                                     sector_cps=k, offset=round(p * k / passes),
                                     samples_per_cp=samples_per_cp,
                                     max_sweep_fraction=max_sweep_fraction,
                                     threshold=threshold,
                                     travel_per_deg_mm=travel_per_deg_mm,
                                     sweep_speed_factor=sweep_speed_factor)
            _check_mu_rate(r, m, fluence.fractions)
            direction = "CW" if np.sign(_wrap(gantry[order][1] - gantry[order][0])) > 0 \
                else "CCW"
            name = f"SWARC{n + 1}" if passes == 1 else f"SWARC{n + 1}.{p + 1}"
            n_pt = r["gantry"].size
            beams.append(BeamDelivery(
                f"{name}_{direction}", "arc", r["gantry"], bfs[0].collimator_deg,
                bfs[0].couch_deg, bfs[0].isocenter_mm, r["a"], r["b"],
                np.tile(r["jaw_x"], (n_pt, 1)), np.tile(r["jaw_y"], (n_pt, 1)),
                r["cumulative_mu"], r["dij_beam"], n_segments=n_pt,
                mu_group=r["mu_group"]))
            used.append(r["sector_cps"])
    return Delivery("vmat-sliding", m, tuple(beams), fluence.fractions,
                    {"sector_deg": float(sector_deg), "passes": int(passes),
                     "samples_per_cp": int(samples_per_cp),
                     "max_sweep_fraction": float(max_sweep_fraction),
                     "threshold": float(threshold),
                     "travel_per_deg_mm": float(travel_per_deg_mm
                                                or m.leaf_travel_limit_per_deg_mm),
                     "largest_sector_cps": int(max(used, default=0)), "sweep_speed_factor": float(sweep_speed_factor)})


def _check_mu_rate(r: dict, m: Machine, fractions: int) -> None:
    """Sector MU per degree within the machine's range (a clear error, not a clip: a
    clipped MU would no longer deliver the sweep's fluence)."""
    dmu = np.diff(r["cumulative_mu"])
    dg = np.abs(_wrap(np.diff(r["gantry"])))
    rate = dmu / fractions / np.maximum(dg, 1e-9)
    if rate.size and rate.max() > m.max_mu_per_deg * (1 + 1e-9):
        raise InputError(f"sliding-window VMAT needs {rate.max():.1f} MU/deg per fraction "
                         f"> the machine's {m.max_mu_per_deg}: use more passes or longer "
                         "sectors", field="passes")
