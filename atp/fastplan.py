"""The AIRT-style fast path as a planning pipeline (top floor, next to ``atp.pipeline``).

``fast_plan(patient, spare={"Parotid_L": 0.1})`` (also ``atp.plan(..., fast=True,
spare=...)`` and ``atp plan PATIENT --fast --spare Parotid_L=0.1``) runs:

load -> predict (default: the predictor registry's default) -> resolve goals with the
predicted dose (:func:`atp.plans.prepare_goals`, as the optimiser path) -> arc
dose-influence matrix (one full arc 180 -> 180 deg clockwise, a control point every
``arc_spacing_deg`` = 4 deg, dose grid = CT grid / 3; or a given ``dij=``) ->
:class:`atp.optimizer.fastpath.chain.FastPath` ``prepare()`` (matrix to the torch
device, masks, initial fluence) -> ``run(spare)`` (error map + unrolled correction:
fluence in MU per beamlet) -> VMAT leaf sequencing (sequencer ``vmat``) -> deliverable
dose on the patient grid (Gy) -> goal evaluation -> an :class:`atp.plans.Plan`
(``Plan.save`` writes plan.json, dose.npy, report.html, dicom/ ... as for any plan).

Options: one :class:`FastPlanOptions` (frozen; its ``fastpath`` field the chain's
:class:`~atp.optimizer.fastpath.options.FastPathOptions`); :data:`PRESETS` are named
instances (``options="coverage"``, or ``FastPlanOptions.from_preset("coverage",
vmat_sequencer="vmat")``). The older nested mapping (``fast_options={"preset": ...,
"arc_spacing_deg": ..., "fastpath_options": {...}}``) is still accepted
(:func:`fast_plan_options`).

Sliders: the plan keeps its prepared ``FastPath`` (``plan.attachments["fastpath"]``, not
serialised). :func:`respare` (``respare(plan, spare={"Parotid_L": 0.2})``) regenerates
the whole plan (correction, sequencing, deliverable dose, evaluation) for a new slider
setting WITHOUT re-running the predictor or rebuilding any matrix; ``spare`` is the full
setting (OARs not named are at 0). A plan read back by ``load_plan`` has no prepared
FastPath: ``respare`` then prepares one from the stored dij and predicted dose (still no
prediction, no dose engine). Sparing factor s in [0, 1) for an OAR asks its dose below
(1 - s) x the baseline dose D0 (the dose of the initial fluence); 0 for every OAR is
exactly the baseline plan.

Torch device: ``device='auto'`` takes CUDA when ``torch.cuda.is_available()`` and says in
the plan notes when it ran on the CPU; ``device='cuda'`` without CUDA raises
:class:`~atp.errors.BackendUnavailableError` (no silent fallback); ``'cpu'`` forces CPU.

``plan.json`` settings record ``fast: true``, ``spare``, ``preset``,
``fastpath_options`` (the FastPathOptions values and the sequencing-pass / MU / aperture
options), ``initial_fluence_path`` ('fallback': exact back-projection + dose-mimicking
steps, no trained Bev2Fluence weights; 'network': a trained Bev2Fluence model) and
``device``; ``timings_s`` has one entry per module (AIRT table), see :data:`STAGES`.

torch is imported inside the functions that need it (an optional dependency: ``import
atp.fastplan`` and the CLI's flag checks work without it).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from atp import sequencer
from atp.dose import arc as arcs
from atp.dose.geometry import arc_control_points
from atp.dose.resample import downsample_factor
from atp.errors import BackendUnavailableError, GridMismatchError, InputError, StructureError
from atp.goals import evaluate_goals
from atp.optimizer.fastpath.options import FastPathOptions
from atp.plans import Plan, StageTimer, goal_list_settings, prepare_goals, versions
from atp.sequencer.aperture_refine import refine_apertures
from atp.sequencer.far_tail import dose_objective
from atp.sequencer.fidelity import fidelity
from atp.sequencer.reweight import optimise_mu

#: timings_s keys (seconds), in pipeline order. pre-processing: loading the patient and
#: the goal list, resolving goals (+ control structures), masks onto the dose grid; dose
#: influence: the arc dij (0 when given); dij to device: CSR matrix + transpose on the
#: torch device; initial fluence: step size + fallback (or network) initial fluence;
#: error map + correction: the slider-dependent part; deliverable dose: apertures ->
#: beamlet weights -> dose on the patient grid; evaluation: ideal dose, fidelity, goals;
#: export: ``Plan.save`` (recorded when the plan is saved).
STAGES = ("pre-processing", "dose prediction", "dose influence", "dij to device",
          "initial fluence", "error map + correction", "sequencing", "control-point MU",
          "aperture refinement", "deliverable dose", "evaluation", "export")
#: the progress stages whose seconds add up under another :data:`STAGES` key
_STAGE_LABELS = {"load patient": "pre-processing", "resolve goals": "pre-processing",
                 "predict dose": "dose prediction"}

#: VMAT sequencers the fast path can deliver its arc with (``vmat_sequencer``)
VMAT_SEQUENCERS = ("vmat", "vmat-sliding")

DEFAULT_PRESET = "airt"
DEFAULT_ARC_SPACING_DEG = 4.0
DEFAULT_DOSE_GRID_FACTOR = 3
FALLBACK_MESSAGE = "initial fluence from the exact fallback (no trained Bev2Fluence weights)"
NETWORK_MESSAGE = "initial fluence from the trained Bev2Fluence network"


# --- options -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FastPlanOptions:
    """Settings of :func:`fast_plan` (frozen; change with :func:`dataclasses.replace`).

    preset: the name of the :data:`PRESETS` entry these options started from (recorded in
    plan.json). arc_start_deg -> arc_stop_deg (deg, clockwise; equal = full arc) with a
    control point every arc_spacing_deg, dose grid factor dose_grid_factor,
    beamlet_size_mm beamlets: the arc dij (unless one is given). machine: the linac for
    VMAT sequencing. device: 'auto' | 'cpu' | 'cuda' (torch). initial_fluence: 'auto'
    (the trained Bev2Fluence network when its weights exist -- ``weights`` or the shipped
    ``optimizer/fastpath/weights/bev2fluence.pt`` -- else the exact fallback), 'network'
    (an error when there are no weights: no silent fallback) or 'fallback'. correction:
    the same choice for the correction module -- 'auto' (the trained correction network,
    ``correction_weights`` or the shipped ``optimizer/fastpath/weights/correction.pt``,
    when they exist, else the exact unrolled steps), 'network' or 'exact'.
    initial_fluence_fn / correction_fn: such functions given directly (skip the choice).
    vmat_passes: arcs the VMAT sequencer delivers the one optimised arc in (2: dual arc).
    vmat_sequencer: 'vmat' (rule-based, one aperture per control point and pass) or
    'vmat-sliding' (arc sectors of ``sector_deg`` degrees swept by a sliding window,
    :mod:`atp.sequencer.vmat_sliding`). sequencing_passes: correction passes against the
    last sequencing's loss (``pass_steps`` steps each, default the correction's);
    mu_iterations: control-point MU optimisation on the objective after sequencing (0:
    the sequencer's least-squares MU); aperture_iterations / aperture_rounds: direct
    aperture refinement after sequencing (0: off). fastpath: the chain's numeric options.
    """

    preset: str = DEFAULT_PRESET
    arc_start_deg: float = 180.0
    arc_stop_deg: float = 180.0
    arc_spacing_deg: float = DEFAULT_ARC_SPACING_DEG
    dose_grid_factor: int = DEFAULT_DOSE_GRID_FACTOR
    beamlet_size_mm: float = 5.0
    machine: str = "millennium120"
    device: str = "auto"
    initial_fluence: str = "auto"
    weights: str | Path | None = None
    correction: str = "auto"
    correction_weights: str | Path | None = None
    initial_fluence_fn: Callable | None = None
    correction_fn: Callable | None = None
    vmat_passes: int = 2
    vmat_sequencer: str = "vmat"
    sector_deg: float = 20.0
    sequencing_passes: int = 0
    pass_steps: int | None = None
    mu_iterations: int = 30
    aperture_iterations: int = 0
    aperture_rounds: int = 3
    fastpath: FastPathOptions = field(default_factory=FastPathOptions)

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **changes) -> FastPlanOptions:
        """The preset ``name`` with ``changes`` (fields of this class) applied."""
        if not isinstance(name, str) or name not in PRESETS:
            raise InputError(f"unknown fast-path preset {name!r}; presets: "
                             f"{', '.join(PRESETS)}", field="--preset")
        return replace(PRESETS[name], **changes)


#: the FastPlanOptions fields plan.json records inside ``settings.fastpath_options``,
#: beside the FastPathOptions values (where they were before options were objects)
RECORDED_WITH_FASTPATH = ("sequencing_passes", "pass_steps", "mu_iterations",
                          "aperture_iterations", "aperture_rounds")
_PLAN_FIELDS = {f.name for f in fields(FastPlanOptions)} - {"fastpath", "preset"}
_CHAIN_FIELDS = {f.name for f in fields(FastPathOptions)}

#: named fast-path settings (``preset=`` / ``atp plan --fast --preset NAME``); options
#: given explicitly win. 'airt' is the default (rule-based arcs, one aperture per control
#: point and arc pass: ~2 min beam-on, OAR means level with the optimiser's, PTV coverage
#: short of it); 'coverage' the coverage-first setting (sliding-window arc sectors, a
#: cold hinge below Rx, OAR hinges off the target voxels, two correction passes against
#: the sequencing loss, and a third of the default's fluence smoothness -- the sweeps
#: deliver modulated maps that one aperture per control point cannot: PTV_70 HI 0.095 vs
#: the default's 0.234, but parotid means ~8 Gy higher, ~10 min beam-on and 1.5-1.8x the
#: time; BENCHMARKS.md, 33 validation patients). Both keep the FastPath defaults for the
#: rest, the organ-maximum term included.
PRESETS = {
    "airt": FastPlanOptions(preset="airt", vmat_sequencer="vmat", sector_deg=20.0),
    "coverage": FastPlanOptions(
        preset="coverage", vmat_sequencer="vmat-sliding", sector_deg=20.0,
        sequencing_passes=2,
        fastpath=FastPathOptions(oar_minus_targets="support", coverage_weight=4.0,
                                 smoothness=0.1)),
}


def fast_plan_options(spec=None, **changes) -> FastPlanOptions:
    """FastPlanOptions from ``spec``: None (the default preset), a preset name, a
    FastPlanOptions, or a mapping of the older keyword form -- ``preset`` (the base),
    FastPlanOptions field names, and ``fastpath_options`` (FastPathOptions fields, the
    :data:`RECORDED_WITH_FASTPATH` fields, ``initial_fluence_fn`` / ``correction_fn``);
    what is given explicitly wins over the preset (a ``fastpath_options`` key over the
    preset's value of that key; ``vmat_sequencer`` / ``sector_deg`` None: the preset's).
    ``changes``: more keys of the mapping form."""
    if isinstance(spec, FastPlanOptions):
        return _apply(spec, changes) if changes else spec
    if spec is None or isinstance(spec, str):
        spec = {"preset": spec or DEFAULT_PRESET}
    if not isinstance(spec, Mapping):
        raise InputError(f"fast-path options must be FastPlanOptions, a preset name or a "
                         f"mapping, got {spec!r}", field="fast_options")
    spec = {**spec, **changes}
    return _apply(FastPlanOptions.from_preset(spec.pop("preset", DEFAULT_PRESET)), spec)


def _apply(base: FastPlanOptions, spec: dict) -> FastPlanOptions:
    spec = dict(spec)
    nested = spec.pop("fastpath_options", None)
    if nested is not None and not hasattr(nested, "items"):
        raise InputError(f"fastpath_options must be a mapping, got {nested!r}",
                         field="fastpath_options")
    top, chain = {}, {}
    for key, value in (nested or {}).items():
        if key in _CHAIN_FIELDS:
            chain[key] = value
        elif key in RECORDED_WITH_FASTPATH or key in ("initial_fluence_fn", "correction_fn"):
            top[key] = value
        else:
            raise InputError(f"unknown fast-path option {key!r}",
                             field=f"fastpath_options.{key}")
    for key, value in spec.items():
        if key not in _PLAN_FIELDS:
            raise InputError(f"unknown fast-path option {key!r}; options: "
                             f"{', '.join(sorted(_PLAN_FIELDS | {'preset'}))}",
                             field=f"fast_options.{key}")
        if value is not None or key not in ("vmat_sequencer", "sector_deg"):
            top[key] = value
    return replace(base, **top, fastpath=replace(base.fastpath, **chain))


def recorded_options(o: FastPlanOptions, fp) -> dict:
    """plan.json ``settings.fastpath_options``: the FastPath's numeric options as it
    holds them, the :data:`RECORDED_WITH_FASTPATH` options, the network functions'
    names."""
    out = {k: getattr(fp, k) for k in _CHAIN_FIELDS}
    out.update(sequencing_passes=int(o.sequencing_passes), pass_steps=o.pass_steps,
               mu_iterations=int(o.mu_iterations),
               aperture_iterations=int(o.aperture_iterations),
               aperture_rounds=int(o.aperture_rounds))
    for key in ("initial_fluence_fn", "correction_fn"):
        fn = getattr(o, key)
        if fn is not None:
            out[key] = getattr(fn, "__qualname__", type(fn).__name__)
    return out


def options_from_settings(settings: dict, recorded: dict | None = None) -> FastPlanOptions:
    """The FastPlanOptions a plan was made with, from its plan.json settings (a plan read
    back respares with them). recorded: ``settings.fastpath_options`` already checked
    (default: as stored); unknown keys are ignored, missing ones take the defaults."""
    recorded = settings.get("fastpath_options") or {} if recorded is None else recorded
    chain = {k: v for k, v in recorded.items() if k in _CHAIN_FIELDS}
    top = {k: recorded[k] for k in RECORDED_WITH_FASTPATH if k in recorded}
    return FastPlanOptions(
        preset=settings.get("preset") or DEFAULT_PRESET,
        machine=settings.get("machine", "millennium120"),
        device=settings.get("device_requested", "auto"),
        vmat_passes=int(settings.get("vmat_passes", 2)),
        vmat_sequencer=settings.get("sequence", "vmat"),
        sector_deg=float(settings.get("sector_deg", 20.0)),
        fastpath=FastPathOptions(**chain), **top)


def check_options(o: FastPlanOptions) -> None:
    """The settings :func:`fast_plan` checks before any work (InputError naming one)."""
    if not (isinstance(o.vmat_passes, int | np.integer) and int(o.vmat_passes) >= 1):
        raise InputError(f"vmat_passes must be an integer >= 1, got {o.vmat_passes!r}",
                         field="vmat_passes")
    if o.vmat_sequencer not in VMAT_SEQUENCERS:
        raise InputError(f"vmat_sequencer must be one of {', '.join(VMAT_SEQUENCERS)}, got "
                         f"{o.vmat_sequencer!r}", field="vmat_sequencer")
    if not (isinstance(o.sector_deg, int | float) and math.isfinite(o.sector_deg)
            and o.sector_deg > 0):
        raise InputError(f"sector_deg must be a number > 0, got {o.sector_deg!r}",
                         field="sector_deg")


# --- inputs ------------------------------------------------------------------------------
def parse_spare_args(items) -> dict[str, float]:
    """CLI ``--spare OAR=FACTOR`` items -> {OAR: factor}; range checked by check_spare."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"expected OAR=FACTOR (e.g. Parotid_L=0.1), got '{item}'",
                             field="--spare")
        try:
            factor = float(value)
        except ValueError:
            raise InputError(f"sparing factor for {name} must be a number in [0, 1), got "
                             f"'{value}'", field="--spare") from None
        if name in out:
            raise InputError(f"sparing factor for {name} given twice", field="--spare")
        out[name] = factor
    return out


