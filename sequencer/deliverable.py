"""Deliverable dose: sequenced apertures + MU -> beamlet weights -> dose via the dij.

Each beamlet's weight is the MU-weighted delivered fraction of its rectangle
(``beamlet_size_mm`` around its BEV centre) over all apertures of its beam
(:func:`atp.dose.aperture.delivered_fraction`, the one function every deliverable dose
goes through). An aperture's radiation field per leaf pair is [a - DLG/2, b + DLG/2]
(physical tips widened by the dosimetric leaf gap, the rounded leaf end) clipped to the X
jaws, over the pair's y extent clipped to the Y jaws; the machine's leaf transmission
reaches the leaf-covered part under the jaws, its jaw transmission the part outside, and
its tongue-and-groove strip narrows openings where neighbouring pairs differ
(:attr:`atp.sequencer.machine.Machine.transmission`).

Moving leaves (sliding window, arcs): each interval between control points is split into
``n_sub`` equal-MU sub-apertures at the midpoints of linearly interpolated tips; an arc
sub-aperture uses the dij columns of the nearer control point (``dij_beam``).

deliverable dose = dij @ weights (``DoseInfluence.dose``), the same linear model the
optimiser used for the ideal fluence, so ideal vs delivered differ only by sequencing and
the collimators' transmission. Transmission reaches only the dij's beamlets (the target's
projection plus the beamlet margin): leakage further out is not in the dose.
"""

from __future__ import annotations

import numpy as np
from atp.sequencer.delivery import BeamDelivery, Delivery

from atp.dose.aperture import (
    Transmission,
    beamlet_pair_slots,
    delivered_fraction,
    delivered_weight_sum,
)
from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.xp import host_map


def beamlet_pair_overlap(bev_y_mm, beamlet_size_y_mm: float, leaf_edges_mm, jaw_y_mm=None,
                         n_apertures: int = 1):
    """The leaf pairs each beamlet row overlaps and by how much.

    Returns ``(pairs, oy)``: pairs (n_beamlets, K) leaf-pair index of each overlap slot,
    oy (n_apertures, n_beamlets, K) overlap in mm across the pairs (clipped to the Y jaws
    when ``jaw_y_mm`` (n_apertures, 2) is given; 0 for unused slots). Depends on the
    geometry and jaws only, not on the leaf positions."""
    pairs, lo, hi, valid = beamlet_pair_slots(bev_y_mm, beamlet_size_y_mm, leaf_edges_mm)
    if jaw_y_mm is not None:
        jy = np.asarray(jaw_y_mm, dtype=np.float64).reshape(n_apertures, 2)
        oy = np.clip(np.minimum(hi[None], jy[:, 1, None, None])
                     - np.maximum(lo[None], jy[:, 0, None, None]), 0.0, None)
    else:
        oy = np.broadcast_to(np.clip(hi - lo, 0.0, None)[None], (n_apertures,) + lo.shape)
    return pairs, oy * valid[None]


def aperture_open_fraction(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm,
                           right_mm, jaw_x_mm=None, jaw_y_mm=None,
                           transmission: Transmission | None = None) -> np.ndarray:
    """Delivered fraction (n_apertures, n_beamlets) of beamlet rectangles
    (:func:`atp.dose.aperture.delivered_fraction`; without ``transmission`` the exact
    open-area fraction).

    left_mm/right_mm: (n_apertures, n_pairs) *radiation-field* edges per leaf pair;
    jaw_x_mm/jaw_y_mm: (n_apertures, 2) or None (no jaw clipping).
    """
    return delivered_fraction(bev_x_mm, bev_y_mm, beamlet_size_mm, leaf_edges_mm, left_mm,
                              right_mm, jaw_x_mm, jaw_y_mm, transmission)


def open_fraction_of_pairs(bev_x_mm, beamlet_size_mm, pairs, oy, left_mm, right_mm,
                           jaw_x_mm=None) -> np.ndarray:
    """Open area fraction (n_apertures, n_beamlets) given the leaf-pair overlaps
    ``(pairs, oy)`` of :func:`beamlet_pair_overlap`: the X overlap of each beamlet with
    each pair's opening (``left_mm``/``right_mm`` (n_apertures, n_pairs) radiation-field
    edges, clipped to the X jaws (n_apertures, 2) when given) times the Y overlap."""
    bx = np.asarray(bev_x_mm, dtype=np.float64)
    sx, sy = (float(s) for s in beamlet_size_mm)
    le = left_mm[:, pairs]  # (n_ap, n_b, K)
    ri = right_mm[:, pairs]
    if jaw_x_mm is not None:
        jx = np.asarray(jaw_x_mm, dtype=np.float64).reshape(le.shape[0], 2)
        le = np.maximum(le, jx[:, 0, None, None])
        ri = np.minimum(ri, jx[:, 1, None, None])
    ox = np.clip(np.minimum(ri, (bx + sx / 2)[None, :, None])
                 - np.maximum(le, (bx - sx / 2)[None, :, None]), 0.0, None)
    return (ox * oy).sum(axis=2) / (sx * sy)


