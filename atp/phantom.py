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

from pathlib import Path

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


# --- AAPM TG-119 C-shape ------------------------------------------------------------------
# Ezzell et al. 2009 (Med Phys 36:5359), test "C-shape": a C-shaped target (OuterTarget)
# wrapped around a central cylindrical avoidance structure (Core) in a water-equivalent
# slab phantom. Dimensions follow pyRadPlan 0.5.0's TG119 phantom (matRad's TG119.mat,
# measured from its masks): slab 300 mm (left-right) x 150 mm (AP) x 300 mm (long), Core a
# cylinder of 10 mm radius and 100 mm length, OuterTarget the shell 15-37 mm from the
# Core's axis (a 5 mm gap between Core and target), 80 mm long, covering the anterior
# side and both lateral sides down to 8 mm posterior of the axis (the C opens
# posteriorly). 50 Gy in 25 fractions to the OuterTarget.
TG119_NAME = "tg119"
TG119_TARGET, TG119_CORE, TG119_BODY = "OuterTarget", "Core", "BODY"
TG119_RX_GY, TG119_FRACTIONS = 50.0, 25
TG119_SPACING_MM = (2.5, 3.0, 3.0)  # (z, y, x), pyRadPlan's TG119 CT
TG119_GEOMETRY_MM = {"body_x": 300.0, "body_y": 150.0, "body_z": 300.0,
                     "core_radius": 10.0, "core_length": 100.0, "target_inner": 15.0,
                     "target_outer": 37.0, "target_length": 80.0, "target_y_max": 8.0}


def tg119_grid(spacing_mm=TG119_SPACING_MM) -> Grid:
    """A grid holding the slab with 15 mm of air around it (10 mm beyond its ends),
    an odd number of voxels per axis so the Core's axis passes through voxel centres."""
    g = TG119_GEOMETRY_MM
    spacing = np.asarray(spacing_mm, dtype=float)
    extent = np.array([g["body_z"] + 20.0, g["body_y"] + 30.0, g["body_x"] + 30.0])
    shape = 2 * np.ceil(extent / spacing / 2.0).astype(int) + 1
    return phantom_grid(tuple(int(n) for n in shape), tuple(spacing))


def tg119_phantom(spacing_mm=TG119_SPACING_MM) -> Patient:
    """The TG-119 C-shape phantom (module comment above) on a grid of ``spacing_mm``
    (z, y, x); deterministic."""
    g = TG119_GEOMETRY_MM
    grid = tg119_grid(spacing_mm)
    pts = grid.voxel_centres_mm().reshape(*grid.shape, 3)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    eps = 1e-6  # voxel centres on a boundary count as inside
    body = ((np.abs(x) <= g["body_x"] / 2 + eps) & (np.abs(y) <= g["body_y"] / 2 + eps)
            & (np.abs(z) <= g["body_z"] / 2 + eps))
    r = np.hypot(x, y)
    core = (r <= g["core_radius"] + eps) & (np.abs(z) <= g["core_length"] / 2 + eps)
    target = ((r >= g["target_inner"] - eps) & (r <= g["target_outer"] + eps)
              & (y <= g["target_y_max"] + eps) & (np.abs(z) <= g["target_length"] / 2 + eps))
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)  # water; air outside
    structures = {n: Structure(n, m, role) for n, m, role in (
        (TG119_BODY, body, Role.EXTERNAL), (TG119_TARGET, target, Role.TARGET),
        (TG119_CORE, core, Role.ORGAN))}
    rx = (Prescription(TG119_TARGET, TG119_RX_GY, TG119_FRACTIONS),)
    return Patient(ct, grid, structures, rx, patient_id="TG119",
                   metadata={"format": "phantom",
                             "description": "AAPM TG-119 C-shape phantom"},
                   source="<TG-119 phantom>")


def prescription_yaml(patient: Patient) -> str:
    """The ``prescription.yaml`` sidecar text for ``patient``'s prescriptions."""
    lines = [f"# prescription of {patient.patient_id} (atp.io.prescription sidecar)",
             f"fractions: {patient.fractions}", "targets:"]
    lines += [f"  {p.target}: {p.dose_gy:g}" for p in patient.prescriptions]
    return "\n".join(lines) + "\n"


def write_dicom_case(patient: Patient, folder) -> dict:
    """Write ``patient`` as a DICOM CT series (``CT/``), an RT Structure Set
    (``RS.<id>.dcm``: RTROIInterpretedType PTV for targets, ORGAN, EXTERNAL) and a
    ``prescription.yaml`` sidecar into ``folder`` (which must exist): a case that
    ``atp plan FOLDER`` reads like any DICOM export. Returns {kind: path(s)}."""
    from atp.io.dicom_export import (  # lazy: pydicom only for this writer
        export_context,
        export_ct_series,
        export_rt_struct,
    )
    from atp.outputs import atomic_write_bytes  # lazy: as above, writers only

    out = Path(folder)
    ctx = export_context(patient)
    ct = export_ct_series(_mkdir(out / "CT"), patient, ctx)
    rs = export_rt_struct(out / f"RS.{patient.patient_id}.dcm", patient, ctx)
    rx = out / "prescription.yaml"
    atomic_write_bytes(rx, prescription_yaml(patient).encode())
    return {"CT": [str(p) for p in ct], "RTSTRUCT": str(rs), "prescription": str(rx)}


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


PHANTOMS = {TG119_NAME: tg119_phantom}