def check_spare(spare, patient) -> dict[str, float]:
    """Validated sliders {OAR name: factor in [0, 1)} for ``patient`` (its organs)."""
    if spare is None:
        return {}
    if not hasattr(spare, "items"):
        raise InputError(f"spare must be a mapping OAR -> factor, got {spare!r}",
                         field="--spare")
    out = {}
    organs = list(patient.organs)
    for name, value in spare.items():
        if name not in organs:
            raise StructureError(f"no OAR '{name}' to spare in this patient; OARs: "
                                 f"{', '.join(organs) or 'none'}", field="--spare")
        try:
            s = float(value)
        except (TypeError, ValueError):
            raise InputError(f"sparing factor for {name} must be a number in [0, 1), got "
                             f"{value!r}", field="--spare") from None
        if not (math.isfinite(s) and 0.0 <= s < 1.0):
            raise InputError(f"sparing factor for {name} must be in [0, 1), got {value!r}",
                             field="--spare")
        out[name] = s
    return out


def resolve_device(device: str | None = "auto") -> tuple[str, str | None]:
    """(torch device, note or None). 'auto': cuda when available, else cpu (with a note);
    'cuda' / 'cuda:N' without CUDA raises BackendUnavailableError; 'cpu' forces CPU."""
    try:
        import torch  # lazy: an optional dependency (pip install 'atp[ml]')
    except ImportError:
        raise BackendUnavailableError("the fast path needs PyTorch (pip install "
                                      "'atp[ml]')") from None
    dev = "auto" if device is None else str(device)
    if dev == "auto":
        if torch.cuda.is_available():
            return "cuda", None
        return "cpu", ("fast path ran on the CPU: torch finds no CUDA device "
                       "(device 'auto')")
    if dev == "cpu":
        return "cpu", None
    if dev == "cuda" or dev.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device '{dev}' was asked for the fast path but torch finds no CUDA "
                "device (torch.cuda.is_available() is False); use --device cpu or auto")
        return dev, None
    raise InputError(f"unknown device '{dev}' (auto | cpu | cuda)", field="--device")


