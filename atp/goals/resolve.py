"""Goal list + patient (+ predicted dose) -> numeric :class:`ResolvedGoal` objects.

Rules, in order, for each goal of the list:

1. **Structure.** The goal's TG-263 name is looked up among the patient's structures
   (exact name first, then the canonical name of each patient structure).
   ``PTV_High`` / ``PTV_Mid`` / ``PTV_Low`` mean the patient's highest / middle /
   lowest prescribed target (Mid: the second of three or more; Low: needs >= 2).
   A structure the patient lacks (or whose mask is empty): a ``required`` goal
   (default for targets) is an error naming the goal's file and line; an optional goal
   is skipped and recorded in ``.skipped``. A name that is not a TG-263 name or alias
   *and* not on the patient is always an error (most likely a typo).
2. **Reference prescription** (for ``<x>%Rx`` values and ``V<x>%%`` metrics): a target's
   own prescription, otherwise the patient's highest prescription.
3. **Value.** Numbers are used as written; ``<x>%Rx`` = x/100 * reference Rx (Gy);
   ``predicted`` = the metric measured on the predicted dose for that structure, times
   ``1 + tolerance/100``. Without a predicted dose, ``missing_predicted='error'``
   raises, ``'keep'`` leaves ``value=None`` (evaluation then reports pass = None).
4. **Weight** = the goal's ``weight`` or the list's priority rule.
5. **Controls.** ``global_max`` -> Dmax on the body (External structure); ``ring`` and
   ``conformity`` with ``around: each_target`` -> one goal per prescribed target
   (id ``<goal id>.<target>``), %Rx values relative to that target.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from atp import dvh, metrics
from atp.errors import GoalListError, GridMismatchError, InputError, StructureError
from atp.goals.controls import body_name, goal_mask, ring_name
from atp.goals.model import Goal, Metric, ResolvedGoal
from atp.goals.schema import EACH_TARGET, TARGET_PLACEHOLDERS, GoalList
from atp.names import canonical_name
from atp.patient import Role


class ResolvedGoals(list):
    """A list of ResolvedGoal with ``skipped``: [{'id', 'structure', 'reason'}, ...]."""

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped: list[dict] = list(skipped)


# --- measuring one metric ------------------------------------------------------------------
def measure(metric: Metric, patient, structure: str, dose_gy, *, mask=None,
            reference_rx_gy: float | None = None) -> float:
    """Value of ``metric`` for ``structure`` on ``dose_gy`` (definitions: atp.dvh,
    atp.metrics). ``mask`` overrides the patient's mask (rings, body)."""
    m = patient.mask(structure) if mask is None else mask
    vcc = patient.grid.voxel_volume_cc
    k = metric.kind
    if k == "Dmean":
        return dvh.mean_dose(dose_gy, m, structure)
    if k == "Dmax":
        return dvh.max_dose(dose_gy, m, structure)
    if k == "Dmin":
        return dvh.min_dose(dose_gy, m, structure)
    if k == "D":
        if metric.volume_unit == "%":
            return dvh.dose_at_volume_pct(dose_gy, m, metric.volume, structure)
        return dvh.dose_at_volume_cc(dose_gy, m, metric.volume, vcc, structure)
    if k == "V":
        thr = metric.dose
        if metric.dose_unit == "%":
            if reference_rx_gy is None:
                raise InputError(f"{metric.text} needs a prescription; the patient has none",
                                 file=patient.source, field=structure)
            thr = metric.dose / 100.0 * reference_rx_gy
        if metric.result_unit == "%":
            return dvh.volume_at_dose_pct(dose_gy, m, thr, structure)
        return dvh.volume_at_dose_cc(dose_gy, m, thr, vcc, structure)
    if metric.is_index:
        return metrics.plan_index(k, patient, dose_gy, structure)
    raise InputError(f"cannot measure metric kind '{k}'", field=metric.text)


