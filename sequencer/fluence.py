"""Fluence maps: beamlet weights of one beam -> 2-D BEV map -> the MLC leaf-pair grid.

Beamlet weights are MU (total course; ``DoseInfluence`` columns are Gy per MU). A beam's
beamlets sit on a regular lattice in the beam's-eye view at the isocentre plane
(``bev_x_mm`` along leaf travel, ``bev_y_mm`` across leaf pairs, pitch
``beamlet_size_mm``). The BEV map has rows along y and columns along x.

On the leaf-pair grid each pair p gets, per x column, the area-weighted mean of the beamlet
rows it overlaps (rows it does not cover count as zero): a 10 mm pair over two 5 mm rows
gets their mean; two 2.5 mm pairs inside one 5 mm row both get that row's value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp.dose.influence import BeamletInfo
from atp.errors import InputError


@dataclass(frozen=True, eq=False)
class BeamFluence:
    """One beam's fluence on the leaf-pair grid.

    fluence_mu: (n_pairs, n_x) MU (total course) per leaf pair and x column.
    x_edges_mm: (n_x + 1,) column boundaries along leaf travel (BEV x, mm at isocentre).
    beam_index: the ``DoseInfluence`` beam this map came from (its dij columns).
    """

    beam_index: int
    gantry_deg: float
    collimator_deg: float
    couch_deg: float
    isocenter_mm: np.ndarray
    x_edges_mm: np.ndarray
    fluence_mu: np.ndarray

    @property
    def pixel_mm(self) -> float:
        return float(self.x_edges_mm[1] - self.x_edges_mm[0])


@dataclass(frozen=True, eq=False)
class FluenceSet:
    """All beams' maps plus what sequencing needs to know about the course."""

    beams: tuple[BeamFluence, ...]
    leaf_edges_mm: np.ndarray  # the machine's pair boundaries the maps were binned on
    fractions: int = 1

    def __post_init__(self) -> None:
        if int(self.fractions) < 1:
            raise InputError(f"fractions must be >= 1, got {self.fractions}", field="fractions")
        object.__setattr__(self, "fractions", int(self.fractions))
        object.__setattr__(self, "beams", tuple(self.beams))


def bev_map(weights_mu, beamlets: BeamletInfo, beam: int):
    """Beamlet weights of ``beam`` -> (map (n_y, n_x) MU, x_centres_mm, y_centres_mm)."""
    w = np.asarray(weights_mu, dtype=np.float64).reshape(-1)
    if w.shape[0] != beamlets.n_beamlets:
        raise InputError(f"{w.shape[0]} weights for {beamlets.n_beamlets} beamlets",
                         field="weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("beamlet weights must be finite and >= 0 MU", field="weights")
    cols = beamlets.columns_of_beam(beam)
    if cols.size == 0:
        raise InputError(f"beam {beam} has no beamlets", field="beam_index")
    sx, sy = (float(s) for s in beamlets.beamlet_size_mm)
    bx, by = beamlets.bev_x_mm[cols], beamlets.bev_y_mm[cols]
    x0, y0 = bx.min(), by.min()
    ix = np.rint((bx - x0) / sx).astype(int)
    iy = np.rint((by - y0) / sy).astype(int)
    if (np.abs(ix * sx + x0 - bx).max() > 1e-3 * sx
            or np.abs(iy * sy + y0 - by).max() > 1e-3 * sy):
        raise InputError(f"beamlets of beam {beam} are not on a regular "
                         f"{sx} x {sy} mm lattice", field="bev_x_mm/bev_y_mm")
    out = np.zeros((iy.max() + 1, ix.max() + 1))
    np.add.at(out, (iy, ix), w[cols])
    return out, x0 + sx * np.arange(out.shape[1]), y0 + sy * np.arange(out.shape[0])


def rows_to_leaf_pairs(bev: np.ndarray, y_centres_mm: np.ndarray, row_mm: float,
                       leaf_edges_mm: np.ndarray) -> np.ndarray:
    """Bin BEV rows (centres ``y_centres_mm``, height ``row_mm``) onto leaf pairs."""
    lo = np.maximum(leaf_edges_mm[:-1, None], y_centres_mm[None, :] - row_mm / 2)
    hi = np.minimum(leaf_edges_mm[1:, None], y_centres_mm[None, :] + row_mm / 2)
    overlap = np.clip(hi - lo, 0.0, None)  # (n_pairs, n_rows) mm
    return (overlap @ bev) / np.diff(leaf_edges_mm)[:, None]


def fluence_set(weights_mu, beamlets: BeamletInfo, leaf_edges_mm, fractions: int = 1,
                beams=None) -> FluenceSet:
    """Every beam's beamlet weights -> maps on the leaf-pair grid (``leaf_edges_mm``)."""
    edges = np.asarray(leaf_edges_mm, dtype=np.float64)
    sx, sy = (float(s) for s in beamlets.beamlet_size_mm)
    out = []
    for b in (range(beamlets.n_beams) if beams is None else beams):
        bev, xc, yc = bev_map(weights_mu, beamlets, b)
        if yc.min() - sy / 2 < edges[0] - 1e-6 or yc.max() + sy / 2 > edges[-1] + 1e-6:
            raise InputError(f"beam {b}: beamlets reach y = [{yc.min() - sy / 2:.1f}, "
                             f"{yc.max() + sy / 2:.1f}] mm, beyond the MLC "
                             f"[{edges[0]:.1f}, {edges[-1]:.1f}] mm", field="bev_y_mm")
        pairs = rows_to_leaf_pairs(bev, yc, sy, edges)
        x_edges = np.concatenate([xc - sx / 2, [xc[-1] + sx / 2]])
        out.append(BeamFluence(int(b), float(beamlets.gantry_deg[b]),
                               float(beamlets.collimator_deg[b]), float(beamlets.couch_deg[b]),
                               beamlets.isocenter_mm[b].copy(), x_edges, pairs))
    return FluenceSet(tuple(out), edges, fractions)
