"""A square field's central-axis dose through a dose-influence matrix.

For the tests and benchmarks that check the pencil-beam engine's dij against its beam model
(``tests/test_far_scatter.py``, ``test_dose_physics.py``, ``test_beam_model.py``,
``benchmarks/engine_vs_model.py``, ``benchmarks/slab_heterogeneity.py``, which puts this
folder on ``sys.path``): beam 0 at gantry 0, its central axis along the dose grid's y axis
through the middle of the grid in x and z.
"""

from __future__ import annotations

import numpy as np

from atp.dose.aperture import aperture_beamlet_weights


def square_field_cax(dij, half_mm: float, *, leaf_mm: float = 5.0, mu: float = 1.0):
    """``(y_mm, cax_gy, weights)`` of a (2 ``half_mm``)² field on beam 0 of ``dij``.

    The field: leaf pairs ``leaf_mm`` wide from -250 to 250 mm, those inside
    ``|y| <= half_mm`` open from ``-half_mm`` to ``half_mm`` (the others closed), ``mu``
    MU (:func:`atp.dose.aperture.aperture_beamlet_weights`). ``cax_gy`` is the dose along
    the grid's y axis (``y_mm``: voxel centres), the mean of the four voxel columns that
    touch the central axis.
    """
    edges = np.arange(-250.0, 250.1, leaf_mm)
    inside = (edges[:-1] >= -half_mm - 1e-6) & (edges[1:] <= half_mm + 1e-6)
    w = aperture_beamlet_weights(dij.beamlets, 0, edges, np.where(inside, -half_mm, 0.0),
                                 np.where(inside, half_mm, 0.0), mu)
    d, g = dij.dose(w), dij.dose_grid
    y = g.origin_mm[1] + g.spacing_mm[1] * np.arange(g.shape[1])
    i, k = g.shape[0] // 2, g.shape[2] // 2  # the voxels touching the axis
    cax = 0.25 * (d[i - 1, :, k - 1] + d[i, :, k - 1] + d[i - 1, :, k] + d[i, :, k])
    return y, cax, w
