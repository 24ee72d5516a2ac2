"""Import dose-influence matrices computed elsewhere into :class:`DoseInfluence`.

Registered formats (``IMPORTERS``; ``atp dij --import FORMAT FILE``):

``matrad``: a MATLAB ``.mat`` file (v5/v7, as written by MATLAB ``save`` or
``scipy.io.savemat``) holding matRad's ``dij`` struct and optionally ``stf``:

* ``dij.physicalDose``: cell array whose first cell is the sparse (n_voxels x n_bixels)
  matrix (Gy per unit bixel weight, matRad's convention);
* ``dij.doseGrid``: ``dimensions`` [Ny Nx Nz], ``resolution.x/.y/.z`` (mm) and the
  coordinate vectors ``x``, ``y``, ``z`` (mm; matRad world = patient LPS when the CT came
  from DICOM). Rows are MATLAB linear indices of the [Ny Nx Nz] cube (column-major);
  atp keeps them unchanged by describing the dose grid with array axes (z, x, y) in C
  order, which enumerates voxels in exactly that order;
* ``dij.ctGrid`` (optional, same fields): the patient grid;
* ``dij.beamNum`` (1-based beam of each bixel; default all beam 1);
* ``stf`` (optional, struct array per beam): ``gantryAngle``, ``couchAngle``,
  ``isoCenter`` (mm), ``bixelWidth`` and ``ray(k).rayPos_bev`` = [x, y, z] at the
  isocentre plane (matRad BEV: x lateral, z across; the bixels of a beam are taken in
  ray order, one bixel per ray as for photons). Without ``stf`` the beam geometry is
  unknown: angles 0, positions 0, and ``meta['beam_geometry'] = 'unknown'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.io import loadmat

from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.errors import InputError
from atp.grid import Grid

# matRad cube (Ny, Nx, Nz) column-major == C order over (z, x, y): axis -> LPS direction
_MATRAD_DIRECTION = np.array([[0.0, 1.0, 0.0],
                              [0.0, 0.0, 1.0],
                              [1.0, 0.0, 0.0]])


def _field(obj, name, path, where, default=None, required=True):
    if hasattr(obj, name):
        return getattr(obj, name)
    if isinstance(obj, dict) and name in obj:
        return obj[name]
    if required:
        raise InputError(f"matRad file lacks {where}.{name}", file=path, field=f"{where}.{name}")
    return default


def _matrad_grid(g, path, where) -> Grid:
    dims = np.atleast_1d(np.asarray(_field(g, "dimensions", path, where), dtype=float))
    res = _field(g, "resolution", path, where)
    rx, ry, rz = (float(np.asarray(_field(res, k, path, f"{where}.resolution")))
                  for k in ("x", "y", "z"))
    if dims.size != 3 or np.any(dims < 1):
        raise InputError(f"dimensions must be [Ny Nx Nz], got {dims.tolist()}", file=path,
                         field=f"{where}.dimensions")
    ny, nx, nz = (int(v) for v in dims)
    first = []
    for k in ("x", "y", "z"):
        vec = _field(g, k, path, where, default=None, required=False)
        first.append(float(np.atleast_1d(vec)[0]) if vec is not None else 0.0)
    origin = np.array(first)  # LPS of voxel (iy=0, ix=0, iz=0)
    return Grid((nz, nx, ny), (rz, rx, ry), origin, _MATRAD_DIRECTION)


def import_matrad(path: str | os.PathLike) -> DoseInfluence:
    """Read a matRad ``dij`` (and optional ``stf``) from a ``.mat`` file."""
    path = Path(path)
    try:
        mat = loadmat(path, struct_as_record=False, squeeze_me=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        raise InputError(f"cannot read MAT file: {exc}", file=path) from None
    if "dij" not in mat:
        raise InputError("no 'dij' variable in the MAT file", file=path, field="dij")
    dij = mat["dij"]
    pd = _field(dij, "physicalDose", path, "dij")
    m = pd
    if isinstance(pd, np.ndarray) and pd.dtype == object:
        m = pd.reshape(-1)[0]
    if not sp.issparse(m):
        m = np.asarray(m)
        if m.ndim != 2:
            raise InputError("physicalDose{1} is not a 2-D matrix", file=path,
                             field="dij.physicalDose")
    dose_grid = _matrad_grid(_field(dij, "doseGrid", path, "dij"), path, "dij.doseGrid")
    ct = _field(dij, "ctGrid", path, "dij", required=False)
    patient_grid = _matrad_grid(ct, path, "dij.ctGrid") if ct is not None else None
    n_bix = m.shape[1]
    beam_num = np.atleast_1d(np.asarray(_field(dij, "beamNum", path, "dij",
                                               default=np.ones(n_bix), required=False)))
    beam_num = beam_num.astype(np.int64).reshape(-1)
    if beam_num.size != n_bix or beam_num.min() < 1:
        raise InputError(f"beamNum must hold {n_bix} 1-based beam numbers", file=path,
                         field="dij.beamNum")
    n_beams = int(beam_num.max())
    gantry = np.zeros(n_beams)
    couch = np.zeros(n_beams)
    iso = np.zeros((n_beams, 3))
    bev_x = np.zeros(n_bix)
    bev_y = np.zeros(n_bix)
    width = 0.0
    geometry = "unknown"
    if "stf" in mat:
        stf = np.atleast_1d(mat["stf"])
        if stf.size != n_beams:
            raise InputError(f"stf has {stf.size} beams, dij {n_beams}", file=path,
                             field="stf")
        for b, beam in enumerate(stf):
            gantry[b] = float(_field(beam, "gantryAngle", path, f"stf({b + 1})")) % 360.0
            couch[b] = float(_field(beam, "couchAngle", path, f"stf({b + 1})",
                                    default=0.0, required=False)) % 360.0
            iso[b] = np.asarray(_field(beam, "isoCenter", path, f"stf({b + 1})"),
                                dtype=float).reshape(3)
            width = float(_field(beam, "bixelWidth", path, f"stf({b + 1})"))
            rays = np.atleast_1d(_field(beam, "ray", path, f"stf({b + 1})"))
            cols = np.flatnonzero(beam_num == b + 1)
            if rays.size != cols.size:
                raise InputError(f"beam {b + 1}: {rays.size} rays but {cols.size} bixels",
                                 file=path, field=f"stf({b + 1}).ray")
            pos = np.array([np.asarray(_field(r, "rayPos_bev", path, "ray"), float).reshape(3)
                            for r in rays])
            bev_x[cols] = pos[:, 0]
            bev_y[cols] = pos[:, 2]
        geometry = "matRad stf"
    info = BeamletInfo(beam_num - 1, gantry, np.zeros(n_beams), couch, iso, bev_x, bev_y,
                       (width, width) if width > 0 else (5.0, 5.0))
    meta = {"engine": "matRad (imported)", "source_file": str(path),
            "units": "as in source: Gy per unit bixel weight", "beam_geometry": geometry}
    try:
        return DoseInfluence(sp.csc_matrix(m, dtype=np.float32), info, dose_grid,
                             patient_grid, meta)
    except InputError as exc:
        raise InputError(exc.message, file=path, field=exc.field) from None


IMPORTERS = {"matrad": import_matrad}


def import_dij(fmt: str, path: str | os.PathLike) -> DoseInfluence:
    """Read an external dij; ``fmt`` is a key of :data:`IMPORTERS`."""
    key = str(fmt).lower()
    if key not in IMPORTERS:
        raise InputError(f"unknown dij format '{fmt}'; supported: {sorted(IMPORTERS)}",
                         field="--import")
    if not Path(path).is_file():
        raise InputError("no such file", file=path)
    return IMPORTERS[key](path)
