"""Dose calculation: beam geometry, dose-influence matrices, engines behind a protocol.

Entry points for other stages:

* :class:`Beam`, :func:`equispaced_beams`, :func:`arc_control_points`,
  :func:`default_isocenter` (:mod:`atp.dose.geometry`);
* ``registry.get("pencil-beam").influence(patient, beams) -> DoseInfluence``;
* :func:`aperture_beamlet_weights`, :func:`aperture_dose` (:mod:`atp.dose.aperture`);
* :func:`mask_to_dose_grid`, :func:`dose_to_patient_grid` (:mod:`atp.dose.resample`).
"""

__all__ = [
    "Beam",
    "BeamletInfo",
    "DoseInfluence",
    "aperture_beamlet_weights",
    "aperture_dose",
    "arc_control_points",
    "default_isocenter",
    "dose_to_patient_grid",
    "equispaced_beams",
    "get_engine",
    "mask_to_dose_grid",
]


def __getattr__(name):  # lazy: importing atp.dose stays cheap
    if name in ("BeamletInfo", "DoseInfluence"):  # scipy.sparse: only when used
        from atp.dose import influence

        return getattr(influence, name)
    if name in ("Beam", "equispaced_beams", "arc_control_points", "default_isocenter"):
        from atp.dose import geometry

        return getattr(geometry, name)
    if name in ("aperture_beamlet_weights", "aperture_dose"):
        from atp.dose import aperture

        return getattr(aperture, name)
    if name in ("mask_to_dose_grid", "dose_to_patient_grid"):
        from atp.dose import resample

        return getattr(resample, name)
    if name == "get_engine":
        from atp.dose.registry import get

        return get
    raise AttributeError(name)
