"""CT number (HU) -> relative electron density (water = 1) by a calibration table.

The default table is ``atp/data/hu_to_density.csv`` (CIRS 062M insert densities; see the
file header for sources); any CSV with the columns ``hu,relative_electron_density``
(``#`` comment lines allowed, HU strictly increasing) can replace it. Between rows the
density is interpolated linearly. A CT with more than ``MAX_OUT_OF_RANGE_FRACTION``
(0.1 %) of its voxels below -1100 or above 5000 HU cannot be a calibrated CT (e.g. raw
stored values, no rescale) and raises :class:`~atp.errors.InputError`. A few voxels
above 5000 HU are metal (dental fillings, common in head-and-neck CTs on extended-HU
scanners): they are clamped to the ends of the table and a warning says how many.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

from atp.errors import InputError

DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "data" / "hu_to_density.csv"
HU_MIN, HU_MAX = -1100.0, 5000.0
MAX_OUT_OF_RANGE_FRACTION = 1e-3


@functools.lru_cache(maxsize=8)
def _read_table(path: str) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    try:
        with open(path) as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise InputError(f"cannot read HU table: {exc.strerror}", file=path) from None
    header_seen = False
    for lineno, ln in enumerate(lines, start=1):
        if not ln or ln.startswith("#"):
            continue
        if not header_seen:
            cols = [c.strip().lower() for c in ln.split(",")]
            if cols[:2] != ["hu", "relative_electron_density"]:
                raise InputError("header must be 'hu,relative_electron_density'", file=path,
                                 field="header", line=lineno)
            header_seen = True
            continue
        try:
            hu, red = (float(v) for v in ln.split(",")[:2])
        except ValueError:
            raise InputError(f"not two numbers: '{ln}'", file=path, field="row",
                             line=lineno) from None
        if not (np.isfinite(hu) and np.isfinite(red)) or red < 0:
            raise InputError("HU and density must be finite, density >= 0", file=path,
                             field="row", line=lineno)
        rows.append((hu, red))
    if len(rows) < 2:
        raise InputError("an HU table needs at least 2 rows", file=path, field="rows")
    t = np.array(rows)
    if np.any(np.diff(t[:, 0]) <= 0):
        raise InputError("HU values must increase strictly", file=path, field="hu")
    return t[:, 0].copy(), t[:, 1].copy()


def load_hu_table(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hu, relative_electron_density) arrays of a calibration table (default: built in)."""
    return _read_table(os.fspath(path) if path is not None else str(DEFAULT_TABLE))


def hu_to_density(ct_hu, table=None, *, source: str | None = None) -> np.ndarray:
    """Relative electron density (float32, same shape) for a CT in HU.

    table: None (default table), a path to a CSV, or a (hu, density) pair of arrays.
    Raises InputError naming ``source`` when more than 0.1 % of the voxels are outside
    [-1100, 5000] HU (or any is not finite); fewer are clamped, with a warning.
    """
    ct = np.asarray(ct_hu, dtype=np.float32)
    if not np.all(np.isfinite(ct)):
        raise InputError("CT contains NaN/inf", file=source, field="ct")
    lo, hi = float(ct.min()), float(ct.max())
    if lo < HU_MIN or hi > HU_MAX:
        n_out = int(np.count_nonzero((ct < HU_MIN) | (ct > HU_MAX)))
        if n_out > MAX_OUT_OF_RANGE_FRACTION * ct.size:
            raise InputError(f"CT values {lo:.0f}..{hi:.0f} HU: {n_out} voxels outside the "
                             f"plausible range [{HU_MIN:.0f}, {HU_MAX:.0f}]; is the CT "
                             "rescaled to HU?", file=source, field="ct")
        warnings.warn(f"{source or 'CT'}: {n_out} voxel(s) outside [{HU_MIN:.0f}, "
                      f"{HU_MAX:.0f}] HU (range {lo:.0f}..{hi:.0f}; metal?) clamped to the "
                      "ends of the HU-density table", stacklevel=2)
        ct = np.clip(ct, HU_MIN, HU_MAX)
    if table is None or isinstance(table, (str, os.PathLike)):
        hu, red = load_hu_table(table)
    else:
        hu, red = (np.asarray(a, dtype=np.float64) for a in table)
    return np.interp(ct, hu, red).astype(np.float32)
