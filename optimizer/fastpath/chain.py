"""The fast-path chain: predicted dose + arc dij -> corrected fluence, with OAR sliders.

``FastPath(patient, dij, predicted_dose_gy).prepare()`` does the per-patient work once
(matrix on the device, masks on the dose grid, the fluence-smoothness operator, step
sizes, initial fluence, baseline dose D0). ``run(spare={...})`` then regenerates the
fluence for any slider setting without re-running the predictor or rebuilding matrices.

Deliverability: both the initial fluence (dose mimicking) and the correction minimise
their dose objective plus ``mu * R(w)``, R the quadratic smoothness of the fluence maps
along leaf travel and between neighbouring control points
(:class:`~atp.optimizer.fastpath.smoothness.FluenceSmoothness`), so each control point's map
is close to what one aperture per leaf row can deliver. ``smoothness`` /
``init_smoothness`` set mu scale-free (:func:`~atp.optimizer.fastpath.correction.balanced_weight`:
the regulariser's mean curvature as a multiple of the data term's); 0 turns it off.

Step sizes: the diagonal row-sum step (:func:`~atp.optimizer.fastpath.correction.diagonal_step`),
one transpose product per objective weighting (A @ 1 is computed once in ``prepare``), so
neither ``prepare`` nor a slider change runs a power iteration. Which path made the initial fluence is
reported (``'fallback'``: exact back-projection + projected-gradient steps; a trained
Bev2Fluence network can be plugged in through ``initial_fluence_fn``).

Sequencing and deliverable dose are composed by the pipeline (top floor), which owns the
sequencer; this module stops at the fluence (MU per beamlet).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import torch
from atp.optimizer.fastpath.correction import (
    balanced_weight,
    curvature_row_sums,
    diagonal_step,
    unrolled_correction,
)
from atp.optimizer.fastpath.error_map import HotColdObjective, value_and_error_map
from atp.optimizer.fastpath.initial_fluence import DoseMimicking, initial_fluence
from atp.optimizer.fastpath.options import FastPathOptions
from atp.optimizer.fastpath.smoothness import FluenceSmoothness
from atp.optimizer.fastpath.torch_dose import RowDose, TorchDose

from atp.dose.influence import DoseInfluence
from atp.dose.resample import interpolation_support, mask_to_dose_grid
from atp.errors import InputError, StructureError
from atp.patient import Patient

#: ``oar_minus_targets``: 'none', or 'support' (the OAR hinges skip every target voxel)
OAR_MINUS_TARGETS = ("none", "support")

#: options measured and not kept (docs/experiments/fastpath.md), each with the values
#: that meant "off": a plan.json that records one at such a value still loads and
#: respares (the key is dropped); any other value has no code path any more
RETIRED_OPTIONS = {"goal_weight": (0.0,), "hot_margin": (0.0,),
                   "target_min_fraction": (0.0,), "target_voxels": ("support",)}
#: values of kept options that were measured and not kept
RETIRED_VALUES = {"oar_minus_targets": ("core",)}


def drop_retired_options(options: Mapping, file=None) -> dict:
    """``options`` (fast-path options recorded in a plan.json) without the retired
    options at their "off" value; a retired option or value that was in use is an
    :class:`~atp.errors.InputError` naming ``file`` and the field."""
    out = {}
    for key, value in options.items():
        field = f"settings.fastpath_options.{key}"
        if key in RETIRED_OPTIONS:
            if value not in RETIRED_OPTIONS[key]:
                raise InputError(f"this plan was made with the experimental fast-path option "
                                 f"{key}={value!r}, which was removed (measured and not kept, "
                                 "docs/experiments/fastpath.md); plan again without it",
                                 file=file, field=field)
            continue
        if value in RETIRED_VALUES.get(key, ()):
            raise InputError(f"this plan was made with {key}={value!r}, which was removed "
                             "(measured and not kept, docs/experiments/fastpath.md); plan "
                             "again without it", file=file, field=field)
        out[key] = value
    return out

def target_prescription_map(patient, dose_grid) -> np.ndarray:
    """(n_voxels,) float32 on ``dose_grid``: each target voxel's highest prescription
    (Gy), 0 elsewhere. A dose-grid voxel is a target voxel when any of its
    trilinear-interpolation weight lands inside the target
    (:func:`atp.dose.resample.interpolation_support`), i.e. every voxel whose dose reaches
    the target on the patient grid, so the dose interpolated back to the finer patient
    grid covers the PTV edge. (The optimiser's rule, the block fraction of the voxel inside
    the target, misses the outer neighbours of edge voxels: on a 3x-coarse dose grid even
    a dose of exactly Rx on every touching voxel leaves PTV_70 D99 near 89 % of Rx, pt_1;
    docs/experiments/fastpath.md.)"""
    rx = np.zeros(dose_grid.n_voxels, dtype=np.float32)
    for presc in sorted(patient.prescriptions, key=lambda r: r.dose_gy):
        frac = interpolation_support(patient.mask(presc.target), patient.grid, dose_grid)
        rx[np.asarray(frac).reshape(-1) > 0.0] = presc.dose_gy
    return rx


def dose_grid_arrays(patient, dose_grid, predicted_dose_gy,
                     device="cpu") -> SimpleNamespace:
    """The per-patient voxel arrays of the fast path on ``dose_grid`` (flattened float32
    tensors on ``device``): body, rx (each target voxel's prescription, Gy; see
    :func:`target_prescription_map`), target_w, oar_w (name -> OAR fraction), pred (the
    predicted dose, Gy) and mimic_w (dose-mimicking voxel weights: body 1, OARs +1 each,
    targets +4). Used by :meth:`FastPath.prepare` and the training-data generator."""
    dev = torch.device(device)

    def on_grid(a):
        arr = mask_to_dose_grid(np.asarray(a, np.float32), patient.grid, dose_grid)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
                                ).to(dev)

    body = on_grid(patient.body_mask)
    rx = torch.from_numpy(target_prescription_map(patient, dose_grid)).to(dev)
    target_w = (rx > 0).to(torch.float32)
    oar_w = {n: on_grid(patient.mask(n)) for n in patient.organs}
    mimic_w = body.clone()
    for w in oar_w.values():
        mimic_w = mimic_w + w
    mimic_w = mimic_w + 4.0 * target_w
    return SimpleNamespace(body=body, rx=rx, target_w=target_w, oar_w=oar_w,
                           pred=on_grid(predicted_dose_gy), mimic_w=mimic_w)


class _Shifted:
    """J(D + offset) for a fixed dose offset; keeps a closed-form gradient if J has one."""

    def __init__(self, objective, offset: torch.Tensor) -> None:
        self.objective = objective
        self.offset = offset
        if hasattr(objective, "value_and_grad"):
            self.value_and_grad = lambda dose: objective.value_and_grad(dose + offset)
        if hasattr(objective, "voxel_support"):  # a shift reads the same voxels
            self.voxel_support = objective.voxel_support

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        return self.objective(dose + self.offset)


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
    smoothness / init_smoothness: strength of the fluence-smoothness regulariser in the
    correction / the fallback initial fluence (0: none). smooth_weight_cp: weight of the
    control-point-to-control-point pairs relative to the leaf-travel pairs. oar_guard:
    weight of the "stay below D0" hinge on OARs without an active slider (0: none).
    coverage_weight / coverage_level: the extra near-minimum coverage hinge of
    :class:`HotColdObjective`. oar_minus_targets: 'none' (the OAR hinges read the whole
    OAR) or 'support' (they skip the target voxels). max_weight / max_level: its
    organ-maximum hinge at max_level x each near-max limit below Rx of the goal list
    (cord, brainstem; :meth:`_max_dose_limits`), 0 to leave it out.
    device: 'cpu' or 'cuda' (torch); everything stays on it inside the loops.
    """

    def __init__(self, patient: Patient, dij: DoseInfluence, predicted_dose_gy: np.ndarray,
                 options: FastPathOptions | None = None, *, resolved_goals=None,
                 device: str = "cpu", initial_fluence_fn: Callable | None = None,
                 correction_fn: Callable | None = None, **changes) -> None:
        """options: the numeric options (default :class:`FastPathOptions`); ``changes``:
        some of its fields by keyword (``FastPath(p, dij, pred, init_steps=10)``)."""
        o = replace(options or FastPathOptions(), **changes)
        self.options = o
        self.patient = patient
        self.dij = dij
        self.predicted_dose_gy = predicted_dose_gy
        self.lam_hot = o.lam_hot
        self.lam_cold = o.lam_cold
        self.init_steps = o.init_steps
        self.correction_steps = o.correction_steps
        self.smoothness = float(o.smoothness)
        self.init_smoothness = float(o.init_smoothness)
        self.smooth_weight_cp = float(o.smooth_weight_cp)
        self.oar_guard = float(o.oar_guard)
        self._rows_op = None  # (row-set key, A[rows] on the device): weight_value_grad
        self._rows_csc = None  # (row-set key, A[rows] SciPy CSC): objective_rows_matrix
        self.coverage_weight = float(o.coverage_weight)
        self.coverage_level = float(o.coverage_level)
        if o.oar_minus_targets not in OAR_MINUS_TARGETS:
            raise ValueError("oar_minus_targets must be none or support, got "
                             f"{o.oar_minus_targets!r}")
        self.oar_minus_targets = o.oar_minus_targets
        if not (float(o.max_weight) >= 0.0 and 0.0 < float(o.max_level) <= 1.0):
            raise ValueError(f"need max_weight >= 0 and max_level in (0, 1], got "
                             f"{o.max_weight}, {o.max_level}")
        self.max_weight = float(o.max_weight)
        self.max_level = float(o.max_level)
        self.max_limits: dict = {}
        self.resolved_goals = resolved_goals
        self.device = torch.device(device)
        self.initial_fluence_fn = initial_fluence_fn
        self.correction_fn = correction_fn
        self.correction_path = "exact" if correction_fn is None else "network"
        self.timings_s: dict[str, float] = {}
        self._prepared = False

    # --- per-patient preparation (once) ------------------------------------------------
    def _hinge_weights(self) -> dict:
        """OAR voxel weights of the correction's OAR hinges (guard and sliders): the OAR,
        minus every target voxel of the coverage term when ``oar_minus_targets`` is
        'support' -- the optimiser's "organ minus PTV" rule: inside a target coverage wins
        anyway, and the hinge would only pull cold spots into it."""
        if self.oar_minus_targets == "none":
            return self.oar_w
        inside = (self.rx > 0).to(torch.float32)
        return {n: w * (1.0 - inside) for n, w in self.oar_w.items()}

    def prepare(self) -> FastPath:
        t0 = time.perf_counter()
        p = self.patient
        self.op = TorchDose(self.dij.matrix, self.device, csr=self.dij.csr)
        t1 = time.perf_counter()
        self.timings_s["dij_to_device"] = t1 - t0
        g = dose_grid_arrays(p, self.dij.dose_grid, self.predicted_dose_gy, self.device)
        self.rx, self.target_w, self.oar_w = g.rx, g.target_w, g.oar_w
        self.pred, self.mimic_w = g.pred, g.mimic_w
        self.oar_hinge_w = self._hinge_weights()
        if self.max_weight > 0:
            self.max_limits = self._max_dose_limits(p)
        t2 = time.perf_counter()
        self.timings_s["masks_to_dose_grid"] = t2 - t1
        # step sizes: A @ 1 once, then one transpose product per objective weighting
        self.smooth = FluenceSmoothness(self.dij.beamlets, 1.0, self.smooth_weight_cp,
                                        device=self.device)
        self.dose_of_ones = self.op(torch.ones(self.op.shape[1], device=self.device))
        mimic = DoseMimicking(self.pred, self.mimic_w)
        r_mimic = curvature_row_sums(self.op, self.mimic_w / mimic.norm, self.dose_of_ones)
        self.mu_init = balanced_weight(r_mimic, self.smooth, self.init_smoothness)
        self.step_mimic = diagonal_step(r_mimic, self.smooth, self.mu_init)
        # a valid (row-sum) Lipschitz bound of A.T diag(v) A, for step = norm / L users
        self.L_mimic = float(r_mimic.max()) * mimic.norm
        self.r_target = curvature_row_sums(self.op, self._target_curvature(),
                                           self.dose_of_ones)
        self.mu = balanced_weight(self.r_target, self.smooth, self.smoothness)
        t3 = time.perf_counter()
        self.timings_s["step_size"] = t3 - t2
        if self.initial_fluence_fn is not None:
            self.w_init = self.initial_fluence_fn(self)
            self.initial_path = "network"
        else:
            self.w_init = initial_fluence(self.op, self.pred, self.mimic_w, self.init_steps,
                                          step=self.step_mimic, regulariser=self.smooth,
                                          reg_weight=self.mu_init)
            self.initial_path = "fallback"
        self.d0 = self.op(self.w_init)
        t4 = time.perf_counter()
        self.timings_s["initial_fluence"] = t4 - t3
        self._prepared = True
        return self

    def _max_dose_limits(self, p) -> dict:
        """name -> (voxel weights, limit Gy) of the organ-maximum term: every organ with a
        numeric near-maximum goal (Dmax, D<=1cc, D<=2%; operator <=; priority <= 3, i.e.
        hard limits and protocol goals, not the predicted-dose ones) in the resolved goal
        list, at its strictest such limit, when that is below the highest prescription
        (a limit above Rx, such as the mandible's hot-spot cap, is the PTV hot-spot
        term's business); voxels: the organ's interpolation support on
        the dose grid (every dose-grid voxel whose interpolated dose reaches the organ,
        weighted by the share of its interpolation weight that lands in the organ: the
        organ is one or two voxels wide on a 3x-coarse dose grid, so its near-maximum on
        the patient grid is set by its neighbours, but mostly by the voxels it fills)."""
        limits: dict[str, float] = {}
        for g in self.resolved_goals or ():
            m = g.metric
            near_max = m.kind == "Dmax" or (m.kind == "D" and (
                (m.volume_unit == "cc" and m.volume <= 1.0) or
                (m.volume_unit == "%" and m.volume <= 2.0)))
            if (near_max and g.kind == "organ" and g.operator == "<=" and g.priority <= 3
                    and g.value is not None and g.structure in p.organs):
                limits[g.structure] = min(float(g.value),
                                          limits.get(g.structure, float("inf")))
        rx_max = max((float(r.dose_gy) for r in p.prescriptions), default=float("inf"))
        out = {}
        for name, limit in limits.items():
            if limit >= rx_max:
                continue
            sup = interpolation_support(p.mask(name), p.grid, self.dij.dose_grid)
            w = torch.from_numpy(np.asarray(sup, np.float32).reshape(-1).copy())
            out[name] = (w.to(self.device), limit)
        return out

    # --- one plan per slider setting ---------------------------------------------------
    def objective(self, sparing: Mapping[str, float]):
        unknown = [n for n in sparing if n not in self.oar_w]
        if unknown:
            raise StructureError(f"sparing slider for unknown OAR(s) {unknown}; this patient "
                                 f"has {sorted(self.oar_w)}", field="--spare")
        return HotColdObjective(self.rx, self.target_w, self.lam_hot, self.lam_cold,
                                self.oar_hinge_w, dict(sparing), self.d0, self.oar_guard,
                                self.coverage_weight, self.coverage_level, self.max_limits,
                                self.max_weight, self.max_level)

    def _target_curvature(self) -> torch.Tensor:
        """Slider-independent curvature bound per voxel: PTV max(lam_hot, lam_cold +
        coverage_weight) / n_target, plus the OAR guard's weight / n_oar."""
        n_t = self.target_w.sum().clamp_min(1.0)
        c = self.target_w * (max(self.lam_hot, self.lam_cold + self.coverage_weight) / n_t)
        if self.oar_guard > 0:
            for w in self.oar_hinge_w.values():
                c = c + self.oar_guard * w / w.sum().clamp_min(1.0)
        for w, _ in self.max_limits.values():
            c = c + self.max_weight * w / w.sum().clamp_min(1.0)
        return c

    def _step_size(self, sparing: Mapping[str, float]) -> torch.Tensor:
        """Diagonal step of the correction objective for this slider setting: the
        target part is prepared once; each active OAR hinge adds its curvature (one
        transpose product when any slider is > 0)."""
        vw = None
        extra = 1.0 - min(self.oar_guard, 1.0)
        for name, s in sparing.items():
            if float(s) > 0 and extra > 0:
                w = self.oar_hinge_w[name]
                term = extra * w / w.sum().clamp_min(1.0)
                vw = term if vw is None else vw + term
        r = self.r_target
        if vw is not None:
            r = r + curvature_row_sums(self.op, vw, self.dose_of_ones)
        return diagonal_step(r, self.smooth, self.mu)

    def run(self, spare: Mapping[str, float] | None = None, *, start=None,
            dose_offset_gy=None, steps: int | None = None) -> FastPathResult:
        """Correct the fluence for the slider setting ``spare``.

        start: fluence (MU, n_beamlets) to start from (default: the initial fluence).
        dose_offset_gy: a dose-grid dose (flattened or 3-D, Gy) added to ``A w`` inside
        the objective -- the sequencing loss of a previous pass (deliverable minus ideal
        dose), so the correction aims the *deliverable* dose at the objective (Siebers et
        al. 2002). steps: correction steps (default ``correction_steps``)."""
        if not self._prepared:
            self.prepare()
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        timings = {}
        t0 = time.perf_counter()
        obj = self.objective(sparing)
        if dose_offset_gy is not None:
            offset = torch.as_tensor(np.asarray(dose_offset_gy, np.float32).reshape(-1),
                                     device=self.device)
            obj = _Shifted(obj, offset)
        step = self._step_size(sparing)
        w0 = self.w_init if start is None else torch.as_tensor(
            np.asarray(start, np.float32), device=self.device)
        t1 = time.perf_counter()
        timings["error_setup"] = t1 - t0
        k = self.correction_steps if steps is None else int(steps)
        if self.correction_fn is not None and start is None and dose_offset_gy is None:
            # the trained correction network (+ its few exact steps)
            w = self.correction_fn(self, w0, sparing, objective=obj, step=step)
        else:
            w = unrolled_correction(w0, self.operator_for(obj), obj, k, step,
                                    regulariser=self.smooth, reg_weight=self.mu)
        dose = self.op(w)
        t2 = time.perf_counter()
        timings["correction"] = t2 - t1
        return FastPathResult(
            fluence_mu=w.detach().cpu().numpy(),
            dose_grid_dose_gy=dose.detach().cpu().numpy().reshape(self.dij.dose_grid.shape),
            initial_path=self.initial_path, sparing=sparing, timings_s=timings,
            objective=float(obj(dose)))

    def objective_value_grad(self, spare: Mapping[str, float] | None = None):
        """``f(dose) -> (J, dJ/dD)`` on NumPy arrays (flattened dose grid, Gy) for the
        correction objective of ``spare`` -- for host-side solvers such as the
        sequencer's control-point MU optimisation."""
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        obj = self.objective(sparing)

        def value_grad(dose_gy):
            d = torch.as_tensor(np.asarray(dose_gy, np.float32).reshape(-1),
                                device=self.device)
            j, e = value_and_error_map(d, obj)
            return float(j), e.cpu().numpy()

        return value_grad

    def objective_rows(self, spare: Mapping[str, float] | None = None) -> np.ndarray | None:
        """Dose-grid voxel indices the correction objective of ``spare`` reads (NumPy,
        sorted), or None when the objective does not name them (any voxel may count)."""
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        support = getattr(self.objective(sparing), "voxel_support", None)
        return None if support is None else support().cpu().numpy()

    def objective_rows_matrix(self, spare: Mapping[str, float] | None = None):
        """(rows, ``dij.matrix[rows]`` as SciPy CSC) for the rows of
        :meth:`objective_rows`, or (None, None); the matrix is cached for the last row
        set, so the control-point MU fit of every correction pass and slider change
        selects the rows once."""
        rows = self.objective_rows(spare)
        if rows is None:
            return None, None
        return rows, self._rows_matrix(rows)

    def _rows_matrix(self, rows: np.ndarray):
        """``dij.matrix[rows]`` (SciPy CSC), cached for the last row set."""
        key = rows.tobytes()
        if self._rows_csc is None or self._rows_csc[0] != key:
            self._rows_csc = (key, self.dij.matrix[rows].tocsc())
        return self._rows_csc[1]

    def operator_for(self, objective):
        """The dose operator to optimise ``objective`` on: A restricted to the rows it
        reads (its ``voxel_support()``; :class:`~atp.optimizer.fastpath.torch_dose.RowDose`,
        the same iterates at about half the cost of a head-and-neck arc dij), or the
        whole A when the objective does not name its rows."""
        support = getattr(objective, "voxel_support", None)
        return self.op if support is None else self._row_operator(support())

    def weight_value_grad(self, spare: Mapping[str, float] | None = None):
        """``f(w) -> (J, dJ/dw)`` on NumPy arrays: the correction objective of ``spare``
        as a function of beamlet weights w (MU), dose A w and A^T dJ/dD on ``device`` --
        for host-side solvers that move apertures (direct aperture refinement)."""
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        obj = self.objective(sparing)
        op = self.operator_for(obj)

        def value_grad(w):
            wt = torch.as_tensor(np.asarray(w, np.float32), device=self.device)
            j, e = value_and_error_map(op(wt), obj)
            return float(j), op.transpose_apply(e).cpu().numpy()

        return value_grad

    def _row_operator(self, rows: torch.Tensor) -> RowDose:
        """A on ``rows`` on the device (:class:`RowDose`), cached for the last row set:
        sliders, correction passes and the aperture refinement keep it."""
        r = rows.cpu().numpy()
        key = r.tobytes()
        if self._rows_op is None or self._rows_op[0] != key:
            op = self.op.restrict_rows(r, self._rows_matrix(r))
            self._rows_op = (key, op)
        return self._rows_op[1]

    def objective_value(self, dose_gy, spare: Mapping[str, float] | None = None) -> float:
        """The correction objective J (for ``spare``) at a dose-grid dose (Gy)."""
        sparing = {k: float(v) for k, v in (spare or {}).items()}
        d = torch.as_tensor(np.asarray(dose_gy, np.float32).reshape(-1), device=self.device)
        return float(self.objective(sparing)(d))
