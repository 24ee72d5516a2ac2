"""Image-plane geometry for DICOM export: put any of our grids into slice/row/column order.

DICOM images are stacks of planes: column index along the row direction cosine (first
triplet of ImageOrientationPatient), row index along the column cosine, planes along the
normal. :func:`slice_layout` finds the array-axis permutation and flips that bring a grid
into that order with planes along +normal (for axis-aligned grids: planes along +z, rows
along +y, columns along +x, i.e. IOP = [1,0,0, 0,1,0]), and gives per-plane positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp.errors import GridMismatchError
from atp.grid import Grid


@dataclass(frozen=True, eq=False)
class SliceLayout:
    perm: tuple[int, int, int]  # source array axes in (plane, row, column) order
    flip: tuple[bool, bool, bool]  # flip after the permutation
    grid: Grid  # the reoriented grid (axes: plane, row, column)
    source_plane_index: np.ndarray  # (n_planes,) original index along perm[0]

    def reorient(self, array: np.ndarray) -> np.ndarray:
        """An array on the source grid -> (planes, rows, columns)."""
        a = np.transpose(np.asarray(array), self.perm)
        for ax, f in enumerate(self.flip):
            if f:
                a = np.flip(a, axis=ax)
        return np.ascontiguousarray(a)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient: row cosine (column axis), then column cosine (row axis)."""
        d = self.grid.direction
        return [float(v) + 0.0 for v in np.concatenate([d[:, 2], d[:, 1]])]

    @property
    def pixel_spacing_mm(self) -> list[float]:
        """PixelSpacing: (row spacing, column spacing)."""
        return [float(self.grid.spacing_mm[1]), float(self.grid.spacing_mm[2])]

    @property
    def slice_spacing_mm(self) -> float:
        return float(self.grid.spacing_mm[0])

    def plane_position_mm(self, k: int) -> np.ndarray:
        """ImagePositionPatient of plane k (centre of its first voxel)."""
        return self.grid.index_to_patient(np.array([k, 0.0, 0.0]))


def slice_layout(grid: Grid) -> SliceLayout:
    """Reorder a grid's axes so planes run along +z (or the normal closest to it), rows
    along +y and columns along +x. Oblique grids are kept oblique; a grid whose axes cannot
    form a right-handed plane stack raises GridMismatchError."""
    d = grid.direction
    targets = (2, 1, 0)  # plane ~ z, row ~ y, column ~ x (patient axes)
    perm = []
    for t in targets:
        scores = [abs(d[t, a]) if a not in perm else -1.0 for a in range(3)]
        perm.append(int(np.argmax(scores)))
    flip = tuple(bool(d[t, a] < 0) for t, a in zip(targets, perm))
    new_dir = np.stack([d[:, a] * (-1.0 if f else 1.0) for a, f in zip(perm, flip)], axis=1)
    if not np.allclose(np.cross(new_dir[:, 2], new_dir[:, 1]), new_dir[:, 0], atol=1e-4):
        raise GridMismatchError("grid axes do not form a right-handed image stack; cannot "
                                "export as DICOM planes", field="direction")
    shape = tuple(grid.shape[a] for a in perm)
    spacing = np.array([grid.spacing_mm[a] for a in perm])
    # origin: the source index of the new (0, 0, 0)
    src = np.zeros(3)
    for ax, (a, f) in enumerate(zip(perm, flip)):
        src[a] = grid.shape[a] - 1 if f else 0
    origin = grid.index_to_patient(src)
    new = Grid(shape, spacing, origin, new_dir)
    n0 = grid.shape[perm[0]]
    planes = np.arange(n0)[::-1] if flip[0] else np.arange(n0)
    return SliceLayout(tuple(perm), flip, new, planes)
