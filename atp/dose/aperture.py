"""Aperture dose: MLC openings + MU -> beamlet weights -> dose (used by the sequencer).

This is the engine's aperture dose at beamlet resolution with partial-beamlet coverage:
each beamlet of the aperture's beam gets ``MU x (open area inside the beamlet) /
(beamlet area)``, the open area being exact for the leaf positions (1-D overlaps along
x for each leaf pair, times the leaf pair's overlap with the beamlet along y). The dose
is then ``dij @ weights``. Leaf-end shape, tongue-and-groove, interleaf leakage and
transmission are not modelled (sub-beamlet detail is averaged over the beamlet).

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


@dataclass(frozen=True, eq=False)
class Aperture:
    """One MLC aperture (a static segment or one control point) and its MU."""

    beam_index: int
    leaf_edges_y_mm: np.ndarray  # (n_pairs + 1,)
    left_mm: np.ndarray  # (n_pairs,)
    right_mm: np.ndarray  # (n_pairs,)
    mu: float


def _overlap(lo_a, hi_a, lo_b, hi_b):
    return np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)


def aperture_beamlet_weights(beamlets: BeamletInfo, beam_index: int, leaf_edges_y_mm,
                             left_mm, right_mm, mu: float) -> np.ndarray:
    """(n_beamlets,) weights in MU: MU x exact open-area fraction of each beamlet of
    ``beam_index`` (0 for beamlets of other beams)."""
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
    w = np.zeros(beamlets.n_beamlets, dtype=np.float64)
    cols = beamlets.columns_of_beam(int(beam_index))
    if cols.size == 0:
        return w
    wx, wy = beamlets.beamlet_size_mm
    x = beamlets.bev_x_mm[cols][:, None]
    y = beamlets.bev_y_mm[cols][:, None]
    oy = _overlap(y - wy / 2, y + wy / 2, edges[None, :-1], edges[None, 1:])  # (nb, np)
    ox = _overlap(x - wx / 2, x + wx / 2, left[None, :], right[None, :])
    w[cols] = float(mu) * (oy * ox).sum(axis=1) / (wx * wy)
    return w


def apertures_to_weights(beamlets: BeamletInfo, apertures) -> np.ndarray:
    """Summed beamlet weights (MU) of several apertures (Aperture or dicts)."""
    total = np.zeros(beamlets.n_beamlets, dtype=np.float64)
    for a in apertures:
        if isinstance(a, dict):
            a = Aperture(**a)
        total += aperture_beamlet_weights(beamlets, a.beam_index, a.leaf_edges_y_mm,
                                          a.left_mm, a.right_mm, a.mu)
    return total


def aperture_dose(dij: DoseInfluence, apertures) -> np.ndarray:
    """Dose (Gy, 3-D on ``dij.dose_grid``) of a list of apertures with their MU."""
    return dij.dose(apertures_to_weights(dij.beamlets, apertures))
