"""Resolved goals + patient + dose-influence matrix -> an optimisation :class:`Problem`.

The problem knows nothing of solvers: it holds the dij rows that any term looks at, the
objective terms (:mod:`atp.optimizer.objectives`), the fluence-smoothness pairs, the initial
fluence and, for every goal, which terms implement it and how to measure it on the dose
grid (so a backend or the hard-goal loop can say whether and by how much it is met).

Rules (documented once, here):

* **Priority -> weight.** A goal's term weight is ``ResolvedGoal.weight``, which the goal
  list's ``priority_weights`` rule sets (an institution overlay can change it). Priority-1
  goals are *hard*: their weight is multiplied by ``hard_weight_factor`` and the
  hard-goal loop (:func:`atp.optimizer.solve.optimize`) raises it further and shifts their
  reference until they are met or cannot be; the QP backend makes them constraints.
* **Metric -> term.** ``Dmax <= x``: ``max``; ``Dmin >= x``: ``min``; ``Dmean``:
  ``mean_max`` / ``mean_min``; ``D{v} <= x``: ``dv_max`` (a near-max, v <=
  ``near_max_volume`` of the structure, becomes ``max``); ``D{v} >= x``: ``dv_min``;
  ``V{x} <= y``: ``D{y} <= x`` and ``V{x} >= y``: ``D{y} >= x``; ``HI``: ``uniform`` at
  the target's prescription; ``CI`` / ``CIpaddick`` / ``GI``: scale the automatic
  fall-off term's weight by the goal's weight / reference weight (noted in
  ``Problem.notes``).
* **Automatic terms** (the paper's F_CI and F_maxdose): a distance-to-target fall-off
  term on every body voxel outside the targets (per-voxel max-dose reference
  ``Rx_near * (end + (1 - end) * exp(-(dist - start_mm)_+ / falloff_mm))``), and a
  global max-dose term on the body at ``global_max_pct`` (default 106 %) of the highest
  prescription. A prescribed target without any lower-bound goal gets ``D95 >= Rx``.
* **Organ minus targets.** A soft (priority >= 2) organ goal with an upper bound below
  the prescription of a target it overlaps is optimised on the organ minus that target
  (``organ_minus_targets``; the clinical "Parotid - PTV" optimisation structure): inside
  the target the two goals conflict voxel by voxel and coverage, of higher priority,
  wins anyway, so the organ term would only pull cold spots into the target. The goal
  is still measured (and reported) on the whole organ: :func:`atp.optimizer.solve.optimize`
  tightens the term's reference by the measured offset between the two (surrogate
  offsets), so the term is active whenever the reported value fails. Hard (priority-1)
  goals keep every voxel.
* **Nested targets.** Upper-bound terms of a target ignore voxels of targets with a
  higher prescription.
* **Target edges at the patient grid's resolution** (``fine_target_edges``). The plan is
  judged on the dose interpolated to the patient (CT) grid, whose edge voxels a coarser
  dose grid cannot see: a dose voxel straddling the edge is half outside the target. So
  lower-bound (coverage) terms of a target, and their measurement, read the dose-grid
  voxels that lie wholly inside it with all 26 neighbours (each standing for its block
  of patient voxels), plus every other patient voxel of the target as a row of its own:
  the trilinear interpolation of the dij's rows (:func:`atp.dose.resample.
  interpolation_rows`), weighted by its volume. Those rows sit after the dose-grid rows
  (``Problem.fine``). Without it (or on a dose grid that is the patient grid), every
  dose-grid voxel touching the target counts fully (not by its partial-volume fraction).
* **Normalisation** (:mod:`atp.optimizer.objectives`): voxel weight x reference dose^2,
  with the voxel weight of point-dose terms (``max`` / ``min``: Dmax, near-max, Dmin,
  global max) capped at ``max_norm_voxels`` so hot spots in large structures count.
* Automatic-term weights are ``*_weight_rel`` times the reference weight (the largest
  weight of a target goal, else of any goal).
* **Leakage** (``leaf_transmission`` T > 0; the pipeline sets the machine's for sliding
  window). A sliding-window beam delivering beamlet weight ``w_i`` in ``MU_b`` monitor
  units keeps a leaf over that beamlet for ``MU_b - w_i`` of them, so it delivers ``(1 -
  T) w_i + T MU_b``: the optimised dose is ``(1 - T) A w + T sum_b MU_b(w) L_b`` with
  ``L_b`` the beam's dose per unit weight on all its beamlets (``Problem.leak``) and
  ``MU_b`` the smooth sliding-window MU below (:func:`atp.optimizer.objectives.beam_mu`).
  Every goal then pays for the leakage its MU put where it is measured (the hot target
  bulk, the mandible inside it, the parotids). Its limits: leakage outside the planning
  beamlets (the rest of the jaw field), the sequencer's extra MU (leaf speed, minimum gap)
  and tongue and groove are not in it; the deliverable-dose correction rounds see those.
  The QP backend refuses such a problem.
* **MU.** Every MU delivers leaf leakage (about 1.5 % of the open-field dose per MU) over
  the whole jaw field, so the objective pays for them: ``mu_weight_rel * wref * sum_b
  MU_b / (n_beams * mean x0)``, MU_b the beam's sliding-window MU as a smooth function of
  the fluence (:class:`atp.optimizer.objectives.MuSurrogate`: rises along leaf travel, soft
  max over leaf rows), i.e. relative to open fields delivering the start fluence. The
  same term lowers the modulation, hence MU, of step-and-shoot and VMAT plans too. The
  QP backend solves it with a conic solver (Clarabel) by default; asked for OSQP it takes
  the hard maximum over leaf rows (the soft maximum is at most ``tau * log(rows)`` above).
* **The iterations' dij** (``dij_tail_threshold``, ``dij_tail_group``). Each first-order
  iteration multiplies by A and A^T, and most of A's non-zeros are pencil beams' scatter
  tails (entries under 0.3 % of their beam's peak: ~95 % of the non-zeros, ~15 % of the
  dose on OpenKBP patients), nearly the same for neighbouring beamlets. The iterations
  use ``Problem.fast``: the entries at or above the threshold exactly and the tail once
  per 2 x 2 block of a beam's beamlets, their mean (:class:`atp.optimizer.rowop.
  TailGrouped`): a third of the products' cost, and within 0.1 Gy of ``A w`` on a 70 Gy
  plan (exact for a fluence uniform over each block). Goals are measured, and the QP
  backend solves, on the exact A; the reported dose is the jaw-field dose as always.
  (``atp.pipeline`` keeps VMAT plans on the exact rows: measured on static fields only.)
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
from atp.optimizer.objectives import (
    Term,
    beam_mu,
    difference_matrix,
    evaluate_terms,
    make_term,
    mu_surrogate,
    mu_value_grad,
    smoothness_pairs,
    term_value_grad,
)
from atp.optimizer.rowop import (
    InterpolatedRows,
    beamlet_groups,
    interpolated_rows,
    tail_grouped,
)
from scipy import ndimage

from atp.dose.resample import downsample_factor, interpolation_rows, mask_to_dose_grid
from atp.errors import GridMismatchError, InputError

LOWER_OPS = (">=", ">")
MU_WEIGHT_REL = 0.004  # train pt_1/2/3/10/100: docs/experiments/dose-physics.md (last section)
UPPER_OPS = ("<=", "<")


@dataclass(frozen=True)
class ProblemOptions:
    """Knobs of :func:`build_problem` (all have documented defaults)."""

    hard_weight_factor: float = 10.0
    near_max_volume: float = 0.02  # D_v <= x, v <= 2 %: max-dose term (D_v >= x, v >= 98 %: min)
    global_max_pct: float = 106.0  # % of the highest prescription
    global_max_weight_rel: float = 1.0
    falloff: bool = True
    falloff_start_mm: float = 5.0
    falloff_mm: float = 15.0  # e-folding distance, mm
    falloff_end_frac: float = 0.35  # far-field reference, fraction of local Rx
    falloff_weight_rel: float = 0.3
    smoothness_weight_rel: float = 0.02
    # sliding-window MU (optimizer.objectives.MuSurrogate): weight_rel * wref * sum_b MU_b
    # / (n_beams * mean x0), i.e. relative to open fields delivering the start fluence
    mu_weight_rel: float = MU_WEIGHT_REL
    mu_tau_rel: float = 0.1  # soft-max temperature over leaf rows, x mean start fluence
    default_target_coverage: bool = True
    min_voxel_fraction: float = 0.05  # ignore voxels with less of the structure than this
    max_norm_voxels: float = 500.0  # cap on W in the normalisation of max/min goal terms
    organ_minus_targets: bool = True  # soft organ limits below a target's Rx skip its voxels
    fine_target_edges: bool = True  # coverage terms read the patient-grid dose at edges
    # a patient-grid edge row's weight in a coverage *term* (its measurement weighs it by
    # its volume, 1 / factor^3 of a dose voxel): 1 counts it as a dose voxel
    fine_edge_term_weight: float = 1.0
    # sliding-window leaf leakage in the optimised dose (module docstring, "Leakage"): the
    # machine's leaf transmission (0: none, the fluence's dose alone)
    leaf_transmission: float = 0.0
    # the iterations' operator (module docstring, "The iterations' dij"): dij entries under
    # this fraction of their beam's peak are kept as the mean of each group x group block
    # of a beam's beamlets (0 or group 1: the exact rows)
    dij_tail_threshold: float = 3e-3
    dij_tail_group: int = 2

    def __post_init__(self):
        if not (0.0 <= self.dij_tail_threshold < 1.0):
            raise ValueError(f"dij_tail_threshold must be in [0, 1), got "
                             f"{self.dij_tail_threshold!r}")
        if int(self.dij_tail_group) != self.dij_tail_group or self.dij_tail_group < 1:
            raise ValueError(f"dij_tail_group must be a positive integer, got "
                             f"{self.dij_tail_group!r}")


@dataclass(frozen=True, eq=False)
class GoalBinding:
    """A resolved goal, its terms (indices into Problem.terms) and how to measure it."""

    goal: object  # ResolvedGoal
    term_indices: tuple[int, ...]
    structure_rows: np.ndarray  # rows of the structure (for measuring)
    structure_vw: np.ndarray
    measurable: bool = True


@dataclass(frozen=True, eq=False)
class FineRows:
    """Patient-grid voxels among a problem's rows (``fine_target_edges``): the rows from
    ``first`` on of ``Problem.A`` are the dij interpolated (``interp``: CSR, one row per
    voxel over the dose-grid voxels) to the patient voxels ``voxels`` (flat, C order)."""

    first: int
    voxels: np.ndarray
    interp: sp.csr_matrix


MAX_TERM_WEIGHT = 1e12  # a term weight beyond this lets the objective's sums overflow


@dataclass(eq=False)
class Problem:
    """The optimisation problem (host arrays; backends move them to their device).

    A: (n_rows, n_beamlets) float32, Gy per unit fluence, the dij rows of ``rows``: CSR,
    or with patient-grid rows (``fine``) an :class:`~atp.optimizer.rowop.InterpolatedRows`
    (``@``, ``.T @``, ``tocsr()``).
    rows: dose-grid voxel index (C order) of each row of A; rows >= the dose grid's
    voxel count are patient-grid voxels (``fine``: which, and their interpolation).
    terms: objective terms on rows of A. smooth_pairs / smooth_weight / smooth_norm: the
    fluence smoothness term. x0: initial fluence. bindings: goal -> terms.
    """

    A: sp.csr_matrix
    rows: np.ndarray
    terms: list[Term]
    x0: np.ndarray
    dose_grid: object
    smooth_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    smooth_weight: float = 0.0
    smooth_norm: float = 1.0
    bindings: list[GoalBinding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    voxel_volume_cc: float = 1.0
    prescriptions: dict = field(default_factory=dict)
    mu: object = None  # optimizer.objectives.MuSurrogate, or None
    mu_scale: float = 0.0  # weight / norm of the MU term
    # patient-grid rows (fine_target_edges): FineRows, or None
    fine: object = None
    # leaf leakage (leaf_transmission): (T, L (n_rows, n_beams) float32: each beam's
    # dose per unit fluence of all its beamlets), with ``mu`` the beams' MU; or None
    leak: tuple | None = None
    # the first-order iterations' operator for A (TailGrouped, or InterpolatedRows over
    # one), or None: A itself (ProblemOptions.dij_tail_threshold)
    fast: object = None

    n_beamlets = property(lambda self: self.A.shape[1], doc="Columns of A (beamlets).")
    n_rows = property(lambda self: self.A.shape[0], doc="Rows of A (the voxels terms read).")

    def smoothness_matrix(self) -> sp.csr_matrix:
        return difference_matrix(self.smooth_pairs, self.n_beamlets)

    def with_terms(self, terms: list[Term]) -> Problem:
        """A shallow copy with another term list (bindings kept: same indices first)."""
        return Problem(self.A, self.rows, list(terms), self.x0, self.dose_grid,
                       self.smooth_pairs, self.smooth_weight, self.smooth_norm,
                       list(self.bindings), list(self.notes), self.voxel_volume_cc,
                       dict(self.prescriptions), self.mu, self.mu_scale, self.fine,
                       self.leak, self.fast)

    def convex_surrogate(self) -> Problem:
        """The convex formulation: every term soft, dose-volume terms replaced by their
        convex surrogates (``dv_min`` -> ``min``, ``dv_max`` -> ``max`` at the same
        reference, same normalisation). Used to compare backends on one function."""
        kinds = {"dv_min": "min", "dv_max": "max"}
        return self.with_terms([replace(t, kind=kinds.get(t.kind, t.kind), hard=False)
                                for t in self.terms])

    # --- evaluation on the host (reference implementation; backends do the same on xp) --
    def dose_rows(self, fluence) -> np.ndarray:
        """The optimised dose on the rows: ``A w``, with leakage ``(1 - T) A w + T L
        MU(w)`` (``leak``)."""
        w = np.asarray(fluence, dtype=np.float32)
        d = self.A @ w
        if self.leak is not None:
            t, L = self.leak
            m = self.mu
            d = (1.0 - t) * d + t * (L @ beam_mu(w, m.D, m.S, m.beam_rows, m.tau))
        return d

    def on_rows(self, dose) -> np.ndarray:
        """A dose on the dose grid (any shape, C order) at the problem's rows: the
        dose-grid rows' values, then the patient-grid rows' interpolation (``fine``)."""
        dose = np.asarray(dose).reshape(-1)
        if self.fine is None:
            return dose[self.rows]
        return np.concatenate([dose[self.rows[:self.fine.first]], self.fine.interp @ dose])

    def objective(self, fluence) -> float:
        """Total objective (float) at ``fluence`` on the host."""
        w = np.asarray(fluence, dtype=np.float32)
        d = self.dose_rows(w)
        arrays = [(t.rows, t.voxel_weight, t.ref_gy) for t in self.terms]
        total, _, _ = evaluate_terms(self.terms, arrays, d)
        total = float(total)
        if self.smooth_weight > 0 and len(self.smooth_pairs):
            diff = w[self.smooth_pairs[:, 0]] - w[self.smooth_pairs[:, 1]]
            total += self.smooth_weight / self.smooth_norm * float(np.sum(diff * diff))
        if self.mu is not None and self.mu_scale > 0:
            total += self.mu_scale * float(self.mu_value(w))
        return total

    def mu_value(self, fluence) -> float:
        """The smoothed sliding-window MU (fluence units, all beams) at ``fluence``."""
        m = self.mu
        v, _ = mu_value_grad(np.asarray(fluence, np.float32), m.D, m.D.T.tocsr(), m.S,
                             m.S.T.tocsr(), m.beam_rows, m.tau)
        return float(v)

    def term_values(self, fluence) -> list[float]:
        d = self.dose_rows(fluence)
        out = []
        for t in self.terms:
            v, _ = term_value_grad(t, d[t.rows], t.voxel_weight, t.ref_gy)
            out.append(float(v))
        return out

    def check_finite(self, fluence) -> None:
        """Raise InputError naming the first objective term whose weight, normalisation,
        reference dose or value at ``fluence`` is not a finite number, or whose weight
        exceeds MAX_TERM_WEIGHT (a weight of 1e308 makes the sum overflow to NaN, which
        would otherwise stop the solver without a word of why)."""
        with np.errstate(all="ignore"):  # the overflow is reported below, not warned
            vals = self.term_values(fluence)
        for t, v in zip(self.terms, vals):
            ref = np.asarray(t.ref_gy, dtype=np.float64)
            problem = None
            if not np.isfinite(t.weight) or not abs(t.weight) <= MAX_TERM_WEIGHT:
                problem = f"weight {t.weight:g} (at most {MAX_TERM_WEIGHT:g})"
            elif not np.isfinite(t.norm):
                problem = f"normalisation {t.norm:g}"
            elif not np.all(np.isfinite(ref)):
                problem = "a reference dose that is not finite"
            elif not np.isfinite(v):
                problem = f"value {v:g} at the start fluence"
            if problem:
                field_name = f"{t.goal_id}.weight" if t.goal_id else t.name
                raise InputError(f"objective term '{t.name}' is not finite: {problem}; "
                                 "lower the goal's weight or priority weight",
                                 field=field_name)
        if not np.isfinite(self.smooth_weight / self.smooth_norm):
            raise InputError("the smoothness term is not finite", field="auto:smoothness")

    def measure(self, binding: GoalBinding, dose_rows: np.ndarray) -> float | None:
        """The goal's metric on the dose grid for ``dose_rows`` (None: not measurable)."""
        if not binding.measurable:
            return None
        return measure_metric(binding.goal.metric, dose_rows[binding.structure_rows],
                              binding.structure_vw, self.voxel_volume_cc,
                              _rx_of(binding.goal, self.prescriptions))

    def goal_report(self, fluence) -> list[dict]:
        """Per goal: achieved value on the dose grid, met?, violation (>= 0, metric unit)."""
        d = self.dose_rows(fluence)
        out = []
        for b in self.bindings:
            g = b.goal
            achieved = self.measure(b, d)
            if achieved is None:
                out.append({"id": g.id, "achieved": None, "met": None, "violation": None})
                continue
            viol = achieved - g.value if g.operator in UPPER_OPS else g.value - achieved
            out.append({"id": g.id, "achieved": achieved, "met": viol <= 1e-6 * max(
                1.0, abs(g.value)), "violation": max(0.0, float(viol)), "hard": g.is_hard})
        return out