#: the fast path's two network options: option -> (flag, weights flag, exact choice,
#: what, shipped weights, module, its default-weights function, its make function)
NETWORKS = {
    "initial_fluence": ("--initial-fluence", "--weights", "fallback", "Bev2Fluence",
                        "optimizer/fastpath/weights/bev2fluence.pt",
                        "atp.optimizer.fastpath.bev2fluence", "default_weights_path",
                        "make_initial_fluence_fn"),
    "correction": ("--correction", "--correction-weights", "exact", "correction-network",
                   "optimizer/fastpath/weights/correction.pt",
                   "atp.optimizer.fastpath.correction_net",
                   "default_correction_weights_path", "make_correction_fn"),
}


def network_choice(option: str, choice, weights, device: str):
    """(fn or None, weights path or None) for ``option`` ('initial_fluence' or
    'correction', see :class:`FastPlanOptions`): 'auto' (the network when ``weights`` or
    the shipped file exist, else the exact path), 'network' (an error without weights:
    no silent fallback) or the exact choice; None means the exact path."""
    flag, weights_flag, exact, what, shipped, module, default, make = NETWORKS[option]
    choice = "auto" if choice is None else str(choice)
    if choice not in ("auto", "network", exact):
        raise InputError(f"{option} must be auto, network or {exact}, got '{choice}'",
                         field=flag)
    if choice == exact:
        if weights is not None:
            raise InputError(f"{what} weights given with {option}='{exact}'",
                             field=weights_flag)
        return None, None
    # lazy: the network modules import torch (an optional dependency)
    mod = importlib.import_module(module)
    path = Path(weights) if weights is not None else getattr(mod, default)()
    if weights is not None and not path.is_file():
        raise InputError(f"no {what} weights file {path}", field=weights_flag)
    if path is None:
        if choice == "network":
            raise InputError(f"{option}='network' but no {what} weights are shipped "
                             f"({shipped}) or given ({weights_flag})", field=flag)
        return None, None
    return getattr(mod, make)(path, device), str(path)


