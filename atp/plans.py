"""The plan as data, shared by both planning pipelines (top floor).

* :class:`Plan`: a finished plan and everything needed to explain or re-optimise it,
  built by keyword; ``Plan.save(dir)`` writes the plan directory atomically (temp dir
  then rename): ``plan.json`` (every resolved goal with its objective-term value,
  achieved value and pass/fail; P1 goals not met and by how much; DVH metrics per
  structure; timings per stage; backend; optimiser status; versions), ``dose.npy``
  (final dose, Gy, patient grid, float32), ``predicted_dose.npy``, ``fluence.npz``
  (``fluence`` per beamlet, ``beam_index``, ``bev_x_mm``, ``bev_y_mm``, ``gantry_deg``),
  ``dij.npz`` (the dose-influence matrix, so a re-plan reuses it) and, for sequenced
  plans, ``ideal_dose.npy``.
* :func:`load_plan` reads a plan directory back (every plan.json field it relies on
  checked: one line naming the file and field on bad input).
* :class:`StageTimer`: seconds per stage and the progress display on stderr.
* :func:`prepare_goals`: the front half of every plan (load patient + goal list ->
  predict -> resolve goals -> control structures).
* :func:`versions`: the software versions a plan records.

What happens to a plan next lives with its pipeline: :func:`atp.pipeline.replan` (the
optimiser) and :func:`atp.fastplan.respare` (the fast path's sliders).
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy

from atp.dose.influence import DoseInfluence
from atp.errors import InputError, quote
from atp.goals import evaluate_goals, load_goal_list, resolve_goals, with_control_structures
from atp.goals.model import Metric, ResolvedGoal
from atp.goals.schema import MAX_WEIGHT, parse_priority_weights
from atp.io import load_patient
from atp.metrics import structure_metrics
from atp.outputs import atomic_output_dir, write_json
from atp.patient import Patient
from atp.predictor import registry as predictors
from atp.progress import Display, saving, tick
from atp.refine_spec import parse_refine
from atp.report import write_report
from atp.sequencer.registry import names as sequencer_names
from atp.version import __version__

PLAN_FORMAT = "atp-plan-1"


# --- progress ---------------------------------------------------------------------------
class StageTimer:
    """Seconds per stage (``timings``) and the progress display on stderr
    (:class:`atp.progress.Display`: a bar on a terminal, plain lines otherwise; rounds
    and iterations inside a stage through :func:`atp.progress.tick`; silent when
    disabled).

    progress: True (display), False, or a callable(stage_name) told each stage's name.
    total: the stages the display counts. labels: {stage name: timings key} for stages
    whose seconds add up under another key (the fast path's AIRT module table).
    """

    def __init__(self, progress, total: int, labels: dict | None = None):
        self.timings: dict[str, float] = {}
        self.labels = dict(labels or {})
        self.callback = progress if callable(progress) else None
        self.display = Display(progress is True, total)

    def run(self, name: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` as the stage ``name``; its seconds are added to
        ``timings[labels.get(name, name)]``."""
        if self.callback is not None:
            self.callback(name)
        t0 = time.perf_counter()
        with self.display.stage(name):
            out = fn(*args, **kwargs)
        key = self.labels.get(name, name)
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0
        return out

    def add(self, n: int = 1) -> None:
        """Stages that turned out to be needed (a kept correction round's field dose)."""
        self.display.grow(n)

    def close(self) -> None:
        self.display.close()


def versions(backend_name: str = "") -> dict:
    """The versions a plan records: atp, Python, NumPy, SciPy and, when loaded, the
    solver / GPU / network libraries (``backend_name``: the backend that made the plan,
    kept for callers; the loaded modules say what ran)."""
    out = {"atp": __version__, "python": platform.python_version(),
           "numpy": np.__version__, "scipy": scipy.__version__}
    for mod in ("cvxpy", "osqp", "clarabel", "cupy", "torch"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = m.__version__
    return out


# --- the front half of every plan -------------------------------------------------------
@dataclass(eq=False)
class PreparedGoals:
    """What :func:`prepare_goals` returns. patient: with the control structures the
    goals built; loaded: the patient as loaded (what the dose engine sees); goal_list: the GoalList; predicted_dose: Gy, patient grid, float32;
    predictor: its name ('given' when passed in); resolved: the resolved goals (their
    ``skipped`` list too); resolve_notes: one line per skipped goal."""

    patient: object
    loaded: object
    goal_list: object
    predicted_dose: np.ndarray
    predictor: str
    resolved: object
    resolve_notes: list


def patient_and_goal_list(patient, site, institution, goal_list, stages):
    """(Patient, GoalList): load the patient when given a path / 'phantom', and the goal
    list: the shipped list of ``site`` (plus the ``institution`` overlay), a YAML path, or
    a GoalList as given."""
    if not isinstance(patient, Patient):
        patient = stages.run("load patient", load_patient, patient)
    if goal_list is None:
        gl = load_goal_list(site=site, institution=institution)
    elif isinstance(goal_list, (str, Path)):
        gl = load_goal_list(path=goal_list, institution=institution)
    else:
        gl = goal_list
    return patient, gl


def prepare_goals(patient, *, site: str = "hn", institution=None, goal_list=None,
                  predictor=None, predicted_dose=None, stages: StageTimer,
                  check_patient=None) -> PreparedGoals:
    """Load patient + goal list -> predict (unless ``predicted_dose`` is given) ->
    resolve goals -> control structures; each step a stage of ``stages``.

    patient: a Patient or anything ``atp.io.load_patient`` accepts. predictor: a name or
    an object with ``predict(patient)`` (default: the registry's default).
    check_patient(patient): called once the patient is loaded, before any prediction
    (input checks that must fail before work)."""
    patient, gl = patient_and_goal_list(patient, site, institution, goal_list, stages)
    if check_patient is not None:
        check_patient(patient)
    if predicted_dose is None:
        pred = predictors.get(predictor or predictors.default_predictor_name(
            getattr(gl, "site", None) or site))
        predictor_name = getattr(pred, "name", str(predictor))
        predicted_dose = stages.run("predict dose", pred.predict, patient)
    else:
        predictor_name = "given"
    predicted_dose = np.asarray(predicted_dose, dtype=np.float32)
    patient.grid.check_array(predicted_dose, field="predicted_dose")
    resolved = stages.run("resolve goals", resolve_goals, gl, patient, predicted_dose)
    notes = [f"skipped {s['id']}: {s['reason']}" for s in getattr(resolved, "skipped", [])]
    return PreparedGoals(patient=with_control_structures(patient, resolved), loaded=patient,
                         goal_list=gl, predicted_dose=predicted_dose,
                         predictor=predictor_name, resolved=resolved, resolve_notes=notes)


def goal_list_settings(gl, site, institution) -> dict:
    """The plan.json settings every plan records about its goal list."""
    pw = getattr(gl, "priority_weights", None)
    return {"site": getattr(gl, "site", site),
            "institution": None if institution is None else str(institution),
            "priority_weights": pw.to_dict() if hasattr(pw, "to_dict") else None}


# --- the Plan ---------------------------------------------------------------------------
@dataclass(eq=False, kw_only=True)
class Plan:
    """A finished plan and everything needed to explain or re-optimise it.

    patient: the Patient (with control structures the goals built). resolved_goals:
    list of ResolvedGoal. results: list of GoalResult on the final dose. fluence:
    beamlet weights. dose_gy: final dose on the patient grid (Gy). predicted_dose_gy:
    the prediction the goals were resolved with. dij: the DoseInfluence. timings_s:
    seconds per stage. backend: the backend that solved it. optimizer: status,
    objective, iterations, messages. term_values: objective-term value per goal id.
    settings: how it was made (plan.json ``settings``). delivery: the sequenced Delivery
    (None: not sequenced). fractions: the optimiser's structure fractions on the dose
    grid (not saved; a re-plan reuses them). ideal_dose_gy: the fluence dose before
    sequencing. fidelity: ideal vs deliverable dose. changes: a re-plan's before ->
    after rows (:func:`atp.goals.changes.goal_changes`; None: not a re-plan).
    attachments: what a pipeline keeps with the plan in memory (not saved), e.g. the
    fast path's prepared chain.
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
    fractions: dict | None = field(default=None, repr=False)
    ideal_dose_gy: np.ndarray | None = None
    fidelity: dict | None = None
    changes: list | None = None
    attachments: dict = field(default_factory=dict, repr=False)

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

    # --- persistence ---------------------------------------------------------------
    def save(self, out_dir, *, report: bool = True, dicom: bool = False,
             extra=None, progress: bool = False) -> Path:
        """Write the plan directory atomically.

        report: also write ``report.html`` (needs matplotlib; skipped with a note when it
        is not installed). dicom: also export RT Plan / RT Dose / RT Struct (and CT for
        non-DICOM patients) into ``dicom/``. extra(tmp_dir, plan): add more files.
        progress: show the save and each file written on stderr (:mod:`atp.progress`).
        """
        t_export = time.perf_counter()
        out_dir = Path(out_dir)
        with saving(progress, str(out_dir)), atomic_output_dir(out_dir) as tmp:
            self._write_arrays(tmp)
            written = {}
            if report and self._write_report(tmp):
                written["report"] = "report.html"
            if dicom:
                # lazy: pydicom takes seconds to import; only a DICOM export pays it
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

    def _write_arrays(self, tmp: Path) -> None:
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

    def _write_report(self, tmp: Path) -> bool:
        """report.html, or a note when matplotlib is not installed; True when written."""
        if importlib.util.find_spec("matplotlib") is None:
            self.notes.append("report.html not written: matplotlib is not "
                              "installed (pip install 'atp[report]')")
            return False
        tick(step="report.html")
        write_report(tmp, self.patient, self.dose_gy, self.predicted_dose_gy,
                     goal_results=self.results, timings=self.timings_s,
                     title=f"atp plan {self.patient.patient_id}",
                     plan_info=self.report_info(),
                     delivery_summary=self.delivery.summary()
                     if self.delivery is not None else None,
                     fidelity=self.fidelity, notes=self.notes, changes=self.changes,
                     refinement=self.optimizer.get("refine"))
        return True


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
_GOAL_REQUIRED = ("id", "structure", "metric", "operator", "priority", "weight", "kind",
                  "source")
_PLAN_JSON_TYPES = {"patient": dict, "goals": list, "settings": dict, "optimizer": dict,
                    "timings_s": dict, "notes": list, "versions": dict}

_SETTINGS_CHECKS = (  # plan.json settings a re-plan reads: key, check, what it must be
    ("backend_requested", lambda v: v in ("auto", "cpu", "gpu", "qp"), "auto, cpu, gpu or qp"),
    ("refine", lambda v: _num(v, lo=0, hi=20, integer=True) or _refine_text(v),
     "an integer 0..20 or dvh:N / scorecard:N"),
    ("sequence", lambda v: isinstance(v, (bool, str)), "true, false or a sequencer name"),
    ("resolve_notes", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
     "a list of text"),
    ("optimizer_options", lambda v: v is None or isinstance(v, dict), "a JSON object"),
    ("machine", lambda v: isinstance(v, str), "a machine name or file"),
)


def _refine_text(v) -> bool:
    """A ``settings.refine`` text (``scorecard:3``) :func:`atp.refine_spec.parse_refine`
    reads."""
    if not isinstance(v, str):
        return False
    try:
        parse_refine(v)
    except InputError:
        return False
    return True


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
        _check_goal(g, i, pj)
    _check_settings(data.get("settings", {}), pj)
    state = data.get("optimizer", {}).get("hard_state")
    if state is not None and not (isinstance(state, dict) and all(
            isinstance(v, dict) and all(_num(x) for x in v.values())
            for v in state.values())):
        raise InputError("must map goal ids to {weight_factor, ref_shift, offset} numbers",
                         file=pj, field="optimizer.hard_state")


def _check_goal(g, i: int, pj) -> None:
    if not isinstance(g, dict):
        raise InputError("each goal must be a JSON object", file=pj, field=f"goals[{i}]")
    for key, ok in _GOAL_FIELDS.items():
        if key not in g and key in _GOAL_REQUIRED:
            raise InputError("missing", file=pj, field=f"goals[{i}].{key}")
        if key in g and not ok(g[key]):
            raise InputError(f"invalid value {quote(g[key])}", file=pj,
                             field=f"goals[{i}].{key}")


def _check_settings(settings: dict, pj) -> None:
    for key, ok, what in _SETTINGS_CHECKS:
        if key in settings and not ok(settings[key]):
            raise InputError(f"must be {what}, got {quote(settings[key])}", file=pj,
                             field=f"settings.{key}")
    seq = settings.get("sequence")
    if isinstance(seq, str) and seq not in sequencer_names():
        raise InputError(f"unknown sequencer {quote(seq)}; installed: "
                         f"{', '.join(sorted(sequencer_names()))}", file=pj,
                         field="settings.sequence")
    pw = settings.get("priority_weights")
    if pw is not None:
        try:
            parse_priority_weights(pw, str(pj), None)
        except InputError as exc:
            raise InputError(exc.message, file=pj, field=f"settings.{exc.field}") from None


def _load_npy(path, field: str, shape=None, *, member: str | None = None) -> np.ndarray:
    """A float array from a plan folder (no pickles), finite, of ``shape``; else
    InputError naming the file and field."""
    try:
        a = _read_array(path, field, member)
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


def _read_array(path, field: str, member: str | None):
    obj = np.load(path, allow_pickle=False)
    if member is None:
        if hasattr(obj, "files"):
            obj.close()
            raise InputError("expected a .npy array, found an .npz archive", file=path,
                             field=field)
        return obj
    if not hasattr(obj, "files"):
        raise InputError("expected an .npz archive", file=path, field=field)
    with obj:
        return np.asarray(obj[member])


def _resolved_from_dict(d: dict):
    return ResolvedGoal(
        id=d["id"], structure=d["structure"], metric=Metric.parse(d["metric"]),
        operator=d["operator"], value=d["value"], priority=int(d["priority"]),
        weight=float(d["weight"]), kind=d["kind"], source=d["source"],
        tolerance_pct=float(d.get("tolerance_pct") or 0.0),
        predicted_value=d.get("predicted_value"), note=d.get("note", ""),
        params=dict(d.get("params") or {}), reference_rx_gy=d.get("reference_rx_gy"))


def _read_plan_json(plan_dir: Path) -> dict:
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
    return data


def _plan_patient(data: dict, pj: Path):
    src = data["patient"].get("source")
    if not src:
        raise InputError("plan.json records no patient source; pass the patient",
                         file=pj, field="patient.source")
    return load_patient("phantom" if src.startswith("<embedded") else src)


def _load_dij(plan_dir: Path, patient) -> DoseInfluence:
    dij = DoseInfluence.load(plan_dir / "dij.npz")
    if dij.patient_grid is None:
        raise InputError("dij has no patient grid", file=plan_dir / "dij.npz",
                         field="patient_grid_shape")
    if dij.patient_grid.shape != patient.grid.shape:
        raise InputError(f"dij patient grid {dij.patient_grid.shape} is not the patient's "
                         f"{patient.grid.shape}", file=plan_dir / "dij.npz",
                         field="patient_grid_shape")
    return dij


def _optional_npy(path: Path, field: str, shape):
    return _load_npy(path, field, shape) if path.is_file() else None


def load_plan(plan_dir, patient=None) -> Plan:
    """Read a plan directory written by :meth:`Plan.save`.

    patient: the Patient (default: loaded again from the source recorded in plan.json).
    """
    plan_dir = Path(plan_dir)
    pj = plan_dir / "plan.json"
    data = _read_plan_json(plan_dir)
    if patient is None:
        patient = _plan_patient(data, pj)
    try:
        resolved = [_resolved_from_dict(g) for g in data["goals"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed goal entry: {quote(str(exc), 120, repr_=False)}",
                         file=pj, field="goals") from None
    patient = with_control_structures(patient, resolved)
    dij = _load_dij(plan_dir, patient)
    shape = patient.grid.shape
    dose = _load_npy(plan_dir / "dose.npy", "dose", shape)
    fl = _load_npy(plan_dir / "fluence.npz", "fluence", (dij.n_beamlets,), member="fluence")
    if np.any(fl < 0):
        raise InputError("negative beamlet weights", file=plan_dir / "fluence.npz",
                         field="fluence")
    return Plan(patient=patient, resolved_goals=resolved,
                results=evaluate_goals(resolved, patient, dose), fluence=fl, dose_gy=dose,
                predicted_dose_gy=_optional_npy(plan_dir / "predicted_dose.npy",
                                                "predicted_dose", shape),
                dij=dij, timings_s=data.get("timings_s", {}),
                backend=data.get("backend", ""), optimizer=data.get("optimizer", {}),
                term_values={g["id"]: g.get("objective_value") for g in data["goals"]},
                settings=data.get("settings", {}), notes=data.get("notes", []),
                versions=data.get("versions", {}),
                ideal_dose_gy=_optional_npy(plan_dir / "ideal_dose.npy", "ideal_dose",
                                            shape),
                fidelity=data.get("fidelity"))
