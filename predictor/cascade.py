"""Two-stage dose prediction (issue 23): a coarse whole-patient network, then a
full-resolution refiner in a window around the targets.

``CascadePredictor(stage1, stage2).predict(patient)``: Stage 1 (a
:class:`~atp.predictor.cnn.CNNPredictor`) predicts the dose on the patient grid; Stage 2 (a
CNNPredictor whose encoding has ``dose_input``: factor 1, a fixed window centred on the
targets, the Stage-1 dose as its last input channel, a ResUNet with
``residual_channel``) returns the corrected dose inside the window; outside the window
the Stage-1 dose is kept. The result keeps the predictor contract (float32 Gy on the
patient grid, zero outside the body).

Checkpoint: ``{"format": "atp-dose-cascade", "version": 1, "stage1": <CNN checkpoint>,
"stage2": <CNN checkpoint>}`` (plain data, read with ``weights_only=True``); ``atp
predict --model cascade.pt`` reads it through :meth:`CNNPredictor.from_checkpoint`.
"""

from __future__ import annotations

import numpy as np
from atp.predictor.base import finalize_dose, require_prescriptions
from atp.predictor.encoding import decode, encode_patient

from atp.errors import InputError
from atp.patient import Patient

CASCADE_FORMAT = "atp-dose-cascade"


class CascadePredictor:
    def __init__(self, stage1, stage2, *, name: str = "cascade") -> None:
        if not stage2.encoding.dose_input:
            raise InputError("stage 2 must take a dose input (encoding.dose_input)",
                             field="stage2")
        self.stage1, self.stage2, self.name = stage1, stage2, name

    def refine(self, patient: Patient, dose1_gy: np.ndarray) -> np.ndarray:
        """Stage 2 on a given Stage-1 dose (patient grid, Gy)."""
        stack, t = encode_patient(patient, self.stage2.encoding, dose1_gy)
        y = self.stage2.predict_network_grid(stack)
        window = decode(y, t, fill=np.nan, interpolation="nearest")
        return finalize_dose(np.where(np.isfinite(window), window, dose1_gy), patient)

    def predict(self, patient: Patient) -> np.ndarray:
        require_prescriptions(patient, self.name)
        return self.refine(patient, self.stage1.predict(patient))

    def checkpoint(self) -> dict:
        return {"format": CASCADE_FORMAT, "version": 1, "stage1": self.stage1.checkpoint(),
                "stage2": self.stage2.checkpoint()}
