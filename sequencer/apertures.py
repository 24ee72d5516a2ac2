"""Shared aperture helpers: radiation-field openings -> physical leaf tips, jaws, parking.

An *effective* opening [left, right] (mm, BEV x) is the field the radiation sees; the
physical tips are DLG/2 inside it. Pairs with no opening are closed at the minimum gap
and parked behind the X1 jaw where the bank span allows.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from atp.sequencer.machine import Machine


def physical_tips(left_eff, right_eff, open_mask, machine: Machine):
    """Effective openings (..., n_pairs) -> physical tips (a, b) honouring the min gap.

    Open pairs: a = left + DLG/2, b = right - DLG/2, widened symmetrically to the
    minimum gap when narrower. Closed pairs are returned as NaN (parked later).
    """
    half = machine.dosimetric_leaf_gap_mm / 2.0
    a = np.asarray(left_eff, dtype=np.float64) + half
    b = np.asarray(right_eff, dtype=np.float64) - half
    g = machine.min_leaf_gap_mm
    narrow = (b - a) < g
    mid = 0.5 * (a + b)
    a = np.where(narrow, mid - g / 2, a)
    b = np.where(narrow, mid + g / 2, b)
    a = np.where(open_mask, a, np.nan)
    b = np.where(open_mask, b, np.nan)
    return a, b


def jaws_around(left_eff, right_eff, open_mask, machine: Machine, margin_mm: float = 0.0):
    """Jaw (X1, X2), (Y1, Y2) bounding every open effective opening (one setting).

    ``left_eff``/``right_eff``/``open_mask``: (..., n_pairs). Clipped to the jaw ranges;
    with nothing open a minimum field at the centre is returned.
    """
    m = machine
    op = np.asarray(open_mask, dtype=bool)
    if not op.any():
        h = max(m.min_field_mm, 1.0) / 2.0
        return np.array([-h, h]), np.array([-h, h])
    x1 = float(np.min(np.where(op, left_eff, np.inf))) - margin_mm
    x2 = float(np.max(np.where(op, right_eff, -np.inf))) + margin_mm
    rows = np.flatnonzero(op.reshape(-1, op.shape[-1]).any(axis=0))
    y1 = float(m.leaf_edges_mm[rows[0]]) - margin_mm
    y2 = float(m.leaf_edges_mm[rows[-1] + 1]) + margin_mm
    x1 = float(np.clip(x1, *m.jaw_x1_range_mm))
    x2 = float(np.clip(x2, *m.jaw_x2_range_mm))
    y1 = float(np.clip(y1, *m.jaw_y1_range_mm))
    y2 = float(np.clip(y2, *m.jaw_y2_range_mm))
    if x2 - x1 < m.min_field_mm:
        c = 0.5 * (x1 + x2)
        x1, x2 = c - m.min_field_mm / 2, c + m.min_field_mm / 2
    if y2 - y1 < m.min_field_mm:
        c = 0.5 * (y1 + y2)
        y1, y2 = c - m.min_field_mm / 2, c + m.min_field_mm / 2
    return np.array([x1, x2]), np.array([y1, y2])


def park_closed(a, b, jaw_x1_mm, machine: Machine):
    """Fill closed (NaN) pairs of one aperture (n_pairs,) with tips closed at the min gap
    behind the X1 jaw, moved in only as far as the bank-span limit requires."""
    m = machine
    a = np.array(a, dtype=np.float64)
    b = np.array(b, dtype=np.float64)
    closed = np.isnan(a)
    if not closed.any():
        return a, b
    b_park = jaw_x1_mm - m.dosimetric_leaf_gap_mm / 2.0 - 1.0
    if (~closed).any():
        # keep both banks within the span limit of the open leaves
        b_park = max(b_park, float(np.max(b[~closed])) - (m.max_leaf_span_mm - 1.0),
                     float(np.max(a[~closed])) + m.min_leaf_gap_mm - (m.max_leaf_span_mm - 1.0))
    lo, hi = m.leaf_position_range_mm
    b_park = float(np.clip(b_park, lo + m.min_leaf_gap_mm, hi))
    b[closed] = b_park
    a[closed] = b_park - m.min_leaf_gap_mm
    return a, b


def limit_bank_span(a, b, open_mask, machine: Machine):
    """Narrow apertures whose open tips of one bank lie further apart than the bank span.

    a, b: physical tips (..., n_pairs) mm; open_mask: (..., n_pairs). One carriage position
    cannot reach tips more than ``max_leaf_span_mm`` apart (less the 1 mm parking margin),
    so bank A tips are moved right up to ``max(a) - span`` and bank B tips left down to
    ``min(b) + span`` (the aperture loses its far ends); pairs left without the minimum
    gap are closed. Returns (a, b, open_mask); the deliverable dose is computed from these
    apertures, so nothing is hidden. Apertures within the span are returned unchanged.
    """
    span = machine.max_leaf_span_mm - 1.0
    op = np.asarray(open_mask, dtype=bool)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a_lim = np.max(np.where(op, a, -np.inf), axis=-1, keepdims=True) - span
    b_lim = np.min(np.where(op, b, np.inf), axis=-1, keepdims=True) + span
    a = np.where(op, np.maximum(a, a_lim), a)
    b = np.where(op, np.minimum(b, b_lim), b)
    return a, b, op & (b - a >= machine.min_leaf_gap_mm - 1e-9)


def _within(lo: float, hi: float, outer, min_field: float) -> np.ndarray:
    """[lo, hi] cut to the ``outer`` jaw pair, at least ``min_field`` wide (or as wide as
    ``outer``), shifted back inside ``outer`` when widening pushed it out."""
    o0, o1 = float(outer[0]), float(outer[1])
    lo, hi = max(lo, o0), min(hi, o1)
    w = min(max(hi - lo, min_field), o1 - o0)
    c = float(np.clip(0.5 * (lo + hi), o0 + w / 2, o1 - w / 2))
    return np.array([c - w / 2, c + w / 2]) if hi - lo < w else np.array([lo, hi])


def track_jaws(delivery):
    """The delivery with jaw tracking: at every control point the X and Y jaws close to
    the radiation field of the pairs open at that control point or its neighbours (open:
    the pair's radiation field, tips widened by DLG/2 even at the minimum gap, reaches
    inside the jaws it had), never wider than the jaws it had.

    Jaws move linearly between control points like the leaves, so a jaw bounding the
    openings at both ends of an interval bounds them all along it. Outside the jaws the
    dose is the jaw transmission (x the leaf transmission where leaves also cover)
    instead of the leaf transmission: tracking lowers the leakage of modulated fields.
    Jaw speed is assumed to keep up with the leaves (a C-arm's jaws travel >= 20 mm/s).
    """
    m = delivery.machine
    half = m.dosimetric_leaf_gap_mm / 2.0
    beams = []
    for beam in delivery.beams:
        a, b = beam.leaf_a_mm, beam.leaf_b_mm
        # every pair whose radiation field (tips widened by DLG/2, even at the minimum
        # gap) reaches inside the jaws it had; parked pairs lie behind the X1 jaw
        ye = m.leaf_edges_mm
        op = ((b + half > beam.jaw_x_mm[:, :1] + 1e-9) & (a - half < beam.jaw_x_mm[:, 1:] - 1e-9)
              & (ye[None, 1:] > beam.jaw_y_mm[:, :1]) & (ye[None, :-1] < beam.jaw_y_mm[:, 1:]))
        near = op.copy()
        near[1:] |= op[:-1]
        near[:-1] |= op[1:]
        jx = np.array(beam.jaw_x_mm)
        jy = np.array(beam.jaw_y_mm)
        for k in range(beam.n_control_points):
            sel = np.flatnonzero(near[k])
            if sel.size == 0:
                continue
            rows = slice(max(k - 1, 0), k + 2)
            x1 = float(np.min(a[rows][:, sel])) - half
            x2 = float(np.max(b[rows][:, sel])) + half
            y1 = float(m.leaf_edges_mm[sel[0]])
            y2 = float(m.leaf_edges_mm[sel[-1] + 1])
            jx[k] = np.clip(_within(x1, x2, jx[k], m.min_field_mm),
                            [m.jaw_x1_range_mm[0], m.jaw_x2_range_mm[0]],
                            [m.jaw_x1_range_mm[1], m.jaw_x2_range_mm[1]])
            jy[k] = np.clip(_within(y1, y2, jy[k], m.min_field_mm),
                            [m.jaw_y1_range_mm[0], m.jaw_y2_range_mm[0]],
                            [m.jaw_y1_range_mm[1], m.jaw_y2_range_mm[1]])
        beams.append(replace(beam, jaw_x_mm=jx, jaw_y_mm=jy))
    meta = dict(delivery.meta)
    meta["jaw_tracking"] = True
    return replace(delivery, beams=tuple(beams), meta=meta)
