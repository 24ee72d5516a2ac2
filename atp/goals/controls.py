"""Control structures that goals build themselves: fall-off rings and the body.

A ring around target T from ``inner_mm`` to ``outer_mm`` holds the body voxels that are
outside every target and whose centre lies at a distance d from the nearest voxel
centre of T with ``inner_mm < d <= outer_mm`` (Euclidean, in mm, using the grid's voxel
spacing per array axis; exact distance transform), minus the voxels within
``outer_mm`` of any target prescribed higher than T (their fall-off belongs to the
higher level's ring). The body is the patient's external
structure, or CT > -500 HU when there is none (:attr:`atp.patient.Patient.body_mask`).

:func:`with_control_structures` adds these masks to a patient as CONTROL structures
under the names that resolved goals use, so later stages can treat them like any other
structure.
"""

from __future__ import annotations

import weakref

import numpy as np
from scipy import ndimage

from atp.errors import StructureError
from atp.patient import Role, Structure

_DIST_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def distance_to_mm(patient, target: str, within_mm: float | None = None) -> np.ndarray:
    """Distance (mm) from every voxel centre to the nearest voxel centre of ``target``.

    within_mm: only distances up to this matter to the caller; the transform then runs
    on the target's bounding box grown by that much (every voxel within ``within_mm`` of
    the target lies inside it, and so does every target voxel, so distances there are
    exact), and the voxels outside get +inf (their true distance is > ``within_mm``)."""
    per_patient = _DIST_CACHE.setdefault(patient, {})
    key = (target, None if within_mm is None else float(within_mm))
    if key not in per_patient:
        mask = patient.mask(target)
        if not mask.any():
            raise StructureError(f"target '{target}' is empty", file=patient.source,
                                 field=target)
        spacing = np.asarray(patient.grid.spacing_mm, dtype=float)
        if within_mm is None:
            d = ndimage.distance_transform_edt(~mask, sampling=spacing)
        else:
            pad = np.ceil(float(within_mm) / spacing).astype(int) + 1
            nz = np.nonzero(mask)
            box = tuple(slice(max(int(i.min()) - p, 0), min(int(i.max()) + p + 1, n))
                        for i, p, n in zip(nz, pad, mask.shape))
            d = np.full(mask.shape, np.inf, dtype=np.float32)
            d[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
        per_patient[key] = d.astype(np.float32, copy=False)
    return per_patient[key]


def ring_name(target: str, inner_mm: float, outer_mm: float) -> str:
    """Name of a ring structure (TG-263 style helper name starting with 'Ring')."""
    return f"Ring_{target}_{inner_mm:g}-{outer_mm:g}mm"


def ring_mask(patient, target: str, inner_mm: float, outer_mm: float) -> np.ndarray:
    """Shell around ``target`` (see the module docstring); may be empty."""
    d = distance_to_mm(patient, target, within_mm=outer_mm)
    all_targets = np.zeros(patient.grid.shape, dtype=bool)
    for t in patient.targets:
        all_targets |= patient.mask(t)
    ring = (d > inner_mm) & (d <= outer_mm) & ~all_targets & patient.body_mask
    rx = patient.prescription_for(target)
    if rx is not None:  # the fall-off of a higher dose level is that level's ring's job
        for p in patient.prescriptions:
            if p.dose_gy > rx.dose_gy:
                ring &= distance_to_mm(patient, p.target, within_mm=outer_mm) > outer_mm
    return ring


def body_name(patient) -> str:
    ext = patient.names(Role.EXTERNAL)
    return ext[0] if ext else "Body"


def goal_mask(goal, patient) -> np.ndarray:
    """The voxels a resolved goal is measured on (rings and the body built here)."""
    control = goal.params.get("control")
    if control == "ring":
        return ring_mask(patient, goal.params["around"], goal.params["inner_mm"],
                         goal.params["outer_mm"])
    if control == "global_max" and goal.structure not in patient.structures:
        return patient.body_mask
    return patient.mask(goal.structure)


def with_control_structures(patient, resolved_goals):
    """The patient plus every ring / body structure the resolved goals refer to."""
    extra = {}
    for g in resolved_goals:
        if g.params.get("control") in ("ring", "global_max") and \
                g.structure not in patient.structures and g.structure not in extra:
            extra[g.structure] = Structure(g.structure, goal_mask(g, patient), Role.CONTROL)
    return patient.with_structures(extra) if extra else patient