def initial_fluence_choice(choice: str, weights, device: str):
    """(initial_fluence_fn or None, weights path or None); None: the exact fallback."""
    return network_choice("initial_fluence", choice, weights, device)


def correction_choice(choice: str, weights, device: str):
    """(correction_fn or None, weights path or None); None: the exact unrolled steps."""
    return network_choice("correction", choice, weights, device)


def correction_message(correction_path: str) -> str:
    """One line saying which correction a fast plan used."""
    return ("correction by the trained correction network (+ exact steps)"
            if correction_path == "network" else
            "correction by exact unrolled gradient steps (no correction-network weights)")


def path_message(initial_path: str) -> str:
    """One line saying which initial-fluence path a fast plan used."""
    return NETWORK_MESSAGE if initial_path == "network" else FALLBACK_MESSAGE


# --- the pipeline ------------------------------------------------------------------------
def fast_plan(patient, *, site: str = "hn", institution=None, goal_list=None,
              predictor=None, predicted_dose=None, dij=None,
              dose_engine: str = "pencil-beam", spare=None, progress=True,
              options: FastPlanOptions | Mapping | str | None = None, **changes) -> Plan:
    """Fast-path plan of one patient (see the module docstring); returns a Plan.

    patient: a Patient or anything ``atp.io.load_patient`` accepts. goal_list / site /
    institution / predictor / predicted_dose (Gy, patient grid): as :func:`atp.plan`.
    dij: an arc DoseInfluence on the patient's grid (skips the dose engine). spare: {OAR:
    factor in [0, 1)}. options: :class:`FastPlanOptions`, a preset name, or the mapping
    form of :func:`fast_plan_options`; ``changes``: keys of that mapping form as keywords
    (``fast_plan(p, arc_spacing_deg=10, preset="coverage")``).
    """
    t_start = time.perf_counter()
    o = fast_plan_options(options, **changes)
    dev, device_note = resolve_device(o.device)  # fail before any work
    check_options(o)
    # lazy: torch (an optional dependency) comes with the chain
    from atp.optimizer.fastpath.chain import FastPath

    stages = StageTimer(progress, total=9, labels=_STAGE_LABELS)
    checked: dict = {}
    try:
        prep = prepare_goals(patient, site=site, institution=institution,
                             goal_list=goal_list, predictor=predictor,
                             predicted_dose=predicted_dose, stages=stages,
                             check_patient=lambda p: checked.update(
                                 spare=check_spare(spare, p)))
        dij, arc, engine_name = _arc_dij(prep.loaded, dij, o, dose_engine, stages)
        nets = _networks(o, dev)
        fp = FastPath(prep.patient, dij, prep.predicted_dose, o.fastpath, device=dev,
                      resolved_goals=list(prep.resolved),
                      initial_fluence_fn=nets["initial_fluence_fn"],
                      correction_fn=nets["correction_fn"])
        stages.run("prepare fast path", fp.prepare)
        settings = {**goal_list_settings(prep.goal_list, site, institution),
                    **_fast_settings(o, fp, prep, nets, engine_name, arc, checked["spare"])}
        notes = _fast_notes(prep.resolve_notes, device_note, fp, nets)
        out = _finish(fp, o, list(prep.resolved), checked["spare"], settings, notes,
                      stages, _prepared_timings(fp, stages, STAGES[:-1]))
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


