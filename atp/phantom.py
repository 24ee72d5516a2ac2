"""The embedded default case: a deterministic head-and-neck-like phantom built in code.

No data file is needed, so ``atp demo`` works for a user who has nothing. Layout
(patient LPS mm, isocentre region at the origin):

* an elliptical neck/head outline (External), water-equivalent soft tissue (0 HU);
* vertebral body (bone, +700 HU) with the SpinalCord inside the canal, Brainstem above;
* an air column (trachea, -1000 HU) anterior to the Esophagus; Larynx; Bone_Mandible;
* Parotid_L / Parotid_R laterally (parallel organs);
* PTV_56: a C-shaped elective volume wrapping around the cord (TG-119 C-shape style,
  needs a concave dose), PTV_70: the primary inside its anterior-left part.
Prescriptions 70 Gy and 56 Gy in 35 fractions.

Arrays are (slice, row, column) = (+z, +y, +x); default 40 x 64 x 64 voxels of
3 x 4 x 4 mm.
"""

from __future__ import annotations

import numpy as np

from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure

PHANTOM_DIRECTION = np.array([[0.0, 0.0, 1.0],  # columns: axis0 -> +z, axis1 -> +y,
                              [0.0, 1.0, 0.0],  # axis2 -> +x
                              [1.0, 0.0, 0.0]])


def phantom_grid(shape=(40, 64, 64), spacing_mm=(3.0, 4.0, 4.0)) -> Grid:
    spacing = np.asarray(spacing_mm, dtype=float)
    centre_index = (np.asarray(shape) - 1) / 2.0
    origin = -(PHANTOM_DIRECTION @ (centre_index * spacing))
    return Grid(tuple(shape), spacing, origin, PHANTOM_DIRECTION)


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def head_neck_phantom(shape=(40, 64, 64), spacing_mm=(3.0, 4.0, 4.0)) -> Patient:
    """Build the default phantom patient (deterministic; same inputs -> same arrays)."""
    grid = phantom_grid(shape, spacing_mm)
    pts = grid.voxel_centres_mm().reshape(*shape, 3)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    z_top = z.max()

    # body: ellipse 150 x 120 mm, a little wider towards the head
    widen = 1.0 + 0.15 * np.clip((z - 0.0) / max(z_top, 1.0), 0, 1)
    body = (x / (75.0 * widen)) ** 2 + ((y - 5.0) / 60.0) ** 2 <= 1.0

    cord_c = (0.0, 30.0)
    r_cord = np.hypot(x - cord_c[0], y - cord_c[1])
    cord = (r_cord <= 5.0) & (z < 0.55 * z_top)
    brainstem = (np.hypot(x, y - 22.0) <= 10.0) & (z >= 0.55 * z_top) & body
    vertebra = (np.hypot(x, y - 22.0) <= 16.0) & ~(r_cord <= 7.0) & (z < 0.55 * z_top)
    vertebra |= (np.hypot(x, y - 45.0) <= 9.0) & (r_cord > 7.0) & (z < 0.55 * z_top)
    trachea = (np.hypot(x, y + 20.0) <= 7.0) & (z < 0.1 * z_top)
    esophagus = (np.hypot(x, y - 2.0) <= 6.0) & (z < 0.2 * z_top) & ~trachea
    larynx = _ellipsoid(x, y, z, (0.0, -28.0, 0.25 * z_top), (14.0, 10.0, 12.0)) & ~trachea
    parotid_l = _ellipsoid(x, y, z, (48.0, 0.0, 0.6 * z_top), (12.0, 16.0, 18.0)) & body
    parotid_r = _ellipsoid(x, y, z, (-48.0, 0.0, 0.6 * z_top), (12.0, 16.0, 18.0)) & body
    jaw_r = np.hypot(x / 1.2, y + 5.0)
    mandible = (jaw_r >= 42.0) & (jaw_r <= 50.0) & (y < 0.0) & (z > 0.45 * z_top) & body

    # targets: C-shaped elective volume around the cord, primary in its anterior-left part
    c_shape = (r_cord >= 15.0) & (r_cord <= 42.0) & (y < 42.0) & (np.abs(z) <= 0.55 * z_top)
    ptv70 = _ellipsoid(x, y, z, (18.0, -4.0, 0.0), (22.0, 18.0, 0.3 * z_top + 10.0))
    ptv70 &= body & ~cord & ~vertebra
    ptv56 = c_shape & body & ~ptv70 & ~mandible

    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = 20.0  # soft tissue
    ct[vertebra & body] = 700.0
    ct[mandible] = 900.0
    ct[trachea & body] = -1000.0

    masks = [
        ("External", body, Role.EXTERNAL),
        ("PTV_70", ptv70, Role.TARGET),
        ("PTV_56", ptv56, Role.TARGET),
        ("SpinalCord", cord & body, Role.ORGAN),
        ("Brainstem", brainstem, Role.ORGAN),
        ("Parotid_L", parotid_l, Role.ORGAN),
        ("Parotid_R", parotid_r, Role.ORGAN),
        ("Larynx", larynx & body, Role.ORGAN),
        ("Esophagus", esophagus & body, Role.ORGAN),
        ("Bone_Mandible", mandible, Role.ORGAN),
    ]
    structures = {n: Structure(n, m, r) for n, m, r in masks}
    rx = (Prescription("PTV_70", 70.0, 35), Prescription("PTV_56", 56.0, 35))
    return Patient(ct, grid, structures, rx, patient_id="atp-phantom-hn",
                   metadata={"format": "phantom", "description": "embedded default case"},
                   source="<embedded phantom>")