def measure_metric(metric, d, vw, voxel_volume_cc: float, rx_gy: float) -> float | None:
    """Dmax/Dmin/Dmean/D_v (Gy) or V_x (% or cc) of weighted voxel doses ``d`` (host)."""
    d = np.asarray(d, dtype=np.float64)
    vw = np.asarray(vw, dtype=np.float64)
    if d.size == 0:
        return None
    kind = metric.kind
    if kind == "Dmax":
        return float(d.max())
    if kind == "Dmin":
        return float(d.min())
    if kind == "Dmean":
        return float(np.sum(vw * d) / np.sum(vw))
    total = float(np.sum(vw))
    if kind == "D":
        frac = _volume_fraction(metric.volume, metric.volume_unit, total, voxel_volume_cc)
        order = np.argsort(-d)
        cum = np.cumsum(vw[order]) / total
        k = min(int(np.searchsorted(cum, frac)), d.size - 1)
        return float(d[order][k])
    if kind == "V":
        thr = metric.dose if metric.dose_unit != "%" else metric.dose / 100.0 * rx_gy
        vol = float(np.sum(vw[d >= thr]))
        if metric.result_unit == "cc":
            return vol * voxel_volume_cc
        return 100.0 * vol / total
    return None


def _volume_fraction(volume, unit, total_weight, voxel_volume_cc) -> float:
    if unit == "cc":
        return float(np.clip(volume / max(total_weight * voxel_volume_cc, 1e-9), 0.0, 1.0))
    return float(np.clip(volume / 100.0, 0.0, 1.0))


