"""Aperture dose: MLC openings + MU -> beamlet weights -> dose (used by the sequencer).

This is the engine's aperture dose at beamlet resolution with partial-beamlet coverage:
each beamlet of the aperture's beam gets ``MU x (delivered fraction of the beamlet)``,
the delivered fraction being exact for the leaf and jaw positions (1-D overlaps along x
for each leaf pair, times the leaf pair's overlap with the beamlet along y). The dose is
then ``dij @ weights``.

Delivery physics (:class:`Transmission`, :func:`delivered_fraction`, the one function
every deliverable dose in atp goes through): under the jaws, the part of a beamlet the
leaves cover transmits ``leaf`` (the average MLC transmission, interleaf leakage
included, e.g. 1.5 % for a Varian Millennium 120 at 6 MV); outside the jaws ``jaw``
(through the jaws alone where the leaves are open there, ``jaw x leaf`` where they also
cover); the rounded leaf end is the dosimetric leaf gap (the caller widens every opening
by DLG/2 per side); tongue and groove: in a strip of ``tongue_groove_mm`` centred on the
boundary of two neighbouring leaf pairs (half on each side) only the part of the opening
both pairs share is open (Deng et al., Med Phys 28 (2001) 2334; the strip is blocked by
the tongue or the groove of whichever leaf still covers it and transmits ``leaf``).
Limits, in plain words: transmission is one number per device (no depth, field-size or
energy dependence, no leaf-end transmission profile beyond the DLG); the dose through
the closed parts reaches only where the dij has beamlets (the target's projection plus
the beamlet margin), so transmission outside that region is not computed; sub-beamlet
detail (the T&G strip, a leaf tip) is averaged over the beamlet area.

All positions are mm at the isocentre plane in the beam's BEV frame: x (= ``bev_x_mm``)
along leaf travel, y (= ``bev_y_mm``) across leaf pairs. Leaf pair k spans
``leaf_edges_y_mm[k] .. leaf_edges_y_mm[k+1]`` and is open from ``left_mm[k]`` to
``right_mm[k]`` (``left <= right``; equal means closed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.errors import InputError


@dataclass(frozen=True)
class Transmission:
    """Radiation through closed collimators (fractions of the open-field dose per MU).

    leaf: MLC leaf transmission (interleaf leakage averaged in), jaw: jaw transmission,
    tongue_groove_mm: width of the tongue-and-groove strip at each leaf-pair boundary
    (mm at the isocentre plane, half on each side). All zero = no transmission."""

    leaf: float = 0.0
    jaw: float = 0.0
    tongue_groove_mm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("leaf", "jaw"):
            v = getattr(self, name)
            if not (np.isfinite(v) and 0.0 <= v < 1.0):
                raise InputError(f"{name} transmission must be in [0, 1), got {v!r}",
                                 field=f"transmission.{name}")
        if not (np.isfinite(self.tongue_groove_mm) and self.tongue_groove_mm >= 0):
            raise InputError(f"tongue-and-groove width must be >= 0 mm, got "
                             f"{self.tongue_groove_mm!r}", field="tongue_groove_mm")

    @property
    def is_zero(self) -> bool:
        return self.leaf == 0.0 and self.jaw == 0.0 and self.tongue_groove_mm == 0.0


NO_TRANSMISSION = Transmission()


def _overlap(lo_a, hi_a, lo_b, hi_b):
    return np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)


def beamlet_pair_slots(bev_y_mm, beamlet_size_y_mm: float, leaf_edges_mm):
    """The leaf pairs each beamlet row overlaps: ``(pairs, lo, hi, valid)``, each
    (n_beamlets, K): pair index of each overlap slot, the y range of the overlap (mm) and
    whether the slot is used. Depends on the geometry only."""
    by = np.asarray(bev_y_mm, dtype=np.float64).reshape(-1)
    sy = float(beamlet_size_y_mm)
    edges = np.asarray(leaf_edges_mm, dtype=np.float64)
    y_lo, y_hi = by - sy / 2, by + sy / 2
    first = np.clip(np.searchsorted(edges, y_lo, side="right") - 1, 0, len(edges) - 2)
    last = np.clip(np.searchsorted(edges, y_hi, side="left") - 1, 0, len(edges) - 2)
    k_max = int((last - first).max()) + 1 if by.size else 1
    raw = first[:, None] + np.arange(k_max)[None, :]
    pairs = np.minimum(raw, len(edges) - 2)
    valid = raw <= last[:, None]
    lo = np.maximum(edges[pairs], y_lo[:, None])
    hi = np.minimum(edges[pairs + 1], y_hi[:, None])
    return pairs, lo, hi, valid


def _tg_strips(edges, pairs, lo, hi, valid, tongue_groove_mm: float, n_pairs: int):
    """The tongue-and-groove strips of each beamlet slot (``pairs``, ``lo``, ``hi``,
    ``valid`` of :func:`beamlet_pair_slots`): per side of the slot's pair, ``(step, ok,
    strip_lo, strip_hi)``; step -1: the strip at the pair's lower boundary (shared with
    pair - 1), +1: at its upper one; the strip's y range within the slot; ok: the slot is
    used and the neighbour exists. Half of ``tongue_groove_mm`` on each side of a
    boundary, at most half the narrowest leaf."""
    half = min(tongue_groove_mm / 2.0, float(np.min(np.diff(edges))) / 2.0)
    for step, s_lo, s_hi in ((-1, edges[pairs], edges[pairs] + half),
                             (1, edges[pairs + 1] - half, edges[pairs + 1])):
        q = pairs + step
        yield (step, valid & (q >= 0) & (q < n_pairs), np.maximum(s_lo, lo),
               np.minimum(s_hi, hi))


def delivered_fraction(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm,
                       right_mm, jaw_x_mm=None, jaw_y_mm=None,
                       transmission: Transmission | None = None,
                       slots=None) -> np.ndarray:
    """Delivered fraction (n_apertures, n_beamlets) of each beamlet rectangle per MU.

    left_mm/right_mm: (n_apertures, n_pairs) *radiation-field* edges per leaf pair (the
    physical tips widened by DLG/2); jaw_x_mm/jaw_y_mm: (n_apertures, 2) or None (no
    jaws: the leaves alone collimate). With ``transmission`` None or zero this is the
    exact open-area fraction of the opening inside the jaws; otherwise (see the module
    docstring) open inside the jaws (less the tongue-and-groove strips) + ``leaf`` x
    leaf-covered inside the jaws + ``jaw`` x open outside + ``jaw x leaf`` x covered
    outside. ``slots``: :func:`beamlet_pair_slots` of these beamlets, when kept.
    """
    t = transmission or NO_TRANSMISSION
    bx = np.asarray(bev_x_mm, dtype=np.float64).reshape(-1)
    sx, sy = (float(s) for s in beamlet_size_mm)
    edges = np.asarray(leaf_edges_mm, dtype=np.float64)
    left = np.atleast_2d(np.asarray(left_mm, dtype=np.float64))
    right = np.atleast_2d(np.asarray(right_mm, dtype=np.float64))
    n_ap, n_pairs = left.shape
    pairs, lo, hi, valid = (slots if slots is not None
                            else beamlet_pair_slots(bev_y_mm, sy, edges))
    x_lo = (bx - sx / 2)[None, :, None]
    x_hi = (bx + sx / 2)[None, :, None]
    le = left[:, pairs]  # (n_ap, n_b, K)
    ri = right[:, pairs]
    oy = np.clip(hi - lo, 0.0, None)[None] * valid[None]  # (1, n_b, K)
    if jaw_y_mm is not None:
        jy = np.asarray(jaw_y_mm, dtype=np.float64).reshape(n_ap, 2)
        jy0, jy1 = jy[:, 0, None, None], jy[:, 1, None, None]
        oy_j = _overlap(lo[None], hi[None], jy0, jy1) * valid[None]
    else:
        jy0 = jy1 = None
        oy_j = oy
    if jaw_x_mm is not None:
        jx = np.asarray(jaw_x_mm, dtype=np.float64).reshape(n_ap, 2)
        jx0, jx1 = jx[:, 0, None, None], jx[:, 1, None, None]
        le_j, ri_j = np.maximum(le, jx0), np.minimum(ri, jx1)
    else:
        jx0 = jx1 = None
        le_j, ri_j = le, ri
    ox_j = _overlap(le_j, ri_j, x_lo, x_hi)
    open_in = (ox_j * oy_j).sum(axis=2)  # open inside the jaws (mm^2)
    area = sx * sy
    if t.is_zero:
        return open_in / area
    by = np.asarray(bev_y_mm, dtype=np.float64).reshape(-1)
    tg = 0.0
    if t.tongue_groove_mm > 0:
        for step, ok, s_lo_b, s_hi_b in _tg_strips(edges, pairs, lo, hi, valid,
                                                   t.tongue_groove_mm, n_pairs):
            qc = np.clip(pairs + step, 0, n_pairs - 1)
            if jy0 is not None:
                oy_s = _overlap(s_lo_b[None], s_hi_b[None], jy0, jy1)
            else:
                oy_s = np.clip(s_hi_b - s_lo_b, 0.0, None)[None]
            oy_s = oy_s * ok[None]
            le_q = np.maximum(le_j, left[:, qc])
            ri_q = np.minimum(ri_j, right[:, qc])
            shared = _overlap(le_q, ri_q, x_lo, x_hi)
            tg = tg + ((ox_j - shared) * oy_s).sum(axis=2)
    # jaw rectangle inside the beamlet, and the leaf opening regardless of the jaws
    if jaw_x_mm is not None:
        jx_in = _overlap(jx[:, 0, None], jx[:, 1, None], (bx - sx / 2)[None], (bx + sx / 2)[None])
    else:
        jx_in = np.full((n_ap, bx.size), sx)
    if jaw_y_mm is not None:
        jy_in = _overlap(jy[:, 0, None], jy[:, 1, None], (by - sy / 2)[None], (by + sy / 2)[None])
    else:
        jy_in = np.full((n_ap, bx.size), sy)
    jaw_area = jx_in * jy_in
    if jaw_x_mm is None and jaw_y_mm is None:
        open_all = open_in
    else:
        open_all = (_overlap(le, ri, x_lo, x_hi) * oy).sum(axis=2)
    open_out = np.clip(open_all - open_in, 0.0, None)
    covered_in = np.clip(jaw_area - open_in, 0.0, None)
    covered_out = np.clip(area - jaw_area - open_out, 0.0, None)
    frac = (open_in - tg + t.leaf * (covered_in + tg) + t.jaw * open_out
            + t.jaw * t.leaf * covered_out)
    return frac / area


def _ramp_sums(ends, mu, pair, xs) -> list:
    """``sum_i mu_i * max(x - ends[p, i], 0)`` for each query (``pair`` p, x) and each
    ``x`` of ``xs`` (arrays shaped as ``pair``): ``ends`` (n_pairs, n_apertures), ``mu``
    (n_apertures,). Each pair's ends sorted once, then cumulative sums and one search
    for all queries (each pair's ends shifted to a band of its own)."""
    n_pairs, n_ap = ends.shape
    order = np.argsort(ends, axis=1, kind="stable")
    srt = np.take_along_axis(ends, order, axis=1)
    m = mu[order]
    cm = np.zeros((n_pairs, n_ap + 1))
    cs = np.zeros((n_pairs, n_ap + 1))
    np.cumsum(m, axis=1, out=cm[:, 1:])
    np.cumsum(m * srt, axis=1, out=cs[:, 1:])
    cm, cs = cm.reshape(-1), cs.reshape(-1)
    band = 2.0 * (float(np.max(np.abs(srt), initial=0.0))
                  + max(float(np.max(np.abs(x), initial=0.0)) for x in xs)) + 1.0
    offset = np.arange(n_pairs) * band
    keys = (srt + offset[:, None]).reshape(-1)
    out = []
    for x in xs:
        k = np.searchsorted(keys, x + offset[pair], side="left") - pair * n_ap
        at = pair * (n_ap + 1) + k  # the ends of pair p strictly below x: k of them
        out.append(x * cm[at] - cs[at])
    return out


def _exposure(lo, hi, mu, pair, x_lo, x_hi) -> np.ndarray:
    """``sum_i mu_i * |[lo[p, i], hi[p, i]] overlap [x_lo, x_hi]|`` per query (``pair``
    p): the integral over [x_lo, x_hi] of the MU-weighted opening profile of the
    intervals (an empty interval, hi < lo, adds nothing); ``lo`` / ``hi`` (n_pairs,
    n_apertures)."""
    a_hi, a_lo = _ramp_sums(lo, mu, pair, (x_hi, x_lo))
    b_hi, b_lo = _ramp_sums(np.maximum(hi, lo), mu, pair, (x_hi, x_lo))
    return a_hi - b_hi - a_lo + b_lo


def delivered_weight_sum(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm,
                         right_mm, mu, jaw_x_mm, jaw_y_mm,
                         transmission: Transmission | None = None,
                         slots=None) -> np.ndarray:
    """``mu @ delivered_fraction(...)`` (n_beamlets,) for apertures that share one jaw
    setting (``jaw_x_mm`` / ``jaw_y_mm``: (2,)), computed without the (n_apertures,
    n_beamlets) matrix: the delivered fraction is linear in the open lengths along x of
    each leaf pair (inside the jaws, regardless of them, and the tongue-and-groove
    strips' shared openings), and the MU-weighted sum of an interval's overlap with a
    beamlet is the integral of the intervals' MU profile over the beamlet
    (:func:`_exposure`: sorted ends and cumulative sums). The same value as
    :func:`delivered_fraction` to float64 rounding (~1e-12 relative; the differences of
    ramp sums leave a residue of either sign where the exact weight is 0, clipped at 0),
    in
    O((n_apertures + n_beamlets) log n_apertures) per leaf pair instead of
    O(n_apertures x n_beamlets): a sliding-window beam's ~1,600 sub-apertures on ~1,500
    jaw-field beamlets 0.13 s -> a few ms."""
    t = transmission or NO_TRANSMISSION
    bx = np.asarray(bev_x_mm, dtype=np.float64).reshape(-1)
    by = np.asarray(bev_y_mm, dtype=np.float64).reshape(-1)
    sx, sy = (float(v) for v in beamlet_size_mm)
    edges = np.asarray(leaf_edges_mm, dtype=np.float64)
    left = np.atleast_2d(np.asarray(left_mm, dtype=np.float64))
    right = np.atleast_2d(np.asarray(right_mm, dtype=np.float64))
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    n_pairs = left.shape[1]
    jx0, jx1 = (float(v) for v in np.asarray(jaw_x_mm, dtype=np.float64).reshape(2))
    jy0, jy1 = (float(v) for v in np.asarray(jaw_y_mm, dtype=np.float64).reshape(2))
    pairs, lo, hi, valid = (slots if slots is not None
                            else beamlet_pair_slots(by, sy, edges))
    xl = np.broadcast_to((bx - sx / 2)[:, None], pairs.shape)
    xh = np.broadcast_to((bx + sx / 2)[:, None], pairs.shape)
    # the leaf pairs the beamlets see (and their neighbours: tongue and groove), each
    # pair's positions over the apertures as a row
    used = np.unique(np.concatenate([pairs.reshape(-1), np.clip(
        pairs.reshape(-1) + 1, 0, n_pairs - 1), np.clip(pairs.reshape(-1) - 1, 0, n_pairs - 1)]))
    row = np.searchsorted(used, pairs)  # each slot's row
    left, right = left[:, used].T, right[:, used].T
    le_j, ri_j = np.maximum(left, jx0), np.minimum(right, jx1)  # inside the X jaws
    oy = np.clip(hi - lo, 0.0, None) * valid
    oy_j = _overlap(lo, hi, jy0, jy1) * valid
    e_in = _exposure(le_j, ri_j, mu, row, xl, xh)
    open_in = (e_in * oy_j).sum(axis=1)
    area = sx * sy
    total_mu = float(mu.sum())
    if t.is_zero:  # the exposures' rounding residue (~1e-11 of the MU) kept >= 0
        return np.maximum(open_in, 0.0) / area
    tg = np.zeros_like(open_in)
    if t.tongue_groove_mm > 0:
        for step, ok, s_lo_b, s_hi_b in _tg_strips(edges, pairs, lo, hi, valid,
                                                   t.tongue_groove_mm, n_pairs):
            # each used pair's neighbour (itself at the bank's edge), as a row; rows
            # that are only neighbours are never queried (any valid row will do)
            nb = np.minimum(np.searchsorted(used, np.clip(used + step, 0, n_pairs - 1)),
                            used.size - 1)
            oy_s = _overlap(s_lo_b, s_hi_b, jy0, jy1) * ok
            shared = _exposure(np.maximum(le_j, left[nb]), np.minimum(ri_j, right[nb]),
                               mu, row, xl, xh)
            tg = tg + ((e_in - shared) * oy_s).sum(axis=1)
    jaw_area = total_mu * (_overlap(jx0, jx1, bx - sx / 2, bx + sx / 2)
                           * _overlap(jy0, jy1, by - sy / 2, by + sy / 2))
    open_all = (_exposure(left, right, mu, row, xl, xh) * oy).sum(axis=1)
    # delivered_fraction's terms, each linear in the apertures' MU:
    # open_in - tg + leaf (covered_in + tg) + jaw open_out + jaw leaf covered_out
    out = (open_in - tg + t.leaf * (jaw_area - open_in + tg) + t.jaw * (open_all - open_in)
           + t.jaw * t.leaf * (total_mu * area - jaw_area - open_all + open_in))
    return np.maximum(out, 0.0) / area  # a weight past every opening: >= 0, not -1e-11


def open_fraction(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm, right_mm,
                  jaw_x_mm=None, jaw_y_mm=None) -> np.ndarray:
    """Exact open-area fraction (no transmission): :func:`delivered_fraction` with none."""
    return delivered_fraction(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm,
                              right_mm, jaw_x_mm, jaw_y_mm, None)


@dataclass(frozen=True, eq=False)
class Aperture:
    """One MLC aperture (a static segment or one control point) and its MU.

    jaw_x_mm / jaw_y_mm: (X1, X2) / (Y1, Y2) jaw positions (None: no jaw collimation);
    transmission: leaf / jaw transmission and tongue-and-groove (None: none)."""

    beam_index: int
    leaf_edges_y_mm: np.ndarray  # (n_pairs + 1,)
    left_mm: np.ndarray  # (n_pairs,)
    right_mm: np.ndarray  # (n_pairs,)
    mu: float
    jaw_x_mm: np.ndarray | None = None
    jaw_y_mm: np.ndarray | None = None
    transmission: Transmission | None = None


def _jaw_pair(v, field: str):
    if v is None:
        return None
    j = np.asarray(v, dtype=np.float64).reshape(-1)
    if j.shape != (2,) or not np.all(np.isfinite(j)) or j[0] > j[1]:
        raise InputError(f"jaws must be two finite mm values, first <= second, got {v!r}",
                         field=field)
    return j


def aperture_beamlet_weights(beamlets: BeamletInfo, beam_index: int, leaf_edges_y_mm,
                             left_mm, right_mm, mu: float, *, jaw_x_mm=None, jaw_y_mm=None,
                             transmission: Transmission | None = None) -> np.ndarray:
    """(n_beamlets,) weights in MU: MU x delivered fraction (:func:`delivered_fraction`)
    of each beamlet of ``beam_index`` (0 for beamlets of other beams)."""
    edges = np.asarray(leaf_edges_y_mm, dtype=np.float64).reshape(-1)
    left = np.asarray(left_mm, dtype=np.float64).reshape(-1)
    right = np.asarray(right_mm, dtype=np.float64).reshape(-1)
    n_pairs = edges.size - 1
    if n_pairs < 1 or np.any(np.diff(edges) <= 0) or not np.all(np.isfinite(edges)):
        raise InputError("leaf edges must be >= 2 strictly increasing finite mm values",
                         field="leaf_edges_y_mm")
    if left.shape != (n_pairs,) or right.shape != (n_pairs,):
        raise InputError(f"need {n_pairs} left and right leaf positions, got "
                         f"{left.size} and {right.size}", field="leaf_positions")
    if not (np.all(np.isfinite(left)) and np.all(np.isfinite(right))):
        raise InputError("leaf positions must be finite", field="leaf_positions")
    if np.any(left > right):
        raise InputError("left leaf beyond right leaf (left_mm > right_mm)",
                         field="leaf_positions")
    if not (np.isfinite(mu) and mu >= 0):
        raise InputError(f"MU must be >= 0, got {mu!r}", field="mu")
    if not (0 <= int(beam_index) < beamlets.n_beams):
        raise InputError(f"beam index {beam_index} out of range 0..{beamlets.n_beams - 1}",
                         field="beam_index")
    jx = _jaw_pair(jaw_x_mm, "jaw_x_mm")
    jy = _jaw_pair(jaw_y_mm, "jaw_y_mm")
    w = np.zeros(beamlets.n_beamlets, dtype=np.float64)
    cols = beamlets.columns_of_beam(int(beam_index))
    if cols.size == 0:
        return w
    frac = delivered_fraction(beamlets.bev_x_mm[cols], beamlets.bev_y_mm[cols],
                              beamlets.beamlet_size_mm, edges, left[None], right[None],
                              None if jx is None else jx[None],
                              None if jy is None else jy[None], transmission)
    w[cols] = float(mu) * frac[0]
    return w


def apertures_to_weights(beamlets: BeamletInfo, apertures) -> np.ndarray:
    """Summed beamlet weights (MU) of several apertures (Aperture or dicts)."""
    total = np.zeros(beamlets.n_beamlets, dtype=np.float64)
    for a in apertures:
        if isinstance(a, dict):
            a = Aperture(**a)
        total += aperture_beamlet_weights(beamlets, a.beam_index, a.leaf_edges_y_mm,
                                          a.left_mm, a.right_mm, a.mu, jaw_x_mm=a.jaw_x_mm,
                                          jaw_y_mm=a.jaw_y_mm, transmission=a.transmission)
    return total


def aperture_dose(dij: DoseInfluence, apertures) -> np.ndarray:
    """Dose (Gy, 3-D on ``dij.dose_grid``) of a list of apertures with their MU."""
    return dij.dose(apertures_to_weights(dij.beamlets, apertures))
