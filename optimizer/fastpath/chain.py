"""The fast-path chain: predicted dose + arc dij -> corrected fluence, with OAR sliders.

``FastPath(patient, dij, predicted_dose_gy).prepare()`` does the per-patient work once
(matrix on the device, masks on the dose grid, step sizes, initial fluence, baseline dose
D0). ``run(spare={...})`` then regenerates the fluence for any slider setting without
re-running the predictor or rebuilding matrices. Which path made the initial fluence is
reported (``'fallback'``: exact back-projection + projected-gradient steps; a trained
Bev2Fluence network can be plugged in through ``initial_fluence_fn``).

Sequencing and deliverable dose are composed by the pipeline (top floor), which owns the
sequencer; this module stops at the fluence (MU per beamlet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from atp.dose.influence import DoseInfluence
from atp.dose.resample import mask_to_dose_grid
from atp.errors import StructureError
from atp.patient import Patient
from optimizer.fastpath.correction import lipschitz_estimate, unrolled_correction
from optimizer.fastpath.error_map import HotColdObjective
from optimizer.fastpath.initial_fluence import initial_fluence
from optimizer.fastpath.torch_dose import TorchDose


@dataclass
class FastPathResult:
    fluence_mu: np.ndarray  # (n_beamlets,)
    dose_grid_dose_gy: np.ndarray  # dose on the dij's dose grid (3-D)
    initial_path: str  # 'fallback' or 'network'
    sparing: dict
    timings_s: dict = field(default_factory=dict)
    objective: float = float("nan")


class FastPath:
    """Differentiable dose feedback, AIRT style (see module docstring).

    lam_hot > lam_cold: PTV hot-spot vs cold-spot weights of the error map.
    init_steps / correction_steps: K of the fallback initial fluence and of the correction.
    device: 'cpu' or 'cuda' (torch); everything stays on it inside the loops.
    """

    def __init__(self, patient: Patient, dij: DoseInfluence, predicted_dose_gy: np.ndarray, *,
                 lam_hot: float = 4.0, lam_cold: float = 1.0, init_steps: int = 60,
                 correction_steps: int = 30, device: str = "cpu",
                 initial_fluence_fn: Callable | None = None) -> None:
        self.patient = patient
        self.dij = dij
        self.predicted_dose_gy = predicted_dose_gy
        self.lam_hot = lam_hot
        self.lam_cold = lam_cold
        self.init_steps = init_steps
        self.correction_steps = correction_steps
        self.device = torch.device(device)
        self.initial_fluence_fn = initial_fluence_fn
        self.timings_s: dict[str, float] = {}
        self._prepared = False

    # --- per-patient preparation (once) ------------------------------------------------
    def _on_dose_grid(self, array: np.ndarray) -> torch.Tensor:
        arr = mask_to_dose_grid(array, self.patient.grid, self.dij.dose_grid)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
                                ).to(self.device)

    def prepare(self) -> "FastPath":
        t0 = time.perf_counter()
        p = self.patient
        self.op = TorchDose(self.dij.matrix, self.device)
        t1 = time.perf_counter()
        self.timings_s["dij_to_device"] = t1 - t0
        body = self._on_dose_grid(p.body_mask.astype(np.float32))
        self.target_w = torch.zeros_like(body)
        rx = np.zeros(self.dij.dose_grid.n_voxels, dtype=np.float32)
        for presc in sorted(p.prescriptions, key=lambda r: r.dose_gy):
            frac = mask_to_dose_grid(p.mask(presc.target).astype(np.float32), p.grid,
                                     self.dij.dose_grid).reshape(-1)
            rx[frac > 0.5] = presc.dose_gy
        self.rx = torch.from_numpy(rx).to(self.device)
        self.target_w = (self.rx > 0).to(torch.float32)
        self.oar_w = {n: self._on_dose_grid(p.mask(n).astype(np.float32))
                      for n in p.organs}
        pred = self._on_dose_grid(np.asarray(self.predicted_dose_gy, dtype=np.float32))
        self.pred = pred
        # dose-mimicking voxel weights: body 1, OARs 2, targets 5
        v = body.clone()
        for w in self.oar_w.values():
            v = v + w
        v = v + 4.0 * self.target_w
        self.mimic_w = v
        t2 = time.perf_counter()
        self.timings_s["masks_to_dose_grid"] = t2 - t1
        self.L_mimic = lipschitz_estimate(self.op, self.mimic_w)
        t3 = time.perf_counter()
        self.timings_s["step_size"] = t3 - t2
        if self.initial_fluence_fn is not None:
            self.w_init = self.initial_fluence_fn(self)
            self.initial_path = "network"
        else:
            self.w_init = initial_fluence(self.op, self.pred, self.mimic_w, self.init_steps,
                                          self.L_mimic)
            self.initial_path = "fallback"
        self.d0 = self.op(self.w_init)
        t4 = time.perf_counter()
        self.timings_s["initial_fluence"] = t4 - t3
        self._prepared = True
        return self

    # --- one plan per slider setting ---------------------------------------------------
    def objective(self, sparing: Mapping[str, float]) -> HotColdObjective:
        unknown = [n for n in sparing if n not in self.oar_w]
        if unknown:
            raise StructureError(f"sparing slider for unknown OAR(s) {unknown}; this patient "
                                 f"has {sorted(self.oar_w)}", field="--spare")
        return HotColdObjective(self.rx, self.target_w, self.lam_hot, self.lam_cold,
                                self.oar_w, dict(sparing), self.d0)

    def _step_size(self, sparing: Mapping[str, float]) -> float:
        n_t = float(self.target_w.sum().clamp_min(1.0))
        vw = self.target_w * (max(self.lam_hot, self.lam_cold) / n_t)
        for name, s in sparing.items():
            if float(s) > 0:
                w = self.oar_w[name]
                vw = vw + w / float(w.sum().clamp_min(1.0))
        lip = lipschitz_estimate(self.op, vw, iters=15)
        return 1.0 / lip if lip > 0 else 0.0

    def run(self, spare: Mapping[str, float] | None = None) -> FastPathResult:
        if not self._prepared:
            self.prepare()
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        timings = {}
        t0 = time.perf_counter()
        obj = self.objective(sparing)
        step = self._step_size(sparing)
        t1 = time.perf_counter()
        timings["error_setup"] = t1 - t0
        w = unrolled_correction(self.w_init, self.op, obj, self.correction_steps, step)
        dose = self.op(w)
        t2 = time.perf_counter()
        timings["correction"] = t2 - t1
        return FastPathResult(
            fluence_mu=w.detach().cpu().numpy(),
            dose_grid_dose_gy=dose.detach().cpu().numpy().reshape(self.dij.dose_grid.shape),
            initial_path=self.initial_path, sparing=sparing, timings_s=timings,
            objective=float(obj(dose)))