def _arc_dij(patient, dij, o: FastPlanOptions, dose_engine: str, stages):
    """(dij, arc settings or None, engine name): the arc dose influence of ``o``, or the
    given dij checked against the patient's grid."""
    if dij is not None:
        if not dij.patient_grid.same_as(patient.grid):
            raise GridMismatchError("the given dose-influence matrix was computed for "
                                    "another patient grid", field="dij")
        return dij, None, "given"
    cps = arc_control_points(float(o.arc_start_deg) % 360.0, float(o.arc_stop_deg) % 360.0,
                             float(o.arc_spacing_deg))
    arc = {"start_deg": float(o.arc_start_deg), "stop_deg": float(o.arc_stop_deg),
           "spacing_deg": float(o.arc_spacing_deg), "control_points": len(cps),
           "direction": "cw"}
    dij = stages.run("dose influence", arcs.arc_influence, patient, cps,
                     engine=dose_engine, dose_grid_factor=int(o.dose_grid_factor),
                     beamlet_size_mm=o.beamlet_size_mm)
    return dij, arc, dose_engine


def _networks(o: FastPlanOptions, dev: str) -> dict:
    """The network functions of ``o`` (given, or chosen by :func:`network_choice`) and
    the weights files used."""
    out = {"initial_fluence_fn": o.initial_fluence_fn, "correction_fn": o.correction_fn,
           "initial_fluence_weights": None, "correction_weights": None}
    for option in ("initial_fluence", "correction"):
        if out[f"{option}_fn"] is None:
            weights = o.weights if option == "initial_fluence" else o.correction_weights
            out[f"{option}_fn"], out[f"{option}_weights"] = network_choice(
                option, getattr(o, option), weights, dev)
    return out


