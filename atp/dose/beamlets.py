"""The beamlet grid of one beam: which BEV cells see a target.

Beamlet (ix, iy) of size (wx, wy) mm at the isocentre plane covers
``u in [ix*wx, (ix+1)*wx)``, ``v in [iy*wy, (iy+1)*wy)``: centres at ``(ix + 0.5) wx``
and ``(iy + 0.5) wy``, so with wy = 5 mm the leaf-pair boundaries (multiples of 5 mm)
fall on beamlet edges and the central axis on a beamlet corner.

A beamlet is kept when its rectangle comes within ``margin_mm`` (at the isocentre
plane) of the BEV projection of the target(s). The projection is rasterised at 1 mm:
every target voxel centre is projected and the projected image grown by half a voxel
diagonal (so voxel extent is covered) plus the margin (Euclidean distance transform).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from atp.dose.geometry import BeamFrame

RASTER_MM = 1.0


def select_beamlets(frame: BeamFrame, target_points_mm: np.ndarray, beamlet_size_mm,
                    margin_mm: float, voxel_half_diag_mm: float):
    """Integer beamlet indices (ix, iy), sorted by iy then ix, that see the target."""
    wx, wy = (float(v) for v in beamlet_size_mm)
    u, v, _ = frame.project(target_points_mm)
    grow = float(margin_mm) + float(voxel_half_diag_mm)
    u0 = np.floor((u.min() - grow) / wx - 1) * wx
    v0 = np.floor((v.min() - grow) / wy - 1) * wy
    nu = int(np.ceil((u.max() + grow - u0) / wx + 2))
    nv = int(np.ceil((v.max() + grow - v0) / wy + 2))
    # raster in mm pixels: pixel centres at u0 + (k + 0.5) * RASTER
    pu = int(np.ceil(nu * wx / RASTER_MM))
    pv = int(np.ceil(nv * wy / RASTER_MM))
    img = np.ones((pu, pv), dtype=bool)  # True = not target (for the distance transform)
    ku = np.clip(((u - u0) / RASTER_MM).astype(np.int64), 0, pu - 1)
    kv = np.clip(((v - v0) / RASTER_MM).astype(np.int64), 0, pv - 1)
    img[ku, kv] = False
    dist = ndimage.distance_transform_edt(img, sampling=RASTER_MM)
    near = dist <= grow + RASTER_MM * 0.5
    # a beamlet is kept when any raster pixel inside it is near the target
    cu = np.minimum((np.arange(pu) * RASTER_MM + 0.5 * RASTER_MM) // wx, nu - 1).astype(int)
    cv = np.minimum((np.arange(pv) * RASTER_MM + 0.5 * RASTER_MM) // wy, nv - 1).astype(int)
    keep = np.zeros((nu, nv), dtype=bool)
    iu, iv = np.nonzero(near)
    keep[cu[iu], cv[iv]] = True
    kx, ky = np.nonzero(keep)
    ix = kx + round(u0 / wx)
    iy = ky + round(v0 / wy)
    order = np.lexsort((ix, iy))
    return ix[order].astype(np.int64), iy[order].astype(np.int64)