def check_dose(dose_gy, patient, *, file=None, what: str = "dose") -> None:
    """A dose array must have the patient's grid shape and finite values."""
    shape = tuple(np.shape(dose_gy))
    if shape != patient.grid.shape:
        raise GridMismatchError(f"{what} shape {shape} does not match the patient grid "
                                f"{patient.grid.shape}", file=file, field="shape")
    if not bool(np.all(np.isfinite(dose_gy))):
        raise InputError(f"{what} contains NaN/inf values", file=file, field=what)


# --- structures ------------------------------------------------------------------------------
def find_structure(name: str, patient) -> str | None:
    """The patient's structure name for a goal's TG-263 name (None when absent/empty)."""
    if name in TARGET_PLACEHOLDERS:
        rx = [p.target for p in patient.prescriptions]
        if name == "PTV_High":
            return rx[0] if rx else None
        if name == "PTV_Low":
            return rx[-1] if len(rx) >= 2 else None
        return rx[1] if len(rx) >= 3 else None
    hit = None
    if name in patient.structures:
        hit = name
    else:
        for n in patient.structures:
            if canonical_name(n) == name:
                hit = n
                break
    if hit is None or patient.structures[hit].n_voxels == 0:
        return None
    return hit


def reference_rx(patient, structure: str | None) -> float | None:
    if structure is not None:
        p = patient.prescription_for(structure)
        if p is not None:
            return p.dose_gy
    return patient.prescriptions[0].dose_gy if patient.prescriptions else None


def _numeric(goal: Goal, ref_rx: float | None, patient) -> float:
    v = goal.value
    if isinstance(v, str) and v.endswith("%Rx"):
        if ref_rx is None:
            raise GoalListError(f"goal '{goal.id}' has value {v} but the patient has no "
                                "prescription", file=goal.source_file, line=goal.line,
                                field=f"{goal.id}.value")
        return float(v[:-3]) / 100.0 * ref_rx
    return float(v)


def _resolved(goal: Goal, gl: GoalList, *, gid=None, structure, value, source,
              ref_rx, predicted_value=None, params=None) -> ResolvedGoal:
    return ResolvedGoal(
        id=gid or goal.id, structure=structure, metric=goal.metric, operator=goal.operator,
        value=value, priority=goal.priority, weight=gl.weight_for(goal), kind=goal.kind,
        source=source, tolerance_pct=goal.tolerance_pct, predicted_value=predicted_value,
        note=goal.note, params=dict(goal.params if params is None else params),
        reference_rx_gy=ref_rx, source_file=goal.source_file, line=goal.line)


def kind_on_patient(goal: Goal, patient, name: str) -> Goal:
    """A goal whose structure name is not TG-263 and that writes no ``kind`` takes its
    kind from the patient's structure ``name``: a target (DICOM RTROIInterpretedType
    PTV/CTV/GTV/ITV, or a target by name) makes it a target goal, with the target
    default priority 2 when it gives none; otherwise it is an organ goal, which must
    give its priority and may not use a target index."""
    if not goal.params.get("kind_from_patient"):
        return goal
    if patient.structures[name].role == Role.TARGET:
        return replace(goal, kind="target")
    field, why = None, ""
    if goal.params.get("priority_from_kind"):
        field, why = "priority", "organ goals need 'priority' (1 = hard, 2 = target level, ...)"
    elif goal.metric.is_index:
        field = "metric"
        why = f"{goal.metric.text} is a target index; use it on a target or a conformity control"
    if field is not None:
        role = patient.structures[name].role.value
        raise GoalListError(f"goal '{goal.id}': '{name}' is not a target on this patient "
                            f"(its structure set marks it {role}); {why}",
                            file=goal.source_file, line=goal.line, field=f"{goal.id}.{field}")
    return replace(goal, kind="organ")


def _control_targets(goal: Goal, patient) -> list[str]:
    around = goal.params.get("around", EACH_TARGET)
    if around == EACH_TARGET:
        return [p.target for p in patient.prescriptions]
    t = find_structure(around, patient)
    if t is None:
        raise StructureError(f"control goal '{goal.id}': the patient has no target "
                             f"'{around}'; targets: {patient.targets}",
                             file=goal.source_file, line=goal.line, field=f"{goal.id}.around")
    return [t]