def _fast_settings(o: FastPlanOptions, fp, prep, nets: dict, engine_name: str, arc,
                   sparing: dict) -> dict:
    """plan.json settings of a fast plan (beside the goal list's)."""
    return {
        "fast": True, "predictor": prep.predictor, "dose_engine": engine_name, "arc": arc,
        "dose_grid_factor": downsample_factor(fp.dij.patient_grid, fp.dij.dose_grid),
        "beamlet_size_mm": o.beamlet_size_mm, "spare": sparing,
        "initial_fluence_path": fp.initial_path, "device": str(fp.device),
        "initial_fluence_weights": nets["initial_fluence_weights"],
        "correction_path": fp.correction_path,
        "correction_weights": nets["correction_weights"],
        "device_requested": "auto" if o.device is None else str(o.device),
        "fastpath_options": recorded_options(o, fp),
        "resolve_notes": prep.resolve_notes, "preset": o.preset,
        "sequence": o.vmat_sequencer, "machine": o.machine,
        "vmat_passes": int(o.vmat_passes), "sector_deg": float(o.sector_deg),
        "backend_requested": "auto", "refine": 0, "optimizer_options": {},
    }


def _fast_notes(resolve_notes, device_note, fp, nets: dict) -> list:
    notes = list(resolve_notes)
    if device_note:
        notes.append(device_note)
    notes.append("fast path: " + path_message(fp.initial_path))
    notes.append("fast path: " + correction_message(fp.correction_path))
    if nets["initial_fluence_weights"]:
        notes.append(f"Bev2Fluence weights: {nets['initial_fluence_weights']}")
    return notes


def _prepared_timings(fp, stages, keys) -> dict:
    """The AIRT table's entries known once the FastPath is prepared: zero for ``keys``,
    plus the preparation's own timings and the stages run so far."""
    timings = {s: 0.0 for s in keys}
    timings["dij to device"] = fp.timings_s["dij_to_device"]
    timings["initial fluence"] = fp.timings_s["step_size"] + fp.timings_s["initial_fluence"]
    if "pre-processing" in timings:
        timings["pre-processing"] += fp.timings_s["masks_to_dose_grid"]
    for key in ("pre-processing", "dose prediction", "dose influence"):
        if key in timings:
            timings[key] += stages.timings.get(key, 0.0)
    return timings


