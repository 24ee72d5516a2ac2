"""``DoseInfluence``: the dose-influence (dij) matrix and what it refers to.

``matrix`` is a scipy.sparse CSC matrix of shape (n_dose_voxels, n_beamlets), float32,
in Gy per unit beamlet weight: dose_gy (flattened dose grid, C order) = matrix @ weights.
Each column is one beamlet; ``beamlets`` says which beam it belongs to, the beam's
gantry/collimator/couch angles (IEC 61217, degrees) and its centre in the beam's-eye
view at the isocentre plane (mm): ``bev_x_mm`` along leaf travel, ``bev_y_mm`` across
leaf pairs. ``dose_grid`` is the grid of the matrix rows (may be coarser than the CT;
``patient_grid`` is the CT grid it maps back onto).

File format (``save``/``load``, a plain ``.npz``, documented so other tools can write it):
  format            str    "atp-dij-1"
  data, indices, indptr, shape   the CSC arrays (float32, int32/int64, int64, (2,))
  beam_index        int32 (n_beamlets,)
  gantry_deg, collimator_deg, couch_deg   float64 (n_beams,)
  isocenter_mm      float64 (n_beams, 3) patient LPS mm
  bev_x_mm, bev_y_mm  float64 (n_beamlets,) beamlet centres at the isocentre plane
  beamlet_size_mm   float64 (2,) (x along leaves, y across)
  dose_grid_*       shape, spacing_mm, origin_mm, direction of the dose grid
  patient_grid_*    same for the patient grid (absent when equal to the dose grid)
  meta_json         str, JSON of free metadata (engine, version, threshold, ...)
  far_*             optional: the far-scatter operator (:mod:`atp.dose.far_scatter`):
                    far_R_* / far_V_* (CSR data, indices, indptr, shape), far_groups
                    (int64 (n_groups, 7): node offset, nx, ny, table offset, levels,
                    table u, table v) and far_gu / far_gv / far_hu / far_hv (float32,
                    the groups' separable factors, concatenated)

Dose = ``matrix @ w`` plus, when ``far`` is present, ``far.apply(w)`` (the far tail of
the wide scatter Gaussian, low rank): :meth:`DoseInfluence.dose` adds both; code that
multiplies ``matrix`` itself (the optimiser) sees the sparse part only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from atp.dose.far_scatter import FarScatter
from atp.dose.resample import dose_to_patient_grid
from atp.errors import InputError
from atp.grid import Grid
from atp.outputs import atomic_write_file, write_npz

FORMAT_TAG = "atp-dij-1"


@dataclass(frozen=True, eq=False)
class BeamletInfo:
    """Per-beam geometry and per-beamlet BEV positions (all numpy arrays)."""

    beam_index: np.ndarray  # (n_beamlets,) int: which beam each column belongs to
    gantry_deg: np.ndarray  # (n_beams,)
    collimator_deg: np.ndarray  # (n_beams,)
    couch_deg: np.ndarray  # (n_beams,)
    isocenter_mm: np.ndarray  # (n_beams, 3)
    bev_x_mm: np.ndarray  # (n_beamlets,) along leaf travel, at isocentre plane
    bev_y_mm: np.ndarray  # (n_beamlets,) across leaf pairs, at isocentre plane
    beamlet_size_mm: tuple[float, float] = (5.0, 5.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "beam_index", np.asarray(self.beam_index, dtype=np.int32))
        for name in ("gantry_deg", "collimator_deg", "couch_deg", "bev_x_mm", "bev_y_mm"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        iso = np.asarray(self.isocenter_mm, dtype=np.float64).reshape(-1, 3)
        object.__setattr__(self, "isocenter_mm", iso)
        nb = self.gantry_deg.shape[0]
        if not (self.collimator_deg.shape[0] == self.couch_deg.shape[0] == iso.shape[0] == nb):
            raise InputError("per-beam arrays differ in length", field="beams")
        n = self.beam_index.shape[0]
        if not (self.bev_x_mm.shape[0] == self.bev_y_mm.shape[0] == n):
            raise InputError("per-beamlet arrays differ in length", field="beamlets")
        if n and (self.beam_index.min() < 0 or self.beam_index.max() >= nb):
            raise InputError("beam_index out of range", field="beam_index")

    @property
    def n_beams(self) -> int:
        return int(self.gantry_deg.shape[0])

    @property
    def n_beamlets(self) -> int:
        return int(self.beam_index.shape[0])

    def columns_of_beam(self, beam: int) -> np.ndarray:
        return np.flatnonzero(self.beam_index == beam)


@dataclass(frozen=True, eq=False)
class DoseInfluence:
    """Sparse dose-influence matrix + beamlet metadata + dose-grid geometry."""

    matrix: sp.csc_matrix
    beamlets: BeamletInfo
    dose_grid: Grid
    patient_grid: Grid | None = None
    meta: dict = field(default_factory=dict)
    far: object | None = None  # atp.dose.far_scatter.FarScatter

    def __post_init__(self) -> None:
        m = self.matrix
        if not sp.issparse(m):
            m = sp.csc_matrix(np.asarray(m))
        m = sp.csc_matrix(m, dtype=np.float32)
        if m.shape[0] != self.dose_grid.n_voxels:
            raise InputError(f"dij has {m.shape[0]} rows but the dose grid has "
                             f"{self.dose_grid.n_voxels} voxels", field="matrix.shape")
        if m.shape[1] != self.beamlets.n_beamlets:
            raise InputError(f"dij has {m.shape[1]} columns but {self.beamlets.n_beamlets} "
                             "beamlets are described", field="matrix.shape")
        if m.nnz and not np.all(np.isfinite(m.data)):
            raise InputError("dij contains NaN/inf", field="matrix.data")
        object.__setattr__(self, "matrix", m)
        if self.far is not None and tuple(self.far.shape) != m.shape:
            raise InputError(f"far-scatter operator has shape {self.far.shape}, the matrix "
                             f"{m.shape}", field="far")
        if self.patient_grid is None:
            object.__setattr__(self, "patient_grid", self.dose_grid)

    @property
    def n_beamlets(self) -> int:
        return self.matrix.shape[1]

    @property
    def n_voxels(self) -> int:
        return self.matrix.shape[0]

    @cached_property
    def csr(self) -> sp.csr_matrix:
        """The matrix as SciPy CSR with sorted indices (float32, Gy per MU), converted
        on first use and kept with the dij: a caller that plans several times on one
        dij (the fast path's re-plans, a TPS holding the arc's dij) converts once.
        Costs about as much memory as the matrix (~8 bytes per non-zero); the fast
        path's torch operator shares these arrays on the CPU."""
        m = self.matrix.tocsr()
        m.sort_indices()
        return m

    def dose(self, weights) -> np.ndarray:
        """Dose on the dose grid (Gy, 3-D) for beamlet weights (n_beamlets,)."""
        w = np.asarray(weights, dtype=np.float32).reshape(-1)
        if w.shape[0] != self.n_beamlets:
            raise InputError(f"{w.shape[0]} weights for {self.n_beamlets} beamlets",
                             field="weights")
        nz = np.flatnonzero(w)
        if nz.size and 2 * (int(nz[-1]) + 1 - int(nz[0])) < w.size:
            # weights on a few columns (one beam's): their block alone, bit for bit the
            # whole product (the other columns add exact zeros), ~n_beams times faster
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            m, ip = self.matrix, self.matrix.indptr
            block = sp.csc_matrix((m.data[ip[lo]:ip[hi]], m.indices[ip[lo]:ip[hi]],
                                   ip[lo:hi + 1] - ip[lo]), shape=(m.shape[0], hi - lo),
                                  copy=False)
            d = block @ w[lo:hi]
        else:
            d = self.matrix @ w
        if self.far is not None:
            d = d + self.far.apply(w)
        return d.reshape(self.dose_grid.shape)

    def patient_dose(self, weights) -> np.ndarray:
        """Dose on the patient (CT) grid (Gy, float32, 3-D): :meth:`dose` mapped back by
        :meth:`to_patient_grid`."""
        return self.to_patient_grid(self.dose(weights))

    def to_patient_grid(self, dose) -> np.ndarray:
        """A dose on this dij's dose grid (Gy, 3-D or flattened) on the patient grid
        (float32, 3-D): trilinear interpolation
        (:func:`atp.dose.resample.dose_to_patient_grid`; as is when the grids agree)."""
        d = np.asarray(dose).reshape(self.dose_grid.shape)
        return dose_to_patient_grid(d, self.dose_grid, self.patient_grid)

    # --- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the documented ``.npz`` format (atomically: a unique temporary file beside
        ``path``, then rename; see :mod:`atp.outputs`)."""
        path = Path(path)
        m = self.matrix
        arrays = {
            "format": np.array(FORMAT_TAG),
            "data": m.data.astype(np.float32), "indices": m.indices, "indptr": m.indptr,
            "shape": np.array(m.shape, dtype=np.int64),
            "beam_index": self.beamlets.beam_index,
            "gantry_deg": self.beamlets.gantry_deg,
            "collimator_deg": self.beamlets.collimator_deg,
            "couch_deg": self.beamlets.couch_deg,
            "isocenter_mm": self.beamlets.isocenter_mm,
            "bev_x_mm": self.beamlets.bev_x_mm, "bev_y_mm": self.beamlets.bev_y_mm,
            "beamlet_size_mm": np.array(self.beamlets.beamlet_size_mm, dtype=np.float64),
            "meta_json": np.array(json.dumps(self.meta, default=str)),
        }
        if self.far is not None:
            arrays.update(self.far.to_arrays())
        for prefix, g in (("dose_grid", self.dose_grid), ("patient_grid", self.patient_grid)):
            arrays[f"{prefix}_shape"] = np.array(g.shape, dtype=np.int64)
            arrays[f"{prefix}_spacing_mm"] = g.spacing_mm
            arrays[f"{prefix}_origin_mm"] = g.origin_mm
            arrays[f"{prefix}_direction"] = g.direction

        atomic_write_file(path, lambda fh: write_npz(fh, arrays, stored=("data",)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DoseInfluence:
        path = Path(path)
        try:
            d = np.load(path, allow_pickle=False)
            files = set(d.files)
        except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
            raise InputError(f"cannot read dij npz: {exc}", file=path) from None
        try:
            tag = str(d["format"]) if "format" in files else None
        except Exception:  # noqa: BLE001 - an object / truncated member
            tag = None
        if tag != FORMAT_TAG:
            raise InputError(f"not an {FORMAT_TAG} file", file=path, field="format")
        try:
            m = sp.csc_matrix((d["data"], d["indices"], d["indptr"]),
                              shape=tuple(int(s) for s in d["shape"]))
            info = BeamletInfo(d["beam_index"], d["gantry_deg"], d["collimator_deg"],
                               d["couch_deg"], d["isocenter_mm"], d["bev_x_mm"], d["bev_y_mm"],
                               tuple(float(v) for v in d["beamlet_size_mm"]))

            def grid(prefix):
                if f"{prefix}_shape" not in files:
                    return None
                return Grid(tuple(int(s) for s in d[f"{prefix}_shape"]),
                            d[f"{prefix}_spacing_mm"], d[f"{prefix}_origin_mm"],
                            d[f"{prefix}_direction"])

            meta = json.loads(str(d["meta_json"])) if "meta_json" in files else {}
            far = None
            if "far_groups" in files:
                far = FarScatter.from_arrays(d)
            return cls(m, info, grid("dose_grid"), grid("patient_grid"), meta, far=far)
        except InputError as exc:
            raise InputError(exc.message, file=path, field=exc.field) from None
        except KeyError as exc:
            raise InputError("missing array", file=path, field=str(exc.args[0])) from None
        except Exception as exc:  # noqa: BLE001 - a truncated / inconsistent / object member
            msg = " ".join(str(exc).split())[:120]
            raise InputError(f"corrupt dij npz: {msg}", file=path, field="matrix") from None
