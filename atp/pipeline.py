"""The planning pipeline: the one place that knows the whole order of the optimiser's stages.

``plan(patient, ...)`` runs: predict -> resolve goals (:func:`atp.plans.prepare_goals`)
-> dose influence -> build problem -> optimise (-> refine) -> (sequence, when a
sequencer is installed and asked for) -> final dose -> evaluate, and returns a
:class:`atp.plans.Plan`. A host (TPS vendor) may pass its own ``DoseInfluence`` (``dij=``,
its clinical engine) and/or its own predicted dose (``predicted_dose=``); stages it
provides are not run. ``Plan.save(dir)`` writes the plan directory and
:func:`atp.plans.load_plan` reads it back (see :mod:`atp.plans`).

``replan(plan, set={"Parotid_L.Dmean.tolerance": -20}, warm=True)`` changes goals and
re-optimises with the stored dij and prediction.

``plan(patient, fast=True, spare={"Parotid_L": 0.1})`` runs the AIRT-style fast path
instead of the optimiser (single arc, predicted dose -> fluence by differentiable dose
feedback, VMAT sequencing; :mod:`atp.fastplan`, whose ``respare(plan, spare={...})``
moves the OAR sparing sliders of such a plan without re-running the predictor or
rebuilding matrices).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

import numpy as np

from atp import final_dose as fd
from atp import sequencer
from atp.dose import registry as engines
from atp.dose.arc import ARC_THRESHOLD
from atp.dose.geometry import BEAM_TEMPLATES, Beam, equispaced_beams
from atp.dose.resample import dose_to_patient_grid
from atp.errors import InputError, quote
from atp.fastplan import FastPlanOptions, fast_plan, fast_plan_options
from atp.forward import forward_dose, forward_dose_grouped
from atp.goals import evaluate_goals
from atp.goals.changes import goal_changes
from atp.goals.schema import MAX_WEIGHT, check_setting
from atp.optimizer import registry as backends
from atp.optimizer.explain import explain_goal
from atp.optimizer.objectives import beam_mu, mu_surrogate
from atp.optimizer.problem import (
    ProblemOptions,
    build_problem,
    reference_weight,
    structure_fractions,
)
from atp.optimizer.refine import refine as run_refine
from atp.optimizer.solve import apply_state, measure_offsets, optimize, surrogate_value
from atp.patient import Patient
from atp.plans import (  # noqa: F401 - Plan and load_plan: also importable from here
    Plan,
    StageTimer,
    goal_list_settings,
    load_plan,
    prepare_goals,
    versions,
)
from atp.progress import tick
from atp.refine_spec import parse_refine
from atp.score_refine import refine_plan
from atp.scorecard import list_scorecards, load_scorecard
from atp.sequencer.deliverable import delivered_weights
from atp.sequencer.fidelity import fidelity
from atp.vmatplan import (
    VmatOptions,
    control_point_beams,
    dmpo_step,
    sweep_influence,
    vmat_arcs,
)

#: target and control goals pursued by weight in the attainment rounds (attain_weight_ids)
ATTAIN_BY_WEIGHT = True
ATTAIN_ROUNDS = 3  # goal-attainment rounds of the optimiser (optimizer.solve.optimize)
ATTAIN_MAX_PRIORITY = 3  # protocol goals (targets P2, organ limits P3), not P4 predicted
DELIVERABLE_ROUNDS = 2  # re-optimisations against the sequencing loss (sequenced plans)
WARM_ATTAIN_ROUNDS = 1  # warm re-plans start from the stored shifts: one round suffices
SETTABLE = ("tolerance", "value", "weight", "priority")


# --- the optimiser path -------------------------------------------------------------------
def plan(patient, site: str = "hn", institution=None, goal_list=None, predictor=None,
         predicted_dose=None, dose_engine: str = "pencil-beam", dij=None,
         backend="auto", beams=9, beam_template: str | None = None, refine=0,
         progress=True, dose_grid_factor: int | None = None, beamlet_size_mm: float = 5.0,
         sequence: bool | str = True, machine: str = "millennium120",
         optimizer_options: dict | None = None, fast: bool = False,
         spare: dict | None = None, options: FastPlanOptions | str | None = None,
         fast_options: dict | None = None, technique: str | None = None,
         vmat_options: dict | None = None, scorecard: str | None = None) -> Plan:
    """Plan one patient (see the module docstring).

    patient: a Patient or anything ``atp.io.load_patient`` accepts (path, 'phantom').
    goal_list: a GoalList or a goal-list YAML path (default: the shipped list of
    ``site`` plus the ``institution`` overlay). predictor: a name or an object with
    ``predict(patient)`` (default: the registry's default); predicted_dose: Gy on the
    patient grid (skips prediction). dij: a DoseInfluence (skips the dose engine).
    backend: 'auto' | 'cpu' | 'gpu' | 'qp' or a backend object. beams: a count or a list
    of Beams; beam_template: a name from BEAM_TEMPLATES. refine: N, 'dvh:N' or
    'scorecard[:N]' (:mod:`atp.refine_spec`; scorecard: its card, default the site's).
    progress: True (tqdm on stderr), False, or a callable(stage_name). sequence: True
    (default: the sequencer's default technique for the beams, sliding window for static
    fields, VMAT for arcs), a technique name ('imrt-sns', 'imrt-sliding', 'vmat') or
    False (no sequencing: the reported dose is the ideal fluence dose, and the plan notes
    say so). When sequenced, the final dose, DVH and goal results are the deliverable
    dose of the MLC apertures on ``machine``, and ``Plan.fidelity`` compares it with the
    ideal. optimizer_options: to the backend. dose_grid_factor: default 2 (fast path: 3).
    fast: run the AIRT-style fast path (:func:`atp.fastplan.fast_plan`: one arc, VMAT)
    instead of the optimiser; spare: its OAR sparing sliders {OAR: factor in [0, 1)};
    options: its :class:`atp.fastplan.FastPlanOptions` (or a preset name);
    fast_options: the same as a mapping (:func:`atp.fastplan.fast_plan_options`:
    ``arc_spacing_deg``, ``device``, ``preset``, ``fastpath_options`` ...).
    technique: None or 'vmat' (:mod:`atp.vmatplan`: two arcs, arc sequencing, DMPO of
    leaves and MU on the goal list); vmat_options: :class:`atp.vmatplan.VmatOptions` fields.
    """
    vmat, beams, sequence, optimizer_options = _technique(
        technique, vmat_options, fast=fast, beam_template=beam_template, beams=beams,
        sequence=sequence, optimizer_options=optimizer_options)
    refine, scorecard = _refine_of(refine, scorecard, site)
    if fast:
        return _fast(patient, site=site, institution=institution, goal_list=goal_list,
                     predictor=predictor, predicted_dose=predicted_dose,
                     dose_engine=dose_engine, dij=dij, progress=progress, spare=spare,
                     options=_fast_options(options, fast_options, machine=machine,
                                           beamlet_size_mm=beamlet_size_mm,
                                           dose_grid_factor=dose_grid_factor),
                     refused={"backend": backend != "auto", "beams": beams not in (None, 9),
                              "beam_template": beam_template is not None, "refine": refine,
                              "optimizer_options": optimizer_options,
                              "sequence": sequence not in (True, "vmat")})
    if spare or fast_options or options is not None:
        raise InputError("OAR sparing sliders (spare=) and fast-path options need fast=True",
                         field="--spare" if spare else "fast_options")
    dose_grid_factor = 2 if dose_grid_factor is None else dose_grid_factor
    stages = StageTimer(progress, total=(  # the bar's stages; +1: explain
        6 + (predicted_dose is None) + (dij is None) + (not isinstance(patient, Patient))
        + bool(refine) + (2 if sequence else 0) + 1 + (vmat is not None)))
    t_start = time.perf_counter()
    try:
        prep = prepare_goals(patient, site=site, institution=institution,
                             goal_list=goal_list, predictor=predictor,
                             predicted_dose=predicted_dose, stages=stages)
        engine_name = "given" if dij is not None else dose_engine
        if dij is None:
            beams, beam_template = _beams_of(prep.goal_list, beams, beam_template)
            dij = stages.run("dose influence", _plan_influence, dose_engine, prep.loaded,
                             vmat, make_beams(beams, beam_template), beamlet_size_mm,
                             dose_grid_factor)
        settings = _plan_settings(
            prep, site, institution, engine_name, backend, vmat, beams=beams,
            beam_template=beam_template, refine=refine, dose_grid_factor=dose_grid_factor,
            beamlet_size_mm=beamlet_size_mm, sequence=sequence, machine=machine,
            optimizer_options=optimizer_options, scorecard=scorecard)
        out = _scorecard_rounds(stages, optimise_and_finish(
            prep.patient, list(prep.resolved), dij, prep.predicted_dose, backend=backend,
            refine=_dvh_rounds(refine), settings=settings, notes=prep.resolve_notes,
            stages=stages), refine, scorecard)
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


def _technique(technique, vmat_options, *, fast, beam_template, beams, sequence,
               optimizer_options):
    """plan(technique=...): (VmatOptions or None, beams, sequence, optimizer_options)."""
    if technique is None:
        if vmat_options:
            raise InputError("vmat_options need technique='vmat'", field="vmat_options")
        return None, beams, sequence, optimizer_options
    if technique not in TECHNIQUES:
        raise InputError(f"unknown technique {quote(technique)}; known: "
                         f"{', '.join(TECHNIQUES)}", field="technique")
    if fast or beam_template is not None or sequence not in (True, "vmat"):
        raise InputError("technique 'vmat' sets the beams and the sequencer; drop "
                         "fast / beam_template / sequence", field="technique")
    vmat = VmatOptions.from_dict(vmat_options)
    if vmat.method == "sweep":  # sector beams planned as static fields, swept as arcs
        return vmat, vmat_arcs(vmat), "vmat-sliding", optimizer_options
    # DMPO optimises the deliverable dose itself: no re-optimisation rounds; the
    # final-dose stage re-sequences without DMPO, so it is off for VMAT (for now)
    return vmat, vmat_arcs(vmat), "vmat", {"deliverable_rounds": 0, "final_dose": False,
                                           **(optimizer_options or {})}


def _plan_influence(engine: str, patient, vmat, beams, beamlet_size_mm, dose_grid_factor):
    """plan()'s dose-influence matrix: the sweep arcs' sector beams
    (:func:`atp.vmatplan.sweep_influence`), or ``beams`` (DMPO arcs: at the arc
    threshold)."""
    if vmat is not None and vmat.method == "sweep":
        return sweep_influence(engine, patient, vmat, beamlet_size_mm=beamlet_size_mm,
                               dose_grid_factor=dose_grid_factor)
    return _influence(engine, patient, beams, beamlet_size_mm, dose_grid_factor,
                      arcs=vmat is not None)


def _influence(engine: str, patient, beams, beamlet_size_mm, dose_grid_factor,
               arcs: bool = False):
    """The dose engine ``engine``'s dose-influence matrix for ``beams`` (``arcs``: at the
    arc sparsification threshold, :data:`atp.dose.arc.ARC_THRESHOLD`)."""
    kw = {"threshold": ARC_THRESHOLD} if arcs else {}
    return engines.get(engine).influence(patient, beams, beamlet_size_mm=beamlet_size_mm,
                                         dose_grid_factor=dose_grid_factor, **kw)


def _plan_settings(prep, site, institution, engine_name, backend, vmat, *, beams,
                   beam_template, refine, dose_grid_factor, beamlet_size_mm, sequence,
                   machine, optimizer_options, scorecard=None) -> dict:
    """The plan.json settings of :func:`plan` (``vmat``: VmatOptions or None)."""
    return {
        **goal_list_settings(prep.goal_list, site, institution),
        "predictor": prep.predictor, "dose_engine": engine_name,
        "backend_requested": backend if isinstance(backend, str) else
        getattr(backend, "name", "custom"),
        "beams": beams if isinstance(beams, int) else None,
        "beam_template": beam_template, "refine": refine.setting,
        "dose_grid_factor": dose_grid_factor, "beamlet_size_mm": beamlet_size_mm,
        "resolve_notes": prep.resolve_notes, "sequence": sequence, "machine": machine,
        "optimizer_options": dict(optimizer_options or {}),
        **({} if vmat is None else {"technique": "vmat", "vmat": vmat.to_dict()}),
        **({} if scorecard is None else {"scorecard": scorecard}),
    }


# --- refinement: DVH-point rounds (in the optimisation) or scorecard rounds (whole plans) -
def _refine_of(refine, scorecard, site):
    """(RefineSpec, scorecard or None) of plan()'s ``refine`` and ``scorecard``: the
    scorecard mode's card is ``scorecard`` (a shipped name or a file) or the site's
    shipped one; a bad card fails here, before any work."""
    spec = parse_refine(refine, field="refine")
    if spec.mode != "scorecard" or not spec:
        return spec, None
    if scorecard is None or str(scorecard).lower() == "none":
        if site not in list_scorecards():
            raise InputError(f"--refine scorecard needs a scorecard: none is shipped for "
                             f"site {quote(site)}; give --scorecard NAME|FILE",
                             field="--scorecard")
        scorecard = site
    card = load_scorecard(scorecard)
    return spec, str(scorecard) if str(scorecard) in list_scorecards() else card.file


def _dvh_rounds(refine) -> int:
    """The DVH-point rounds optimise_and_finish runs (0 in the scorecard mode)."""
    return refine.rounds if refine.mode == "dvh" else 0


def _scorecard_rounds(stages, plan_out: Plan, refine, scorecard) -> Plan:
    """The scorecard mode's rounds on a finished plan (:mod:`atp.score_refine`)."""
    if refine.mode != "scorecard" or not refine:
        return plan_out
    return stages.run("refine (scorecard)", refine_plan, plan_out, refine.rounds, scorecard,
                      replan=replan)


def _beams_of(gl, beams, beam_template):
    """(beams, beam_template): as given, else the goal list's template or beam count
    (else 9 beams)."""
    if beams is None and beam_template is None:
        if getattr(gl, "beam_template", None) in BEAM_TEMPLATES:
            beam_template = gl.beam_template
        else:
            beams = getattr(gl, "beams", None) or 9
    return beams, beam_template


def _fast_options(options, fast_options, *, machine, beamlet_size_mm,
                  dose_grid_factor) -> FastPlanOptions:
    """plan(fast=True)'s FastPlanOptions: ``options`` (FastPlanOptions or a preset name)
    or the ``fast_options`` mapping, with plan()'s ``machine``, ``beamlet_size_mm`` and
    ``dose_grid_factor`` (what the options set explicitly wins)."""
    if options is not None and fast_options:
        raise InputError("give the fast-path options once: options= or fast_options=",
                         field="fast_options")
    if isinstance(options, FastPlanOptions):
        changes = {k: v for k, v, default in (
            ("machine", machine, "millennium120"), ("beamlet_size_mm", beamlet_size_mm, 5.0),
            ("dose_grid_factor", dose_grid_factor, None)) if v != default}
        return replace(options, **changes)
    spec = dict(fast_options or {})
    if options is not None:
        spec.setdefault("preset", options)
    spec = {"machine": machine, "beamlet_size_mm": beamlet_size_mm, **spec}
    if dose_grid_factor is not None:
        spec.setdefault("dose_grid_factor", dose_grid_factor)
    return fast_plan_options(spec)


def _fast(patient, *, refused: dict, **kw) -> Plan:
    """plan(fast=True): refuse optimiser-only options, then atp.fastplan.fast_plan."""
    odd = [name for name, bad in refused.items() if bool(bad)]
    if odd:
        raise InputError(f"{', '.join(odd)} do(es) not apply to the fast path (one arc, "
                         "VMAT; see fast_options)", field=odd[0])
    return fast_plan(patient, **kw)


@dataclass(frozen=True)
class Start:
    """Where an optimisation starts: cold (the default) or from a plan being re-planned.

    fluence: beamlet weights to start from (None: the uniform initial fluence).
    hard_state: the stored hard-goal / attainment state. sequencing_offset: a previous
    plan's deliverable-minus-ideal dose (Gy, patient grid); when given (warm re-plans of
    sequenced plans), the optimisation measures the corrected goals on the ideal dose
    plus it, and no further correction rounds are run. attain_rounds: goal-attainment
    rounds unless ``optimizer_options`` says otherwise (warm re-plans: 1, as the stored
    state is applied first). steer: ids of goals a re-plan changed: the attainment
    rounds pursue them whatever their priority (``optimize(attain_ids=)``). objectives:
    callable(problem, fluence) -> objective terms added to the goal list's (the scorecard
    refinement's tighter objectives, :mod:`atp.score_refine`). field_beams: the plan's
    jaw-field beamlets per dose beam (``Plan.attachments["field_beams"]``): the field dose
    of a dose beam whose jaws did not change is not computed again.
    """
    fluence: np.ndarray | None = None
    hard_state: dict | None = None
    sequencing_offset: np.ndarray | None = None
    attain_rounds: int = ATTAIN_ROUNDS
    steer: tuple = ()
    objectives: object = None  # callable(problem, fluence) -> extra terms (refinement)
    field_beams: dict | None = None  # jaw-field beamlets per dose beam (re-plans reuse them)


COLD = Start()


def replan(plan: Plan, set: dict | None = None, *, warm: bool = True, backend=None,
           refine=None, progress=False, objectives=None) -> Plan:
    """A new plan after changing goals; reuses ``plan``'s dij and prediction.

    set: ``{"<goal>.<field>": number}`` with field one of tolerance (%: predicted
    goals get value = predicted x (1 + tolerance/100)), value, weight, priority.
    ``<goal>`` is a goal id, or an id without its ``.pred`` suffix, or
    ``<structure>.<metric>``. warm: start from the plan's fluence and hard-goal
    state (else cold start from the uniform initial fluence); a warm re-plan of a
    sequenced plan also reuses the plan's sequencing loss (deliverable minus ideal
    dose) as the deliverable-dose correction of its one optimisation, instead of
    running the correction rounds again (one sequencing instead of up to three).
    refine: as plan()'s (None: the plan's own setting; its scorecard mode uses the
    plan's ``scorecard`` setting). objectives: callable(problem, start fluence) ->
    extra objective terms added to the goal list's for this optimisation (the
    scorecard refinement's; :class:`Start`).
    """
    goals = apply_settings(plan.resolved_goals, set or {},
                           plan.settings.get("priority_weights"))
    settings = dict(plan.settings)
    settings["replan_of"] = {"set": dict(set or {}), "warm": bool(warm)}
    offset = None
    if warm and plan.ideal_dose_gy is not None and plan.settings.get("sequence"):
        offset = (np.asarray(plan.dose_gy, np.float32)
                  - np.asarray(plan.ideal_dose_gy, np.float32))
    touched = tuple(n.id for o, n in zip(plan.resolved_goals, goals)
                    if (o.value, o.tolerance_pct, o.priority, o.weight)
                    != (n.value, n.tolerance_pct, n.priority, n.weight))
    start = Start(fluence=plan.fluence if warm else None,
                  hard_state=plan.optimizer.get("hard_state") if warm else None,
                  sequencing_offset=offset,
                  attain_rounds=WARM_ATTAIN_ROUNDS if warm else ATTAIN_ROUNDS,
                  steer=touched, objectives=objectives,
                  field_beams=plan.attachments.get("field_beams"))
    refine, card = _refine_of(plan.settings.get("refine", 0) if refine is None else refine,
                              plan.settings.get("scorecard"), plan.settings.get("site"))
    settings["refine"] = refine.setting
    settings.pop("scorecard", None)
    settings.update({} if card is None else {"scorecard": card})
    stages = StageTimer(progress, total=(  # as plan(): +2 sequence, field dose
        5 + (plan.fractions is None) + (2 if plan.settings.get("sequence") else 0)
        + bool(refine)))
    try:
        new = _scorecard_rounds(stages, optimise_and_finish(
            plan.patient, goals, plan.dij, plan.predicted_dose_gy,
            backend=backend or plan.settings.get("backend_requested", "auto"),
            refine=_dvh_rounds(refine), settings=settings,
            notes=list(plan.settings.get("resolve_notes", [])), stages=stages,
            fractions=plan.fractions, start=start, total_key="replan"), refine, card)
    finally:
        stages.close()
    why = {k: v["line"] for k, v in (new.optimizer.get("blockers") or {}).items()}
    new.changes = goal_changes(plan.results, new.results, why=why)
    return new


# --- optimise and finish ------------------------------------------------------------------
class GoalCheck:
    """The goals an optimisation measures on the patient grid (what the plan is judged
    on): hard goals, goals with a dose-valued term (their surrogate offset keeps what is
    optimised in line with what is reported) and the goals the attainment rounds steer.
    ``check(w, offset)``: the goals at fluence ``w``; ``offset``: a dose (Gy) added first
    (the deliverable-minus-ideal correction)."""

    def __init__(self, patient, dij, resolved, opts: dict):
        self.patient, self.dij = patient, dij
        self.checked = [g for g in resolved if g.value is not None and (
            g.is_hard or g.metric.kind in ("Dmean", "Dmax", "Dmin", "D")
            or (opts["attain_rounds"] and g.priority <= opts["attain_max_priority"]))]

    def __call__(self, w, offset=None) -> list[dict]:
        if not self.checked:
            return []
        d = patient_dose(self.dij, w)
        if offset is None:
            rs = evaluate_goals(self.checked, self.patient, d)
        else:  # organ limits and target coverage on the corrected dose; hot-spot
            # limits of targets / controls stay on the ideal (see _deliverable_correction)
            corr = [_corrects(g) for g in self.checked]
            on_c = evaluate_goals([g for g, c in zip(self.checked, corr) if c],
                                  self.patient, d + offset)
            on_i = evaluate_goals([g for g, c in zip(self.checked, corr) if not c],
                                  self.patient, d)
            rs = on_c + on_i
        return [{"id": r.goal.id, "achieved": r.achieved, "met": r.passed,
                 "violation": max(0.0, -(r.margin or 0.0)), "hard": r.goal.is_hard}
                for r in rs]


@dataclass(eq=False)
class Solve:
    """One optimisation of a plan: the problem, the backend, the solver options (goal
    attainment and the goal check included) and what the finishing steps need."""

    problem: object
    backend: object
    patient: object
    dij: object
    resolved: list
    settings: dict
    opts: dict
    goal_check: GoalCheck
    deliverable_rounds: int
    final: object = None  # atp.final_dose.FinalDoseOptions (sequenced plans)
    field_beams: dict = field(default_factory=dict)  # forward.field_influence's cache
    dmpo_state: dict = field(default_factory=dict)  # VMAT: where DMPO's rounds ended


def attain_limits(resolved, patient) -> dict:
    """Bounds on shifted references (``optimize(attain_limits=...)``): the global maximum's
    reference is pulled down at most to the highest prescription. Below it, a max-dose
    term on every body voxel acts on the whole target against its coverage goals (the
    two then end shifted to their caps, a tug of war that sets the target's dose instead
    of the goals); at it, the term still presses on the hot spots."""
    rx = [float(r.dose_gy) for r in patient.prescriptions]
    if not rx:
        return {}
    return {g.id: (max(rx), None) for g in resolved
            if g.params.get("control") == "global_max" and g.value is not None}


def attain_weight_ids(resolved) -> tuple:
    """Goals the attainment rounds pursue by weight (``optimize(attain_weight_ids=)``):
    every dose-point or dose-volume goal on a target and every control (global maximum,
    rings). Shifting such a goal's reference widens the set of voxels its term presses
    on: a D95 coverage reference pushed to 1.15 Rx presses on the whole target, which
    then ends 7-11 % hot with the organs inside it (the mandible); a heavier weight
    presses only on the voxels that miss. Organ goals keep the reference shift, which for
    them is a plain tightening."""
    return tuple(g.id for g in resolved
                 if g.kind in ("target", "control") and g.value is not None
                 and g.metric.kind in ("Dmax", "Dmin", "D"))


def _solve_setup(problem, be, patient, dij, resolved, settings, start: Start) -> Solve:
    """The solver options: goal attainment (optimizer.solve.optimize: protocol goals,
    priority <= 3, still violated after a solve get their reference shifted, or target
    and control goals their weight raised (:func:`attain_weight_ids`), and are
    re-solved), the goal check, the re-plan's start state."""
    opts = dict(settings.get("optimizer_options") or {})
    opts.setdefault("attain_rounds", start.attain_rounds)
    opts.setdefault("attain_max_priority", ATTAIN_MAX_PRIORITY)
    opts.setdefault("attain_release", True)
    opts.setdefault("attain_limits", attain_limits(resolved, patient))
    if ATTAIN_BY_WEIGHT:
        opts.setdefault("attain_weight_ids", attain_weight_ids(resolved))
    if start.steer:
        opts.setdefault("attain_ids", tuple(start.steer))
    deliverable_rounds = int(opts.pop("deliverable_rounds", DELIVERABLE_ROUNDS))
    final = _final_dose_options(opts.pop("final_dose", None))
    goal_check = GoalCheck(patient, dij, resolved, opts)
    offset = start.sequencing_offset
    if offset is not None and settings.get("sequence", False) and opts.get("attain_rounds"):
        opts.setdefault("goal_check", lambda w: goal_check(w, offset))
        deliverable_rounds = 0
    opts.setdefault("goal_check", goal_check)
    if start.hard_state:
        opts["hard_state"] = start.hard_state
    return Solve(problem, be, patient, dij, resolved, settings, opts, goal_check,
                 deliverable_rounds, final,
                 {} if start.field_beams is None else start.field_beams)


@dataclass(eq=False)
class Finished:
    """What a finishing step returns: the optimiser result (a kept deliverable-correction
    round's), the delivery (None: not sequenced), ideal and reported dose (Gy, patient
    grid), fidelity, and the correction rounds' record (a round not kept, and why)."""

    res: object
    delivery: object
    ideal: np.ndarray | None
    dose: np.ndarray
    fidelity: object  # dict, or a callable that computes it (_fidelity_later), or None
    correction: dict = field(default_factory=dict)
    final: dict | None = None  # the final-dose stage's record (_final_dose_goals)


def optimise_and_finish(patient, resolved, dij, predicted_dose, *, backend, refine,
                        settings, notes, stages: StageTimer, fractions=None,
                        start: Start = COLD, total_key: str = "optimise_total") -> Plan:
    """Optimise (-> refine) -> finish (:data:`FINISHING`: the final dose, sequencing and
    deliverable correction) -> evaluate -> explain -> Plan.

    settings: the plan.json settings (``optimizer_options``, ``sequence``, ``machine``
    are read). fractions: the structure fractions (default: computed). start: a re-plan's
    start state. total_key: the timings key of the whole call."""
    t0 = time.perf_counter()
    be = backends.resolve(backend)
    if fractions is None:
        fractions = stages.run("structure fractions", structure_fractions, patient, dij)
    problem = stages.run("build problem", build_problem, resolved, patient, dij,
                         fractions=fractions, options=_problem_options(settings, dij, be))
    if start.objectives is not None:
        problem = problem.with_terms(list(problem.terms) + list(start.objectives(
            problem, problem.x0 if start.fluence is None else start.fluence)))
    s = _solve_setup(problem, be, patient, dij, resolved, settings, start)
    res = stages.run(f"optimise ({be.name})", optimize, problem, be, start.fluence, **s.opts)
    res, refine_info = _refine(stages, s, res, refine)
    finish = FINISHING[TECHNIQUES.get(settings.get("technique"))
                       or ("sequenced" if settings.get("sequence", False) else "ideal")]
    out = finish(stages, s, res)
    results = stages.run("evaluate", evaluate_goals, resolved, patient, out.dose)
    if (out.ideal is not None and s.opts.get("surrogate_offsets", True)
            and not getattr(be, "hard_constraints", False)):
        # the offsets in force from here on (reported objective values, why lines,
        # warm re-plans) are measured on the reported dose, also when the last
        # correction round was not kept
        _final_offsets(problem, out.res, s.goal_check(out.res.fluence, out.dose - out.ideal))
    optimised = apply_state(problem, out.res.hard_state)  # the terms as last optimised
    blockers = stages.run("explain", _blockers, optimised, out.res.fluence, results,
                          patient, resolved, out.correction.get("rejected"))
    vals = optimised.term_values(out.res.fluence)
    timings = dict(stages.timings)
    timings[total_key] = time.perf_counter() - t0
    notes = list(notes) + list(problem.notes)
    if not settings.get("sequence", False):
        notes.append("not sequenced: dose, DVH and goal results are the ideal fluence dose, "
                     "not a deliverable MLC plan")
    return Plan(patient=patient, resolved_goals=list(resolved), results=results,
                fluence=np.asarray(out.res.fluence, np.float32), dose_gy=out.dose,
                predicted_dose_gy=predicted_dose, dij=dij, timings_s=timings,
                backend=out.res.backend,
                optimizer=_optimizer_info(problem, out, refine_info, blockers, optimised,
                                          vals),
                term_values=_term_values(problem, vals),
                settings=settings, notes=notes, versions=versions(out.res.backend),
                delivery=out.delivery, fractions=fractions, ideal_dose_gy=out.ideal,
                fidelity=out.fidelity() if callable(out.fidelity) else out.fidelity,
                attachments={"field_beams": s.field_beams} if s.field_beams else {})


def _problem_options(settings, dij, be) -> ProblemOptions:
    """The optimisation problem's options: a sliding-window plan optimised by a
    first-order backend models the leaf leakage of its MU in the optimised dose (the
    machine's leaf transmission; ``ProblemOptions.leaf_transmission``). Arcs iterate on
    the exact dij rows: the grouped scatter tail (``dij_tail_threshold``) was measured on
    static fields only (docs/experiments/plan-quality.md, twentieth session)."""
    kw = {"dij_tail_threshold": 0.0} if settings.get("technique") == "vmat" else {}
    seq = settings.get("sequence", False)
    if not seq or getattr(be, "hard_constraints", False):
        return ProblemOptions(**kw)
    technique = seq if isinstance(seq, str) else sequencer.default_technique(dij)
    if technique not in ("imrt-sliding", "vmat-sliding"):
        return ProblemOptions(**kw)
    machine = sequencer.load_machine(settings.get("machine") or "millennium120")
    return ProblemOptions(leaf_transmission=machine.leaf_transmission, **kw)


def _refine(stages, s: Solve, res, refine):
    """AIRTP refinement rounds (``refine``; 0: none): (result, record or None)."""
    if not refine:
        return res, None

    def score(w):
        return _score_results(evaluate_goals(s.resolved, s.patient, patient_dose(s.dij, w)))

    outcome = stages.run("refine", run_refine, s.problem, s.backend, res, rounds=int(refine),
                         score=score, **s.opts)
    return outcome.result, {"rounds_run": outcome.rounds_run, "scores": outcome.scores,
                            "accepted": outcome.accepted}


def _finish_ideal(stages, s: Solve, res) -> Finished:
    """Not sequenced: the ideal fluence dose is the plan's dose."""
    dose = stages.run("final dose", patient_dose, s.dij, res.fluence)
    return Finished(res, None, None, dose, None)


def _finish_sequenced(stages, s: Solve, res, *, dmpo: VmatOptions | None = None
                      ) -> Finished:
    """Sequence into MLC apertures (the ``sequence`` setting: True for the default
    technique of the beams, or a technique name) on the ``machine`` setting; the reported
    dose over each beam's whole jaw field; deliverable-correction rounds (kept only when
    they score better) with their own field dose. dmpo: VMAT options; the sequenced arcs'
    leaves and MU are then optimised on the goal list (:func:`_dmpo`) before the field
    dose."""
    dose = stages.run("final dose", patient_dose, s.dij, res.fluence)
    sequence = s.settings.get("sequence", False)
    technique = None if sequence is True else str(sequence)
    machine = s.settings.get("machine", "millennium120")
    patient, dij = s.patient, s.dij
    vmat = dmpo or _vmat_of(s.settings)  # the sequencer's arc parameters
    correct = bool(s.deliverable_rounds and s.opts.get("attain_rounds")
                   and s.opts.get("goal_check") is s.goal_check)
    delivery, ideal, dose, fid = stages.run(
        "sequence", _sequence, patient, dij, res.fluence, dose, technique, machine, vmat,
        leak=_planned_leak(s), beamlet_dose=correct)
    if dmpo is not None:
        delivery, dose, fid = stages.run("dmpo", _dmpo, s, res, delivery, ideal, dmpo,
                                         column_gen=True)
    # the reported dose (whole jaw field, leakage included) before any correction
    # round, so the rounds correct against what is reported (#19)
    beamlet_dose = dose
    # _field_dose keeps its jaw-field dij here (the final-dose stage), and the per-beam
    # beamlets it reuses when a beam's jaws did not change (kept with the plan for re-plans)
    field: dict = {"beams": s.field_beams}
    delivery, dose, fid = stages.run("field dose", _field_dose, patient, dij, delivery,
                                     ideal, dose, fid, keep=field)
    if dmpo is not None and dmpo.dmpo_rounds:
        off, failed = _vmat_hard_failed(s, delivery, dose)
        if failed:
            stages.add(2)  # counted here: the pass runs only when a hard goal fails
            delivery, dose, fid = _dmpo_reported(stages, s, res, (delivery, ideal, dose, fid),
                                                 dmpo, field, off, failed)
    correction: dict = {}  # _deliverable_correction: a round it did not keep, and why
    if correct:
        stages.add(1)  # counted here: the stage runs only when it applies
        kept = stages.run("deliverable correction", _deliverable_correction, s, res,
                          technique, machine, (delivery, ideal, dose, fid),
                          info=correction, field_extra=dose - beamlet_dose, vmat=vmat)
        if kept[0] is not res:  # a round was kept: its own field dose
            res, delivery, ideal, dose, fid = kept
            stages.add(1)
            delivery, dose, fid = stages.run("field dose", _field_dose, patient, dij,
                                             delivery, ideal, dose, fid, keep=field)
    final = None
    if s.final is not None and s.final.enabled:
        def resequence(w):  # the plan's fluence re-sequenced, its reported dose
            out = _sequence(patient, dij, w, patient_dose(dij, w), technique, machine, vmat,
                            leak=_planned_leak(s), beamlet_dose=False)
            kept: dict = {"beams": field["beams"]}  # unchanged jaws: reused
            dl, dd, ff = _field_dose(patient, dij, *out, keep=kept)
            return dl, out[1], dd, ff, kept.get("dij", dij), kept.get("unit_weights")

        stages.add(1)  # counted here: the stage runs only when enabled
        delivery, dose, fid, final, ideal, fluence = stages.run(
            "final-dose goals", _final_dose_goals, patient, s.resolved,
            field.get("dij", dij), delivery, ideal, dose, fid, s.final,
            fluence=res.fluence, beam_index=dij.beamlets.beam_index, resequence=resequence,
            unit_doses=field.get("unit_doses"), unit_weights=field.get("unit_weights"))
        res.fluence = fluence
    return Finished(res, delivery, ideal, dose, fid, correction, final)


def _finish_vmat(stages, s: Solve, res) -> Finished:
    """VMAT (:mod:`atp.vmatplan`). Method 'sweep': the sector beams' fluence swept as
    arcs (``vmat-sliding``), then as static fields (deliverable-correction rounds, the
    final-dose goals) with every control point its own dose beam in the reported dose.
    Method 'dmpo': one rule-based sequencing pass per arc, then direct
    machine-parameter optimisation of every control point's leaves and MU on the goal
    list, then the reported field dose."""
    vmat = _vmat_of(s.settings) or VmatOptions()
    return _finish_sequenced(stages, s, res, dmpo=None if vmat.method == "sweep" else vmat)


def _vmat_of(settings) -> VmatOptions | None:
    """The plan's VMAT options (settings ``vmat``), or None. Settings without a method
    are a plan saved before sweep arcs (2026-12-06): DMPO arcs."""
    v = settings.get("vmat")
    return None if v is None else VmatOptions.from_dict({"method": "dmpo", **v})


def _vmat_hard_failed(s: Solve, delivery, reported):
    """(offset, failed): the reported dose of a VMAT delivery minus its beamlet dose (the
    leakage outside the planning beamlets, the per-control-point dose), and the goal
    check's records of the hard goals that reported dose fails."""
    w = delivered_weights(delivery, s.dij.beamlets)
    off = np.asarray(reported, np.float32) - patient_dose(s.dij, w)
    return off, [r for r in s.goal_check(w, off) if r["hard"] and r["met"] is False]


def _dmpo_reported(stages, s: Solve, res, first, options, field, off, failed):
    """A second DMPO pass when the reported dose of ``first`` (delivery, ideal, dose,
    fidelity) fails hard goals (``failed``) that DMPO's own (beamlet) dose met: its rounds
    measure the goals on the beamlet dose plus the first pass's reported-minus-beamlet
    ``off`` (as the static fields' deliverable correction), from the first pass's
    weights; kept when it fails fewer hard goals, or the same number by less."""
    delivery, ideal = first[0], first[1]
    d2, dose2, fid2 = stages.run("dmpo (reported dose)", _dmpo, s, res, delivery, ideal,
                                 options, goal_check=lambda w: s.goal_check(w, off),
                                 hard_state=s.dmpo_state or None)
    d2, dose2, fid2 = stages.run("field dose", _field_dose, s.patient, s.dij, d2, ideal,
                                 dose2, fid2, keep=field)

    def shortfall(bad):
        return len(bad), sum(r["violation"] for r in bad)

    if shortfall(_vmat_hard_failed(s, d2, dose2)[1]) < shortfall(failed):
        return d2, dose2, fid2
    return first[0], first[2], first[3]


def _dmpo(s: Solve, res, delivery, ideal_dose, options: VmatOptions, goal_check=None,
          hard_state=None, column_gen: bool = False):
    """The arcs' leaves and MU optimised on the goal list as ``res`` left it
    (:func:`atp.vmatplan.dmpo_step`; goal_check: the goals' measure, default the plan's;
    hard_state: where its rounds start); the deliverable dose on the patient grid."""
    delivery, info = dmpo_step(s.problem, res, s.dij, delivery, options,
                               solve_options=dict(s.opts,
                                                  goal_check=goal_check or s.goal_check),
                               hard_state=hard_state, column_gen=column_gen)
    s.dmpo_state = info.pop("hard_state")
    meta = {k: v for k, v in delivery.meta.items() if k != "dmpo"}
    # flat scalars: the delivery summary (plan.json, --json) carries them
    meta.update({f"dmpo_{k}": (round(v, 6) if isinstance(v, float) else v)
                 for k, v in info.items() if isinstance(v, (bool, int, float, str))})
    delivery = replace(delivery, meta=meta)
    dose = s.dij.to_patient_grid(sequencer.deliverable_dose(delivery, s.dij))
    return delivery, dose, _fidelity_later(ideal_dose, dose, s.patient)


#: how an optimised plan is finished: 'ideal' (not sequenced) or 'sequenced' (static
#: fields or arcs through the sequencer registry); a technique that needs its own
#: finishing adds an entry (stages, Solve, result) -> Finished
FINISHING = {"ideal": _finish_ideal, "sequenced": _finish_sequenced, "vmat": _finish_vmat}
#: plan(technique=...) -> its FINISHING entry
TECHNIQUES = {"vmat": "vmat"}


def _term_values(problem, vals) -> dict:
    """Objective-term value per goal id (``vals``: the terms' values at the final
    fluence, as last optimised)."""
    return {b.goal.id: float(sum(vals[i] for i in b.term_indices))
            for b in problem.bindings if b.term_indices}


def _optimizer_info(problem, out: Finished, refine_info, blockers, optimised,
                    vals) -> dict:
    """plan.json ``optimizer``: the solver's status, terms, goal report, state."""
    res = out.res
    auto = {t.name: v for t, v in zip(problem.terms, vals) if t.goal_id is None}
    return {
        "backend": res.backend, "solver": res.solver, "status": res.status,
        "objective": res.objective, "iterations": res.iterations,
        "automatic_terms": auto, "messages": res.messages, "problem_notes": problem.notes,
        "n_beamlets": problem.n_beamlets, "n_rows": problem.n_rows,
        "goal_report": res.goal_report, "timings_s": res.timings_s,
        "refine": refine_info, "hard_state": res.hard_state,
        "surrogates": _surrogates(optimised, res), "blockers": blockers,
        "correction_rejected": out.correction.get("rejected"),
        "final_dose": out.final,
    }


def _final_offsets(problem, res, report) -> None:
    """Re-measure every goal's surrogate offset at the final fluence against ``report``
    (the goals on the reported dose) into ``res.hard_state``."""

    state = {k: dict(v) for k, v in (res.hard_state or {}).items()}
    for gid, off in measure_offsets(problem, res.fluence, report).items():
        state.setdefault(gid, {"weight_factor": 1.0, "ref_shift": 0.0})["offset"] = off
    res.hard_state = state


def _blockers(optimised, fluence, results, patient, resolved, rejected=None) -> dict:
    """{goal id: optimizer.explain.explain_goal(...)} for every failing goal: what holds
    it (opposing terms at the final fluence, a target's coverage floor, and a
    deliverable-correction round that would have moved it but lowered the goal-list
    score: ``rejected`` from :func:`_deliverable_correction`)."""

    cache: dict = {}
    out = {}
    for r in results:
        if r.passed is False:
            e = explain_goal(optimised, fluence, r, patient, resolved, cache=cache)
            if e is None:
                continue
            moved = (rejected or {}).get("moved", {}).get(r.goal.id)
            g = r.goal
            if moved is not None and g.value is not None and (
                    moved < 0 if g.operator in ("<=", "<") else moved > 0) \
                    and abs(moved) > max(0.1, 0.01 * abs(float(g.value))):
                lost = rejected.get("broke") or []
                cost = rejected.get("cost") or []
                e["line"] += (f"; a deliverable-dose correction round would have moved it "
                              f"by {moved:+.3g} {g.metric.result_unit} but was not kept: "
                              f"the goal-list score fell" + (f" (it broke {', '.join(lost)})"
                                                              if lost else
                                                              f" (on {', '.join(cost)})"
                                                              if cost else ""))
                e["rejected_round"] = {"moved": moved, "broke": lost}
            out[r.goal.id] = e
    return out


def _surrogates(optimised, res) -> dict:
    """Per goal with a dose-valued term: what the optimiser saw at the final fluence --
    its term's reference (Gy, after offsets and shifts), the metric on the term's voxels
    (the surrogate: dose grid, ideal dose, an organ minus the targets it overlaps), the
    surrogate offset in force and how many dose-grid voxels the term / structure has."""

    d = optimised.dose_rows(res.fluence)
    out = {}
    for b in optimised.bindings:
        s = surrogate_value(optimised, b, d)
        if s is None:
            continue
        t = optimised.terms[b.term_indices[0]]
        st = (res.hard_state or {}).get(b.goal.id, {})
        out[b.goal.id] = {"reference_gy": float(t.ref_gy), "surrogate_gy": float(s),
                          "offset_gy": float(st.get("offset", 0.0)),
                          "shift_gy": float(st.get("ref_shift", 0.0)),
                          "term_voxels": int(t.rows.size),
                          "structure_voxels": int(b.structure_rows.size)}
    return out


def _corrects(goal) -> bool:
    """Goals the deliverable correction measures on the corrected dose: organ goals and
    target lower bounds (coverage)."""
    return goal.kind == "organ" or (goal.kind == "target" and goal.operator in (">=", ">"))


def _deliverable_correction(s: Solve, res, technique, machine, current, info=None,
                            field_extra=None, vmat=None):
    """Re-optimise against the sequencing loss, then sequence again (``rounds`` times).

    Sequencing (MLC leakage and transmission, tongue-and-groove, the minimum leaf gap)
    changes the dose; the plan is judged on the deliverable dose. Each round measures the
    goals on ``ideal(w) + (deliverable - ideal)`` of the last sequencing (the correction
    term of Siebers et al., Med Phys 2002, "Incorporating multi-leaf collimator leaf
    sequencing into iterative IMRT optimization"), so the goal-attainment loop moves the
    references of goals the sequencing pushed out of tolerance, warm from the current
    fluence and hard-goal state. The round's plan is kept only when its deliverable dose
    scores better on the goal list (:func:`_score_results`). Upper limits on targets and
    control structures (global max, rings) stay measured on the ideal dose: the hot spots
    sequencing adds are local leaf artefacts the fluence cannot remove, and moving those
    references would only lower the whole target dose.

    ``current``'s dose is the reported one (the whole jaw field, :func:`_field_dose`);
    ``field_extra`` (Gy) is what that adds to the planning beamlets' deliverable dose (the
    leakage outside them), added to each round's re-sequenced dose, so rounds are
    corrected and scored on the dose that is reported.
    """
    problem, be, opts, goal_check = s.problem, s.backend, s.opts, s.goal_check
    patient, dij, resolved, rounds = s.patient, s.dij, s.resolved, s.deliverable_rounds
    best = (res, *current)
    best_rs = evaluate_goals(resolved, patient, current[2])
    best_score = _score_results(best_rs)
    for k in range(rounds):
        tick(correction_round=f"{k + 1}/{rounds}")
        r0, _, ideal, dose, _ = best
        offset = (dose - ideal).astype(np.float32)
        o = dict(opts, hard_state=r0.hard_state,
                 goal_check=lambda w, off=offset: goal_check(w, off))
        r1 = optimize(problem, be, r0.fluence, **o)
        d1 = patient_dose(dij, r1.fluence)
        out = _sequence(patient, dij, r1.fluence, d1, technique, machine, vmat,
                        leak=_planned_leak(s))
        if field_extra is not None:
            out = (out[0], out[1], out[2] + field_extra, out[3])
        rs1 = evaluate_goals(resolved, patient, out[2])
        score = _score_results(rs1)
        if score <= best_score:
            if info is not None:  # what the round would have changed (same dose model)
                info["rejected"] = {
                    "round": k + 1, "score": [best_score, score],
                    "moved": {a.goal.id: float(b.achieved - a.achieved)
                              for a, b in zip(best_rs, rs1)},
                    "broke": [f"{b.goal.id} (P{b.goal.priority})" for a, b in
                              zip(best_rs, rs1) if a.passed is True and b.passed is False],
                    # the goals whose score fell most: what the goal list preferred
                    "cost": [f"{b.goal.id} (P{b.goal.priority}) {b.achieved - a.achieved:+.3g}"
                             f" {b.goal.metric.result_unit}" for a, b in sorted(
                                 zip(best_rs, rs1),
                                 key=lambda ab: _goal_score(ab[1]) - _goal_score(ab[0]))
                             if _goal_score(b) < _goal_score(a)][:3]}
            break
        best, best_rs, best_score = (r1, *out), rs1, score
    return best


def _goal_score(r) -> float:
    """One goal's part of :func:`_score_results`."""
    g = r.goal
    if r.passed is None or g.value is None:
        return 0.0
    rel = float(np.clip((r.margin or 0.0) / max(abs(g.value), 1.0), -1.0, 1.0))
    return g.weight * ((1.0 if r.passed else 0.0) + 0.1 * rel)


def _score_results(results) -> float:
    """Goal-list score on the patient grid: weight per goal met + 0.1 x weight x margin."""
    return float(sum(_goal_score(r) for r in results))


def _sequence(patient, dij, fluence, ideal_dose, technique, machine, vmat=None,
              leak: float = 0.0, beamlet_dose: bool = True):
    """Sequence the fluence into MLC apertures; deliverable dose on the patient grid.
    vmat: VmatOptions (its sequencer parameters,
    :meth:`atp.vmatplan.VmatOptions.sequence_params`). leak: the leaf transmission the
    optimiser modelled (:func:`_planned_leak`); sweep arcs then fit their sectors' MU
    to that leaky dose (:func:`_leaky_dose`). The fidelity record
    (gamma, DVH deltas: ~0.5 s) is None when :func:`_field_dose` computes the reported
    one anyway (a pencil-beam dij; VMAT's DMPO records its own). beamlet_dose=False:
    the dose returned is None where :func:`_field_dose` computes the reported one
    (the planning beamlets' deliverable dose, ~0.6 s, is then not computed)."""
    params = {} if vmat is None else vmat.sequence_params()
    if technique == "vmat-sliding" and leak > 0:  # the MU fit: to the dose planned
        params["reference_dose"] = _leaky_dose(dij, fluence, leak)
    delivery = sequencer.sequence(fluence, dij, technique, machine=machine,
                                  fractions=patient.fractions, **params)
    dose = None
    if beamlet_dose or not _field_dose_recomputes(dij):
        dose = dij.to_patient_grid(sequencer.deliverable_dose(delivery, dij))
    fid = None
    if vmat is None and not _field_dose_recomputes(dij):
        fid = _fidelity_later(ideal_dose, dose, patient)
    return delivery, ideal_dose, dose, fid


def _planned_leak(s: Solve) -> float:
    """The leaf transmission the plan's optimisation modelled (``Problem.leak``; 0:
    none)."""
    leak = getattr(s.problem, "leak", None)
    return 0.0 if leak is None else float(leak[0])


def _leaky_dose(dij, fluence, t: float) -> np.ndarray:
    """The dose the optimiser planned for a sliding-window delivery of ``fluence`` (on
    ``dij.dose_grid``): each beamlet ``(1 - T) w_i + T MU_b`` with T = ``t`` the leaf
    transmission it modelled and MU_b its beam's sliding-window MU (the largest leaf
    row's rises, :func:`atp.optimizer.objectives.beam_mu` at a small temperature), as
    ``ProblemOptions.leaf_transmission`` models it. Sweep arcs fit their sectors' MU to
    it: the leakage-free ``dij @ w`` took the planned leakage away with ~7 % of the MU
    (docs/experiments/vmat-dmpo.md, nineteenth session)."""
    w = np.asarray(fluence, dtype=np.float32)
    bl = dij.beamlets
    beams = np.unique(bl.beam_index)
    m = mu_surrogate(bl.beam_index, bl.bev_x_mm, bl.bev_y_mm, bl.beamlet_size_mm,
                     1e-3 * max(float(np.mean(w)), 1e-12))
    mu = np.asarray(beam_mu(w, m.D, m.S, m.beam_rows, m.tau), dtype=np.float32)
    return dij.dose((1.0 - t) * w + t * mu[np.searchsorted(beams, bl.beam_index)])


def _fidelity_later(ideal_dose, dose, patient):
    """``fidelity(ideal_dose, dose, ...)`` (:func:`atp.sequencer.fidelity.fidelity`) to call
    when the plan is assembled: a plan reports up to four doses on the way (sequencing,
    correction rounds, final-dose stage) and keeps only the last one's fidelity, whose
    gamma index costs ~0.7 s on an OpenKBP patient."""
    masks = {n: patient.mask(n) for n in patient.targets + patient.organs}
    return functools.partial(fidelity, ideal_dose, dose, patient.grid.spacing_mm, masks)


def _field_dose_recomputes(dij) -> bool:
    """Whether :func:`_field_dose` recomputes the reported dose (and its fidelity)."""
    return (dij.meta or {}).get("engine") == "pencil-beam"


def _field_dose(patient, dij, delivery, ideal_dose, dose, fid, keep=None):
    """The reported deliverable dose: the final delivery recomputed over each beam's whole
    jaw field (:func:`atp.forward.forward_dose`, what ``atp dose`` computes from the
    exported RT Plan), so the leakage through closed leaves and jaws outside the planning
    beamlets is in it too; plus MU per cGy in the delivery's summary. A dij not made by
    the pencil-beam engine (imported) keeps its own deliverable dose. Arcs (VMAT): every
    control point its own dose beam at the engine's default threshold, as ``atp dose``
    reads the exported RT Plan (:func:`atp.vmatplan.control_point_beams`; sweep arcs'
    planning beams are their sectors' centres, DMPO arcs' their control points)."""
    per_control_point = any(b.kind == "arc" for b in delivery.beams)
    meta = dict(delivery.meta)
    fx = delivery.fractions
    if patient.prescriptions:
        rx_fx = patient.max_prescription_gy / fx
        meta["mu_per_cgy"] = round(delivery.total_mu / fx / (100.0 * rx_fx), 3)
    m = delivery.machine
    meta["leaf_transmission_percent"] = round(100.0 * m.leaf_transmission, 3)
    meta["jaw_transmission_percent"] = round(100.0 * m.jaw_transmission, 3)
    dm = dij.meta or {}
    if _field_dose_recomputes(dij):
        b = dij.beamlets
        kw = {"dose_grid_factor": int(dm.get("dose_grid_factor", 2)),
              "beamlet_size_mm": float(b.beamlet_size_mm[0]),
              "margin_mm": float(dm.get("margin_mm", 5.0)),
              "threshold": None if per_control_point else dm.get("threshold")}
        if per_control_point and any(b.mu_group is not None for b in delivery.beams):
            # sliding-window arcs: each sector's dose (the final-dose stage scales them)
            subs = [fd.unit_delivery(delivery, u) for u in fd.mu_units(delivery)]
            units = [forward_dose_grouped(patient, *control_point_beams(d), **kw)[0]
                     if d.total_mu > 0 else np.zeros(patient.grid.shape, np.float32)
                     for d in subs]  # a sector may deliver nothing
            dose = np.sum(units, axis=0, dtype=np.float32)
            if keep is not None:
                keep["unit_doses"] = np.stack(units).astype(np.float32)
        elif per_control_point:  # ~120 dose beams: a few at a time (memory)
            dose, _ = forward_dose_grouped(patient, *control_point_beams(delivery), **kw)
        else:
            beams = [Beam(float(g), float(c), float(t), tuple(iso)) for g, c, t, iso in
                     zip(b.gantry_deg, b.collimator_deg, b.couch_deg, b.isocenter_mm)]
            weights: list | None = None if keep is None else []
            dose, fdij = forward_dose(patient, delivery, beams, **kw, cache=(
                None if keep is None else keep.setdefault("beams", {})), per_beam=weights)
            if keep is not None:  # the final-dose stage splits the dose by beam on it
                keep["dij"] = fdij  # (its beams: the delivery's)
                keep["unit_weights"] = weights  # each beam's, on fdij (_beam_doses)
        meta["dose_beamlets"] = "jaw field"
        fid = _fidelity_later(ideal_dose, dose, patient)
    return replace(delivery, meta=meta), dose, fid


def _final_dose_options(value):
    """optimizer_options['final_dose']: None (defaults), False (off), or a dict of
    :class:`atp.final_dose.FinalDoseOptions` fields."""
    if value is None or value is True:
        return fd.FinalDoseOptions()
    if value is False:
        return fd.FinalDoseOptions(enabled=False)
    if not isinstance(value, dict):
        raise InputError("must be true, false or an object of final-dose options",
                         field="optimizer_options.final_dose")
    known = set(fd.FinalDoseOptions.__dataclass_fields__)
    bad = sorted(set(value) - known)
    if bad:
        raise InputError(f"unknown final-dose option {quote(bad[0])}; known: "
                         f"{', '.join(sorted(known))}", field="optimizer_options.final_dose")
    try:
        return fd.FinalDoseOptions(**value)
    except ValueError as exc:
        raise InputError(str(exc), field="optimizer_options.final_dose") from None


def _final_dose_goals(patient, resolved, dij, delivery, ideal_dose, dose, fid, opts, *,
                      fluence=None, beam_index=None, resequence=None, unit_doses=None,
                      unit_weights=None):
    """Goals held on the final deliverable dose on the CT grid (:mod:`atp.final_dose`):
    per-beam MU re-weighting against the goal list (priority-1 goals first), then the
    normalisation of the primary target's coverage where the priority-1 limits allow.
    ``dij`` is the one the reported dose was computed on (the jaw-field dij). Returns
    (delivery, dose, fidelity, info, ideal dose, fluence) with the MU of the delivery
    scaled.

    A goal broken on the final dose may need a beam's MU lowered below what its sequence
    allows (a sliding-window sweep is timed at the dynamic dose rate): then the plan's
    ``fluence`` is scaled per beam (``beam_index``: the dij beam of each beamlet) by the
    unbounded re-weighting and ``resequence(fluence)`` -> (delivery, ideal, dose,
    fidelity, dij, unit weights or None) sequences it again (``opts.resequence_for``: when a priority-1 goal
    fails, or whenever the re-weighting meets more goals); that plan is kept by
    :func:`_resequenced_better`, and its MU are then re-weighted within their bounds."""
    info = {}
    # each MU unit's dose of ``delivery`` on ``dij`` (reused when kept); sliding-window
    # arcs: ``unit_doses``, each sector's reported dose; static beams: ``unit_weights``,
    # each beam's delivered weights on ``dij`` (:func:`_field_dose`)
    per_beam = unit_doses
    if resequence is not None and fluence is not None and opts.resequence:
        before = evaluate_goals(resolved, patient, dose)
        if fd._hard_violation(before)[0] > 0 or opts.resequence_for == "goals":
            if per_beam is None:
                per_beam = _beam_doses(delivery, dij, unit_weights)
            s, rinfo = fd.reweight_beams(resolved, patient, per_beam, opts,
                                         wref=reference_weight(resolved))
            bounds = fd.scale_bounds(delivery, opts)
            if rinfo.get("kept") and any(x < lo for x, (lo, _) in zip(s, bounds)):
                per_dij = _per_dij_beam(delivery, s, int(np.max(beam_index)) + 1)
                w = np.asarray(fluence, np.float32) * per_dij[beam_index].astype(np.float32)
                d2, i2, dose2, f2, dij2, uw2 = resequence(w)
                keep, record = _resequenced_better(before, evaluate_goals(
                    resolved, patient, dose2))
                info["resequenced"] = dict(record, dij_beam_scales=[
                    round(float(x), 4) for x in per_dij], kept=keep)
                if keep:
                    delivery, ideal_dose, dose, fid, dij, fluence = d2, i2, dose2, f2, dij2, w
                    per_beam, unit_weights = None, uw2
            else:
                info["resequence_not_tried"] = rinfo.get("why") or (  # plan.json
                    "the re-weighting stays within the beams' MU bounds")
    if per_beam is None:
        per_beam = _beam_doses(delivery, dij, unit_weights)
    delivery, dose, fid, more = _final_mu_scaling(patient, resolved, dij, delivery,
                                                  ideal_dose, dose, fid, opts, per_beam)
    info.update(more)
    return delivery, dose, fid, info, ideal_dose, fluence


def _resequenced_better(before, after) -> tuple[bool, dict]:
    """Whether a re-sequenced plan (its goal results ``after``) is kept over the plan
    (``before``): it lowers the priority-1 shortfall, or keeps every priority-1 goal the
    plan met, adds no shortfall and meets more goals by weight."""
    hv0, met0 = fd._hard_violation(before)
    hv2, met2 = fd._hard_violation(after)
    w0, w2 = fd._weighted_met(before), fd._weighted_met(after)
    keep = hv2 < hv0 or (hv2 <= hv0 + 1e-12 and met0 <= met2 and w2 > w0 + 1e-9)
    return keep, {"hard_shortfall": [round(hv0, 5), round(hv2, 5)],
                  "weighted_met": [round(w0, 4), round(w2, 4)]}


def _beam_doses(delivery, dij, weights=None) -> np.ndarray:
    """(n_beams, *patient grid) Gy: each delivery beam's dose on the patient grid from
    ``dij`` (the jaw-field dij of :func:`atp.forward.forward_dose`, or the planning dij; for
    :mod:`atp.final_dose`), the machine's transmission and the dij's far-scatter tail
    included (``dij.dose``); their sum is the delivery's reported dose. Each beam's own
    delivered weights: the split fields of one gantry angle share its dij columns.
    weights: those weights per MU unit when already computed (:func:`_field_dose`'s
    ``unit_weights``, on this ``dij`` for this ``delivery``)."""
    units = fd.mu_units(delivery)  # a beam, or a sliding-window arc's sector
    if weights is None or len(weights) != len(units):
        weights = [delivered_weights(fd.unit_delivery(delivery, u), dij.beamlets)
                   for u in units]
    return np.stack([dij.to_patient_grid(dij.dose(np.asarray(w).astype(np.float32)))
                     for w in weights]).astype(np.float32)


def _per_dij_beam(delivery, scales, n_dij_beams: int) -> np.ndarray:
    """Per dij beam: the smallest scale of the delivery's MU units it feeds (split
    fields; :func:`atp.final_dose.mu_units`)."""
    out = np.ones(n_dij_beams)
    seen = np.zeros(n_dij_beams, bool)
    for u, x in zip(fd.mu_units(delivery), scales):
        for d in np.unique(fd.unit_delivery(delivery, u).beams[0].dij_beam):
            out[d] = min(out[d], x) if seen[d] else x
            seen[d] = True
    return out


def _final_mu_scaling(patient, resolved, dij, delivery, ideal_dose, dose, fid, opts,
                      per_beam=None):
    """:func:`_final_dose_goals` within the machine's MU limits: (delivery, dose, fid,
    info). per_beam: :func:`_beam_doses` of ``delivery`` if already computed."""
    if per_beam is None:
        per_beam = _beam_doses(delivery, dij)
    gap = float(np.max(np.abs(per_beam.sum(axis=0) - dose)))
    if gap > 1e-3 * max(float(np.max(dose)), 1e-6):  # not the reported dose's model
        return delivery, dose, fid, {"kept": False, "why": f"the beams' doses differ from "
                                     f"the reported dose by up to {gap:.3g} Gy"}
    bounds = fd.scale_bounds(delivery, opts)
    s, info = fd.reweight_beams(resolved, patient, per_beam, opts,
                                wref=reference_weight(resolved), bounds=bounds)
    new = np.tensordot(s.astype(np.float32), per_beam, 1)
    c, ninfo = fd.normalise(resolved, patient, new, opts,
                            max_scale=min(hi / x for (_, hi), x in zip(bounds, s)))
    info.update(ninfo)
    s = s * c
    if np.all(s == 1.0):
        return delivery, dose, fid, info
    new = np.asarray(new * np.float32(c), dtype=np.float32)
    before = delivery.total_mu
    delivery = fd.scale_beams(delivery, s)
    meta = dict(delivery.meta)
    if "mu_per_cgy" in meta and delivery.beams:
        meta["mu_per_cgy"] = round(float(meta["mu_per_cgy"]) * delivery.total_mu
                                   / max(before, 1e-12), 3)
    delivery = replace(delivery, meta=meta)
    fid = _fidelity_later(ideal_dose, new, patient)
    info["mu_scales"] = [round(float(x), 4) for x in s]
    return delivery, new, fid, info


# --- goal settings (re-plans) ------------------------------------------------------------
def _goal_matches(goal, key: str) -> bool:
    if key == goal.id:
        return True
    if goal.id.endswith(".pred") and key == goal.id[: -len(".pred")]:
        return True
    return key == f"{goal.structure}.{goal.metric.text}"


def apply_settings(resolved_goals, settings: dict, priority_weights: dict | None = None):
    """Resolved goals with ``{"<goal>.<field>": number}`` changes applied (see replan)."""
    goals = list(resolved_goals)
    for key, val in settings.items():
        gkey, _, fld = str(key).rpartition(".")
        if fld not in SETTABLE or not gkey:
            raise InputError(f"cannot set '{key}': expected <goal>.<field> with field one "
                             f"of {', '.join(SETTABLE)}", field="--set")
        hits = [i for i, g in enumerate(goals) if _goal_matches(g, gkey)]
        if not hits:
            raise InputError(f"no goal {quote(gkey)}; goals: "
                             f"{quote(', '.join(g.id for g in goals), 300, repr_=False)}",
                             field="--set")
        # the rules of the goal-list field it overrides (finite, in range, right type)
        val = check_setting(fld, val, unit=goals[hits[0]].metric.result_unit,
                            where=f"--set {quote(key, 60, repr_=False)}")
        if fld == "priority" and int(val) == 1 and goals[hits[0]].source == "predicted":
            raise InputError("priority-1 goals are hard: give the value yourself, "
                             "'predicted' values are only for priority >= 2",
                             field=f"--set {quote(key, 60, repr_=False)}")
        if fld == "tolerance":
            hits = [i for i in hits if goals[i].source == "predicted"
                    and goals[i].predicted_value is not None]
            if not hits:
                raise InputError(f"goal '{gkey}' is not a predicted goal; set its value "
                                 "instead", field="--set")
        for i in hits:
            g = goals[i]
            if fld == "tolerance":
                value = g.predicted_value * (1.0 + val / 100.0)
                if g.metric.result_unit == "%":
                    value = min(value, 100.0)
                goals[i] = replace(g, tolerance_pct=val, value=value,
                                   note=_note_in_force(g.note, f"tolerance {val:+g} %: "
                                                       f"predicted {g.predicted_value:.4g} "
                                                       f"x {1 + val / 100:.4g} = {value:.4g}"
                                                       f" {g.metric.result_unit}"))
            elif fld == "value":
                goals[i] = replace(g, value=val, note=_note_in_force(
                    g.note, f"value {val:.4g} {g.metric.result_unit} (set by replan)"))
            elif fld == "weight":
                if val <= 0:
                    raise InputError(f"weight must be > 0, got {val}", field="--set")
                goals[i] = replace(g, weight=val)
            else:
                p = int(val)
                if p < 1:
                    raise InputError(f"priority must be >= 1, got {val}", field="--set")
                goals[i] = replace(g, priority=p, weight=_priority_weight(p, priority_weights))
    return goals


IN_FORCE = " [in force: "


def _note_in_force(note: str, what: str) -> str:
    """A goal's note with the setting in force after a re-plan (replaces an earlier one)."""
    base = (note or "").split(IN_FORCE)[0]
    return f"{base}{IN_FORCE}{what}]"


def _priority_weight(priority: int, rule: dict | None) -> float:
    rule = rule or {}
    table = {int(k): float(v) for k, v in (rule.get("table") or {}).items()}
    if priority in table:
        return table[priority]
    try:
        w = float(rule.get("base", 10.0)) ** (int(rule.get("top", 3)) - int(priority))
    except (OverflowError, TypeError, ValueError):
        w = float("inf")
    if not 0 < w <= MAX_WEIGHT:
        raise InputError(f"the priority rule gives priority {int(priority)} the weight {w:g}, "
                         f"outside (0, {MAX_WEIGHT:g}]", field="settings.priority_weights")
    return w


def make_beams(beams=9, beam_template: str | None = None):
    """Beams from a count (equispaced coplanar) or a template name or a list of Beams."""

    if beam_template is not None:
        if beam_template not in BEAM_TEMPLATES:
            raise InputError(f"unknown beam template '{beam_template}'; known: "
                             f"{', '.join(sorted(BEAM_TEMPLATES))}", field="beam_template")
        n, start = BEAM_TEMPLATES[beam_template]
        return equispaced_beams(n, start)
    if isinstance(beams, (list, tuple)):
        return list(beams)
    return equispaced_beams(beams)


def patient_dose(dij, fluence) -> np.ndarray:
    """Dose (Gy) on the patient grid for beamlet weights."""
    if hasattr(dij, "patient_dose"):
        return np.asarray(dij.patient_dose(fluence), dtype=np.float32)
    d = dij.dose(fluence)
    if dij.dose_grid.same_as(dij.patient_grid):
        return np.asarray(d, dtype=np.float32)
    return np.asarray(dose_to_patient_grid(d, dij.dose_grid, dij.patient_grid),
                      dtype=np.float32)
