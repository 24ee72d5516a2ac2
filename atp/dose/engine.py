"""The ``DoseEngine`` protocol every dose engine (ours or a vendor's) implements.

``influence(patient, beams, *, beamlet_size_mm=5.0, dose_grid_factor=2, margin_mm=5.0,
threshold=...) -> DoseInfluence``: Gy per MU of each beamlet on the dose grid
``patient.grid.downsampled(dose_grid_factor)``. ``beams`` is a list of
:class:`atp.dose.geometry.Beam` (isocentre None = default isocentre).

``aperture_dose(dij, apertures) -> dose_gy``: dose of MLC apertures with MU
(:mod:`atp.dose.aperture`), on the dij's dose grid.

Engines are found by name through :mod:`atp.dose.registry`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from atp.dose.influence import DoseInfluence


@runtime_checkable
class DoseEngine(Protocol):
    name: str

    def influence(self, patient, beams, *, beamlet_size_mm=5.0, dose_grid_factor: int = 2,
                  margin_mm: float = 5.0, threshold: float = ...) -> DoseInfluence:
        ...

    def aperture_dose(self, dij: DoseInfluence, apertures):
        ...
