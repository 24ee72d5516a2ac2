"""The AIRT-style fast path as a planning pipeline (top floor, next to ``atp.pipeline``).

``fast_plan(patient, spare={"Parotid_L": 0.1})`` (also ``atp.plan(..., fast=True,
spare=...)`` and ``atp plan PATIENT --fast --spare Parotid_L=0.1``) runs:

load -> predict (default: the predictor registry's default) -> resolve goals with the
predicted dose (exactly as :func:`atp.pipeline.plan`) -> arc dose-influence matrix (one
full arc 180 -> 180 deg clockwise, a control point every ``arc_spacing_deg`` = 4 deg, dose
grid = CT grid / 3; or a given ``dij=``) -> :class:`atp.optimizer.fastpath.chain.FastPath`
``prepare()`` (matrix to the torch device, masks, initial fluence) -> ``run(spare)``
(error map + unrolled correction: fluence in MU per beamlet) -> VMAT leaf sequencing
(sequencer ``vmat``) -> deliverable dose on the patient grid (Gy) -> goal evaluation ->
an :class:`atp.pipeline.Plan` (``Plan.save`` writes plan.json, dose.npy, report.html,
dicom/ ... as for any plan).

Sliders: the plan keeps its prepared ``FastPath`` (``plan.fastpath``, not serialised).
``plan.respare(spare={"Parotid_L": 0.2})`` (= :func:`respare`) regenerates the whole plan
(correction, sequencing, deliverable dose, evaluation) for a new slider setting WITHOUT
re-running the predictor or rebuilding any matrix; ``spare`` is the full setting (OARs
not named are at 0). A plan read back by ``load_plan`` has no prepared FastPath:
``respare`` then prepares one from the stored dij and predicted dose (still no
prediction, no dose engine). Sparing factor s in [0, 1) for an OAR asks its dose below
(1 - s) x the baseline dose D0 (the dose of the initial fluence); 0 for every OAR is
exactly the baseline plan.

Torch device: ``device='auto'`` takes CUDA when ``torch.cuda.is_available()`` and says in
the plan notes when it ran on the CPU; ``device='cuda'`` without CUDA raises
:class:`~atp.errors.BackendUnavailableError` (no silent fallback); ``'cpu'`` forces CPU.

``plan.json`` settings record ``fast: true``, ``spare``, ``initial_fluence_path``
('fallback': exact back-projection + dose-mimicking steps, no trained Bev2Fluence weights;
'network': a trained Bev2Fluence model) and ``device``; ``timings_s`` has one entry per
module (AIRT table), see :data:`STAGES`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from atp.errors import BackendUnavailableError, GridMismatchError, InputError, StructureError

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

#: FastPath numeric options recorded in plan.json (and reused when a loaded plan respares)
FASTPATH_OPTION_KEYS = ("lam_hot", "lam_cold", "init_steps", "correction_steps",
                        "smoothness", "init_smoothness", "smooth_weight_cp", "oar_guard",
                        "sequencing_passes", "pass_steps", "mu_iterations",
                        "aperture_iterations", "aperture_rounds",
                        "coverage_weight", "coverage_level", "oar_minus_targets",
                        "max_weight", "max_level")

#: VMAT sequencers the fast path can deliver its arc with (``vmat_sequencer``)
VMAT_SEQUENCERS = ("vmat", "vmat-sliding")

#: named fast-path settings (``preset=`` / ``atp plan --fast --preset NAME``): what each
#: sets of the sequencer and of ``fastpath_options``; options given explicitly win.
#: 'airt' is the default (rule-based arcs, one aperture per control point and arc pass:
#: ~2 min beam-on, OAR means level with the optimiser's, PTV coverage short of it);
#: 'coverage' the coverage-first setting (sliding-window arc sectors, a cold hinge below
#: Rx, OAR hinges off the target voxels, two correction passes against the sequencing
#: loss, and a third of the default's fluence smoothness -- the sweeps deliver modulated
#: maps that one aperture per control point cannot: PTV_70 HI 0.095 vs the default's
#: 0.234, but parotid means ~8 Gy higher, ~10 min beam-on and 1.5-1.8x the time;
#: BENCHMARKS.md, 33 validation patients). Both keep the FastPath defaults for the
#: rest, the organ-maximum term included.
PRESETS = {
    "airt": {"vmat_sequencer": "vmat", "sector_deg": 20.0, "fastpath_options": {}},
    "coverage": {"vmat_sequencer": "vmat-sliding", "sector_deg": 20.0,
                 "fastpath_options": {"oar_minus_targets": "support",
                                      "coverage_weight": 4.0, "sequencing_passes": 2,
                                      "smoothness": 0.1}},
}
DEFAULT_PRESET = "airt"

DEFAULT_ARC_SPACING_DEG = 4.0
DEFAULT_DOSE_GRID_FACTOR = 3
FALLBACK_MESSAGE = "initial fluence from the exact fallback (no trained Bev2Fluence weights)"
NETWORK_MESSAGE = "initial fluence from the trained Bev2Fluence network"


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
        import torch
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


def _network_choice(choice, weights, device, *, option: str, flag: str, weights_flag: str,
                    exact: str, what: str, shipped: str, load):
    """(fn or None, weights path or None) for one fast-path network option: 'auto' (the
    network when ``weights`` or the shipped file exist, else the exact path), 'network'
    (an error without weights: no silent fallback) or ``exact``. ``load()`` returns
    (default weights path or None, make_fn(path, device))."""
    choice = "auto" if choice is None else str(choice)
    if choice not in ("auto", "network", exact):
        raise InputError(f"{option} must be auto, network or {exact}, got '{choice}'",
                         field=flag)
    if choice == exact:
        if weights is not None:
            raise InputError(f"{what} weights given with {option}='{exact}'",
                             field=weights_flag)
        return None, None
    default_path, make = load()
    path = Path(weights) if weights is not None else default_path
    if weights is not None and not path.is_file():
        raise InputError(f"no {what} weights file {path}", field=weights_flag)
    if path is None:
        if choice == "network":
            raise InputError(f"{option}='network' but no {what} weights are shipped "
                             f"({shipped}) or given ({weights_flag})", field=flag)
        return None, None
    return make(path, device), str(path)


def initial_fluence_choice(choice: str, weights, device: str):
    """(initial_fluence_fn or None, weights path or None) for ``initial_fluence`` (see
    :func:`fast_plan`); None means the exact fallback."""
    def load():
        from atp.optimizer.fastpath.bev2fluence import (
            default_weights_path,
            make_initial_fluence_fn,
        )

        return default_weights_path(), make_initial_fluence_fn

    return _network_choice(choice, weights, device, option="initial_fluence",
                           flag="--initial-fluence", weights_flag="--weights",
                           exact="fallback", what="Bev2Fluence",
                           shipped="optimizer/fastpath/weights/bev2fluence.pt", load=load)


def correction_choice(choice: str, weights, device: str):
    """(correction_fn or None, weights path or None) for ``correction`` (see
    :func:`fast_plan`); None means the exact unrolled steps."""
    def load():
        from atp.optimizer.fastpath.correction_net import (
            default_correction_weights_path,
            make_correction_fn,
        )

        return default_correction_weights_path(), make_correction_fn

    return _network_choice(choice, weights, device, option="correction",
                           flag="--correction", weights_flag="--correction-weights",
                           exact="exact", what="correction-network",
                           shipped="optimizer/fastpath/weights/correction.pt", load=load)


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
              dose_engine: str = "pencil-beam", spare=None,
              arc_start_deg: float = 180.0, arc_stop_deg: float = 180.0,
              arc_spacing_deg: float = DEFAULT_ARC_SPACING_DEG,
              dose_grid_factor: int = DEFAULT_DOSE_GRID_FACTOR,
              beamlet_size_mm: float = 5.0, machine: str = "millennium120",
              device: str = "auto", progress=True, fastpath_options: dict | None = None,
              initial_fluence: str = "auto", weights=None, correction: str = "auto",
              correction_weights=None, vmat_passes: int = 2,
              vmat_sequencer: str | None = None, sector_deg: float | None = None,
              preset: str = DEFAULT_PRESET):
    """Fast-path plan of one patient (see the module docstring); returns a Plan.

    patient: a Patient or anything ``atp.io.load_patient`` accepts. goal_list / site /
    institution / predictor / predicted_dose (Gy, patient grid): as :func:`atp.plan`.
    dij: an arc DoseInfluence on the patient's grid (skips the dose engine); else one
    arc ``arc_start_deg`` -> ``arc_stop_deg`` (deg, clockwise; equal = full arc) with a
    control point every ``arc_spacing_deg`` deg, dose grid factor ``dose_grid_factor``,
    ``beamlet_size_mm`` mm beamlets. spare: {OAR: factor in [0, 1)}. machine: the linac
    for VMAT sequencing. device: 'auto' | 'cpu' | 'cuda'. fastpath_options: passed to
    FastPath (``lam_hot``, ``lam_cold``, ``init_steps``, ``correction_steps``,
    ``smoothness``, ``init_smoothness``, ``smooth_weight_cp``, ``oar_guard``,
    ``initial_fluence_fn``). initial_fluence: 'auto' (the trained Bev2Fluence network
    when its weights exist -- ``weights`` or the shipped
    ``optimizer/fastpath/weights/bev2fluence.pt`` -- else the exact fallback), 'network'
    (an error when there are no weights: no silent fallback) or 'fallback'. correction:
    the same choice for the correction module -- 'auto' (the trained correction network,
    ``correction_weights`` or the shipped ``optimizer/fastpath/weights/correction.pt``,
    when they exist, else the exact unrolled steps), 'network' or 'exact'. vmat_passes:
    arcs the VMAT sequencer delivers the one optimised arc in (2: dual arc).
    vmat_sequencer: 'vmat' (rule-based, one aperture per control point and pass) or
    'vmat-sliding' (arc sectors of ``sector_deg`` degrees swept by a sliding window,
    :mod:`atp.sequencer.vmat_sliding`). preset: a name of :data:`PRESETS` ('airt', the
    default, or 'coverage'), which sets ``vmat_sequencer``, ``sector_deg`` and some
    ``fastpath_options``; what is given explicitly wins (a ``fastpath_options`` key over
    the preset's value of that key).
    """
    from atp.goals import resolve_goals, with_control_structures
    from atp.pipeline import _Stages, patient_and_goal_list

    t_start = time.perf_counter()
    dev, device_note = resolve_device(device)  # fail before any work
    if not (isinstance(vmat_passes, int | np.integer) and int(vmat_passes) >= 1):
        raise InputError(f"vmat_passes must be an integer >= 1, got {vmat_passes!r}",
                         field="vmat_passes")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise InputError(f"unknown fast-path preset {preset!r}; presets: "
                         f"{', '.join(PRESETS)}", field="--preset")
    if fastpath_options is not None and not hasattr(fastpath_options, "items"):
        raise InputError(f"fastpath_options must be a mapping, got {fastpath_options!r}",
                         field="fastpath_options")
    base = PRESETS[preset]
    vmat_sequencer = base["vmat_sequencer"] if vmat_sequencer is None else vmat_sequencer
    sector_deg = base["sector_deg"] if sector_deg is None else sector_deg
    fastpath_options = {**base["fastpath_options"], **(fastpath_options or {})}
    if vmat_sequencer not in VMAT_SEQUENCERS:
        raise InputError(f"vmat_sequencer must be one of {', '.join(VMAT_SEQUENCERS)}, got "
                         f"{vmat_sequencer!r}", field="vmat_sequencer")
    if not (isinstance(sector_deg, int | float) and math.isfinite(sector_deg)
            and sector_deg > 0):
        raise InputError(f"sector_deg must be a number > 0, got {sector_deg!r}",
                         field="sector_deg")
    from atp.optimizer.fastpath.chain import FastPath

    timings = {s: 0.0 for s in STAGES if s != "export"}
    stages = _Stages(progress, total=9)
    try:
        t0 = time.perf_counter()
        patient, gl = patient_and_goal_list(patient, site, institution, goal_list, stages)
        sparing = check_spare(spare, patient)
        timings["pre-processing"] += time.perf_counter() - t0
        # prediction
        if predicted_dose is None:
            from atp.predictor import registry as predictors

            pred = predictors.get(predictor or predictors.default_predictor_name())
            predictor_name = getattr(pred, "name", str(predictor))
            t0 = time.perf_counter()
            predicted_dose = stages.run("dose prediction", pred.predict, patient)
            timings["dose prediction"] = time.perf_counter() - t0
        else:
            predictor_name = "given"
        predicted_dose = np.asarray(predicted_dose, dtype=np.float32)
        patient.grid.check_array(predicted_dose, field="predicted_dose")
        t0 = time.perf_counter()
        resolved = stages.run("resolve goals", resolve_goals, gl, patient, predicted_dose)
        resolve_notes = [f"skipped {s['id']}: {s['reason']}"
                         for s in getattr(resolved, "skipped", [])]
        patient_c = with_control_structures(patient, resolved)
        timings["pre-processing"] += time.perf_counter() - t0
        # arc dose influence
        arc = None
        if dij is None:
            from atp.dose import arc as arcs
            from atp.dose.geometry import arc_control_points

            cps = arc_control_points(float(arc_start_deg) % 360.0,
                                     float(arc_stop_deg) % 360.0, float(arc_spacing_deg))
            arc = {"start_deg": float(arc_start_deg), "stop_deg": float(arc_stop_deg),
                   "spacing_deg": float(arc_spacing_deg), "control_points": len(cps),
                   "direction": "cw"}
            t0 = time.perf_counter()
            dij = stages.run("dose influence", arcs.arc_influence, patient, cps,
                             engine=dose_engine, dose_grid_factor=int(dose_grid_factor),
                             beamlet_size_mm=beamlet_size_mm)
            timings["dose influence"] = time.perf_counter() - t0
            engine_name = dose_engine
        else:
            if not dij.patient_grid.same_as(patient.grid):
                raise GridMismatchError("the given dose-influence matrix was computed for "
                                        "another patient grid", field="dij")
            engine_name = "given"
        from atp.dose.resample import downsample_factor

        opts = dict(fastpath_options or {})
        weights_note = weights_used = None
        if "initial_fluence_fn" not in opts:
            fn, weights_used = initial_fluence_choice(initial_fluence, weights, dev)
            if fn is not None:
                opts["initial_fluence_fn"] = fn
                weights_note = f"Bev2Fluence weights: {weights_used}"
        correction_used = None
        if "correction_fn" not in opts:
            cfn, correction_used = correction_choice(correction, correction_weights, dev)
            if cfn is not None:
                opts["correction_fn"] = cfn
        fp = FastPath(patient_c, dij, predicted_dose, device=dev,
                      resolved_goals=list(resolved), **opts)
        stages.run("prepare fast path", fp.prepare)
        timings["dij to device"] = fp.timings_s["dij_to_device"]
        timings["pre-processing"] += fp.timings_s["masks_to_dose_grid"]
        timings["initial fluence"] = (fp.timings_s["step_size"]
                                      + fp.timings_s["initial_fluence"])
        pw = getattr(gl, "priority_weights", None)
        settings = {
            "fast": True, "site": getattr(gl, "site", site),
            "institution": None if institution is None else str(institution),
            "predictor": predictor_name, "dose_engine": engine_name, "arc": arc,
            "dose_grid_factor": downsample_factor(dij.patient_grid, dij.dose_grid),
            "beamlet_size_mm": beamlet_size_mm, "spare": sparing,
            "initial_fluence_path": fp.initial_path, "device": str(fp.device),
            "initial_fluence_weights": weights_used,
            "correction_path": fp.correction_path, "correction_weights": correction_used,
            "device_requested": "auto" if device is None else str(device),
            "fastpath_options": _jsonable_options(opts, fp),
            "priority_weights": pw.to_dict() if hasattr(pw, "to_dict") else None,
            "resolve_notes": resolve_notes, "preset": preset,
            "sequence": vmat_sequencer, "machine": machine,
            "vmat_passes": int(vmat_passes), "sector_deg": float(sector_deg),
            "backend_requested": "auto", "refine": 0, "optimizer_options": {},
        }
        notes = list(resolve_notes)
        if device_note:
            notes.append(device_note)
        notes.append("fast path: " + path_message(fp.initial_path))
        notes.append("fast path: " + correction_message(fp.correction_path))
        if weights_note:
            notes.append(weights_note)
        out = _finish(fp, list(resolved), sparing, settings, notes, timings, stages)
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


def respare(plan, spare=None, *, progress=False):
    """A new Plan for a new slider setting (see the module docstring).

    Reuses ``plan.fastpath`` (prepared matrices, masks, initial fluence, baseline dose);
    never runs the predictor or the dose engine. ``spare``: the full slider setting.
    """
    if not plan.settings.get("fast"):
        raise InputError("respare needs a fast-path plan (atp.plan(..., fast=True))",
                         field="spare")
    t_start = time.perf_counter()
    sparing = check_spare(spare, plan.patient)
    timings = {s: 0.0 for s in ("error map + correction", "sequencing", "control-point MU",
                                "deliverable dose",
                                "evaluation")}
    fp = plan.fastpath
    notes = [n for n in plan.notes if not n.startswith("respare:")]
    if fp is None:  # a plan read back from disk: prepare from the stored dij + prediction
        from atp.optimizer.fastpath.chain import FastPath, drop_retired_options

        if plan.predicted_dose_gy is None:
            raise InputError("this plan has no predicted dose to respare from",
                             field="predicted_dose")
        dev, _ = resolve_device(plan.settings.get("device_requested", "auto"))
        recorded = drop_retired_options(plan.settings.get("fastpath_options") or {},
                                        file="plan.json")
        opts = {k: v for k, v in recorded.items() if k in FASTPATH_OPTION_KEYS}
        from atp.optimizer.fastpath.bev2fluence import make_initial_fluence_fn
        from atp.optimizer.fastpath.correction_net import make_correction_fn

        for path_key, weights_key, fn_key, make, what in (
                ("initial_fluence_path", "initial_fluence_weights", "initial_fluence_fn",
                 make_initial_fluence_fn, "initial fluence"),
                ("correction_path", "correction_weights", "correction_fn",
                 make_correction_fn, "correction")):
            if plan.settings.get(path_key) == "network":  # no silent fallback
                w = plan.settings.get(weights_key)
                if not w or not Path(w).is_file():
                    raise InputError(f"this plan's {what} came from the network weights "
                                     f"{w!r}, which are not there any more; plan again "
                                     "with fast=True", field=weights_key)
                opts[fn_key] = make(w, dev)
        fp = FastPath(plan.patient, plan.dij, plan.predicted_dose_gy, device=dev,
                      resolved_goals=list(plan.resolved_goals), **opts).prepare()
        timings["dij to device"] = fp.timings_s["dij_to_device"]
        timings["initial fluence"] = (fp.timings_s["step_size"]
                                      + fp.timings_s["initial_fluence"])
        notes.append("respare: fast path prepared again from the stored dij and predicted "
                     "dose (no prediction, no dose engine)")
    settings = dict(plan.settings)
    settings["spare"] = sparing
    settings["respare_of"] = {"spare": dict(plan.settings.get("spare") or {})}
    stages = _respare_stages(progress)
    try:
        out = _finish(fp, list(plan.resolved_goals), sparing, settings, notes, timings,
                      stages)
    finally:
        stages.close()
    out.timings_s["total"] = time.perf_counter() - t_start
    return out


# --- shared tail -------------------------------------------------------------------------
def _respare_stages(progress):
    from atp.pipeline import _Stages

    return _Stages(progress, total=4)


def _jsonable_options(opts: dict, fp) -> dict:
    out = {k: getattr(fp, k) for k in FASTPATH_OPTION_KEYS}
    for key in ("initial_fluence_fn", "correction_fn"):
        fn = opts.get(key)
        if fn is not None:
            out[key] = getattr(fn, "__qualname__", type(fn).__name__)
    return out


def _timed(stages, timings, key, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = stages.run(key, fn, *args, **kwargs)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return out


def _finish(fp, resolved, sparing, settings, notes, timings, stages):
    """FastPath.run -> VMAT sequencing -> deliverable dose -> evaluation -> Plan."""
    from atp import sequencer
    from atp.goals import evaluate_goals
    from atp.pipeline import Plan, _versions
    from atp.sequencer.fidelity import fidelity

    patient, dij = fp.patient, fp.dij
    machine = settings.get("machine", "millennium120")

    mu_info = []
    aperture_info = []

    def sequenced(r):
        # with the MU optimised on J below, the sequencer's least-squares MU fit (same
        # free MU, other objective) would only be overwritten: skip it
        technique = settings.get("sequence", "vmat")
        params = {"passes": int(settings.get("vmat_passes", 2))}
        if technique == "vmat-sliding":
            params["sector_deg"] = float(settings.get("sector_deg", 20.0))
        delivery = _timed(stages, timings, "sequencing", sequencer.sequence, r.fluence_mu,
                          dij, technique, machine=machine, fractions=patient.fractions,
                          reweight=fp.mu_iterations <= 0, **params)
        if fp.mu_iterations > 0:
            from atp.sequencer.reweight import optimise_mu

            def fit_mu(delivery):
                # J's rows of the dij are selected once (cached by the FastPath) and
                # reused by every correction pass and slider change
                rows, row_matrix = fp.objective_rows_matrix(sparing)
                return optimise_mu(delivery, dij, fp.objective_value_grad(sparing),
                                   max_iter=fp.mu_iterations, rows=rows,
                                   row_matrix=row_matrix)

            delivery, info = _timed(stages, timings, "control-point MU", fit_mu, delivery)
            mu_info.append(info)
        if fp.aperture_iterations > 0:
            from atp.sequencer.aperture_refine import refine_apertures

            delivery, info = _timed(stages, timings, "aperture refinement",
                                    refine_apertures, delivery, dij.beamlets,
                                    fp.weight_value_grad(sparing),
                                    rounds=fp.aperture_rounds,
                                    iterations=fp.aperture_iterations)
            aperture_info.append(info)
        grid_dose = _timed(stages, timings, "deliverable dose",
                           sequencer.deliverable_dose, delivery, dij)
        return r, delivery, grid_dose, fp.objective_value(grid_dose, sparing)

    best = sequenced(_timed(stages, timings, "error map + correction", fp.run, sparing))
    passes = []
    for _ in range(int(fp.sequencing_passes)):
        # AIRT's repeated correction passes, aimed at the deliverable dose: the last
        # sequencing's loss (deliverable - ideal) is added inside the objective
        r0, _, grid0, j0 = best
        offset = np.asarray(grid0, np.float32) - r0.dose_grid_dose_gy
        r1 = _timed(stages, timings, "error map + correction", fp.run, sparing,
                    start=r0.fluence_mu, dose_offset_gy=offset, steps=fp.pass_steps)
        cand = sequenced(r1)
        passes.append({"objective_before": j0, "objective_after": cand[3],
                       "kept": cand[3] < j0})
        if not cand[3] < j0:
            break
        best = cand
    res, delivery, grid_dose, _ = best

    dose = _timed(stages, timings, "deliverable dose", dij.to_patient_grid, grid_dose)

    def evaluate():
        ideal = dij.to_patient_grid(res.dose_grid_dose_gy)
        masks = {n: patient.mask(n) for n in patient.targets + patient.organs}
        fid = fidelity(ideal, dose, patient.grid.spacing_mm, masks)
        return ideal, fid, evaluate_goals(resolved, patient, dose)

    ideal, fid, results = _timed(stages, timings, "evaluation", evaluate)
    optimizer_info = {
        "method": "fastpath", "initial_path": res.initial_path,
        "objective": res.objective, "sparing": dict(res.sparing),
        "n_beamlets": int(dij.n_beamlets), "device": str(fp.device),
        "timings_s": {**fp.timings_s, **res.timings_s}, "sequencing_passes": passes,
        "control_point_mu": mu_info, "aperture_refinement": aperture_info,
    }
    return Plan(patient, resolved, results, np.asarray(res.fluence_mu, np.float32), dose,
                fp.predicted_dose_gy, dij, timings, f"fastpath-{fp.device.type}",
                optimizer_info, {}, settings, list(notes), _versions("fastpath"),
                delivery, None, ideal, fid, fastpath=fp)
