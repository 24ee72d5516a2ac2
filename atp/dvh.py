"""Dose-volume histograms and DVH metrics, one documented definition each.

Every function takes a dose array in Gy, a boolean structure mask of the same shape
(on the same grid) and, where a volume in cc is involved, the volume of one voxel in cc.
The structure's dose samples are ``dose_gy[mask]``.

Definitions (the same as OpenKBP's own evaluation code, so that our numbers and
OpenKBP's agree exactly):

* **Partial voxels**: a voxel belongs to a structure entirely or not at all (the mask
  is boolean); every voxel counts with the full voxel volume. No supersampling.
* **D x %** (dose received by at least x % of the volume):
  ``np.percentile(roi_dose, 100 - x)`` with numpy's default *linear* interpolation
  between the sorted voxel doses. D100% is the minimum, D0% the maximum.
* **D v cc** (dose received by at least v cc; D0.03cc, D0.1cc, D2cc): v is first turned
  into a whole number of voxels ``n = max(1, round(v / voxel_volume_cc))`` (OpenKBP
  does exactly this for D0.1cc), then ``np.percentile(roi_dose, 100 - 100 * n / N)``
  with N the structure's voxel count. When n >= N it is the structure's minimum.
* **V x Gy** (volume receiving at least x Gy): the voxels with ``dose >= x`` counted
  whole; as a percentage of the structure's voxel count, or in cc (count x voxel cc).
* **Dmean / Dmax / Dmin**: mean, maximum and minimum voxel dose (Dmax is a single
  voxel; use D0.03cc for a near-maximum).
* **Cumulative DVH**: for dose levels ``d_k = k * bin_width_gy`` (k = 0..K, the last
  at or above the structure maximum), the fraction of voxels with ``dose >= d_k``.

An empty mask is an error (:class:`~atp.errors.StructureError` naming the structure),
never a silent NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp.errors import GridMismatchError, InputError, StructureError
from atp.xp import array_module


def roi_dose(dose_gy, mask, name: str | None = None):
    """The dose samples (Gy) of a structure: ``dose_gy[mask]`` after checking.

    Raises GridMismatchError when shapes differ and StructureError for an empty mask.
    """
    xp = array_module(dose_gy, mask)
    if tuple(dose_gy.shape) != tuple(mask.shape):
        raise GridMismatchError(
            f"dose shape {tuple(dose_gy.shape)} != mask shape {tuple(mask.shape)}",
            field=name or "shape")
    m = mask if mask.dtype == bool else (mask != 0)
    values = dose_gy[m]
    if values.size == 0:
        raise StructureError(f"structure '{name or '?'}' has an empty mask (no voxels)",
                             field=name or "mask")
    return xp.asarray(values, dtype=xp.float64)


def _check_fraction(value: float, what: str, lo: float = 0.0, hi: float = 100.0) -> float:
    v = float(value)
    if not (np.isfinite(v) and lo <= v <= hi):
        raise InputError(f"{what} must be within [{lo:g}, {hi:g}], got {value}", field=what)
    return v


def _to_float(x) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def dose_at_volume_pct(dose_gy, mask, volume_pct: float, name: str | None = None) -> float:
    """D{volume_pct}% in Gy: ``np.percentile(roi_dose, 100 - volume_pct)`` (linear)."""
    v = _check_fraction(volume_pct, "volume_pct")
    d = roi_dose(dose_gy, mask, name)
    xp = array_module(d)
    return _to_float(xp.percentile(d, 100.0 - v))


def voxels_for_volume(volume_cc: float, voxel_volume_cc: float) -> int:
    """Whole voxels standing for ``volume_cc``: ``max(1, round(volume_cc / voxel_cc))``."""
    if not (np.isfinite(volume_cc) and volume_cc > 0):
        raise InputError(f"volume must be > 0 cc, got {volume_cc}", field="volume_cc")
    if not (np.isfinite(voxel_volume_cc) and voxel_volume_cc > 0):
        raise InputError(f"voxel volume must be > 0 cc, got {voxel_volume_cc}",
                         field="voxel_volume_cc")
    return max(1, int(np.round(volume_cc / voxel_volume_cc)))


def dose_at_volume_cc(dose_gy, mask, volume_cc: float, voxel_volume_cc: float,
                      name: str | None = None) -> float:
    """D{volume_cc}cc in Gy (OpenKBP's rule; see the module docstring)."""
    n = voxels_for_volume(volume_cc, voxel_volume_cc)
    d = roi_dose(dose_gy, mask, name)
    xp = array_module(d)
    q = max(0.0, 100.0 - 100.0 * n / d.size)
    return _to_float(xp.percentile(d, q))


def volume_at_dose_pct(dose_gy, mask, dose_threshold_gy: float,
                       name: str | None = None) -> float:
    """V{x}Gy as % of the structure: 100 * count(dose >= x) / count(mask)."""
    d = roi_dose(dose_gy, mask, name)
    return 100.0 * _to_float((d >= float(dose_threshold_gy)).sum()) / d.size


def volume_at_dose_cc(dose_gy, mask, dose_threshold_gy: float, voxel_volume_cc: float,
                      name: str | None = None) -> float:
    """V{x}Gy in cc: count(dose >= x) * voxel_volume_cc (whole voxels)."""
    d = roi_dose(dose_gy, mask, name)
    return _to_float((d >= float(dose_threshold_gy)).sum()) * float(voxel_volume_cc)


def mean_dose(dose_gy, mask, name: str | None = None) -> float:
    """Dmean in Gy: mean voxel dose."""
    return _to_float(roi_dose(dose_gy, mask, name).mean())


def max_dose(dose_gy, mask, name: str | None = None) -> float:
    """Dmax in Gy: the single hottest voxel."""
    return _to_float(roi_dose(dose_gy, mask, name).max())


def min_dose(dose_gy, mask, name: str | None = None) -> float:
    """Dmin in Gy: the single coldest voxel."""
    return _to_float(roi_dose(dose_gy, mask, name).min())


@dataclass(frozen=True)
class DVH:
    """A cumulative DVH: ``volume_fraction[k]`` = fraction of voxels with dose >= dose_gy[k].

    dose_gy: dose levels (Gy), equally spaced from 0.
    volume_fraction: in [0, 1], non-increasing; 1 at 0 Gy.
    volume_cc: volume_fraction * structure volume (cc).
    """

    dose_gy: np.ndarray
    volume_fraction: np.ndarray
    volume_cc: np.ndarray
    structure_volume_cc: float

    @property
    def volume_pct(self) -> np.ndarray:
        return 100.0 * self.volume_fraction


def cumulative_dvh(dose_gy, mask, voxel_volume_cc: float, bin_width_gy: float = 0.1,
                   max_dose_gy: float | None = None, name: str | None = None) -> DVH:
    """Cumulative DVH of a structure on dose levels 0, w, 2w, ... (see module docstring).

    max_dose_gy: last level (default: the structure maximum rounded up to a bin).
    """
    if not (np.isfinite(bin_width_gy) and bin_width_gy > 0):
        raise InputError(f"bin width must be > 0 Gy, got {bin_width_gy}", field="bin_width_gy")
    d = roi_dose(dose_gy, mask, name)
    if not isinstance(d, np.ndarray):  # CuPy: the DVH is a small host-side table
        d = d.get()
    top = float(d.max()) if max_dose_gy is None else float(max_dose_gy)
    n_levels = int(np.ceil(max(top, 0.0) / bin_width_gy)) + 1
    levels = np.arange(n_levels, dtype=np.float64) * bin_width_gy
    s = np.sort(d)
    # count of voxels with dose >= level = N - (number of voxels < level)
    counts = s.size - np.searchsorted(s, levels, side="left")
    frac = counts / s.size
    vol = s.size * float(voxel_volume_cc)
    return DVH(levels, frac, frac * vol, vol)
