"""The patient model: CT, grid, structures with roles, prescriptions. Immutable.

Array axes: every 3-D array of a :class:`Patient` (CT, masks, any dose on the patient
grid) has the patient's ``grid.shape`` in the grid's own array-axis order; the
:class:`~atp.grid.Grid` says how each axis maps to patient coordinates (LPS, mm).
For OpenKBP data the axes are (rows = y anterior->posterior, columns = x right->left,
slices = z); for DICOM import they are (slices = z, rows = y, columns = x).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import numpy as np

from atp.errors import InputError, StructureError
from atp.grid import Grid


class Role(str, Enum):
    """What a structure is for in planning."""

    TARGET = "target"
    ORGAN = "organ"  # organ at risk
    CONTROL = "control"  # helper structure: ring, optimisation structure
    EXTERNAL = "external"  # body outline / where dose may be non-zero


@dataclass(frozen=True, eq=False)
class Structure:
    """One region of interest: canonical name, boolean mask on the patient grid, role."""

    name: str
    mask: np.ndarray
    role: Role = Role.ORGAN
    original_name: str | None = None  # name as found in the source data

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.dtype != bool:
            if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
                raise StructureError("mask contains NaN/inf", field=self.name)
            m = m != 0
        m = np.array(m, dtype=bool, copy=True)
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        object.__setattr__(self, "role", Role(self.role))

    @property
    def n_voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    def volume_cc(self, grid: Grid) -> float:
        return self.n_voxels * grid.voxel_volume_cc


@dataclass(frozen=True)
class Prescription:
    """Prescribed dose to one target: total dose in Gy over ``fractions`` fractions."""

    target: str
    dose_gy: float
    fractions: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.dose_gy) and self.dose_gy > 0):
            raise InputError(f"prescription dose must be > 0 Gy, got {self.dose_gy}",
                             field=f"prescription.{self.target}")
        if int(self.fractions) < 1:
            raise InputError(f"fractions must be >= 1, got {self.fractions}",
                             field=f"prescription.{self.target}")
        object.__setattr__(self, "fractions", int(self.fractions))
        object.__setattr__(self, "dose_gy", float(self.dose_gy))

    @property
    def dose_per_fraction_gy(self) -> float:
        return self.dose_gy / self.fractions


@dataclass(frozen=True, eq=False)
class Patient:
    """Everything atp knows about one patient, read-only.

    ct_hu: float32 CT in Hounsfield units on ``grid``.
    grid: geometry of ct_hu and of every mask.
    structures: canonical name -> Structure (masks on ``grid``).
    prescriptions: one per target, highest dose first.
    patient_id: identifier (from the source data, or made up for phantoms).
    metadata: free-form (source path, DICOM UIDs, ...).
    """

    ct_hu: np.ndarray
    grid: Grid
    structures: Mapping[str, Structure]
    prescriptions: tuple[Prescription, ...] = ()
    patient_id: str = "anonymous"
    metadata: Mapping[str, object] = field(default_factory=dict)
    source: str | None = None  # file/folder it came from, for error messages

    def __post_init__(self) -> None:
        ct = np.array(self.ct_hu, dtype=np.float32, copy=True)
        self.grid.check_array(ct, file=self.source, field="ct")
        if not np.all(np.isfinite(ct)):
            raise InputError("CT contains NaN/inf values", file=self.source, field="ct")
        ct.setflags(write=False)
        object.__setattr__(self, "ct_hu", ct)
        structs = {}
        for name, s in dict(self.structures).items():
            if s.name != name:
                raise StructureError(f"structure key '{name}' != its name '{s.name}'",
                                     file=self.source, field=name)
            self.grid.check_array(s.mask, file=self.source, field=f"structure {name}")
            structs[name] = s
        object.__setattr__(self, "structures", MappingProxyType(structs))
        rx = tuple(sorted(self.prescriptions, key=lambda p: -p.dose_gy))
        for p in rx:
            if p.target not in structs:
                raise StructureError(
                    f"prescription refers to missing structure '{p.target}'; "
                    f"structures: {sorted(structs)}", file=self.source, field=p.target)
            if structs[p.target].n_voxels == 0:
                raise StructureError(f"target '{p.target}' has an empty mask",
                                     file=self.source, field=p.target)
        object.__setattr__(self, "prescriptions", rx)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    # --- lookups -----------------------------------------------------------------------
    def structure(self, name: str) -> Structure:
        try:
            return self.structures[name]
        except KeyError:
            raise StructureError(
                f"unknown structure '{name}'; this patient has {sorted(self.structures)}",
                file=self.source, field=name) from None

    def mask(self, name: str) -> np.ndarray:
        return self.structure(name).mask

    def names(self, role: Role | str | None = None) -> list[str]:
        if role is None:
            return list(self.structures)
        role = Role(role)
        return [n for n, s in self.structures.items() if s.role == role]

    @property
    def targets(self) -> list[str]:
        """Target names, highest prescription first (then unprescribed targets)."""
        rx = [p.target for p in self.prescriptions]
        return rx + [n for n in self.names(Role.TARGET) if n not in rx]

    @property
    def organs(self) -> list[str]:
        return self.names(Role.ORGAN)

    @property
    def body_mask(self) -> np.ndarray:
        """The external structure's mask, or (CT > -500 HU) when there is none."""
        ext = self.names(Role.EXTERNAL)
        if ext:
            return self.structures[ext[0]].mask
        return self.ct_hu > -500.0

    def prescription_for(self, target: str) -> Prescription | None:
        for p in self.prescriptions:
            if p.target == target:
                return p
        return None

    @property
    def max_prescription_gy(self) -> float:
        if not self.prescriptions:
            raise InputError("patient has no prescription", file=self.source,
                             field="prescriptions")
        return self.prescriptions[0].dose_gy

    @property
    def fractions(self) -> int | None:
        return self.prescriptions[0].fractions if self.prescriptions else None

    def prescription_map_gy(self) -> np.ndarray:
        """Per voxel, the highest prescription (Gy) of any target containing it, else 0."""
        out = np.zeros(self.grid.shape, dtype=np.float32)
        for p in sorted(self.prescriptions, key=lambda p: p.dose_gy):
            out[self.structures[p.target].mask] = p.dose_gy
        return out

    def target_centroid_mm(self, target: str | None = None) -> np.ndarray:
        """Centre of mass (patient mm) of a target (default: highest-dose target)."""
        name = target or (self.targets[0] if self.targets else None)
        if name is None:
            raise StructureError("patient has no target", file=self.source, field="targets")
        idx = np.argwhere(self.mask(name))
        if idx.size == 0:
            raise StructureError(f"target '{name}' is empty", file=self.source, field=name)
        return self.grid.index_to_patient(idx.mean(axis=0))

    # --- derivation --------------------------------------------------------------------
    def with_structures(self, extra: Mapping[str, Structure]) -> Patient:
        """A new Patient with structures added or replaced (e.g. rings)."""
        merged = dict(self.structures)
        merged.update(extra)
        return Patient(self.ct_hu, self.grid, merged, self.prescriptions, self.patient_id,
                       self.metadata, self.source)

    def summary(self) -> dict:
        """Plain-data description (what ``atp info --json`` prints)."""
        return {
            "patient_id": self.patient_id,
            "source": self.source,
            "grid": self.grid.to_dict(),
            "voxel_volume_cc": self.grid.voxel_volume_cc,
            "structures": [
                {"name": n, "role": s.role.value, "original_name": s.original_name,
                 "voxels": s.n_voxels, "volume_cc": round(s.volume_cc(self.grid), 3)}
                for n, s in self.structures.items()
            ],
            "prescriptions": [
                {"target": p.target, "dose_gy": p.dose_gy, "fractions": p.fractions}
                for p in self.prescriptions
            ],
        }
