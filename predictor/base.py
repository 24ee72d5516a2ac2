"""The Predictor protocol and helpers every predictor shares.

A predictor maps a :class:`~atp.patient.Patient` to a predicted dose: a float32 array
in Gy with the patient's ``grid.shape`` (same axis order as ``patient.ct_hu``), zero
outside ``patient.body_mask``. Trainable predictors also offer ``fit(patients)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from atp.errors import InputError
from atp.patient import Patient, Role


@runtime_checkable
class Predictor(Protocol):
    """Anything with a ``name`` and ``predict(patient) -> dose_gy``."""

    name: str

    def predict(self, patient: Patient) -> np.ndarray:  # pragma: no cover - protocol
        ...


@runtime_checkable
class TrainablePredictor(Predictor, Protocol):
    """A predictor whose parameters can be learnt from patients with a reference dose."""

    def fit(self, patients: Iterable[Patient]) -> TrainablePredictor:  # pragma: no cover
        ...


def reference_dose_gy(patient: Patient) -> np.ndarray:
    """The reference (clinical) dose stored with a training patient, in Gy."""
    dose = patient.metadata.get("reference_dose_gy")
    if dose is None:
        raise InputError("patient has no reference dose to learn from", file=patient.source,
                         field="reference_dose_gy")
    dose = np.asarray(dose, dtype=np.float32)
    patient.grid.check_array(dose, file=patient.source, field="reference_dose_gy")
    return dose


def require_prescriptions(patient: Patient, who: str) -> None:
    if not patient.prescriptions:
        raise InputError(f"the {who} predictor needs at least one prescribed target",
                         file=patient.source, field="prescriptions")


# organs found in head-and-neck patients and not in other sites' (a lung patient has a
# spinal cord and an oesophagus too)
HEAD_NECK_ORGANS = ("Brainstem", "Parotid_L", "Parotid_R", "Larynx", "Bone_Mandible")


def require_trained_organs(patient: Patient, who: str, organs) -> None:
    """A network trained on head-and-neck patients refuses a patient from another site (a
    prostate or lung patient would get a head-and-neck dose pattern): one with none of the
    head-and-neck organs among its inputs ``organs`` and an organ at risk the network was
    not trained on (lungs, heart, rectum...). A head-and-neck patient whose only contoured
    organ is the spinal cord (OpenKBP has two) is predicted."""
    hn = [o for o in organs if o in HEAD_NECK_ORGANS]
    if not hn or any(o in patient.structures for o in hn):
        return
    foreign = sorted(n for n, s in patient.structures.items()
                     if s.role == Role.ORGAN and n not in organs)
    if foreign:
        raise InputError(f"the {who} predictor is trained on head-and-neck patients only "
                         f"(OpenKBP), and this patient has none of its head-and-neck organs "
                         f"({', '.join(hn)}) but organs it was not trained on "
                         f"({', '.join(foreign[:4])}); use --predictor baseline",
                         file=patient.source, field="structures")


def finalize_dose(dose_gy: np.ndarray, patient: Patient) -> np.ndarray:
    """Contract of every prediction: float32 Gy, >= 0, finite, zero outside the body."""
    out = np.asarray(dose_gy, dtype=np.float32)
    patient.grid.check_array(out, file=patient.source, field="predicted dose")
    out = np.where(np.isfinite(out), out, 0.0).astype(np.float32)
    np.maximum(out, 0.0, out=out)
    out[~patient.body_mask] = 0.0
    return out
