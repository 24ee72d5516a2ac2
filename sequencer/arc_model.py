"""The arc model of the leaf-and-MU optimisers: one VMAT arc's beamlet weights (MU) as a
function of its control points' leaf tips and MU, and the vector-Jacobian product of that
map in closed form (NumPy).

w(a, b, v): beamlet weights (MU) of the delivery, exactly as
:func:`atp.sequencer.deliverable.delivered_weights` computes them (each interval between
control points split into ``n_sub`` equal-MU sub-apertures at linearly interpolated tips,
the delivered fraction of each beamlet rectangle with the machine's transmission, jaws
fixed). That map is piecewise linear in the tips. The weights and the MU derivative are
exact, transmission included; the tip derivative is that of the opening inside the jaws
times (1 - leaf transmission): it leaves out the tongue-and-groove strips and tips moving
outside the jaws (a fraction of a percent of the dose).

J and dJ/dw come from the caller (``weight_value_grad``);
:func:`atp.sequencer.far_tail.dose_objective` builds it from a dose objective on the
dose the product reports (sparse matrix plus the far-scatter tail). Used by
:mod:`atp.sequencer.aperture_refine` (box-constrained refinement) and
:mod:`atp.sequencer.dmpo` (direct machine-parameter optimisation).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from atp.sequencer.deliverable import beamlet_pair_overlap
from atp.sequencer.delivery import BeamDelivery
from atp.sequencer.machine import Machine
from atp.sequencer.reweight import _mu_map
from atp.sequencer.vmat import control_point_cover_deg

from atp.dose.aperture import beamlet_pair_slots, delivered_fraction
from atp.dose.influence import BeamletInfo


class ArcModel:
    """One arc beam: free tips (n_cp, n_pairs) a, b and free MU v (n_cp,), the fixed
    geometry of its sub-apertures, and w / dJ-by-variables in closed form."""

    def __init__(self, beam: BeamDelivery, beamlets: BeamletInfo, machine: Machine,
                 fractions: int, n_sub: int) -> None:
        self.beam = beam
        n_all, n_pairs = beam.leaf_a_mm.shape
        self.n_cp, self.n_pairs, self.n_sub = n_all - 2, n_pairs, int(n_sub)
        self.M, v0 = _mu_map(beam)
        self.a0 = beam.leaf_a_mm[1:-1].copy()
        self.b0 = beam.leaf_b_mm[1:-1].copy()
        self.v0 = v0
        cover = control_point_cover_deg(beam.gantry_deg[1:-1])
        self.mu_lo = machine.min_mu_per_deg * cover * fractions
        self.mu_hi = machine.max_mu_per_deg * cover * fractions
        half = machine.dosimetric_leaf_gap_mm / 2.0
        self.half = half
        self.transmission = machine.transmission
        self.leaf_edges_mm = machine.leaf_edges_mm
        # sub-apertures: every interval k (n_all - 1 of them) x n_sub
        n_int = n_all - 1
        t = (np.arange(self.n_sub) + 0.5) / self.n_sub
        self.k = np.repeat(np.arange(n_int), self.n_sub)
        self.t = np.tile(t, n_int)
        dij = np.where(self.t < 0.5, beam.dij_beam[self.k], beam.dij_beam[self.k + 1])
        jx = beam.jaw_x_mm[self.k] + self.t[:, None] * (beam.jaw_x_mm[self.k + 1]
                                                      - beam.jaw_x_mm[self.k])
        jy = beam.jaw_y_mm[self.k] + self.t[:, None] * (beam.jaw_y_mm[self.k + 1]
                                                      - beam.jaw_y_mm[self.k])
        self.beamlet_size_mm = tuple(float(s) for s in beamlets.beamlet_size_mm)
        sx, sy = self.beamlet_size_mm
        self.area = sx * sy
        self.groups = []
        for d in np.unique(dij):
            cols = beamlets.columns_of_beam(int(d))
            sel = np.flatnonzero(dij == d)
            pairs, oy = beamlet_pair_overlap(beamlets.bev_y_mm[cols], sy,
                                             machine.leaf_edges_mm, jy[sel], sel.size)
            bx = beamlets.bev_x_mm[cols]
            # flat (sub-aperture, pair) slot of every overlap, for the gradient's scatter
            slot = (np.arange(sel.size)[:, None, None] * n_pairs + pairs[None]).ravel()
            slots = beamlet_pair_slots(beamlets.bev_y_mm[cols], sy, machine.leaf_edges_mm)
            self.groups.append((cols, sel, pairs, oy, slot, bx, jx[sel],
                                (bx - sx / 2)[None, :, None], (bx + sx / 2)[None, :, None],
                                jx[sel, 0, None, None], jx[sel, 1, None, None],
                                beamlets.bev_y_mm[cols], jy[sel], slots))

    def _edges(self, a, b):
        """Radiation-field edges (n_subs, n_pairs) of the sub-apertures."""
        a_all = np.concatenate([a[:1], a, a[-1:]])
        b_all = np.concatenate([b[:1], b, b[-1:]])
        t = self.t[:, None]
        left = a_all[self.k] + t * (a_all[self.k + 1] - a_all[self.k]) - self.half
        right = b_all[self.k] + t * (b_all[self.k + 1] - b_all[self.k]) + self.half
        return left, right

    def _sub_mu(self, v):
        return np.repeat(self.M @ v, self.n_sub) / self.n_sub

    def weights(self, a, b, v, out: np.ndarray) -> None:
        """Add this arc's beamlet weights (MU) to ``out``."""
        left, right = self._edges(a, b)
        mu = self._sub_mu(v)
        for cols, sel, _, _, _, bx, jx, _, _, _, _, by, jy, slots in self.groups:
            out[cols] += mu[sel] @ delivered_fraction(
                bx, by, self.beamlet_size_mm, self.leaf_edges_mm, left[sel], right[sel], jx,
                jy, self.transmission, slots=slots)

    def grad(self, a, b, v, g_w):
        """dJ/da, dJ/db (n_cp, n_pairs) and dJ/dv (n_cp,) from dJ/dw (n_beamlets,)."""
        left, right = self._edges(a, b)
        mu = self._sub_mu(v)
        n_s = left.shape[0]
        d_left = np.zeros((n_s, self.n_pairs))
        d_right = np.zeros((n_s, self.n_pairs))
        d_mu = np.zeros(n_s)
        keep = 1.0 - self.transmission.leaf  # the covered part still transmits
        for (cols, sel, pairs, oy, slot, bx, jx, blo, bhi, j0, j1, by, jy,
             slots) in self.groups:
            le_raw = left[sel][:, pairs]
            ri_raw = right[sel][:, pairs]
            le = np.maximum(le_raw, j0)
            ri = np.minimum(ri_raw, j1)
            lo_c = np.maximum(le, blo)
            hi_c = np.minimum(ri, bhi)
            gw = g_w[cols][None, :, None]
            ogw = oy * gw
            frac = delivered_fraction(bx, by, self.beamlet_size_mm, self.leaf_edges_mm,
                                      left[sel], right[sel], jx, jy, self.transmission,
                                      slots=slots)
            d_mu[sel] += frac @ g_w[cols]
            # tips often sit exactly on a beamlet edge or a jaw (kinks): the mean of the
            # two one-sided derivatives (what a central difference measures)
            common = ogw * (0.5 * keep * mu[sel] / self.area)[:, None, None]
            dr = common * (((ri_raw < j1) & (ri < bhi) & (ri >= lo_c)).astype(np.float64)
                           + ((ri_raw <= j1) & (ri <= bhi) & (ri > lo_c)))
            dl = common * (((le_raw >= j0) & (le >= blo) & (le < hi_c)).astype(np.float64)
                           + ((le_raw > j0) & (le > blo) & (le <= hi_c)))
            n_slot = sel.size * self.n_pairs
            d_right[sel] += np.bincount(slot, dr.ravel(), n_slot).reshape(sel.size, -1)
            d_left[sel] -= np.bincount(slot, dl.ravel(), n_slot).reshape(sel.size, -1)
        n_all = self.n_cp + 2

        t = self.t.reshape(-1, self.n_sub, 1)

        def to_cp(d):  # through the interpolation and the tied end points
            d = d.reshape(n_all - 1, self.n_sub, self.n_pairs)
            full = np.zeros((n_all, self.n_pairs))
            full[:-1] += ((1 - t) * d).sum(axis=1)
            full[1:] += (t * d).sum(axis=1)
            g = full[1:-1].copy()
            g[0] += full[0]
            g[-1] += full[-1]
            return g

        d_dmu = d_mu.reshape(-1, self.n_sub).sum(axis=1) / self.n_sub
        return to_cp(d_left), to_cp(d_right), self.M.T @ d_dmu

    def beam_with(self, a, b, v) -> BeamDelivery:
        dmu = self.M @ v
        return replace(self.beam, leaf_a_mm=np.concatenate([a[:1], a, a[-1:]]),
                       leaf_b_mm=np.concatenate([b[:1], b, b[-1:]]),
                       cumulative_mu=np.concatenate([[0.0], np.cumsum(dmu)]))


def arc_value_grad(models, parts, n_w: int, weight_value_grad):
    """Objective value and its gradient w.r.t. every arc's leaf tips and control-point MU.

    models: the arcs' :class:`ArcModel`; parts: one ``(a, b, v)`` (leaf tips mm, MU) per
    arc; weight_value_grad: beamlet weights -> (J, dJ/dw). Returns ``(J, [(dJ/da, dJ/db,
    dJ/dv) per arc])``; shared by :mod:`atp.sequencer.aperture_refine` and :mod:`atp.sequencer.dmpo`.
    """
    w = np.zeros(n_w)
    for md, (a, b, v) in zip(models, parts):
        md.weights(a, b, v, w)
    j, g_w = weight_value_grad(w)
    g_w = np.asarray(g_w, np.float64).reshape(-1)
    return float(j), [md.grad(a, b, v, g_w) for md, (a, b, v) in zip(models, parts)]
