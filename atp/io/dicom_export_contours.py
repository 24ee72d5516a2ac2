"""Boolean masks -> closed planar contours (patient mm) per image plane, holes included.

Each plane of the (plane, row, column) mask is traced with marching squares (contourpy,
matplotlib's contour engine) at level 0.5 on a zero-padded copy, so every contour is
closed and passes halfway between inside and outside voxel centres: a voxel centre lies
inside the traced polygons (even-odd rule, holes being separate contours) exactly when the
voxel is in the mask. Contours are returned as (n_points, 3) arrays without the repeated
closing point.
"""

from __future__ import annotations

import contourpy
import numpy as np

from atp.io.dicom_export_geometry import SliceLayout


def plane_contours(mask_plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours of one 2-D boolean plane, as (n, 2) arrays of (row, column) index."""
    m = np.pad(np.asarray(mask_plane, dtype=np.float64), 1)
    if not m.any():
        return []
    gen = contourpy.contour_generator(z=m, line_type=contourpy.LineType.Separate,
                                      corner_mask=False)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64)  # (x = column, y = row) in padded index
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        out.append(np.stack([pts[:, 1] - 1.0, pts[:, 0] - 1.0], axis=1))
    return out


def mask_contours(mask: np.ndarray, layout: SliceLayout) -> list[tuple[int, np.ndarray]]:
    """(plane index, (n, 3) patient mm points) for every contour of a source-grid mask."""
    m = layout.reorient(np.asarray(mask, dtype=bool))
    out = []
    for k in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)):
        for rc in plane_contours(m[k]):
            idx = np.concatenate([np.full((len(rc), 1), float(k)), rc], axis=1)
            out.append((int(k), layout.grid.index_to_patient(idx)))
    return out