def resolve_goals(goal_list: GoalList, patient, predicted_dose_gy=None, *,
                  missing_predicted: str = "error") -> ResolvedGoals:
    """Resolve every goal for one patient (rules in the module docstring)."""
    if missing_predicted not in ("error", "keep"):
        raise ValueError("missing_predicted must be 'error' or 'keep'")
    if predicted_dose_gy is not None:
        check_dose(predicted_dose_gy, patient, what="predicted dose")
    out = ResolvedGoals()
    for goal in goal_list.goals:
        control = goal.params.get("control")
        if control == "global_max":
            ref = reference_rx(patient, None)
            out.append(_resolved(goal, goal_list, structure=body_name(patient),
                                 value=_numeric(goal, ref, patient), source="control",
                                 ref_rx=ref))
            continue
        if control in ("ring", "conformity"):
            for t in _control_targets(goal, patient):
                ref = reference_rx(patient, t)
                params = dict(goal.params, around=t)
                if control == "ring":
                    name = ring_name(t, goal.params["inner_mm"], goal.params["outer_mm"])
                else:
                    name = t
                out.append(_resolved(goal, goal_list, gid=f"{goal.id}.{t}", structure=name,
                                     value=_numeric(goal, ref, patient), source="control",
                                     ref_rx=ref, params=params))
            continue
        name = find_structure(goal.structure, patient)
        if name is None:
            present = goal.structure in patient.structures
            why = (f"structure '{goal.structure}' has an empty mask" if present else
                   f"patient has no structure '{goal.structure}'")
            if goal.required or (goal.params.get("unknown_name") and not present):
                hint = (" (not a TG-263 name or alias: check the spelling)"
                        if goal.params.get("unknown_name") else "")
                raise StructureError(
                    f"goal '{goal.id}': {why}{hint}; patient structures: "
                    f"{sorted(patient.structures)}", file=goal.source_file, line=goal.line,
                    field=f"{goal.id}.structure")
            out.skipped.append({"id": goal.id, "structure": goal.structure,
                                "reason": why + " (optional goal)"})
            continue
        goal = kind_on_patient(goal, patient, name)
        ref = reference_rx(patient, name)
        if goal.metric.is_index and patient.prescription_for(name) is None \
                and goal.metric.kind != "HI":
            raise StructureError(f"goal '{goal.id}': {goal.metric.text} needs a prescribed "
                                 f"target, '{name}' has no prescription",
                                 file=goal.source_file, line=goal.line,
                                 field=f"{goal.id}.metric")
        if goal.is_predicted:
            if predicted_dose_gy is None:
                if missing_predicted == "error":
                    raise GoalListError(f"goal '{goal.id}' has value 'predicted' but no "
                                        "predicted dose was given", file=goal.source_file,
                                        line=goal.line, field=f"{goal.id}.value")
                out.append(_resolved(goal, goal_list, structure=name, value=None,
                                     source="predicted", ref_rx=ref))
                continue
            pv = measure(goal.metric, patient, name, predicted_dose_gy, reference_rx_gy=ref)
            value = pv * (1.0 + goal.tolerance_pct / 100.0)
            if goal.metric.result_unit == "%":
                value = min(value, 100.0)
            out.append(_resolved(goal, goal_list, structure=name, value=value,
                                 source="predicted", ref_rx=ref, predicted_value=pv))
            continue
        out.append(_resolved(goal, goal_list, structure=name, source="user", ref_rx=ref,
                             value=_numeric(goal, ref, patient)))
    return out


def measure_goal(goal: ResolvedGoal, patient, dose_gy) -> float:
    """The achieved value of a resolved goal on ``dose_gy``."""
    mask = goal_mask(goal, patient) if goal.params.get("control") in ("ring", "global_max") \
        else None
    if mask is not None and not mask.any():
        raise StructureError(f"goal '{goal.id}': control structure '{goal.structure}' is "
                             "empty on this patient", file=patient.source, field=goal.id)
    return measure(goal.metric, patient, goal.structure, dose_gy, mask=mask,
                   reference_rx_gy=goal.reference_rx_gy)
