"""Beam geometry: IEC 61217 angles, isocentre, beam's-eye-view (BEV) frames.

Coordinates
-----------
Patient coordinates are DICOM LPS in mm (+x patient left, +y posterior, +z superior);
the patient lies head-first supine (HFS), so the IEC 61217 fixed system maps onto LPS as

    X_f (towards the patient's left)  = +x
    Y_f (towards the gantry)          = +z
    Z_f (up, anterior)                = -y

Gantry angle theta rotates the gantry system about Y_f (right-hand rule): at couch 0 the
source sits at ``iso + SAD * (sin theta, -cos theta, 0)`` (LPS), so theta = 0 irradiates
from anterior and theta = 90 from the patient's left. The collimator (beam limiting
device, BLD) angle phi rotates about the gantry Z_g axis (which points from the
isocentre towards the source); the couch angle psi rotates the patient support about the
vertical Z_f axis (both right-hand rule, degrees, IEC 61217).

BEV axes (what every beamlet position refers to), at the isocentre plane (SAD 1000 mm):

* ``bev_x_mm``: along IEC BLD X_b = direction of MLC leaf travel. At gantry 0,
  collimator 0, couch 0 this is the patient's left (+x).
* ``bev_y_mm``: along IEC BLD Y_b = across leaf pairs. At gantry 0 / collimator 0 /
  couch 0 this is superior (+z).
* a point p projects to ``(u, v) = SAD / s * ((p - iso) . X_b, (p - iso) . Y_b)`` where
  ``s = SAD - (p - iso) . Z_b`` is its distance from the source along the beam axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp.errors import InputError, StructureError

SAD_MM = 1000.0  # source-axis distance of a standard C-arm linac, mm

# IEC fixed (X_f, Y_f, Z_f) -> LPS: columns are the LPS images of the IEC unit vectors
_IEC_TO_LPS = np.array([[1.0, 0.0, 0.0],
                        [0.0, 0.0, -1.0],
                        [0.0, 1.0, 0.0]])


def _check_angle(value, name: str) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number of degrees, got {value!r}",
                         field=name) from None
    if not np.isfinite(a) or a < 0.0 or a >= 360.0:
        raise InputError(f"{name} must be in [0, 360) degrees, got {value!r}", field=name)
    return a


@dataclass(frozen=True)
class Beam:
    """One static beam (or one arc control point).

    gantry_deg, collimator_deg, couch_deg: IEC 61217 angles in [0, 360) degrees.
    isocenter_mm: LPS mm, or None for "use the default isocentre of the patient"
    (:func:`default_isocenter`), filled in by :func:`resolve_beams`.
    """

    gantry_deg: float
    collimator_deg: float = 0.0
    couch_deg: float = 0.0
    isocenter_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gantry_deg", _check_angle(self.gantry_deg, "gantry_deg"))
        object.__setattr__(self, "collimator_deg",
                           _check_angle(self.collimator_deg, "collimator_deg"))
        object.__setattr__(self, "couch_deg", _check_angle(self.couch_deg, "couch_deg"))
        if self.isocenter_mm is not None:
            iso = np.asarray(self.isocenter_mm, dtype=np.float64).reshape(-1)
            if iso.shape != (3,) or not np.all(np.isfinite(iso)):
                raise InputError(f"isocentre must be 3 finite mm values, got "
                                 f"{self.isocenter_mm!r}", field="isocenter_mm")
            object.__setattr__(self, "isocenter_mm", tuple(float(v) for v in iso))

    def with_isocenter(self, iso_mm) -> Beam:
        return Beam(self.gantry_deg, self.collimator_deg, self.couch_deg,
                    tuple(float(v) for v in np.asarray(iso_mm).reshape(3)))

    def frame(self) -> BeamFrame:
        """The beam's coordinate frame in LPS (needs an isocentre)."""
        if self.isocenter_mm is None:
            raise InputError("beam has no isocentre; call resolve_beams(patient, beams)",
                             field="isocenter_mm")
        return beam_frame(self.gantry_deg, self.collimator_deg, self.couch_deg,
                          self.isocenter_mm)


@dataclass(frozen=True, eq=False)
class BeamFrame:
    """Orthonormal beam frame in patient LPS coordinates.

    x_axis: BLD X_b (leaf travel); y_axis: BLD Y_b (across leaf pairs);
    z_axis: Z_g, from the isocentre towards the source. source_mm = iso + SAD * z_axis.
    """

    isocenter_mm: np.ndarray
    x_axis: np.ndarray
    y_axis: np.ndarray
    z_axis: np.ndarray
    sad_mm: float = SAD_MM

    @property
    def source_mm(self) -> np.ndarray:
        return self.isocenter_mm + self.sad_mm * self.z_axis

    def project(self, points_mm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points (..., 3) LPS mm -> (u_mm, v_mm, s_mm): BEV position at the isocentre
        plane (u along X_b, v along Y_b) and distance from the source along the axis."""
        rel = np.asarray(points_mm, dtype=np.float64) - self.isocenter_mm
        s = self.sad_mm - rel @ self.z_axis
        scale = self.sad_mm / s
        return (rel @ self.x_axis) * scale, (rel @ self.y_axis) * scale, s

    def iso_plane_point(self, u_mm, v_mm) -> np.ndarray:
        """LPS mm of BEV point(s) (u, v) on the isocentre plane, shape (..., 3)."""
        u = np.asarray(u_mm, dtype=np.float64)[..., None]
        v = np.asarray(v_mm, dtype=np.float64)[..., None]
        return self.isocenter_mm + u * self.x_axis + v * self.y_axis


def _rot(axis: int, deg: float) -> np.ndarray:
    """Right-hand rotation matrix about IEC fixed axis 0=X, 1=Y, 2=Z."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def beam_frame(gantry_deg: float, collimator_deg: float = 0.0, couch_deg: float = 0.0,
               isocenter_mm=(0.0, 0.0, 0.0), sad_mm: float = SAD_MM) -> BeamFrame:
    """BEV frame for IEC 61217 angles (see module docstring), in LPS."""
    # gantry then collimator, expressed in IEC fixed coordinates
    g = _rot(1, gantry_deg)
    c = _rot(2, collimator_deg)
    bld = g @ c  # columns: X_b, Y_b, Z_b in IEC fixed
    # the patient turns with the couch: fixed-frame vectors seen in couch (patient) frame
    to_patient = _rot(2, couch_deg).T
    m = _IEC_TO_LPS @ to_patient @ bld
    m[np.abs(m) < 1e-15] = 0.0
    iso = np.asarray(isocenter_mm, dtype=np.float64).reshape(3)
    return BeamFrame(iso, m[:, 0].copy(), m[:, 1].copy(), m[:, 2].copy(), float(sad_mm))


