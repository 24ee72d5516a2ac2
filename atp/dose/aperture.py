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
        half = min(t.tongue_groove_mm / 2.0, float(np.min(np.diff(edges))) / 2.0)
        for step, s_lo, s_hi in ((-1, edges[pairs], edges[pairs] + half),
                                 (1, edges[pairs + 1] - half, edges[pairs + 1])):
            q = pairs + step
            ok = valid & (q >= 0) & (q < n_pairs)
            qc = np.clip(q, 0, n_pairs - 1)
            s_lo_b = np.maximum(s_lo, lo)
            s_hi_b = np.minimum(s_hi, hi)
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