# --- building ---------------------------------------------------------------------------
def structure_fractions(patient, dij) -> dict[str, np.ndarray]:
    """Per structure, the fraction (0..1) of each dose-grid voxel inside it, flattened."""
    same = dij.dose_grid.same_as(patient.grid)
    out = {}
    for name, s in patient.structures.items():
        if same:
            out[name] = s.mask.reshape(-1).astype(np.float32)
        else:
            out[name] = np.asarray(mask_to_dose_grid(s.mask, patient.grid, dij.dose_grid),
                                   dtype=np.float32).reshape(-1)
    return out


def _body_fraction(patient, dij, fractions) -> np.ndarray:
    ext = patient.names("external")
    if ext:
        return fractions[ext[0]]
    body = patient.body_mask
    if dij.dose_grid.same_as(patient.grid):
        return body.reshape(-1).astype(np.float32)

    return np.asarray(mask_to_dose_grid(body, patient.grid, dij.dose_grid),
                      dtype=np.float32).reshape(-1)


def _distance_and_rx(dose_grid, target_frac: dict[str, np.ndarray], rx: dict[str, float]):
    """Distance (mm) to the nearest target voxel and that voxel's prescription (Gy)."""
    shape = dose_grid.shape
    rx_map = np.zeros(int(np.prod(shape)), dtype=np.float32)
    for name in sorted(target_frac, key=lambda n: rx.get(n, 0.0)):
        if name in rx:
            rx_map[target_frac[name] >= 0.5] = rx[name]
    inside = (rx_map > 0).reshape(shape)
    if not inside.any():
        return None, None
    dist, idx = ndimage.distance_transform_edt(~inside, sampling=dose_grid.spacing_mm,
                                               return_indices=True)
    nearest = np.ravel_multi_index(tuple(idx), shape).reshape(-1)
    return dist.reshape(-1).astype(np.float32), rx_map[nearest]