BEAM_TEMPLATES = {  # name -> (number of equispaced coplanar beams, start gantry deg)
    "hn_9field": (9, 0.0),
    "hn_7field": (7, 0.0),
    "hn_5field": (5, 0.0),
}


def equispaced_beams(n: int, start_deg: float = 0.0) -> list[Beam]:
    """``n`` coplanar beams 360/n degrees apart starting at ``start_deg`` (IEC gantry)."""
    if int(n) != n or n < 1:
        raise InputError(f"number of beams must be a positive integer, got {n!r}",
                         field="beams")
    n = int(n)
    return [Beam(float((start_deg + i * 360.0 / n) % 360.0)) for i in range(n)]


#: an arc's dose is computed with one dose beam per this many degrees when its control
#: points are closer (a treatment-planning system's "dose calculation gantry spacing",
#: e.g. Pinnacle's 4 deg default): each control point's fluence goes to the dose beam at
#: its gantry angle rounded to a multiple of this (:func:`arc_dose_angles`)
ARC_DOSE_STEP_DEG = 4.0


def arc_dose_angles(gantry_deg, step_deg: float = ARC_DOSE_STEP_DEG) -> np.ndarray:
    """The dose-beam gantry angle of each control point of one beam: its own angle for
    a static field or an arc whose control points are all >= ``step_deg`` apart; else
    (e.g. a sliding-window arc sampled every degree) rounded to a multiple of
    ``step_deg``, so neighbouring control points share a dose beam (the angle error at
    most ``step_deg / 2``). The plan's reported dose and ``atp dose`` of its RT Plan both
    group control points by this."""
    g = np.asarray(gantry_deg, dtype=np.float64) % 360.0
    steps = np.abs((np.diff(g) + 180.0) % 360.0 - 180.0)
    if g.size < 2 or steps.max() <= 1e-6 or steps.min() >= step_deg - 1e-6:
        return g
    return (np.round(g / step_deg) * step_deg) % 360.0


def arc_control_points(start_deg: float, stop_deg: float, spacing_deg: float = 2.0,
                       direction: str = "cw", collimator_deg: float = 0.0,
                       couch_deg: float = 0.0) -> list[Beam]:
    """Control points of one arc, each a :class:`Beam` at the centre of its sector.

    The arc runs from ``start_deg`` to ``stop_deg`` clockwise (``'cw'``: increasing IEC
    gantry angle) or counter-clockwise (``'ccw'``); equal start and stop means a full
    360 degree arc. The arc is cut into sectors of at most ``spacing_deg`` and each
    control point represents one sector (so 180 control points for a full arc at 2 deg).
    """
    _check_angle(start_deg, "start_deg")
    _check_angle(stop_deg, "stop_deg")
    if not (np.isfinite(spacing_deg) and 0 < spacing_deg <= 360):
        raise InputError(f"control-point spacing must be in (0, 360] degrees, got "
                         f"{spacing_deg!r}", field="spacing_deg")
    if direction not in ("cw", "ccw"):
        raise InputError(f"direction must be 'cw' or 'ccw', got {direction!r}",
                         field="direction")
    sign = 1.0 if direction == "cw" else -1.0
    span = ((stop_deg - start_deg) * sign) % 360.0
    if span == 0.0:
        span = 360.0
    n = int(np.ceil(span / spacing_deg - 1e-9))
    step = span / n
    angles = [(start_deg + sign * (i + 0.5) * step) % 360.0 for i in range(n)]
    return [Beam(round(a, 9) % 360.0, collimator_deg, couch_deg) for a in angles]


def default_isocenter(patient) -> np.ndarray:
    """Centre of mass (LPS mm) of the highest-dose target (first of ``patient.targets``)."""
    if not patient.targets:
        raise StructureError("patient has no target to place the isocentre on",
                             file=patient.source, field="targets")
    return patient.target_centroid_mm(patient.targets[0])


def resolve_beams(patient, beams) -> list[Beam]:
    """Fill in default isocentres and check every isocentre lies inside the CT."""
    beams = list(beams)
    if not beams:
        raise InputError("no beams given", field="beams")
    iso_default = None
    out = []
    for i, b in enumerate(beams):
        if not isinstance(b, Beam):
            raise InputError(f"beam {i} is not a Beam: {b!r}", field="beams")
        if b.isocenter_mm is None:
            if iso_default is None:
                iso_default = default_isocenter(patient)
            b = b.with_isocenter(iso_default)
        if not patient.grid.contains_point(b.isocenter_mm):
            raise InputError(f"isocentre {[round(float(v), 1) for v in b.isocenter_mm]} mm of beam {i} "
                             "lies outside the CT", file=patient.source, field="isocenter_mm")
        out.append(b)
    return out
