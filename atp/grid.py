"""Voxel grids and the one place where array indices and patient coordinates meet.

A :class:`Grid` maps a continuous array index ``(i0, i1, i2)`` (voxel centres at
integer indices, axes in the array's own order) to patient coordinates in mm in the
DICOM patient system (LPS: +x towards the patient's left, +y posterior, +z superior):

    p_mm = origin_mm + direction @ (spacing_mm * index)

``direction[:, a]`` is the unit vector, in patient coordinates, along which array axis
``a`` runs. ``origin_mm`` is the centre of voxel (0, 0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from atp.errors import GridMismatchError


def _frozen(a, dtype=np.float64) -> np.ndarray:
    arr = np.array(a, dtype=dtype, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Grid:
    """Geometry of a 3-D voxel array.

    shape: number of voxels per array axis.
    spacing_mm: voxel size along each array axis, mm.
    origin_mm: patient coordinate (mm, LPS) of the centre of voxel (0, 0, 0).
    direction: 3x3 matrix, column a = patient-space unit vector of array axis a.
    """

    shape: tuple[int, int, int]
    spacing_mm: np.ndarray
    origin_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise GridMismatchError(f"grid shape must be 3 positive ints, got {self.shape}",
                                    field="shape")
        object.__setattr__(self, "shape", shape)
        spacing = _frozen(self.spacing_mm)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise GridMismatchError(f"voxel spacing must be 3 positive mm values, got {spacing}",
                                    field="spacing_mm")
        object.__setattr__(self, "spacing_mm", spacing)
        origin = _frozen(self.origin_mm)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise GridMismatchError(f"origin must be 3 finite mm values, got {origin}",
                                    field="origin_mm")
        object.__setattr__(self, "origin_mm", origin)
        direction = _frozen(self.direction)
        if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3),
                                                       atol=1e-4):
            raise GridMismatchError("direction must be an orthonormal 3x3 matrix",
                                    field="direction")
        object.__setattr__(self, "direction", direction)

    # --- sizes -------------------------------------------------------------------------
    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm^3 (cc)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous index coordinates to patient mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing_mm[None, :]
        m[:3, 3] = self.origin_mm
        return m

    # --- conversions (the only place index <-> patient lives) --------------------------
    def index_to_patient(self, index) -> np.ndarray:
        """Continuous index (..., 3) in array-axis order -> patient mm (..., 3)."""
        idx = np.asarray(index, dtype=np.float64)
        return self.origin_mm + (idx * self.spacing_mm) @ self.direction.T

    def patient_to_index(self, point_mm) -> np.ndarray:
        """Patient mm (..., 3) -> continuous index (..., 3) (voxel centres at integers)."""
        p = np.asarray(point_mm, dtype=np.float64) - self.origin_mm
        return (p @ self.direction) / self.spacing_mm

    def axis_coords_mm(self, axis: int) -> np.ndarray:
        """Distances (mm) of voxel centres along one array axis from voxel 0."""
        return np.arange(self.shape[axis]) * self.spacing_mm[axis]

    def voxel_centres_mm(self) -> np.ndarray:
        """All voxel centres in patient mm, shape (n_voxels, 3), C order."""
        idx = np.indices(self.shape, dtype=np.float64).reshape(3, -1).T
        return self.index_to_patient(idx)

    def contains_point(self, point_mm) -> bool:
        idx = self.patient_to_index(point_mm)
        return bool(np.all(idx >= -0.5) and np.all(idx <= np.array(self.shape) - 0.5))

    # --- comparison --------------------------------------------------------------------
    def same_as(self, other: Grid, tol_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-6)
        )

    def check_array(self, array: np.ndarray, *, file=None, field: str = "array") -> None:
        """Raise GridMismatchError unless ``array`` has this grid's shape."""
        if tuple(np.shape(array)) != self.shape:
            raise GridMismatchError(
                f"array shape {tuple(np.shape(array))} does not match the patient grid "
                f"{self.shape}", file=file, field=field)

    def downsampled(self, factor: int) -> Grid:
        """A coarser grid covering the same region: every ``factor``-th voxel block.

        Voxel (j) of the coarse grid has its centre at the centre of the block of fine
        voxels [j*factor, (j+1)*factor). Used for dose grids coarser than the CT.
        """
        if factor < 1:
            raise ValueError("factor must be >= 1")
        shape = tuple(int(np.ceil(s / factor)) for s in self.shape)
        offset = (factor - 1) / 2.0
        origin = self.index_to_patient(np.full(3, offset))
        return Grid(shape, self.spacing_mm * factor, origin, self.direction)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing_mm": self.spacing_mm.tolist(),
            "origin_mm": self.origin_mm.tolist(),
            "direction": self.direction.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(tuple(d["shape"]), d["spacing_mm"], d.get("origin_mm", (0, 0, 0)),
                   d.get("direction", np.eye(3)))
