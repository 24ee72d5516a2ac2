"""IMRT leaf sequencing of fixed-gantry fluence maps.

* :func:`sequence_step_and_shoot` -- the reducing-level method of Xia and Verhey (1998):
  the map is quantised to integer levels; repeatedly the largest power of two not above
  the current maximum is taken as the level step, every row's runs of pixels at or above
  it form apertures (the i-th run of each row goes into the i-th segment, so a segment
  has at most one opening per pair), and the step is subtracted under them.
* :func:`sequence_sliding_window` -- unidirectional dynamic delivery after Spirou & Chui
  (1994) / Bortfeld et al. (1994): both leaves sweep from -x to +x; inside a pixel both
  move at full speed, at a rise of the profile the trailing leaf waits, at a fall the
  leading leaf waits, which delivers the piecewise-constant profile with the least MU.
  The minimum gap plus DLG forces a floor fluence (gap / speed) along the swept span, so
  each pair sweeps only between its first and last pixel holding at least half of it. A
  pair done before the beam's last MU leaves, closed, for behind the nearer jaw instead of
  resting with its gap open at its last edge (:func:`_leave_the_field`).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from atp.sequencer.apertures import jaws_around, park_closed, physical_tips
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.fluence import BeamFluence, FluenceSet
from atp.sequencer.machine import Machine


def _runs(row_mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True runs of a 1-D boolean array."""
    d = np.diff(np.concatenate([[0], row_mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def xia_verhey_segments(levels: np.ndarray):
    """Integer level map (n_pairs, n_x) -> list of (level_weight, [(start, stop) | None
    per pair]); the weighted sum of the segment masks reproduces ``levels`` exactly."""
    r = np.array(levels, dtype=np.int64)
    if r.min() < 0:
        raise ValueError("levels must be >= 0")
    segments = []
    while r.max() > 0:
        step = 1 << int(np.floor(np.log2(r.max())))
        mask = r >= step
        runs = [_runs(row) for row in mask]
        for i in range(max(len(x) for x in runs)):
            segments.append((step, [x[i] if i < len(x) else None for x in runs]))
        r = r - step * mask
    return segments


def split_for_bank_span(segs, x_edges_mm: np.ndarray, machine: Machine):
    """Split segments whose open leaves cannot be reached with one carriage position.

    A segment whose physical leaf tips of one bank lie further apart than the machine's
    ``max_leaf_span_mm`` (e.g. a 16 cm wide field with openings at both ends) is split into
    segments of the same weight, each opening a subset of its leaf pairs (greedy, pairs in
    order of their bank-A tip) whose tips fit within the span. The weighted sum of the
    segment masks is unchanged, so the delivered fluence is the same.
    """
    limit = machine.max_leaf_span_mm - 1.0  # the 1 mm parking margin of park_closed
    out = []
    for weight, rows in segs:
        idx = [p for p, r in enumerate(rows) if r is not None]
        if len(idx) < 2:
            out.append((weight, rows))
            continue
        left = np.array([x_edges_mm[rows[p][0]] for p in idx])
        right = np.array([x_edges_mm[rows[p][1]] for p in idx])
        a, b = physical_tips(left, right, np.ones(len(idx), bool), machine)
        if np.ptp(a) <= limit and np.ptp(b) <= limit:
            out.append((weight, rows))
            continue
        groups, cur = [], []
        for k in np.argsort(a, kind="stable"):
            trial = cur + [k]
            if cur and (np.ptp(a[trial]) > limit or np.ptp(b[trial]) > limit):
                groups.append(cur)
                trial = [k]
            cur = trial
        groups.append(cur)
        for g in groups:
            keep = {idx[k] for k in g}
            out.append((weight, [r if p in keep else None for p, r in enumerate(rows)]))
    return out


def _static_beam(bf: BeamFluence, machine: Machine, segs, unit_mu: float, name: str):
    edges = bf.x_edges_mm
    n_pairs = bf.fluence_mu.shape[0]
    n = len(segs)
    left = np.zeros((n, n_pairs))
    right = np.zeros((n, n_pairs))
    op = np.zeros((n, n_pairs), dtype=bool)
    mus = np.array([w * unit_mu for w, _ in segs])
    for k, (_, rows) in enumerate(segs):
        for p, run in enumerate(rows):
            if run is not None:
                left[k, p], right[k, p], op[k, p] = edges[run[0]], edges[run[1]], True
    jx, jy = jaws_around(left, right, op, machine)
    a, b = physical_tips(left, right, op, machine)
    for k in range(n):
        a[k], b[k] = park_closed(a[k], b[k], jx[0], machine)
    # two control points per segment: beam on between them, leaves move while off
    a2, b2 = np.repeat(a, 2, axis=0), np.repeat(b, 2, axis=0)
    cum = np.concatenate([[0.0], np.repeat(np.cumsum(mus), 2)[:-1]])
    n_cp = 2 * n
    return BeamDelivery(name, "static", np.full(n_cp, bf.gantry_deg), bf.collimator_deg,
                        bf.couch_deg, bf.isocenter_mm, a2, b2, np.tile(jx, (n_cp, 1)),
                        np.tile(jy, (n_cp, 1)), cum, np.full(n_cp, bf.beam_index),
                        n_segments=n)


def sequence_step_and_shoot(fluence: FluenceSet, machine: Machine, *, levels: int = 10,
                            ) -> Delivery:
    """Step-and-shoot IMRT: Xia-Verhey reducing levels on ``levels`` intensity levels
    per beam (level = beam max / ``levels``)."""
    if levels < 1:
        raise ValueError("levels must be >= 1")
    beams = []
    for i, bf in enumerate(fluence.beams):
        fmax = float(bf.fluence_mu.max())
        name = f"IMRT{i + 1:02d}_G{bf.gantry_deg:03.0f}"
        unit = fmax / levels
        if not unit > 0:  # empty field (or a fluence so small its level unit underflows)
            segs, unit = [], 0.0
        else:
            segs = xia_verhey_segments(np.rint(bf.fluence_mu / unit).astype(np.int64))
            segs = split_for_bank_span(segs, bf.x_edges_mm, machine)
        if not segs:  # an empty field: one closed segment, zero MU
            segs = [(0, [None] * bf.fluence_mu.shape[0])]
        beams.append(_static_beam(bf, machine, segs, unit, name))
    return Delivery("imrt-sns", machine, tuple(beams), fluence.fractions,
                    {"levels": levels})


def sweep_row(profile: np.ndarray, width_mm: np.ndarray, speed: float):
    """Trailing (A) and leading (B) leaf trajectories delivering ``profile`` (MU per
    pixel) across pixels of ``width_mm``: (times_A, times_B) at the 2(n+1) breakpoints,
    positions are the pixel edges, each visited twice (arrive, leave)."""
    ext = np.concatenate([[0.0], profile, [0.0]])
    d = np.diff(ext)  # rise at each of the n+1 edges
    wait_a, wait_b = np.maximum(d, 0.0), np.maximum(-d, 0.0)
    move = np.concatenate([width_mm / speed, [0.0]])
    # time leaving edge k = sum_{j<=k} wait + sum_{j<k} move
    leave_a = np.cumsum(wait_a) + np.concatenate([[0.0], np.cumsum(move)[:-1]])
    leave_b = np.cumsum(wait_b) + np.concatenate([[0.0], np.cumsum(move)[:-1]])
    arrive_a, arrive_b = leave_a - wait_a, leave_b - wait_b
    ta = np.stack([arrive_a, leave_a], axis=1).reshape(-1)
    tb = np.stack([arrive_b, leave_b], axis=1).reshape(-1)
    return ta, tb


def split_columns(f: np.ndarray, x_edges_mm: np.ndarray, machine: Machine) -> list[slice]:
    """Column ranges of a fluence map (n_pairs, n_x), each narrow enough for one carriage.

    A field whose fluence spans more than the bank span (less the DLG and a 1 mm
    margin) is delivered as split fields, as clinical systems do: contiguous, equal-width
    column blocks between the first and last non-zero column. One slice when it fits.
    """
    cols = np.flatnonzero((f > 0).any(axis=0))
    if cols.size == 0:
        return [slice(0, f.shape[1])]
    j0, j1 = int(cols[0]), int(cols[-1]) + 1
    limit = machine.max_leaf_span_mm - machine.dosimetric_leaf_gap_mm - 1.0
    width = float(x_edges_mm[j1] - x_edges_mm[j0])
    if width <= limit:
        return [slice(0, f.shape[1])]
    pix = float(np.max(np.diff(x_edges_mm)))
    per = max(1, int(limit // pix))  # columns per split field
    n = int(np.ceil((j1 - j0) / per))
    bounds = np.linspace(j0, j1, n + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in pairwise(bounds)]


def sequence_sliding_window(fluence: FluenceSet, machine: Machine, *,
                            max_control_points: int = 400) -> Delivery:
    """Sliding-window IMRT (unidirectional sweep, least MU for the leaf speed).

    Leaf speed is expressed per MU at the dynamic dose rate
    (``machine.mm_per_mu(fractions)``: the maximum dose rate unless the machine sets
    ``delivery.dynamic_dose_rate_mu_min``). Control points are the union of every pair's
    breakpoints; beyond ``max_control_points`` they are resampled evenly in MU. A sweep
    whose tips of one bank would at some moment lie further apart than the bank span is
    delivered as split fields instead (:func:`split_columns`), each a dynamic beam of its
    own at the same gantry angle (names ``..._1``, ``..._2``).
    """
    m = machine
    speed = m.mm_per_mu(fluence.fractions)  # mm per total-course MU
    floor = (m.min_leaf_gap_mm + m.dosimetric_leaf_gap_mm) / speed
    beams = []
    for i, bf in enumerate(fluence.beams):
        name = f"IMRT{i + 1:02d}_G{bf.gantry_deg:03.0f}"
        whole = _sliding_beam(bf, bf.fluence_mu, m, speed, floor, max_control_points, name)
        if _bank_span_mm(whole) <= m.max_leaf_span_mm:
            beams.append(whole)
            continue
        pieces = split_columns(bf.fluence_mu, bf.x_edges_mm, m)
        for k, cols in enumerate(pieces):
            f = np.zeros_like(bf.fluence_mu)
            f[:, cols] = bf.fluence_mu[:, cols]
            beams.append(_sliding_beam(bf, f, m, speed, floor, max_control_points,
                                       name if len(pieces) == 1 else f"{name}_{k + 1}"))
    return Delivery("imrt-sliding", m, tuple(beams), fluence.fractions,
                    {"floor_mu": floor})


def _leave_the_field(rows, total: float, jaw_x_mm, m: Machine, speed: float):
    """Send each leaf pair whose sweep ends before the beam's (``total`` MU) on, closed,
    behind a jaw at full leaf speed.

    A finished pair cannot close completely: its minimum gap plus the dosimetric leaf gap
    stays open. Held at the end of its sweep while the other pairs finish, it would give
    that edge's pixel the gap's share (about 2 of 5 mm) of every remaining MU: on H&N
    fields up to 20-50 % of the map's maximum, a hot line along the fields' ends. Moving
    at full speed it gives each pixel it crosses only the sweep's floor fluence
    (``floor_mu``), and behind a jaw only the jaw's transmission. The pair takes the
    shorter way (on to the X2 jaw, or back over its own sweep to the X1 jaw) where the
    bank span allows the place behind that jaw with every other pair at either end of its
    sweep (tips of one bank at most ``max_leaf_span_mm - 1.5`` apart; in fields wider
    than that a pair may find neither and rests at its last edge as before); a pair that
    runs out of time stops where the beam ends. rows: (pair, positions, times_A,
    times_B) of :func:`sweep_row` (radiation edges); the jaws ``jaw_x_mm`` (X1, X2) are
    those around the sweeps."""
    x1, x2 = float(jaw_x_mm[0]), float(jaw_x_mm[1])
    gap = m.dosimetric_leaf_gap_mm + m.min_leaf_gap_mm  # the radiation opening, closed
    span = m.max_leaf_span_mm - 1.5
    lo, hi = m.leaf_position_range_mm
    half = m.dosimetric_leaf_gap_mm / 2.0
    # radiation edges of a closed pair: [x - gap, x]; behind X1: x <= x1; X2: x - gap >= x2
    back = max(x1 - 0.5, x2 - span, lo + m.min_leaf_gap_mm + half)
    on = min(x2 + gap + 0.5, x1 + span, hi + half)
    out = []
    for p, xs, ta, tb in rows:
        t_end = max(ta[-1], tb[-1])
        x_end = float(xs[-1])
        ways = [(x2 - x_end, 0, on)] if on - gap >= x2 else []  # (path, tie, target)
        ways += [(x_end - x1, 1, back)] if back <= x1 else []  # behind a jaw
        if t_end < total and ways:
            target = min(ways)[2]
            dist = target - x_end
            if abs(dist) > 1e-9:
                t_x = t_end + abs(dist) / speed
                if t_x > total:
                    t_x, target = total, x_end + np.sign(dist) * speed * (total - t_end)
                xs, ta, tb = np.append(xs, target), np.append(ta, t_x), np.append(tb, t_x)
        out.append((p, xs, ta, tb))
    return out


def _bank_span_mm(beam: BeamDelivery) -> float:
    """Largest distance between two tips of one bank at any control point (mm)."""
    a, b = beam.leaf_a_mm, beam.leaf_b_mm
    return float(max(np.ptp(a, axis=1).max(), np.ptp(b, axis=1).max()))


def _sliding_beam(bf: BeamFluence, f: np.ndarray, m: Machine, speed: float, floor: float,
                  max_control_points: int, name: str) -> BeamDelivery:
    """One dynamic beam sweeping the fluence map ``f`` (n_pairs, n_x) MU."""
    edges = bf.x_edges_mm
    n_pairs = f.shape[0]
    rows = []  # (pair, xs, ta, tb)
    for p in range(n_pairs):
        # sweep only between the first and last pixel worth at least half the floor:
        # outside, delivering the floor would be a larger error than delivering 0
        nz = np.flatnonzero((f[p] >= floor / 2) & (f[p] > 1e-9 * max(f.max(), 1e-30)))
        if nz.size == 0:
            continue
        j0, j1 = nz[0], nz[-1] + 1
        prof = np.maximum(f[p, j0:j1], floor)
        ta, tb = sweep_row(prof, np.diff(edges[j0:j1 + 1]), speed)
        xs = np.repeat(edges[j0:j1 + 1], 2)
        rows.append((p, xs, ta, tb))
    if not rows:
        return _static_beam(bf, m, [(0, [None] * n_pairs)], 0.0, name)
    row_ends = np.array([max(r[2][-1], r[3][-1]) for r in rows])  # MU each sweep ends
    total = float(row_ends.max())
    # the jaws around every sweep (radiation edges: from the first to the last edge)
    start = np.full((1, n_pairs), np.nan)
    end = np.full((1, n_pairs), np.nan)
    for p, xs, _, _ in rows:
        start[0, p], end[0, p] = xs[0], xs[-1]
    jx, jy = jaws_around(np.nan_to_num(start), np.nan_to_num(end), ~np.isnan(start), m)
    ends = np.unique(row_ends[row_ends < total])  # where pairs turn to leave: control points
    rows = _leave_the_field(rows, total, jx, m, speed)
    times = np.unique(np.concatenate([np.concatenate([r[2], r[3]]) for r in rows]
                                     + [[0.0, total]]))
    if times.size > max_control_points:
        keep = ends[:max_control_points // 2]
        times = np.unique(np.concatenate(
            [np.linspace(0.0, total, max_control_points - keep.size), keep]))
    n_cp = times.size
    left = np.zeros((n_cp, n_pairs))
    right = np.zeros((n_cp, n_pairs))
    op = np.zeros((n_cp, n_pairs), dtype=bool)
    for p, xs, ta, tb in rows:
        left[:, p] = np.interp(times, ta, xs)
        right[:, p] = np.interp(times, tb, xs)
        op[:, p] = True
    half = m.dosimetric_leaf_gap_mm / 2.0
    a = left + half
    b = right - half
    a = np.minimum(a, b - m.min_leaf_gap_mm)  # start/end of a sweep: keep the min gap
    for k in range(n_cp):
        a[k][~op[k]] = np.nan
        b[k][~op[k]] = np.nan
        a[k], b[k] = park_closed(a[k], b[k], jx[0], m)
    return BeamDelivery(name, "dynamic", np.full(n_cp, bf.gantry_deg), bf.collimator_deg,
                        bf.couch_deg, bf.isocenter_mm, a, b, np.tile(jx, (n_cp, 1)),
                        np.tile(jy, (n_cp, 1)), times, np.full(n_cp, bf.beam_index),
                        n_segments=n_cp)