def beam_apertures(beam: BeamDelivery, dlg_mm: float, n_sub: int = 4):
    """Apertures a beam delivers: dict of left/right radiation edges (n, n_pairs),
    jaw_x/jaw_y (n, 2), mu (n,) total-course MU and dij_beam (n,)."""
    a, b = beam.leaf_a_mm, beam.leaf_b_mm
    dmu = np.diff(beam.cumulative_mu)
    on = np.flatnonzero(dmu > 0)
    if on.size == 0:
        n_pairs = a.shape[1]
        return {"left": np.zeros((0, n_pairs)), "right": np.zeros((0, n_pairs)),
                "jaw_x": np.zeros((0, 2)), "jaw_y": np.zeros((0, 2)), "mu": np.zeros(0),
                "dij_beam": np.zeros(0, dtype=np.int64)}
    moving = (np.abs(a[on + 1] - a[on]).max(axis=1) > 1e-9) | \
             (np.abs(b[on + 1] - b[on]).max(axis=1) > 1e-9) | \
             (beam.dij_beam[on + 1] != beam.dij_beam[on])
    subs = np.where(moving, n_sub, 1)
    k = np.repeat(on, subs)
    j = np.concatenate([np.arange(s) for s in subs])
    t = (j + 0.5) / np.repeat(subs, subs)  # midpoints of equal-MU sub-intervals
    aa = a[k] + t[:, None] * (a[k + 1] - a[k])
    bb = b[k] + t[:, None] * (b[k + 1] - b[k])
    jx = beam.jaw_x_mm[k] + t[:, None] * (beam.jaw_x_mm[k + 1] - beam.jaw_x_mm[k])
    jy = beam.jaw_y_mm[k] + t[:, None] * (beam.jaw_y_mm[k + 1] - beam.jaw_y_mm[k])
    mu = dmu[k] / np.repeat(subs, subs)
    dij = np.where(t < 0.5, beam.dij_beam[k], beam.dij_beam[k + 1])
    half = dlg_mm / 2.0
    return {"left": aa - half, "right": bb + half, "jaw_x": jx, "jaw_y": jy, "mu": mu,
            "dij_beam": dij}


def delivered_weights(delivery: Delivery, beamlets: BeamletInfo, n_sub: int = 4,
                      chunk: int = 256, transmission: Transmission | None = None,
                      per_beam: list | None = None) -> np.ndarray:
    """Beamlet weights (MU, total course) equivalent to the sequenced delivery, the
    machine's transmission included (``transmission``: another one, e.g.
    ``Transmission()`` for the open-area fraction alone). per_beam: a list that gets
    each delivery beam's own weights appended (float64 over all beamlets; what
    ``delivered_weights`` of that beam alone returns, bit for bit)."""
    m = delivery.machine
    edges = m.leaf_edges_mm
    trans = m.transmission if transmission is None else transmission
    w = np.zeros(beamlets.n_beamlets)
    for beam in delivery.beams:
        wb = w if per_beam is None else np.zeros(beamlets.n_beamlets)
        ap = beam_apertures(beam, m.dosimetric_leaf_gap_mm, n_sub)
        for d in np.unique(ap["dij_beam"]):
            cols = beamlets.columns_of_beam(int(d))
            sel = np.flatnonzero(ap["dij_beam"] == d)
            slots = beamlet_pair_slots(beamlets.bev_y_mm[cols], beamlets.beamlet_size_mm[1],
                                       edges)
            for c in _weight_parts(ap, sel, beamlets, cols, slots, edges, trans, chunk):
                w[cols] += c
                if wb is not w:
                    wb[cols] += c
        if per_beam is not None:
            per_beam.append(wb)
    return w


#: apertures per jaw setting from which :func:`_weight_parts` sums them by exposure
#: integrals (:func:`atp.dose.aperture.delivered_weight_sum`) instead of per aperture
EXPOSURE_MIN_APERTURES = 16


def _weight_parts(ap, sel, beamlets, cols, slots, edges, trans, chunk):
    """The MU-weighted delivered fractions of apertures ``sel`` of :func:`beam_apertures`
    ``ap`` on the beamlets ``cols`` (one dij beam), as parts to add in order: one per
    jaw setting shared by at least :data:`EXPOSURE_MIN_APERTURES` apertures (a static
    beam's sliding window: one), the rest per aperture in chunks (in threads)."""
    jaws = np.concatenate([ap["jaw_x"][sel], ap["jaw_y"][sel]], axis=1)
    settings, inv, counts = np.unique(jaws, axis=0, return_inverse=True,
                                      return_counts=True)
    inv = inv.reshape(-1)
    size = beamlets.beamlet_size_mm
    bx, by = beamlets.bev_x_mm[cols], beamlets.bev_y_mm[cols]
    parts = [delivered_weight_sum(bx, by, size, edges, ap["left"][sel[inv == g]],
                                  ap["right"][sel[inv == g]], ap["mu"][sel[inv == g]],
                                  js[:2], js[2:], trans, slots=slots)
             for g, js in enumerate(settings) if counts[g] >= EXPOSURE_MIN_APERTURES]
    rest = sel[counts[inv] < EXPOSURE_MIN_APERTURES]

    def part(i):
        frac = delivered_fraction(bx, by, size, edges, ap["left"][i], ap["right"][i],
                                  ap["jaw_x"][i], ap["jaw_y"][i], trans, slots=slots)
        return ap["mu"][i] @ frac

    # chunks in threads, summed in their order (the serial sum, bit for bit)
    return parts + list(host_map(part, [rest[s:s + chunk]
                                        for s in range(0, rest.size, chunk)]))


def deliverable_dose(delivery: Delivery, dij: DoseInfluence, n_sub: int = 4,
                     transmission: Transmission | None = None,
                     per_beam: list | None = None) -> np.ndarray:
    """Dose (Gy, total course, 3-D on ``dij.dose_grid``) of the sequenced delivery
    (the machine's transmission included unless ``transmission`` says otherwise);
    per_beam: as :func:`delivered_weights`'."""
    return dij.dose(delivered_weights(delivery, dij.beamlets, n_sub,
                                      transmission=transmission, per_beam=per_beam))
