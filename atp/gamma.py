"""Gamma index (Low et al. 1998) between a reference and an evaluated 3-D dose on one grid.

Global normalisation: the dose criterion is ``dose_pct`` % of the reference maximum (or of
``norm_gy``); only reference voxels at or above ``threshold_pct`` % of that maximum are
scored. The evaluated dose is searched at offsets on a sub-voxel lattice (pitch
``step_mm``, default DTA/3) within the DTA sphere, trilinearly interpolated, so a voxel
passes when some point within DTA satisfies the combined criterion; gamma values above 1
are lower bounds (the search stops at the DTA radius, which is all a pass rate needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from atp.errors import GridMismatchError


@dataclass(frozen=True)
class GammaResult:
    pass_rate_pct: float  # % of scored voxels with gamma <= 1
    n_scored: int
    gamma: np.ndarray  # (n_scored,) gamma per scored voxel (capped search, see module doc)
    mask: np.ndarray  # bool, reference-grid voxels that were scored
    dose_pct: float
    dta_mm: float
    threshold_pct: float


def gamma_index(reference_gy, evaluated_gy, spacing_mm, *, dose_pct: float = 3.0,
                dta_mm: float = 3.0, threshold_pct: float = 10.0, norm_gy: float | None = None,
                step_mm: float | None = None) -> GammaResult:
    """Global gamma of ``evaluated_gy`` against ``reference_gy`` (same shape, voxel
    ``spacing_mm`` per array axis)."""
    ref = np.asarray(reference_gy, dtype=np.float64)
    ev = np.asarray(evaluated_gy, dtype=np.float64)
    if ref.shape != ev.shape or ref.ndim != 3:
        raise GridMismatchError(f"gamma needs two 3-D doses of one shape, got {ref.shape} "
                                f"and {ev.shape}", field="dose")
    sp = np.asarray(spacing_mm, dtype=np.float64).reshape(3)
    norm = float(norm_gy) if norm_gy is not None else float(ref.max())
    mask = ref >= threshold_pct / 100.0 * norm
    idx = np.argwhere(mask).astype(np.float64)
    if idx.shape[0] == 0 or norm <= 0:
        return GammaResult(100.0, 0, np.zeros(0), mask, dose_pct, dta_mm, threshold_pct)
    dd = dose_pct / 100.0 * norm
    r = ref[mask]
    step = float(step_mm) if step_mm else dta_mm / 3.0
    n = int(np.ceil(dta_mm / step))
    g = np.arange(-n, n + 1) * step
    offs = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    d2 = (offs ** 2).sum(axis=1)
    offs = offs[d2 <= dta_mm ** 2 + 1e-9]
    offs = offs[np.argsort((offs ** 2).sum(axis=1))]
    best = ((ev[mask] - r) / dd) ** 2  # zero offset
    for o in offs[1:]:
        dist2 = float((o ** 2).sum()) / dta_mm ** 2
        todo = best > dist2  # only voxels that this offset could still improve
        if not todo.any():
            continue
        coords = (idx[todo] + o / sp).T
        val = map_coordinates(ev, coords, order=1, mode="nearest")
        best[todo] = np.minimum(best[todo], dist2 + ((val - r[todo]) / dd) ** 2)
    gam = np.sqrt(best)
    return GammaResult(float(100.0 * np.mean(gam <= 1.0)), int(gam.size), gam, mask,
                       dose_pct, dta_mm, threshold_pct)
