"""The planning pipeline: the one place that knows the whole order of stages.

``plan(patient, ...)`` runs: predict -> resolve goals -> dose influence -> build problem
-> optimise (-> refine) -> (sequence, when a sequencer is installed and asked for) ->
final dose -> evaluate, and returns a :class:`Plan`. A host (TPS vendor) may pass its own
``DoseInfluence`` (``dij=``, its clinical engine) and/or its own predicted dose
(``predicted_dose=``); stages it provides are not run.

``Plan.save(dir)`` writes, atomically (temp dir then rename):

* ``plan.json``: every resolved goal with its objective-term value, achieved value and
  pass/fail; P1 goals not met (and by how much); DVH metrics per structure; timings per
  stage (s); backend; optimiser status; versions;
* ``dose.npy`` (final dose, Gy, patient grid, float32), ``predicted_dose.npy``;
* ``fluence.npz`` (``fluence`` per beamlet, ``beam_index``, ``bev_x_mm``, ``bev_y_mm``,
  ``gantry_deg``); ``dij.npz`` (the dose-influence matrix, so a re-plan reuses it).

``load_plan(dir)`` reads it back; ``Plan.replan(set={"Parotid_L.Dmean.tolerance": -20},
warm=True)`` changes goals and re-optimises with the stored dij and prediction.

``plan(patient, fast=True, spare={"Parotid_L": 0.1})`` runs the AIRT-style fast path
instead of the optimiser (single arc, predicted dose -> fluence by differentiable dose
feedback, VMAT sequencing; :mod:`atp.fastplan`); ``Plan.respare(spare={...})`` moves the
OAR sparing sliders of such a plan without re-running the predictor or rebuilding
matrices.

This module imports predictor / optimizer / sequencer lazily, inside functions.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from atp.errors import InputError, quote
from atp.goals.schema import MAX_WEIGHT, check_setting

PLAN_FORMAT = "atp-plan-1"
ATTAIN_ROUNDS = 3  # goal-attainment rounds of the optimiser (optimizer.solve.optimize)
ATTAIN_MAX_PRIORITY = 3  # protocol goals (targets P2, organ limits P3), not P4 predicted
DELIVERABLE_ROUNDS = 2  # re-optimisations against the sequencing loss (sequenced plans)
WARM_ATTAIN_ROUNDS = 1  # warm re-plans start from the stored shifts: one round suffices
SETTABLE = ("tolerance", "value", "weight", "priority")


# --- progress ---------------------------------------------------------------------------
class _Stages:
    """Stage timer + progress display on stderr (:class:`atp.progress.Display`: a bar on
    a terminal, plain lines otherwise; rounds and iterations inside a stage through
    :func:`atp.progress.tick`; silent when disabled)."""

    def __init__(self, progress, total: int):
        from atp.progress import Display

        self.timings: dict[str, float] = {}
        self._callback = progress if callable(progress) else None
        self._display = Display(progress is True, total)

    def run(self, name: str, fn, *args, **kwargs):
        if self._callback is not None:
            self._callback(name)
        t0 = time.perf_counter()
        with self._display.stage(name):
            out = fn(*args, **kwargs)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def add(self, n: int = 1) -> None:
        """Stages that turned out to be needed (a kept correction round's field dose)."""
        self._display.grow(n)

    def close(self):
        self._display.close()


# --- the Plan ---------------------------------------------------------------------------
@dataclass(eq=False)
class Plan:
    """A finished plan and everything needed to explain or re-optimise it.

    patient: the Patient (with control structures the goals built). resolved_goals:
    list of ResolvedGoal. results: list of GoalResult on the final dose. fluence:
    beamlet weights. dose_gy: final dose on the patient grid (Gy). predicted_dose_gy:
    the prediction the goals were resolved with. dij: the DoseInfluence. timings_s:
    seconds per stage. backend: the backend that solved it. optimizer: status,
    objective, iterations, messages. term_values: objective-term value per goal id.
    """

    patient: object
    resolved_goals: list
    results: list
    fluence: np.ndarray
    dose_gy: np.ndarray
    predicted_dose_gy: np.ndarray | None
    dij: object
    timings_s: dict
    backend: str
    optimizer: dict = field(default_factory=dict)
    term_values: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    delivery: object = None
    _fractions: dict | None = None
    ideal_dose_gy: np.ndarray | None = None  # fluence dose before sequencing, if sequenced
    fidelity: dict | None = None
    # the prepared FastPath of a fast plan (not saved): respare() reuses it
    fastpath: object = field(default=None, repr=False)
    # a re-plan's before -> after rows (atp.goals.changes.goal_changes); None: not a re-plan
    changes: list | None = None

    # --- summaries -----------------------------------------------------------------
    @property
    def unmet_hard(self) -> list[dict]:
        """Priority-1 goals the final dose does not meet, with the shortfall."""
        out = []
        for r in self.results:
            if r.goal.is_hard and r.passed is False:
                out.append({"id": r.goal.id, "structure": r.goal.structure,
                            "metric": r.goal.metric.text, "operator": r.goal.operator,
                            "value": r.goal.value, "achieved": r.achieved,
                            "misses_by": -r.margin if r.margin is not None else None,
                            "unit": r.goal.metric.result_unit})
        return out

    def goal_table(self) -> list[dict]:
        rows = []
        for r in self.results:
            d = r.to_dict()
            d["objective_value"] = self.term_values.get(r.goal.id)
            d["optimised"] = (self.optimizer.get("surrogates") or {}).get(r.goal.id)
            why = (self.optimizer.get("blockers") or {}).get(r.goal.id)
            if why and r.passed is False:
                d["why"] = why["line"]
            rows.append(d)
        return rows

    def dvh_metrics(self) -> dict:
        from atp.metrics import structure_metrics

        return structure_metrics(self.patient, self.dose_gy)

    def summary(self) -> dict:
        res = self.results
        return {
            "goals_total": len(res),
            "goals_passed": sum(r.passed is True for r in res),
            "goals_failed": sum(r.passed is False for r in res),
            "hard_unmet": self.unmet_hard,
        }

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "patient": {"id": self.patient.patient_id, "source": self.patient.source},
            "settings": self.settings,
            "backend": self.backend,
            "optimizer": self.optimizer,
            "summary": self.summary(),
            "goals": self.goal_table(),
            "dvh_metrics": self.dvh_metrics(),
            "timings_s": self.timings_s,
            "notes": self.notes,
            "versions": self.versions,
            "delivery": self.delivery.summary() if self.delivery is not None else None,
            "fidelity": self.fidelity,
            **({"changes": self.changes} if self.changes is not None else {}),
            "files": {"dose": "dose.npy", "predicted_dose": "predicted_dose.npy",
                      "fluence": "fluence.npz", "dij": "dij.npz"},
        }

    # --- persistence ---------------------------------------------------------------
    def report_info(self) -> dict:
        """How the plan was made, for the report's summary: site, institution overlay,
        predictor, backend (or fast path), dose engine, sequencing, machine, re-plan."""
        s = self.settings
        seq = s.get("sequence")
        info = {"site": s.get("site"),
                "institution overlay": s.get("institution") or "none (shipped goal list)",
                "predictor": s.get("predictor") or ("given predicted dose"
                                                    if self.predicted_dose_gy is not None
                                                    else None),
                "backend": (f"fast path ({s.get('preset') or 'airt'}, device "
                            f"{s.get('device')})" if s.get("fast") else self.backend),
                "dose engine": s.get("dose_engine"),
                "sequencer": ("none: ideal fluence dose (not deliverable)" if seq is False
                              else "auto" if seq is True else seq),
                "machine": s.get("machine") if seq is not False else None}
        if s.get("replan_of"):
            r = s["replan_of"]
            info["re-plan"] = (", ".join(f"{k}={v:g}" for k, v in r.get("set", {}).items())
                               or "no goal changed") + ("; warm" if r.get("warm")
                                                         else "; cold")
        return info

    def save(self, out_dir, *, report: bool = True, dicom: bool = False,
             extra=None, progress: bool = False) -> Path:
        """Write the plan directory atomically.

        report: also write ``report.html`` (needs matplotlib; skipped with a note when it
        is not installed). dicom: also export RT Plan / RT Dose / RT Struct (and CT for
        non-DICOM patients) into ``dicom/``. extra(tmp_dir, plan): add more files.
        progress: show the save and each file written on stderr (:mod:`atp.progress`).
        """
        import importlib.util

        from atp.outputs import atomic_output_dir, write_json
        from atp.progress import saving, tick

        t_export = time.perf_counter()
        out_dir = Path(out_dir)
        with saving(progress, str(out_dir)), atomic_output_dir(out_dir) as tmp:
            tick(step="dose arrays")
            np.save(tmp / "dose.npy", np.asarray(self.dose_gy, dtype=np.float32))
            if self.predicted_dose_gy is not None:
                np.save(tmp / "predicted_dose.npy",
                        np.asarray(self.predicted_dose_gy, dtype=np.float32))
            b = self.dij.beamlets
            np.savez_compressed(tmp / "fluence.npz", fluence=self.fluence,
                                beam_index=b.beam_index, bev_x_mm=b.bev_x_mm,
                                bev_y_mm=b.bev_y_mm, gantry_deg=b.gantry_deg)
            tick(step="dij.npz")
            self.dij.save(tmp / "dij.npz")
            if self.ideal_dose_gy is not None:
                np.save(tmp / "ideal_dose.npy", np.asarray(self.ideal_dose_gy, np.float32))
            written = {}
            if report:
                if importlib.util.find_spec("matplotlib") is None:
                    self.notes.append("report.html not written: matplotlib is not "
                                      "installed (pip install 'atp[report]')")
                else:
                    from atp.report import write_report

                    tick(step="report.html")
                    write_report(tmp, self.patient, self.dose_gy, self.predicted_dose_gy,
                                 goal_results=self.results, timings=self.timings_s,
                                 title=f"atp plan {self.patient.patient_id}",
                                 plan_info=self.report_info(),
                                 delivery_summary=self.delivery.summary()
                                 if self.delivery is not None else None,
                                 fidelity=self.fidelity, notes=self.notes,
                                 changes=self.changes)
                    written["report"] = "report.html"
            if dicom:
                from atp.io.dicom_export import export_plan_set

                tick(step="DICOM export")
                export_plan_set(tmp / "dicom", self.patient, self.dose_gy, self.delivery)
                written["dicom"] = "dicom/"
            if extra is not None:
                extra(tmp, self)
            self.timings_s["export"] = time.perf_counter() - t_export  # all but plan.json
            data = self.to_json()
            data["files"].update(written)
            write_json(tmp / "plan.json", data)
        return out_dir

    # --- re-optimisation -----------------------------------------------------------
    def respare(self, spare: dict | None = None, *, progress=False) -> Plan:
        """Fast-path plans: a new plan for OAR sparing sliders ``spare`` ({OAR: factor in
        [0, 1)}, the full setting). Reuses the prepared fast path (no prediction, no dij
        rebuild); see :func:`atp.fastplan.respare`."""
        from atp.fastplan import respare

        return respare(self, spare, progress=progress)

    def replan(self, set: dict | None = None, *, warm: bool = True, backend=None,
               refine: int | None = None, progress=False) -> Plan:
        """A new plan after changing goals; reuses this plan's dij and prediction.

        set: ``{"<goal>.<field>": number}`` with field one of tolerance (%: predicted
        goals get value = predicted x (1 + tolerance/100)), value, weight, priority.
        ``<goal>`` is a goal id, or an id without its ``.pred`` suffix, or
        ``<structure>.<metric>``. warm: start from this plan's fluence and hard-goal
        state (else cold start from the uniform initial fluence); a warm re-plan of a
        sequenced plan also reuses this plan's sequencing loss (deliverable minus ideal
        dose) as the deliverable-dose correction of its one optimisation, instead of
        running the correction rounds again (one sequencing instead of up to three).
        """
        goals = apply_settings(self.resolved_goals, set or {},
                               self.settings.get("priority_weights"))
        settings = dict(self.settings)
        settings["replan_of"] = {"set": dict(set or {}), "warm": bool(warm)}
        offset = None
        if warm and self.ideal_dose_gy is not None and self.settings.get("sequence"):
            offset = (np.asarray(self.dose_gy, np.float32)
                      - np.asarray(self.ideal_dose_gy, np.float32))
        touched = tuple(n.id for o, n in zip(self.resolved_goals, goals)
                        if (o.value, o.tolerance_pct, o.priority, o.weight)
                        != (n.value, n.tolerance_pct, n.priority, n.weight))
        new = _optimise_and_finish(
            self.patient, goals, self.dij, self.predicted_dose_gy, steer=touched,
            backend=backend or self.settings.get("backend_requested", "auto"),
            refine=self.settings.get("refine", 0) if refine is None else refine,
            x0=self.fluence if warm else None, progress=progress, settings=settings,
            fractions=self._fractions, notes=list(self.settings.get("resolve_notes", [])),
            sequence=self.settings.get("sequence", False),
            hard_state=self.optimizer.get("hard_state") if warm else None,
            sequencing_offset=offset,
            attain_rounds_default=WARM_ATTAIN_ROUNDS if warm else ATTAIN_ROUNDS)
        from atp.goals.changes import goal_changes

        why = {k: v["line"] for k, v in (new.optimizer.get("blockers") or {}).items()}
        new.changes = goal_changes(self.results, new.results, why=why)
        return new


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