def respare(plan: Plan, spare=None, *, progress=False) -> Plan:
    """A new Plan of a fast-path ``plan`` for a new slider setting (see the module
    docstring).

    Reuses the plan's prepared FastPath (``plan.attachments["fastpath"]``: matrices,
    masks, initial fluence, baseline dose); never runs the predictor or the dose engine.
    A plan read back from disk prepares one from its stored dij and predicted dose.
    ``spare``: the full slider setting.
    """
    if not plan.settings.get("fast"):
        raise InputError("respare needs a fast-path plan (atp.plan(..., fast=True))",
                         field="spare")
    t_start = time.perf_counter()
    sparing = check_spare(spare, plan.patient)
    fp = plan.attachments.get("fastpath")
    notes = [n for n in plan.notes if not n.startswith("respare:")]
    o = _respare_options(plan.settings)
    keys = ("error map + correction", "sequencing", "control-point MU", "deliverable dose",
            "evaluation")
    timings = {s: 0.0 for s in keys}
    if fp is None:  # a plan read back from disk: prepare from the stored dij + prediction
        fp = _prepare_again(plan, o)
        timings = _prepared_timings(fp, None, keys)
        notes.append("respare: fast path prepared again from the stored dij and predicted "
                     "dose (no prediction, no dose engine)")
    settings = dict(plan.settings)
    settings["spare"] = sparing
    settings["respare_of"] = {"spare": dict(plan.settings.get("spare") or {})}
    stages = StageTimer(progress, total=4)
    try:
        out = _finish(fp, o, list(plan.resolved_goals), sparing, settings, notes, stages,
                      timings)
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


def _respare_options(settings: dict) -> FastPlanOptions:
    # lazy: the chain imports torch (an optional dependency; respare needs it anyway)
    from atp.optimizer.fastpath.chain import drop_retired_options

    recorded = drop_retired_options(settings.get("fastpath_options") or {},
                                    file="plan.json")
    return options_from_settings(settings, recorded)


def _prepare_again(plan: Plan, o: FastPlanOptions):
    """A prepared FastPath from a loaded plan's stored dij and predicted dose, with the
    network weights it was made with (no silent fallback when they are gone)."""
    # lazy: torch (an optional dependency) comes with the chain
    from atp.optimizer.fastpath.chain import FastPath

    if plan.predicted_dose_gy is None:
        raise InputError("this plan has no predicted dose to respare from",
                         field="predicted_dose")
    dev, _ = resolve_device(plan.settings.get("device_requested", "auto"))
    fns = {}
    for option, weights_key in (("initial_fluence", "initial_fluence_weights"),
                                ("correction", "correction_weights")):
        if plan.settings.get(f"{option}_path") == "network":
            w = plan.settings.get(weights_key)
            if not w or not Path(w).is_file():
                raise InputError(f"this plan's {option.replace('_', ' ')} came from the "
                                 f"network weights {w!r}, which are not there any more; "
                                 "plan again with fast=True", field=weights_key)
            fns[f"{option}_fn"] = network_choice(option, "network", w, dev)[0]
    return FastPath(plan.patient, plan.dij, plan.predicted_dose_gy, o.fastpath, device=dev,
                    resolved_goals=list(plan.resolved_goals), **fns).prepare()


# --- shared tail -------------------------------------------------------------------------
def _finish(fp, o: FastPlanOptions, resolved, sparing, settings, notes, stages,
            timings) -> Plan:
    """FastPath.run -> VMAT sequencing (+ correction passes) -> deliverable dose ->
    evaluation -> Plan. timings: the AIRT table so far; the stages run here add to it."""
    patient, dij = fp.patient, fp.dij
    info = {"control_point_mu": [], "aperture_refinement": []}
    best = _sequenced(fp, o, sparing, stages, info,
                      stages.run("error map + correction", fp.run, sparing))
    best, passes = _correction_passes(fp, o, sparing, stages, info, best)
    res, delivery, grid_dose, _ = best
    dose = stages.run("deliverable dose", dij.to_patient_grid, grid_dose)
    ideal, fid, results = stages.run("evaluation", _evaluate, patient, dij, resolved, res,
                                     dose)
    optimizer_info = {
        "method": "fastpath", "initial_path": res.initial_path,
        "objective": res.objective, "sparing": dict(res.sparing),
        "n_beamlets": int(dij.n_beamlets), "device": str(fp.device),
        "timings_s": {**fp.timings_s, **res.timings_s}, "sequencing_passes": passes,
        **info,
    }
    for key, seconds in stages.timings.items():
        if key in STAGES and key not in ("pre-processing", "dose prediction",
                                         "dose influence"):
            timings[key] = timings.get(key, 0.0) + seconds
    return Plan(patient=patient, resolved_goals=resolved, results=results,
                fluence=np.asarray(res.fluence_mu, np.float32), dose_gy=dose,
                predicted_dose_gy=fp.predicted_dose_gy, dij=dij, timings_s=timings,
                backend=f"fastpath-{fp.device.type}", optimizer=optimizer_info,
                settings=settings, notes=list(notes), versions=versions("fastpath"),
                delivery=delivery, ideal_dose_gy=ideal, fidelity=fid,
                attachments={"fastpath": fp})