def _distance_to(dose_grid, fracs) -> np.ndarray:
    """Distance (mm) of every dose-grid voxel to the union of the given structures."""
    inside = np.zeros(dose_grid.n_voxels, dtype=bool)
    for f in fracs:
        inside |= f >= 0.5
    if not inside.any():
        return np.full(dose_grid.n_voxels, np.inf, dtype=np.float32)
    dist = ndimage.distance_transform_edt(~inside.reshape(dose_grid.shape),
                                          sampling=dose_grid.spacing_mm)
    return dist.reshape(-1).astype(np.float32)


def _rx_of(goal, rx: dict) -> float:
    """The prescription (Gy) a goal's '%' doses refer to."""
    ref = getattr(goal, "reference_rx_gy", None)
    if ref:
        return float(ref)
    if goal.structure in rx:
        return rx[goal.structure]
    return max(rx.values()) if rx else 1.0


def reference_weight(resolved_goals) -> float:
    tw = [g.weight for g in resolved_goals if g.kind == "target" and not g.is_hard]
    if tw:
        return float(max(tw))
    ws = [g.weight for g in resolved_goals]
    return float(max(ws)) if ws else 1.0


def build_problem(resolved_goals, patient, dij, *, options: ProblemOptions | None = None,
                  fractions: dict[str, np.ndarray] | None = None) -> Problem:
    """Build the optimisation problem (see the module docstring for every rule).

    resolved_goals: list of ResolvedGoal; patient: Patient; dij: DoseInfluence.
    fractions: precomputed :func:`structure_fractions` (saves time on re-plans).
    """
    opt = options or ProblemOptions()
    if fractions is None:
        fractions = structure_fractions(patient, dij)
    rx = {p.target: p.dose_gy for p in patient.prescriptions}
    targets = [n for n in patient.targets if n in fractions]
    wref = reference_weight(resolved_goals)
    dvox_cc = dij.dose_grid.voxel_volume_cc
    notes: list[str] = []

    # 1. the terms on dose-grid voxel indices (before restriction to used rows)
    specs = []  # (kind, voxel_idx, vw, ref, weight, volume, name, goal_id, hard)
    binding_specs = []  # (goal, [spec indices], voxel_idx, vw, measurable)

    body_f = _body_fraction(patient, dij, fractions)
    dist_cache: dict = {}
    n_vox = dij.n_voxels
    factor = _fine_factor(patient, dij) if opt.fine_target_edges else None
    fine_ids: dict[int, int] = {}  # patient voxel -> its row after the dose-grid rows
    coverage_cache: dict = {}

    def coverage_vox(name):
        """A target's coverage voxels (module docstring, "Target edges"): dose voxels
        wholly inside with their 26 neighbours, weight 1; its other patient voxels as
        their own rows (index n_vox + id), weight 1 / factor^3."""
        if name not in coverage_cache:
            full = fractions[name].reshape(dij.dose_grid.shape) >= 1.0 - 1e-6
            inner = ndimage.binary_erosion(full, structure=np.ones((3, 3, 3), bool))
            ct = np.argwhere(patient.structures[name].mask)
            b = ct // factor
            edge = ct[~inner[b[:, 0], b[:, 1], b[:, 2]]]
            flat = np.ravel_multi_index(tuple(edge.T), patient.grid.shape)
            ids = np.array([fine_ids.setdefault(int(v), len(fine_ids)) for v in flat],
                           dtype=np.int64)
            inner_idx = np.flatnonzero(inner.reshape(-1))
            coverage_cache[name] = (
                np.concatenate([inner_idx, n_vox + ids]),
                np.concatenate([np.ones(inner_idx.size, np.float32),
                                np.full(ids.size, 1.0 / factor ** 3, np.float32)]))
        return coverage_cache[name]

    def edge_term_weight(vox, vw):
        """A coverage term's voxel weights: its CT-grid edge rows weigh
        ``fine_edge_term_weight`` in the term (their volume in the measurement)."""
        return np.where(vox >= n_vox, np.float32(opt.fine_edge_term_weight),
                        vw).astype(np.float32)

    def control_vox(g):
        """Voxels of a control goal's structure: the body, or a ring around a target."""
        ctl = g.params.get("control")
        if ctl == "global_max":
            idx = np.flatnonzero(body_f >= 0.5)
            return idx, np.ones(idx.size, np.float32)
        if ctl == "ring":
            around = g.params.get("around", "each_target")
            names = targets if around in ("each_target", None) else [around]
            missing = [n for n in names if n not in fractions]
            if missing:
                raise InputError(f"ring goal '{g.id}' is around '{missing[0]}', which the "
                                 f"patient lacks; structures: {sorted(fractions)}", field=g.id)
            key = tuple(names)
            if key not in dist_cache:
                dist_cache[key] = _distance_to(dij.dose_grid,
                                               [fractions[n] for n in names])
            dist = dist_cache[key]
            inner = float(g.params.get("inner_mm", 0.0))
            outer = float(g.params["outer_mm"])
            in_target = np.zeros_like(body_f)
            for t in targets:
                in_target = np.maximum(in_target, fractions[t])
            sel = (dist > inner) & (dist <= outer) & (in_target < 0.5) & (body_f >= 0.5)
            idx = np.flatnonzero(sel)
            return idx, np.ones(idx.size, np.float32)
        raise InputError(f"control goal '{g.id}' of type '{ctl}' has no structure to "
                         "optimise", field=g.id)

    def struct_vox(name, upper=False, goal=None):
        if goal is not None and goal.kind == "control" and name not in fractions and \
                goal.params.get("control") in ("ring", "global_max"):
            return control_vox(goal)
        if name not in fractions:
            raise InputError(f"goal refers to structure '{name}' the patient lacks; "
                             f"structures: {sorted(fractions)}", field=name)
        f = fractions[name].copy()
        if upper and name in rx:
            higher = [t for t in targets if rx.get(t, 0.0) > rx[name]]
            for t in higher:
                f = np.clip(f - fractions[t], 0.0, 1.0)
        idx = np.flatnonzero(f >= opt.min_voxel_fraction)
        return idx, f[idx]

    falloff_weight = opt.falloff_weight_rel * wref
    has_lower = set()
    has_global_max = False
    for g in resolved_goals:
        m = g.metric
        upper = g.operator in UPPER_OPS
        if g.operator not in UPPER_OPS + LOWER_OPS:
            raise InputError(f"goal '{g.id}': operator must be <= or >=, got '{g.operator}'",
                             field=g.id)
        weight = g.weight * (opt.hard_weight_factor if g.is_hard else 1.0)
        if g.value is None:
            notes.append(f"{g.id}: no value (a predicted goal without a predicted dose); "
                         "not optimised")
            binding_specs.append((g, [], None, None, False))
            continue
        if m.kind in ("CI", "CIpaddick", "GI"):
            falloff_weight = max(falloff_weight, opt.falloff_weight_rel * g.weight)
            notes.append(f"{g.id}: {m.kind} goal steers the automatic fall-off term "
                         f"(weight {falloff_weight:g}); evaluated, not a separate term")
            binding_specs.append((g, [], None, None, False))
            continue
        vox, vw = struct_vox(g.structure, upper=upper, goal=g)
        if (opt.organ_minus_targets and upper and g.kind == "organ" and not g.is_hard
                and vox.size and m.kind in ("Dmax", "Dmean", "D", "V")):
            limit = (m.dose if m.dose_unit != "%" else m.dose / 100.0 * _rx_of(g, rx)) \
                if m.kind == "V" else float(g.value)
            f = np.zeros(fractions[g.structure].shape, np.float32)
            f[vox] = vw
            for t in targets:
                if rx.get(t, 0.0) > limit:
                    f = np.clip(f - fractions[t], 0.0, 1.0)
            keep = np.flatnonzero(f >= opt.min_voxel_fraction)
            if keep.size and keep.size < vox.size:
                vox, vw = keep, f[keep]
        if vox.size == 0:
            notes.append(f"{g.id}: structure '{g.structure}' has no voxels on the dose grid")
            binding_specs.append((g, [], None, None, False))
            continue
        meas_vox, meas_vw = struct_vox(g.structure, goal=g)
        if g.params.get("control") == "global_max":
            has_global_max = True
        total = float(vw.sum())
        kind, ref, volume = None, float(g.value), 1.0
        if m.kind == "Dmax":
            kind = "max" if upper else "dv_min"
            volume = 0.0 if not upper else 1.0
        elif m.kind == "Dmin":
            kind = "min" if not upper else "dv_max"
        elif m.kind == "Dmean":
            kind = "mean_max" if upper else "mean_min"
        elif m.kind == "D":
            volume = _volume_fraction(m.volume, m.volume_unit, total, dvox_cc)
            if upper:
                kind = "max" if volume <= opt.near_max_volume else "dv_max"
            else:  # a near-min (D_v, v >= 1 - near_max_volume) becomes a min-dose term
                kind = "min" if volume >= 1.0 - opt.near_max_volume else "dv_min"
        elif m.kind == "V":
            thr = m.dose if m.dose_unit != "%" else m.dose / 100.0 * _rx_of(g, rx)
            vol_unit = "cc" if m.result_unit == "cc" else "%"
            volume = _volume_fraction(g.value, vol_unit, total, dvox_cc)
            ref = float(thr)
            kind = "dv_max" if upper else "dv_min"
        elif m.kind == "HI":
            r = rx.get(g.structure)
            if r is None:
                notes.append(f"{g.id}: HI on an unprescribed structure is evaluated only")
                binding_specs.append((g, [], None, None, False))
                continue
            kind, ref = "uniform", r
        else:
            notes.append(f"{g.id}: metric kind '{m.kind}' has no objective term; "
                         "evaluated only")
            binding_specs.append((g, [], None, None, False))
            continue
        if not upper and g.kind == "target" and factor and g.structure in fractions:
            vox, meas_vw = meas_vox, _ = coverage_vox(g.structure)
            vw = edge_term_weight(vox, meas_vw)
        elif not upper and g.kind == "target":
            # partial-volume edge voxels count fully for target coverage, so the dose
            # interpolated back to the finer patient grid covers the target edge
            vw = np.ones_like(vw)
        if not upper:
            has_lower.add(g.structure)
        specs.append((kind, vox, vw, ref, weight, volume, f"{g.id}", g.id, g.is_hard))
        binding_specs.append((g, [len(specs) - 1], meas_vox, meas_vw,
                              m.kind in ("Dmax", "Dmin", "Dmean", "D", "V")))

    # default coverage for prescribed targets without a lower-bound goal
    if opt.default_target_coverage:
        for t in targets:
            if t in rx and t not in has_lower:
                vox, vw = coverage_vox(t) if factor else struct_vox(t)
                if factor:
                    vw = edge_term_weight(vox, vw)
                specs.append(("dv_min", vox, vw, rx[t], wref, 0.95, f"auto:{t}.D95", None,
                              False))
                notes.append(f"auto: {t} has no lower-bound goal; added D95 >= {rx[t]:g} Gy")

    body_vox = np.flatnonzero(body_f >= 0.5)
    if rx and body_vox.size and not has_global_max:
        gmax = opt.global_max_pct / 100.0 * max(rx.values())
        specs.append(("max", body_vox, np.ones(body_vox.size, np.float32), gmax,
                      opt.global_max_weight_rel * wref, 1.0, "auto:global_max", None, False))
    if rx and opt.falloff and body_vox.size:
        dist, rx_near = _distance_and_rx(dij.dose_grid, {t: fractions[t] for t in targets},
                                         rx)
        if dist is not None:
            outside = body_vox[dist[body_vox] > 0]
            dd = np.maximum(dist[outside] - opt.falloff_start_mm, 0.0)
            e = opt.falloff_end_frac
            ref = rx_near[outside] * (e + (1.0 - e) * np.exp(-dd / opt.falloff_mm))
            if outside.size:
                specs.append(("max", outside, np.ones(outside.size, np.float32),
                              ref.astype(np.float32), falloff_weight, 1.0, "auto:falloff",
                              None, False))

    # 2. restrict the dij to the rows some term uses
    used = np.unique(np.concatenate([s[1] for s in specs] + [
        b[2] for b in binding_specs if b[2] is not None]))
    lookup = np.full(n_vox + len(fine_ids), -1, dtype=np.int64)
    lookup[used] = np.arange(used.size)
    ops = _operators(dij, used, fine_ids, patient.grid, opt)
    A, fine = ops["A"], ops["fine"]

    terms = [make_term(k, lookup[v], vw, ref, w, volume=vol, name=name, goal_id=gid,
                       hard=hard, norm_voxels_cap=None if name == "auto:falloff"
                       else opt.max_norm_voxels)
             for (k, v, vw, ref, w, vol, name, gid, hard) in specs]
    bindings = []
    for g, idx, vox, vw, measurable in binding_specs:
        rows = lookup[vox] if vox is not None else np.zeros(0, np.int64)
        bindings.append(GoalBinding(g, tuple(idx), rows,
                                    vw if vw is not None else np.zeros(0, np.float32),
                                    measurable))

    x0 = initial_fluence(A, terms, rx, targets, fractions, lookup)
    pairs = smoothness_pairs(dij.beamlets.beam_index, dij.beamlets.bev_x_mm,
                             dij.beamlets.bev_y_mm, dij.beamlets.beamlet_size_mm)
    smooth_norm = max(len(pairs), 1) * float(np.mean(x0)) ** 2
    mu = None
    mu_scale = 0.0
    leak = None
    x0_mean = float(np.mean(x0)) if x0.size else 0.0
    if (opt.mu_weight_rel > 0 or opt.leaf_transmission > 0) and x0_mean > 0:
        bl = dij.beamlets
        mu = mu_surrogate(bl.beam_index, bl.bev_x_mm, bl.bev_y_mm, bl.beamlet_size_mm,
                          opt.mu_tau_rel * x0_mean)
        mu_scale = opt.mu_weight_rel * wref / (len(mu.beam_rows) * x0_mean)
        if opt.leaf_transmission > 0:
            if "beam_columns" not in ops:
                ops["beam_columns"] = _beam_columns(A, bl.beam_index)
            leak = (float(opt.leaf_transmission), ops["beam_columns"])
    if "fast" not in ops:
        ops["fast"] = _fast_operator(A, dij, opt)
    problem = Problem(A, used, terms, x0, dij.dose_grid, pairs,
                      opt.smoothness_weight_rel * wref, max(smooth_norm, 1e-12), bindings,
                      notes, dvox_cc, rx, mu, mu_scale, fine, leak, ops["fast"])
    problem.check_finite(x0)
    return problem


