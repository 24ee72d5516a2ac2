"""Arc dij: one beam per control point, arc defaults, CLI --arc."""

from __future__ import annotations

import numpy as np

from atp.dose.arc import ARC_DOSE_GRID_FACTOR, ARC_THRESHOLD, arc_influence
from atp.dose.geometry import arc_control_points


def test_arc_influence_per_control_point(phantom):
    cps = arc_control_points(0, 80, 20)  # 4 control points at 10, 30, 50, 70 deg
    dij = arc_influence(phantom, cps)
    assert dij.beamlets.n_beams == 4
    np.testing.assert_allclose(dij.beamlets.gantry_deg, [10, 30, 50, 70])
    assert set(np.unique(dij.beamlets.beam_index)) == {0, 1, 2, 3}
    assert dij.meta["arc"] is True and dij.meta["control_points"] == 4
    assert dij.meta["threshold"] == ARC_THRESHOLD
    assert dij.dose_grid.same_as(phantom.grid.downsampled(ARC_DOSE_GRID_FACTOR))
    # every control point irradiates the primary target
    ptv = dij.patient_dose(np.ones(dij.n_beamlets))[phantom.mask("PTV_70")]
    assert ptv.min() > 0