def _sequenced(fp, o: FastPlanOptions, sparing, stages, info: dict, r):
    """(r, delivery, dose-grid dose, objective J): ``r``'s fluence sequenced into a VMAT
    delivery, its control-point MU optimised on J and its apertures refined (when
    asked), and its deliverable dose."""
    dij, patient = fp.dij, fp.patient
    # with the MU optimised on J below, the sequencer's least-squares MU fit (same free
    # MU, other objective) would only be overwritten: skip it
    params = {"passes": int(o.vmat_passes)}
    if o.vmat_sequencer == "vmat-sliding":
        # the leaves as fast as the slowest gantry allows: the fast path's arc (control
        # points every few degrees, two samples each) was measured so (fastpath.md)
        params.update(sector_deg=float(o.sector_deg), sweep_speed_factor=math.inf)
    delivery = stages.run("sequencing", sequencer.sequence, r.fluence_mu, dij,
                          o.vmat_sequencer, machine=o.machine,
                          fractions=patient.fractions, reweight=o.mu_iterations <= 0,
                          **params)
    if o.mu_iterations > 0:
        delivery, mu = stages.run("control-point MU", _fit_mu, fp, o, sparing, delivery)
        info["control_point_mu"].append(mu)
    if o.aperture_iterations > 0:
        rows, row_matrix = fp.objective_rows_matrix(sparing)
        objective = dose_objective(dij, fp.objective_value_grad(sparing), rows, row_matrix,
                                   embed=True)  # the reported dose: far tail included
        delivery, ap = stages.run("aperture refinement", refine_apertures, delivery,
                                  dij.beamlets, objective,
                                  rounds=int(o.aperture_rounds),
                                  iterations=int(o.aperture_iterations))
        info["aperture_refinement"].append(ap)
    grid_dose = stages.run("deliverable dose", sequencer.deliverable_dose, delivery, dij)
    return r, delivery, grid_dose, fp.objective_value(grid_dose, sparing)


def _fit_mu(fp, o: FastPlanOptions, sparing, delivery):
    # J's rows of the dij are selected once (cached by the FastPath) and reused by every
    # correction pass and slider change
    rows, row_matrix = fp.objective_rows_matrix(sparing)
    return optimise_mu(delivery, fp.dij, fp.objective_value_grad(sparing),
                       max_iter=int(o.mu_iterations), rows=rows, row_matrix=row_matrix)


def _correction_passes(fp, o: FastPlanOptions, sparing, stages, info: dict, best):
    """AIRT's repeated correction passes, aimed at the deliverable dose: the last
    sequencing's loss (deliverable - ideal) is added inside the objective; a pass is
    kept while it lowers J. Returns (best, one record per pass)."""
    passes = []
    for _ in range(int(o.sequencing_passes)):
        r0, _, grid0, j0 = best
        offset = np.asarray(grid0, np.float32) - r0.dose_grid_dose_gy
        r1 = stages.run("error map + correction", fp.run, sparing, start=r0.fluence_mu,
                        dose_offset_gy=offset, steps=o.pass_steps)
        cand = _sequenced(fp, o, sparing, stages, info, r1)
        passes.append({"objective_before": j0, "objective_after": cand[3],
                       "kept": cand[3] < j0})
        if not cand[3] < j0:
            break
        best = cand
    return best, passes


def _evaluate(patient, dij, resolved, res, dose):
    """(ideal dose, fidelity, goal results) of a fast plan's deliverable ``dose``."""
    ideal = dij.to_patient_grid(res.dose_grid_dose_gy)
    masks = {n: patient.mask(n) for n in patient.targets + patient.organs}
    fid = fidelity(ideal, dose, patient.grid.spacing_mm, masks)
    return ideal, fid, evaluate_goals(resolved, patient, dose)