#: dij -> {"key": ..., "A": ..., "fine": ..., "fast": ..., "beam_columns": ...}: the
#: latest row operators built on each living dij (gone with it; DoseInfluence hashes by
#: identity)
_OPERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _operators(dij, used, fine_ids: dict, patient_grid, opt: ProblemOptions) -> dict:
    """The problem's row operators on ``dij``: ``A`` and its :class:`FineRows`
    (:func:`_rows_matrix`), and once asked for, the iterations' form (``fast``,
    :func:`_fast_operator`) and the beams' columns (``beam_columns``). Kept for the
    latest rows and options while ``dij`` lives: a warm re-plan (a tolerance tweak keeps
    the rows) reuses them instead of splitting the dij again (~0.7 s on an OpenKBP
    patient), and with them ``A``'s cached transposes (:func:`atp.xp.csr_transpose`).
    Memory: a living dij keeps these (about as much as the problem's rows of the dij,
    twice with the transposes) until it is dropped or another problem is built on it."""
    voxels = np.fromiter(fine_ids.keys(), dtype=np.int64, count=len(fine_ids))
    key = (_digest(used), _digest(voxels), tuple(patient_grid.shape),
           tuple(np.asarray(patient_grid.spacing_mm, float).tolist()),
           tuple(np.asarray(patient_grid.origin_mm, float).tolist()),
           float(opt.dij_tail_threshold), int(opt.dij_tail_group))
    hit = _OPERATORS.get(dij)
    if hit is not None and hit["key"] == key:
        return hit
    A, fine = _rows_matrix(dij, used, fine_ids, patient_grid)
    ops = {"key": key, "A": A, "fine": fine}
    _OPERATORS[dij] = ops
    return ops