# --- the stages -------------------------------------------------------------------------
from atp.dose.geometry import BEAM_TEMPLATES  # one home: the geometry


def make_beams(beams=9, beam_template: str | None = None):
    """Beams from a count (equispaced coplanar) or a template name or a list of Beams."""
    from atp.dose.geometry import equispaced_beams

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
    from atp.dose.resample import dose_to_patient_grid

    return np.asarray(dose_to_patient_grid(d, dij.dose_grid, dij.patient_grid),
                      dtype=np.float32)


def _versions(backend_name: str) -> dict:
    import scipy

    import atp

    out = {"atp": atp.__version__, "python": platform.python_version(),
           "numpy": np.__version__, "scipy": scipy.__version__}
    for mod in ("cvxpy", "osqp", "clarabel", "cupy", "torch"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = m.__version__
    return out


def patient_and_goal_list(patient, site, institution, goal_list, stages):
    """(Patient, GoalList): load the patient when given a path / 'phantom', and the goal
    list: the shipped list of ``site`` (plus the ``institution`` overlay), a YAML path, or
    a GoalList as given."""
    from atp.goals import load_goal_list
    from atp.patient import Patient

    if not isinstance(patient, Patient):
        from atp.io import load_patient

        patient = stages.run("load patient", load_patient, patient)
    if goal_list is None:
        gl = load_goal_list(site=site, institution=institution)
    elif isinstance(goal_list, (str, Path)):
        gl = load_goal_list(path=goal_list, institution=institution)
    else:
        gl = goal_list
    return patient, gl


def plan(patient, site: str = "hn", institution=None, goal_list=None, predictor=None,
         predicted_dose=None, dose_engine: str = "pencil-beam", dij=None,
         backend="auto", beams=9, beam_template: str | None = None, refine: int = 0,
         progress=True, dose_grid_factor: int | None = None, beamlet_size_mm: float = 5.0,
         sequence: bool | str = True, machine: str = "millennium120",
         optimizer_options: dict | None = None, fast: bool = False,
         spare: dict | None = None, fast_options: dict | None = None) -> Plan:
    """Plan one patient (see the module docstring).

    patient: a Patient or anything ``atp.io.load_patient`` accepts (path, 'phantom').
    goal_list: a GoalList or a goal-list YAML path (default: the shipped list of
    ``site`` plus the ``institution`` overlay). predictor: a name or an object with
    ``predict(patient)`` (default: the registry's default); predicted_dose: Gy on the
    patient grid (skips prediction). dij: a DoseInfluence (skips the dose engine).
    backend: 'auto' | 'cpu' | 'gpu' | 'qp' or a backend object. beams: a count or a list
    of Beams; beam_template: a name from BEAM_TEMPLATES. refine: AIRTP refinement rounds.
    progress: True (tqdm on stderr), False, or a callable(stage_name).
    sequence: True (default: the sequencer's default technique for the beams, sliding
    window for static fields, VMAT for arcs), a technique name ('imrt-sns',
    'imrt-sliding', 'vmat') or False (no sequencing: the reported dose is the ideal
    fluence dose, and the plan notes say so). When sequenced, the final dose, DVH and
    goal results are the deliverable dose of the MLC apertures on ``machine``, and
    ``Plan.fidelity`` compares it with the ideal.
    optimizer_options: passed to the backend (e.g. ``max_iter``, ``method``).
    dose_grid_factor: default 2 (fast path: 3).
    fast: run the AIRT-style fast path (:func:`atp.fastplan.fast_plan`: one arc, VMAT)
    instead of the optimiser; spare: its OAR sparing sliders {OAR: factor in [0, 1)};
    fast_options: more ``fast_plan`` keywords (``arc_spacing_deg``, ``device``, ...).
    """
    from atp.goals import resolve_goals, with_control_structures

    if fast:
        return _fast(patient, site=site, institution=institution, goal_list=goal_list,
                     predictor=predictor, predicted_dose=predicted_dose,
                     dose_engine=dose_engine, dij=dij, backend=backend, beams=beams,
                     beam_template=beam_template, refine=refine, progress=progress,
                     dose_grid_factor=dose_grid_factor, beamlet_size_mm=beamlet_size_mm,
                     sequence=sequence, machine=machine,
                     optimizer_options=optimizer_options, spare=spare,
                     fast_options=fast_options)
    if spare or fast_options:
        raise InputError("OAR sparing sliders (spare=) and fast_options need fast=True",
                         field="--spare" if spare else "fast_options")
    if dose_grid_factor is None:
        dose_grid_factor = 2

    from atp.patient import Patient

    n_stages = (6 + (predicted_dose is None) + (dij is None) + (not isinstance(patient, Patient))
                + (1 if refine else 0) + (3 if sequence else 0) + 1)  # bar; +1: explain
    stages = _Stages(progress, total=n_stages)
    t_start = time.perf_counter()
    try:
        patient, gl = patient_and_goal_list(patient, site, institution, goal_list, stages)
        # prediction
        predictor_name = None
        if predicted_dose is None:
            from atp.predictor import registry as predictors

            pred = predictors.get(predictor or predictors.default_predictor_name())
            predictor_name = getattr(pred, "name", str(predictor))
            predicted_dose = stages.run("predict dose", pred.predict, patient)
        else:
            predictor_name = "given"
        predicted_dose = np.asarray(predicted_dose, dtype=np.float32)
        patient.grid.check_array(predicted_dose, field="predicted_dose")
        resolved = stages.run("resolve goals", resolve_goals, gl, patient, predicted_dose)
        resolve_notes = [f"skipped {s['id']}: {s['reason']}"
                         for s in getattr(resolved, "skipped", [])]
        patient_c = with_control_structures(patient, resolved)
        # dose influence
        engine_name = "given"
        if dij is None:
            from atp.dose import registry as engines

            engine = engines.get(dose_engine)
            engine_name = dose_engine
            if beams is None and beam_template is None:
                if getattr(gl, "beam_template", None) in BEAM_TEMPLATES:
                    beam_template = gl.beam_template
                else:
                    beams = getattr(gl, "beams", None) or 9
            bl = make_beams(beams, beam_template)
            dij = stages.run("dose influence", engine.influence, patient, bl,
                             beamlet_size_mm=beamlet_size_mm,
                             dose_grid_factor=dose_grid_factor)
        pw = getattr(gl, "priority_weights", None)
        settings = {
            "site": getattr(gl, "site", site), "institution": None if institution is None
            else str(institution), "predictor": predictor_name, "dose_engine": engine_name,
            "backend_requested": backend if isinstance(backend, str) else
            getattr(backend, "name", "custom"),
            "beams": beams if isinstance(beams, int) else None,
            "beam_template": beam_template, "refine": int(refine),
            "dose_grid_factor": dose_grid_factor, "beamlet_size_mm": beamlet_size_mm,
            "priority_weights": pw.to_dict() if hasattr(pw, "to_dict") else None,
            "resolve_notes": resolve_notes, "sequence": sequence, "machine": machine,
            "optimizer_options": dict(optimizer_options or {}),
        }
        out = _optimise_and_finish(patient_c, list(resolved), dij, predicted_dose,
                                   backend=backend, refine=refine, x0=None, stages=stages,
                                   settings=settings, notes=resolve_notes, sequence=sequence)
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


def _fast(patient, *, backend, beams, beam_template, refine, sequence, optimizer_options,
          dose_grid_factor, fast_options, **kw) -> Plan:
    """plan(fast=True): refuse optimiser-only options, then atp.fastplan.fast_plan."""
    from atp.fastplan import fast_plan

    odd = [n for n, bad in (("backend", backend != "auto"), ("beams", beams not in (None, 9)),
                            ("beam_template", beam_template is not None),
                            ("refine", bool(refine)), ("optimizer_options",
                                                       bool(optimizer_options)),
                            ("sequence", sequence not in (True, "vmat"))) if bad]
    if odd:
        raise InputError(f"{', '.join(odd)} do(es) not apply to the fast path (one arc, "
                         "VMAT; see fast_options)", field=odd[0])
    opts = dict(fast_options or {})
    if dose_grid_factor is not None:
        opts.setdefault("dose_grid_factor", dose_grid_factor)
    return fast_plan(patient, **{**kw, **opts})


def _optimise_and_finish(patient, resolved, dij, predicted_dose, *, backend, refine, x0,
                         settings, notes, progress=False, stages=None, fractions=None,
                         sequence=False, hard_state=None, sequencing_offset=None,
                         attain_rounds_default: int = ATTAIN_ROUNDS, steer=()) -> Plan:
    """Optimise (-> refine) (-> sequence + deliverable correction) -> evaluate.

    sequencing_offset: a previous plan's deliverable-minus-ideal dose (Gy, patient grid);
    when given (warm re-plans), the optimisation measures the corrected goals on the
    ideal dose plus it, and no further correction rounds are run.
    attain_rounds_default: goal-attainment rounds unless ``optimizer_options`` says
    otherwise (warm re-plans: 1, as the stored hard/attainment state is applied first).
    steer: ids of goals a re-plan changed: the attainment rounds pursue them whatever
    their priority (``atp.optimizer.solve.optimize(attain_ids=)``).
    """
    from atp.goals import evaluate_goals
    from atp.optimizer import registry as backends
    from atp.optimizer.problem import build_problem, structure_fractions
    from atp.optimizer.refine import refine as run_refine
    from atp.optimizer.solve import apply_state, optimize

    own = stages is None
    if own:
        stages = _Stages(progress, total=6 + (1 if refine else 0))
    t0 = time.perf_counter()
    try:
        be = backends.resolve(backend)
        if fractions is None:
            fractions = stages.run("structure fractions", structure_fractions, patient, dij)
        problem = stages.run("build problem", build_problem, resolved, patient, dij,
                             fractions=fractions)
        opts = dict(settings.get("optimizer_options") or {})
        # goal attainment (optimizer.solve.optimize): protocol goals (priority <= 3)
        # still violated after a solve get their reference shifted and are re-solved
        opts.setdefault("attain_rounds", attain_rounds_default)
        opts.setdefault("attain_max_priority", ATTAIN_MAX_PRIORITY)
        if steer:
            opts.setdefault("attain_ids", tuple(steer))
        deliverable_rounds = int(opts.pop("deliverable_rounds", DELIVERABLE_ROUNDS))
        # every goal with a dose-valued term is measured: its surrogate offset (reported -
        # surrogate, optimizer.solve) keeps what is optimised in line with what is reported
        checked = [g for g in resolved if g.value is not None and (
            g.is_hard or g.metric.kind in ("Dmean", "Dmax", "Dmin", "D")
            or (opts["attain_rounds"] and g.priority <= opts["attain_max_priority"]))]

        def goal_check(w, offset=None):
            """Hard goals and the goals the attainment rounds steer, measured on the
            patient grid (what the plan is judged on); ``offset``: a dose (Gy) added
            first (the deliverable-minus-ideal correction)."""
            if not checked:
                return []
            d = patient_dose(dij, w)
            if offset is None:
                rs = evaluate_goals(checked, patient, d)
            else:  # organ limits and target coverage on the corrected dose; hot-spot
                # limits of targets / controls stay on the ideal (see _deliverable_correction)
                corr = [_corrects(g) for g in checked]
                on_c = evaluate_goals([g for g, c in zip(checked, corr) if c], patient,
                                      d + offset)
                on_i = evaluate_goals([g for g, c in zip(checked, corr) if not c], patient, d)
                rs = on_c + on_i
            return [{"id": r.goal.id, "achieved": r.achieved, "met": r.passed,
                     "violation": max(0.0, -(r.margin or 0.0)), "hard": r.goal.is_hard}
                    for r in rs]

        if sequencing_offset is not None and sequence and opts.get("attain_rounds"):
            opts.setdefault("goal_check", lambda w: goal_check(w, sequencing_offset))
            deliverable_rounds = 0
        opts.setdefault("goal_check", goal_check)
        if hard_state:
            opts["hard_state"] = hard_state
        res = stages.run(f"optimise ({be.name})", optimize, problem, be, x0, **opts)
        refine_info = None
        if refine:
            def score(w):
                dose = patient_dose(dij, w)
                rs = evaluate_goals(resolved, patient, dose)
                return _score_results(rs)

            outcome = stages.run("refine", run_refine, problem, be, res, rounds=int(refine),
                                 score=score, **opts)
            res = outcome.result
            refine_info = {"rounds_run": outcome.rounds_run, "scores": outcome.scores,
                           "accepted": outcome.accepted}
        delivery = ideal = fid = None
        correction: dict = {}  # _deliverable_correction: a round it did not keep, and why
        dose = stages.run("final dose", patient_dose, dij, res.fluence)
        if sequence:
            technique = None if sequence is True else str(sequence)
            machine = settings.get("machine", "millennium120")
            delivery, ideal, dose, fid = stages.run(
                "sequence", _sequence, patient, dij, res.fluence, dose, technique, machine)
            # the reported dose (whole jaw field, leakage included) before any correction
            # round, so the rounds correct against what is reported (#19)
            beamlet_dose = dose
            delivery, dose, fid = stages.run("field dose", _field_dose, patient, dij,
                                             delivery, ideal, dose, fid)
            if deliverable_rounds and opts.get("attain_rounds") and opts.get("goal_check") is goal_check:
                kept = stages.run(
                    "deliverable correction", _deliverable_correction, problem, be, res,
                    opts, goal_check, patient, dij, resolved, technique, machine,
                    deliverable_rounds,
                    (delivery, ideal, dose, fid), info=correction,
                    field_extra=dose - beamlet_dose)
                if kept[0] is not res:  # a round was kept: its own field dose
                    res, delivery, ideal, dose, fid = kept
                    stages.add(1)
                    delivery, dose, fid = stages.run("field dose", _field_dose, patient,
                                                     dij, delivery, ideal, dose, fid)
        results = stages.run("evaluate", evaluate_goals, resolved, patient, dose)
        if (ideal is not None and opts.get("surrogate_offsets", True)
                and not getattr(be, "hard_constraints", False)):
            # the offsets in force from here on (reported objective values, why lines,
            # warm re-plans) are measured on the reported dose, also when the last
            # correction round was not kept
            _final_offsets(problem, res, goal_check(res.fluence, dose - ideal))
        optimised = apply_state(problem, res.hard_state)  # the terms as last optimised
        blockers = stages.run("explain", _blockers, optimised, res.fluence, results,
                              patient, resolved, correction.get("rejected"))
    finally:
        if own:
            stages.close()
    term_values = {}
    vals = optimised.term_values(res.fluence)
    for b in problem.bindings:
        if b.term_indices:
            term_values[b.goal.id] = float(sum(vals[i] for i in b.term_indices))
    surrogates = _surrogates(optimised, res)
    auto = {t.name: v for t, v in zip(problem.terms, vals) if t.goal_id is None}
    optimizer_info = {
        "backend": res.backend, "solver": res.solver, "status": res.status,
        "objective": res.objective, "iterations": res.iterations,
        "automatic_terms": auto, "messages": res.messages, "problem_notes": problem.notes,
        "n_beamlets": problem.n_beamlets, "n_rows": problem.n_rows,
        "goal_report": res.goal_report, "timings_s": res.timings_s,
        "refine": refine_info, "hard_state": res.hard_state, "surrogates": surrogates,
        "blockers": blockers, "correction_rejected": correction.get("rejected"),
    }
    timings = dict(stages.timings)
    timings["replan" if own else "optimise_total"] = time.perf_counter() - t0
    notes = list(notes) + list(problem.notes)
    if not sequence:
        notes.append("not sequenced: dose, DVH and goal results are the ideal fluence dose, "
                     "not a deliverable MLC plan")
    return Plan(patient, list(resolved), results, np.asarray(res.fluence, np.float32), dose,
                predicted_dose, dij, timings, res.backend, optimizer_info, term_values,
                settings, notes, _versions(res.backend),
                delivery, fractions, ideal, fid)


def _final_offsets(problem, res, report) -> None:
    """Re-measure every goal's surrogate offset at the final fluence against ``report``
    (the goals on the reported dose) into ``res.hard_state``."""
    from atp.optimizer.solve import measure_offsets

    state = {k: dict(v) for k, v in (res.hard_state or {}).items()}
    for gid, off in measure_offsets(problem, res.fluence, report).items():
        state.setdefault(gid, {"weight_factor": 1.0, "ref_shift": 0.0})["offset"] = off
    res.hard_state = state


def _blockers(optimised, fluence, results, patient, resolved, rejected=None) -> dict:
    """{goal id: optimizer.explain.explain_goal(...)} for every failing goal: what holds
    it (opposing terms at the final fluence, a target's coverage floor, and a
    deliverable-correction round that would have moved it but lowered the goal-list
    score: ``rejected`` from :func:`_deliverable_correction`)."""
    from atp.optimizer.explain import explain_goal

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
    from atp.optimizer.solve import surrogate_value

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


def _deliverable_correction(problem, be, res, opts, goal_check, patient, dij, resolved,
                            technique, machine, rounds, current, info=None,
                            field_extra=None):
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
    from atp.goals import evaluate_goals
    from atp.optimizer.solve import optimize
    from atp.progress import tick

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
        out = _sequence(patient, dij, r1.fluence, d1, technique, machine)
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


def _sequence(patient, dij, fluence, ideal_dose, technique, machine):
    """Sequence the fluence into MLC apertures; deliverable dose on the patient grid."""
    from atp import sequencer
    from atp.sequencer.fidelity import fidelity

    delivery = sequencer.sequence(fluence, dij, technique, machine=machine,
                                  fractions=patient.fractions)
    dose = dij.to_patient_grid(sequencer.deliverable_dose(delivery, dij))
    masks = {n: patient.mask(n) for n in patient.targets + patient.organs}
    fid = fidelity(ideal_dose, dose, patient.grid.spacing_mm, masks)
    return delivery, ideal_dose, dose, fid


def _field_dose(patient, dij, delivery, ideal_dose, dose, fid):
    """The reported deliverable dose: the final delivery recomputed over each beam's whole
    jaw field (:func:`atp.forward.forward_dose`, what ``atp dose`` computes from the
    exported RT Plan), so the leakage through closed leaves and jaws outside the planning
    beamlets is in it too; plus MU per cGy in the delivery's summary. A dij not made by
    the pencil-beam engine (imported) keeps its own deliverable dose."""
    from dataclasses import replace as _replace

    from atp.dose.geometry import Beam
    from atp.forward import forward_dose
    from atp.sequencer.fidelity import fidelity

    meta = dict(delivery.meta)
    fx = delivery.fractions
    if patient.prescriptions:
        rx_fx = patient.max_prescription_gy / fx
        meta["mu_per_cgy"] = round(delivery.total_mu / fx / (100.0 * rx_fx), 3)
    m = delivery.machine
    meta["leaf_transmission_percent"] = round(100.0 * m.leaf_transmission, 3)
    meta["jaw_transmission_percent"] = round(100.0 * m.jaw_transmission, 3)
    dm = dij.meta or {}
    if dm.get("engine") == "pencil-beam":
        b = dij.beamlets
        beams = [Beam(float(g), float(c), float(t), tuple(iso)) for g, c, t, iso in
                 zip(b.gantry_deg, b.collimator_deg, b.couch_deg, b.isocenter_mm)]
        dose, _ = forward_dose(patient, delivery, beams,
                               dose_grid_factor=int(dm.get("dose_grid_factor", 2)),
                               beamlet_size_mm=float(b.beamlet_size_mm[0]),
                               margin_mm=float(dm.get("margin_mm", 5.0)),
                               threshold=dm.get("threshold"))
        meta["dose_beamlets"] = "jaw field"
        masks = {n: patient.mask(n) for n in patient.targets + patient.organs}
        fid = fidelity(ideal_dose, dose, patient.grid.spacing_mm, masks)
    return _replace(delivery, meta=meta), dose, fid


# --- loading ----------------------------------------------------------------------------
def _num(v, *, lo=-math.inf, hi=math.inf, optional=False, integer=False) -> bool:
    if v is None:
        return optional
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer and not isinstance(v, int):
        return False
    return math.isfinite(float(v)) and lo <= v <= hi


_GOAL_FIELDS = {  # plan.json goal key -> check
    "id": lambda v: isinstance(v, str) and bool(v),
    "structure": lambda v: isinstance(v, str) and bool(v),
    "metric": lambda v: isinstance(v, str) and bool(v),
    "operator": lambda v: v in ("<=", ">="),
    "value": lambda v: _num(v, lo=0.0, optional=True),
    "priority": lambda v: _num(v, lo=1, hi=99, integer=True),
    "weight": lambda v: _num(v, lo=0.0, hi=MAX_WEIGHT) and v > 0,
    "kind": lambda v: v in ("target", "organ", "control"),
    "source": lambda v: isinstance(v, str),
    "tolerance_pct": lambda v: _num(v, lo=-100, hi=1000, optional=True),
    "predicted_value": lambda v: _num(v, optional=True),
    "reference_rx_gy": lambda v: _num(v, lo=0.0, optional=True),
    "note": lambda v: v is None or isinstance(v, str),
    "params": lambda v: v is None or isinstance(v, dict),
}
_PLAN_JSON_TYPES = {"patient": dict, "goals": list, "settings": dict, "optimizer": dict,
                    "timings_s": dict, "notes": list, "versions": dict}


_SETTINGS_CHECKS = (  # plan.json settings a re-plan reads: key, check, what it must be
    ("backend_requested", lambda v: v in ("auto", "cpu", "gpu", "qp"), "auto, cpu, gpu or qp"),
    ("refine", lambda v: _num(v, lo=0, hi=20, integer=True), "an integer 0..20"),
    ("sequence", lambda v: isinstance(v, (bool, str)), "true, false or a sequencer name"),
    ("resolve_notes", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
     "a list of text"),
    ("optimizer_options", lambda v: v is None or isinstance(v, dict), "a JSON object"),
    ("machine", lambda v: isinstance(v, str), "a machine name or file"),
)


def _check_plan_json(data, pj) -> None:
    """plan.json read back: the types :func:`load_plan` relies on, or InputError naming
    plan.json and the field (a hand-edited or foreign plan.json must not traceback)."""
    if not isinstance(data, dict):
        raise InputError("plan.json must hold a JSON object", file=pj)
    for key, typ in _PLAN_JSON_TYPES.items():
        if key in data and not isinstance(data[key], typ):
            raise InputError(f"must be a JSON {typ.__name__}, got {type(data[key]).__name__}",
                             file=pj, field=key)
    for key in ("patient", "goals"):
        if key not in data:
            raise InputError("missing", file=pj, field=key)
    src = data["patient"].get("source")
    if src is not None and not isinstance(src, str):
        raise InputError("must be text", file=pj, field="patient.source")
    for i, g in enumerate(data["goals"]):
        if not isinstance(g, dict):
            raise InputError("each goal must be a JSON object", file=pj, field=f"goals[{i}]")
        for key, ok in _GOAL_FIELDS.items():
            if key not in g and key in ("id", "structure", "metric", "operator", "priority",
                                        "weight", "kind", "source"):
                raise InputError("missing", file=pj, field=f"goals[{i}].{key}")
            if key in g and not ok(g[key]):
                raise InputError(f"invalid value {quote(g[key])}", file=pj,
                                 field=f"goals[{i}].{key}")
    settings = data.get("settings", {})
    for key, ok, what in _SETTINGS_CHECKS:
        if key in settings and not ok(settings[key]):
            raise InputError(f"must be {what}, got {quote(settings[key])}", file=pj,
                             field=f"settings.{key}")
    seq = settings.get("sequence")
    if isinstance(seq, str):
        from atp.sequencer.registry import names

        if seq not in names():
            raise InputError(f"unknown sequencer {quote(seq)}; installed: "
                             f"{', '.join(sorted(names()))}", file=pj, field="settings.sequence")
    pw = settings.get("priority_weights")
    if pw is not None:
        from atp.goals.schema import parse_priority_weights

        try:
            parse_priority_weights(pw, str(pj), None)
        except InputError as exc:
            raise InputError(exc.message, file=pj, field=f"settings.{exc.field}") from None
    state = data.get("optimizer", {}).get("hard_state")
    if state is not None and not (isinstance(state, dict) and all(
            isinstance(v, dict) and all(_num(x) for x in v.values())
            for v in state.values())):
        raise InputError("must map goal ids to {weight_factor, ref_shift, offset} numbers",
                         file=pj, field="optimizer.hard_state")


def _load_npy(path, field: str, shape=None, *, member: str | None = None) -> np.ndarray:
    """A float array from a plan folder (no pickles), finite, of ``shape``; else
    InputError naming the file and field."""
    try:
        obj = np.load(path, allow_pickle=False)
        if member is None:
            if hasattr(obj, "files"):
                obj.close()
                raise InputError("expected a .npy array, found an .npz archive", file=path,
                                 field=field)
            a = obj
        else:
            if not hasattr(obj, "files"):
                raise InputError("expected an .npz archive", file=path, field=field)
            with obj:
                a = np.asarray(obj[member])
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("missing", file=path, field=field) from None
    except KeyError:
        raise InputError("missing array", file=path, field=field) from None
    except Exception as exc:  # noqa: BLE001 - truncated / pickle-bearing / not numpy
        raise InputError(f"cannot read: {quote(str(exc), 120, repr_=False)}", file=path,
                         field=field) from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf":
        raise InputError("must be a numeric array", file=path, field=field)
    if shape is not None and a.shape != tuple(shape):
        raise InputError(f"shape {a.shape} is not {tuple(shape)}", file=path, field=field)
    if not np.all(np.isfinite(a)):
        raise InputError("contains NaN/inf", file=path, field=field)
    return a


def _resolved_from_dict(d: dict):
    from atp.goals.model import Metric, ResolvedGoal

    return ResolvedGoal(
        id=d["id"], structure=d["structure"], metric=Metric.parse(d["metric"]),
        operator=d["operator"], value=d["value"], priority=int(d["priority"]),
        weight=float(d["weight"]), kind=d["kind"], source=d["source"],
        tolerance_pct=float(d.get("tolerance_pct") or 0.0),
        predicted_value=d.get("predicted_value"), note=d.get("note", ""),
        params=dict(d.get("params") or {}), reference_rx_gy=d.get("reference_rx_gy"))


def load_plan(plan_dir, patient=None) -> Plan:
    """Read a plan directory written by :meth:`Plan.save`.

    patient: the Patient (default: loaded again from the source recorded in plan.json).
    """
    from atp.dose.influence import DoseInfluence
    from atp.goals import evaluate_goals, with_control_structures

    plan_dir = Path(plan_dir)
    pj = plan_dir / "plan.json"
    if not pj.is_file():
        raise InputError("not a plan directory (no plan.json)", file=plan_dir)
    try:
        data = json.loads(pj.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:
        raise InputError(f"malformed plan.json: {quote(str(exc), 120, repr_=False)}",
                         file=pj) from None
    if not isinstance(data, dict):
        raise InputError("plan.json must hold a JSON object", file=pj)
    if data.get("format") != PLAN_FORMAT:
        raise InputError(f"not an {PLAN_FORMAT} plan", file=pj, field="format")
    _check_plan_json(data, pj)
    for f in ("dose.npy", "fluence.npz", "dij.npz"):
        if not (plan_dir / f).is_file():
            raise InputError(f"plan directory lacks {f}", file=plan_dir, field=f)
    if patient is None:
        src = data["patient"].get("source")
        if not src:
            raise InputError("plan.json records no patient source; pass the patient",
                             file=pj, field="patient.source")
        from atp.io import load_patient

        patient = load_patient("phantom" if src.startswith("<embedded") else src)
    try:
        resolved = [_resolved_from_dict(g) for g in data["goals"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed goal entry: {quote(str(exc), 120, repr_=False)}",
                         file=pj, field="goals") from None
    patient = with_control_structures(patient, resolved)
    dij = DoseInfluence.load(plan_dir / "dij.npz")
    if dij.patient_grid is None:
        raise InputError("dij has no patient grid", file=plan_dir / "dij.npz",
                         field="patient_grid_shape")
    if dij.patient_grid.shape != patient.grid.shape:
        raise InputError(f"dij patient grid {dij.patient_grid.shape} is not the patient's "
                         f"{patient.grid.shape}", file=plan_dir / "dij.npz",
                         field="patient_grid_shape")
    dose = _load_npy(plan_dir / "dose.npy", "dose", patient.grid.shape)
    pred_file = plan_dir / "predicted_dose.npy"
    pred = _load_npy(pred_file, "predicted_dose", patient.grid.shape) \
        if pred_file.is_file() else None
    fl = _load_npy(plan_dir / "fluence.npz", "fluence", (dij.n_beamlets,), member="fluence")
    if np.any(fl < 0):
        raise InputError("negative beamlet weights", file=plan_dir / "fluence.npz",
                         field="fluence")
    ideal_file = plan_dir / "ideal_dose.npy"
    ideal = _load_npy(ideal_file, "ideal_dose", patient.grid.shape) \
        if ideal_file.is_file() else None
    results = evaluate_goals(resolved, patient, dose)
    term_values = {g["id"]: g.get("objective_value") for g in data["goals"]}
    return Plan(patient, resolved, results, fl, dose, pred, dij, data.get("timings_s", {}),
                data.get("backend", ""), data.get("optimizer", {}), term_values,
                data.get("settings", {}), data.get("notes", []), data.get("versions", {}),
                ideal_dose_gy=ideal, fidelity=data.get("fidelity"))
