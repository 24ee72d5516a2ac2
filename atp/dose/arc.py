"""Beamlet matrices for VMAT arcs: one beam per control point, compressed to fit memory.

An arc is a list of control points (:func:`atp.dose.geometry.arc_control_points`, 2 deg
apart by default); each control point is computed as a static beam at the centre of
its sector, and its beamlets become the columns of that control point
(``beamlets.beam_index`` = control-point index). A full arc has 180 control points, so
the matrix is ~20 times a 9-beam IMRT matrix; it is kept in memory by

* a coarser dose grid (default ``ARC_DOSE_GRID_FACTOR`` = 3: 11.7 x 11.7 x 7.5 mm voxels
  on an OpenKBP CT), and
* a higher sparsification threshold (default ``ARC_THRESHOLD`` = 3e-4 of each control
  point's peak; at 1e-4 the 9-beam matrix drops 0.7 % of the integral dose, at 3e-4
  about 2.6 %, see BENCHMARKS.md),

both overridable. BENCHMARKS.md lists the measured size and peak memory of a
180-control-point arc on an OpenKBP patient.
"""

from __future__ import annotations

from atp.dose import registry
from atp.dose.geometry import arc_control_points
from atp.dose.influence import DoseInfluence

ARC_DOSE_GRID_FACTOR = 3
ARC_THRESHOLD = 3e-4


def arc_influence(patient, control_points=None, *, engine=None,
                  dose_grid_factor: int = ARC_DOSE_GRID_FACTOR,
                  threshold: float = ARC_THRESHOLD, beamlet_size_mm=5.0,
                  margin_mm: float = 5.0, progress=None) -> DoseInfluence:
    """Per-control-point dose-influence matrix of an arc (default: full 360 deg arc at
    2 deg, starting at 180 deg clockwise). ``engine``: anything the dose-engine
    registry accepts (default ``"pencil-beam"``)."""
    if control_points is None:
        control_points = arc_control_points(180.0, 180.0, 2.0)
    eng = registry.get(engine)
    dij = eng.influence(patient, control_points, beamlet_size_mm=beamlet_size_mm,
                        dose_grid_factor=dose_grid_factor, margin_mm=margin_mm,
                        threshold=threshold, progress=progress)
    meta = dict(dij.meta)
    meta.update({"arc": True, "control_points": len(control_points)})
    return DoseInfluence(dij.matrix, dij.beamlets, dij.dose_grid, dij.patient_grid, meta,
                         far=dij.far)