def _digest(a) -> str:
    """A content key of an integer array (its int64 bytes)."""
    return hashlib.sha1(np.ascontiguousarray(a, np.int64).tobytes(),
                        usedforsecurity=False).hexdigest()


def _fast_operator(A, dij, opt: ProblemOptions):
    """The iterations' form of ``A`` (:class:`~atp.optimizer.rowop.TailGrouped`; over the
    dose-grid rows of an InterpolatedRows), or None for the exact rows."""
    if opt.dij_tail_threshold <= 0 or opt.dij_tail_group <= 1 or A.shape[1] == 0:
        return None
    bl = dij.beamlets
    col_max = dij.matrix.max(axis=0).toarray().reshape(-1).astype(np.float64)
    beams, inv = np.unique(np.asarray(bl.beam_index), return_inverse=True)
    peak = np.zeros(beams.size, np.float64)
    np.maximum.at(peak, inv.reshape(-1), col_max)
    cut = (opt.dij_tail_threshold * peak[inv.reshape(-1)]).astype(np.float32)
    groups = beamlet_groups(bl.beam_index, bl.bev_x_mm, bl.bev_y_mm, bl.beamlet_size_mm,
                            int(opt.dij_tail_group))
    if isinstance(A, InterpolatedRows):
        return InterpolatedRows(tail_grouped(A.B, cut, groups), A.S, A.top, np, None,
                                A.ST)
    return tail_grouped(A, cut, groups)


def _beam_columns(A, beam_index) -> np.ndarray:
    """(n_rows, n_beams) float32: each beam's dose per unit fluence on all its beamlets,
    beams in the order of :func:`mu_surrogate` (sorted beam indices)."""
    beams, col = np.unique(np.asarray(beam_index), return_inverse=True)
    ind = sp.csr_matrix((np.ones(col.size, np.float32), (np.arange(col.size), col)),
                        shape=(col.size, beams.size))
    return np.asarray((A @ ind).toarray(), dtype=np.float32)


def _fine_factor(patient, dij) -> int | None:
    """The patient-to-dose-grid down-sampling factor where target edges get patient-grid
    rows (``fine_target_edges``); None when the dose grid is the patient grid, or not an
    integer down-sampling of it."""
    if dij.dose_grid.same_as(patient.grid):
        return None
    try:
        return downsample_factor(patient.grid, dij.dose_grid)
    except GridMismatchError:
        return None


def _rows_matrix(dij, used, fine_ids: dict, patient_grid):
    """A's rows: the dij's rows ``used`` (< its voxel count), then the patient-grid rows
    (``used`` beyond it, ids of ``fine_ids``) interpolated from the dij, as the operator
    :class:`~atp.optimizer.rowop.InterpolatedRows` (the dij's rows once, not each patient
    row's union of eight); and their :class:`FineRows` (None without them)."""
    n_vox = dij.n_voxels
    m = dij.matrix.tocsr()
    real = used[used < n_vox]
    virt = used[used >= n_vox] - n_vox
    if not virt.size:
        return sp.csr_matrix(m[real, :], dtype=np.float32), None
    voxels = np.fromiter(fine_ids.keys(), dtype=np.int64, count=len(fine_ids))[virt]
    interp = interpolation_rows(voxels, patient_grid, dij.dose_grid)
    return interpolated_rows(m, real, interp), FineRows(int(real.size), voxels, interp)


def initial_fluence(A, terms, rx, targets, fractions, lookup) -> np.ndarray:
    """Uniform fluence scaled so the highest-Rx target's mean dose equals its Rx."""
    n = A.shape[1]
    w = np.ones(n, dtype=np.float32)
    d = A @ w
    if rx and targets:
        t = max((t for t in targets if t in rx), key=lambda t: rx[t], default=None)
        if t is not None:
            vox = np.flatnonzero(fractions[t] >= 0.5)
            rows = lookup[vox]
            rows = rows[rows >= 0]
            mean = float(np.mean(d[rows])) if rows.size else 0.0
            if mean > 0:
                return w * np.float32(rx[t] / mean)
    m = float(np.max(d)) if d.size else 0.0
    return w * np.float32(1.0 / m) if m > 0 else w
