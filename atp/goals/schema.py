"""The goal-list YAML schema: parsing and validating ``goal_lists/<site>.yaml``.

A goal list file (documented for users in ``goal_lists/README.md``)::

    site: hn                         # required, the name used by --site
    description: ...                 # optional
    beam_template: hn_9field         # optional default beam arrangement (name)
    beams: 9                         # optional number of equispaced beams
    priority_weights:                # optional: priority -> objective weight rule
      base: 10                       #   weight = base ** (top - priority)
      top: 3                         #   (default 10 ** (3 - p): P1 100, P2 10, P3 1, P4 0.1)
      table: {1: 1000}               #   explicit weights win over the formula
    goals:
      - structure: PTV_70            # TG-263 name or an alias (canonicalised)
        metric: D95%                 # see atp.goals.metric
        operator: ">="               # <= or >=
        value: 100%Rx                # number (metric unit) | "<x>%Rx" | predicted
        priority: 2                  # 1 = hard (user value only); targets default 2
        note: "RTOG 0615"            # protocol citation
      - structure: Parotid_L
        metric: Dmean
        operator: "<="
        value: predicted             # the predicted dose's value for this metric ...
        tolerance: -10               # ... times (1 + tolerance/100)
        priority: 3
      - control: ring                # control goals: ring | global_max | conformity
        inner_mm: 5
        outer_mm: 15
        value: 85%Rx

Goal keys: ``id`` (default ``<structure>.<metric>``, ``.pred`` appended for predicted
values; must be unique), ``structure``, ``control``, ``metric``, ``operator``,
``value``, ``tolerance`` (%), ``priority``, ``weight`` (> 0; overrides the priority
rule), ``required`` (default: true for targets, false otherwise), ``note``, ``kind``
(target | organ; inferred from the TG-263 name), ``around`` / ``inner_mm`` /
``outer_mm`` (control goals). Unknown keys are errors (typos do not pass silently).

Rules: ``predicted`` only for organ goals at priority >= 2; ``tolerance`` only with
``predicted``; ``<x>%Rx`` only for dose (Gy) metrics; plan indices (CI, CIpaddick, HI,
GI) only on targets or conformity controls. Control goals take user values only:
``global_max`` (structure: the body; ``Dmax <= 106%Rx`` of the highest prescription by
default, priority 2), ``ring`` (a shell ``inner_mm < distance <= outer_mm`` around a
target, outside every target; default ``Dmax``, ``<=``, priority 3, ``around:
each_target`` -> one goal per prescribed target with %Rx of that target), and
``conformity`` (default ``CIpaddick >= value`` per prescribed target, priority 3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from atp.dose.geometry import BEAM_TEMPLATES
from atp.errors import GoalListError, quote
from atp.goals.metric import parse_metric
from atp.goals.model import Goal, Metric
from atp.names import canonical_name, role_for

GOAL_KEYS = ("id", "structure", "control", "metric", "operator", "value", "tolerance",
             "priority", "weight", "required", "note", "kind", "around", "inner_mm",
             "outer_mm")
TOP_KEYS = ("site", "description", "beam_template", "beams", "priority_weights", "goals")
CONTROL_TYPES = ("ring", "global_max", "conformity")
OPERATORS = ("<=", ">=")
TARGET_PLACEHOLDERS = ("PTV_High", "PTV_Mid", "PTV_Low")
EACH_TARGET = "each_target"
MAX_WEIGHT = 1e6        # the largest objective weight a goal may get (default P1: 100)
MAX_PRIORITY = 99
_RX_VALUE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*Rx\s*$", re.IGNORECASE)


# --- raw fields: value + where it was written ---------------------------------------------
@dataclass(frozen=True)
class Field:
    """A raw YAML value with the file and line it came from."""

    value: object
    file: str | None
    line: int | None


def raw_fields(item, file: str | None) -> dict[str, Field]:
    """A LineDict goal item -> {key: Field} (lines per key)."""
    return {k: Field(v, file, item.line_of(k) if hasattr(item, "line_of") else None)
            for k, v in item.items()}


# --- priority -> weight --------------------------------------------------------------------
@dataclass(frozen=True)
class PriorityWeights:
    """The documented priority -> objective weight rule.

    weight(p) = table[p] if p is in the table, else base ** (top - p).
    Default: 10 ** (3 - p): P1 100, P2 10, P3 1, P4 0.1, P5 0.01.
    """

    base: float = 10.0
    top: int = 3
    table: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", MappingProxyType(dict(self.table)))

    def weight(self, priority: int) -> float:
        if priority in self.table:
            return float(self.table[priority])
        return _pow_weight(float(self.base), int(self.top), int(priority))

    def describe(self) -> str:
        text = f"weight = {self.base:g} ** ({self.top} - priority)"
        if self.table:
            text += "; table " + ", ".join(f"P{k}: {v:g}" for k, v in sorted(self.table.items()))
        return text

    def to_dict(self) -> dict:
        return {"base": self.base, "top": self.top, "table": dict(self.table)}


def _pow_weight(base: float, top: int, priority: int) -> float:
    """base ** (top - priority), inf where that overflows (callers check the range)."""
    try:
        return float(base) ** (int(top) - int(priority))
    except OverflowError:
        return math.inf


def parse_priority_weights(data, file: str | None, line: int | None,
                           base: PriorityWeights | None = None) -> PriorityWeights:
    """Parse a ``priority_weights`` mapping (keys base, top, table)."""
    if not isinstance(data, dict):
        raise GoalListError("priority_weights must be a mapping with base, top and/or table",
                            file=file, line=line, field="priority_weights")
    pw = base or PriorityWeights()
    unknown = set(data) - {"base", "top", "table"}
    if unknown:
        k = min(map(str, unknown))
        raise GoalListError(f"unknown key {quote(k)} (expected base, top, table)", file=file,
                            line=_line(data, k, line), field=f"priority_weights.{k}")
    b, t, table = pw.base, pw.top, dict(pw.table)
    if "base" in data:
        b = data["base"]
        if not _is_number(b) or b <= 1:
            raise GoalListError(f"base must be a number > 1, got {quote(b)}", file=file,
                                line=_line(data, "base", line), field="priority_weights.base")
    if "top" in data:
        t = data["top"]
        if not _is_int(t) or not 1 <= t <= MAX_PRIORITY:
            raise GoalListError(f"top must be an integer 1..{MAX_PRIORITY}, got {quote(t)}",
                                file=file, line=_line(data, "top", line),
                                field="priority_weights.top")
    if _pow_weight(float(b), int(t), 1) > MAX_WEIGHT:
        key = "top" if "top" in data and int(t) > PriorityWeights().top or \
            "base" not in data else "base"
        raise GoalListError(f"base ** (top - 1) = {float(b):g} ** {int(t) - 1} gives "
                            f"priority 1 a weight above {MAX_WEIGHT:g}", file=file,
                            line=_line(data, key, line), field=f"priority_weights.{key}")
    if "table" in data:
        tb = data["table"]
        tline = _line(data, "table", line)
        if not isinstance(tb, dict):
            raise GoalListError("table must map priority -> weight", file=file, line=tline,
                                field="priority_weights.table")
        for k, v in tb.items():
            if not _is_int(k) or k < 1 or not _is_number(v) or not 0 < v <= MAX_WEIGHT:
                raise GoalListError(f"table entry {quote(k, 20)}: {quote(v, 20)}: priorities "
                                    f"are integers >= 1, weights numbers in (0, "
                                    f"{MAX_WEIGHT:g}]", file=file,
                                    line=_line(tb, k, tline), field="priority_weights.table")
            table[int(k)] = float(v)
    return PriorityWeights(float(b), int(t), table)


# --- the goal list -------------------------------------------------------------------------
@dataclass(frozen=True)
class GoalList:
    """A site's goal list after the (optional) institution overlay was merged."""

    site: str
    goals: tuple[Goal, ...]
    description: str = ""
    priority_weights: PriorityWeights = field(default_factory=PriorityWeights)
    beam_template: str | None = None
    beams: int | None = None
    source_file: str | None = None
    institution: str | None = None
    overlay_file: str | None = None
    # what the overlay did, in order: {"id", "change": removed|modified|added, "file",
    # "line", "fields": changed field names (modified)}
    overlay_changes: tuple[dict, ...] = ()

    def weight_for(self, goal: Goal) -> float:
        """The goal's own ``weight`` when given, else the priority rule's weight."""
        return float(goal.weight) if goal.weight is not None else \
            self.priority_weights.weight(goal.priority)

    def goal(self, goal_id: str) -> Goal:
        for g in self.goals:
            if g.id == goal_id:
                return g
        raise GoalListError(f"no goal with id '{goal_id}'; ids: {[g.id for g in self.goals]}",
                            file=self.source_file, field="id")

    @property
    def ids(self) -> list[str]:
        return [g.id for g in self.goals]

    def to_dict(self) -> dict:
        return {
            "site": self.site, "description": self.description,
            "institution": self.institution, "source_file": self.source_file,
            "overlay_file": self.overlay_file, "overlay_changes": list(self.overlay_changes),
            "beam_template": self.beam_template,
            "beams": self.beams, "priority_weights": self.priority_weights.to_dict(),
            "priority_rule": self.priority_weights.describe(),
            "goals": [goal_to_dict(g, self.weight_for(g)) for g in self.goals],
        }


def goal_to_dict(goal: Goal, weight: float | None = None) -> dict:
    d = {"id": goal.id, "structure": goal.structure, "kind": goal.kind,
         "metric": goal.metric.text, "unit": goal.metric.result_unit,
         "operator": goal.operator, "value": goal.value, "priority": goal.priority,
         "tolerance_pct": goal.tolerance_pct, "required": goal.required,
         "weight": goal.weight if weight is None else weight, "note": goal.note,
         "source": f"{goal.source_file}:{goal.line}"}
    if goal.params:
        d["params"] = dict(goal.params)
    return d


# --- helpers -------------------------------------------------------------------------------
def _line(mapping, key, default=None):
    return mapping.line_of(key) if hasattr(mapping, "line_of") else default


def check_document(data, file, allowed: tuple[str, ...], shape: str, name_key: str,
                   name_rule: str) -> tuple[str, str | None]:
    """The top of a YAML document: a mapping (``shape`` says of what) whose keys are all
    ``allowed``, naming itself by a non-empty ``name_key`` (``name_rule`` says what it
    holds), with an optional text ``description``; else GoalListError naming the file and
    line. Returns (name, description or None)."""
    if not isinstance(data, dict):
        raise GoalListError(shape, file=file, line=getattr(data, "line", 1))
    for k in data:
        if k not in allowed:
            raise GoalListError(f"unknown key {quote(k)}; allowed: {', '.join(allowed)}",
                                file=file, line=_line(data, k), field=quote(k, repr_=False))
    name = data.get(name_key)
    if not isinstance(name, str) or not name.strip():
        raise GoalListError(f"'{name_key}' must {name_rule}", file=file,
                            line=_line(data, name_key, 1), field=name_key)
    desc = data.get("description")
    if desc is not None and not isinstance(desc, str):
        raise GoalListError(f"description must be text, got {quote(desc)}", file=file,
                            line=_line(data, "description", 1), field="description")
    return name, desc


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def structure_kind(name: str) -> str:
    """'target' | 'organ' | 'control' from a TG-263 name (atp.names.role_for)."""
    if name in TARGET_PLACEHOLDERS:
        return "target"
    role = role_for(name).value
    return {"target": "target", "control": "control"}.get(role, "organ")


def _kind_from_patient(raw, known: bool, value) -> bool:
    """Whether a goal's kind is left to the patient's structure set: its name is not a
    TG-263 name or alias, it writes no ``kind`` and its value is not ``predicted``
    (predicted values are for organs only)."""
    predicted = isinstance(value, str) and value.strip().lower() == "predicted"
    return not known and "kind" not in raw and not predicted


def canonical_structure(name: str) -> tuple[str, bool]:
    """(canonical TG-263 name, known). Unknown names are kept as written."""
    if name in TARGET_PLACEHOLDERS:
        return name, True
    c = canonical_name(name)
    return (c, True) if c is not None else (name, False)


def parse_value(v, metric: Metric, fail):
    """Validate a goal value: number, '<x>%Rx' (canonical text kept) or 'predicted'."""
    if isinstance(v, str):
        s = v.strip()
        if s.lower() == "predicted":
            return "predicted"
        m = _RX_VALUE.match(s)
        if m:
            if metric.result_unit != "Gy":
                raise fail("value", f"{quote(s)}: %Rx values are only for dose (Gy) metrics; "
                                    f"{metric.text} is in {metric.result_unit or 'no unit'}")
            pct = float(m.group(1))
            if not 0 < pct <= 300:
                raise fail("value", f"{quote(s)}: percentage of Rx must be in (0, 300]")
            return f"{pct:g}%Rx"
        raise fail("value", f"value must be a number, '<x>%Rx' or 'predicted', got {quote(s)}")
    if not _is_number(v):
        raise fail("value", f"value must be a number, '<x>%Rx' or 'predicted', got {quote(v)}")
    v = float(v)
    if v < 0:
        raise fail("value", f"value must be >= 0, got {v:g}")
    if metric.result_unit == "%" and v > 100:
        raise fail("value", f"{metric.text} is a percentage: value must be <= 100, got {v:g}")
    return v


def check_setting(field_name: str, value, *, unit: str | None = None,
                  where: str = "--set") -> float:
    """One re-plan change (``atp replan --set GOAL.FIELD=VALUE``, ``atp.replan(plan, set=)``)
    validated with the rules of the goal-list field it overrides: tolerance a percentage
    in (-100, 1000], value a number >= 0 (<= 100 for % metrics), weight in
    (0, MAX_WEIGHT], priority an integer 1..MAX_PRIORITY; all finite. Returns the number;
    raises GoalListError naming ``where``."""
    def fail(msg):
        return GoalListError(msg, field=where)

    if isinstance(value, bool):
        raise fail(f"{field_name} must be a number, got {quote(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise fail(f"{field_name} must be a number, got {quote(value)}") from None
    if not math.isfinite(v):
        raise fail(f"{field_name} must be a finite number, got {quote(value)}")
    if field_name == "tolerance" and not -100 < v <= 1000:
        raise fail(f"tolerance is a percentage in (-100, 1000], got {v:g}")
    if field_name == "value":
        if v < 0:
            raise fail(f"value must be >= 0, got {v:g}")
        if unit == "%" and v > 100:
            raise fail(f"value is a percentage: must be <= 100, got {v:g}")
    if field_name == "weight" and not 0 < v <= MAX_WEIGHT:
        raise fail(f"weight must be a number in (0, {MAX_WEIGHT:g}], got {v:g}")
    if field_name == "priority" and (v != int(v) or not 1 <= v <= MAX_PRIORITY):
        raise fail(f"priority must be an integer 1..{MAX_PRIORITY}, got {v:g}")
    return v


def parse_goal(raw: Mapping[str, Field], *, file: str | None, line: int | None,
               index: int) -> Goal:
    """Validate one raw goal (see the module docstring for the rules)."""
    label = f"goals[{index}]"
    if "id" in raw and isinstance(raw["id"].value, str):
        label = quote(raw["id"].value, 40, repr_=False)

    def fail(key: str, msg: str) -> GoalListError:
        f = raw.get(key)
        return GoalListError(msg, file=f.file if f else file, line=f.line if f else line,
                             field=f"{label}.{key}")

    def get(key, default=None):
        return raw[key].value if key in raw else default

    for k in raw:
        if k not in GOAL_KEYS:
            raise fail(k, f"unknown goal key {quote(k)}; allowed: {', '.join(GOAL_KEYS)}")
    control = get("control")
    params: dict = {}
    if control is not None:
        if control not in CONTROL_TYPES:
            raise fail("control", f"unknown control {quote(control)}; one of {CONTROL_TYPES}")
        if "structure" in raw:
            raise fail("structure", "a control goal builds its own structure; remove "
                                    "'structure' (use 'around' for rings/conformity)")
        kind = "control"
        params["control"] = control
        structure = {"ring": "Ring", "global_max": "Body", "conformity": "Targets"}[control]
        default_metric = {"ring": "Dmax", "global_max": "Dmax", "conformity": "CIpaddick"}
        metric_text = get("metric", default_metric[control])
        default_op = ">=" if control == "conformity" else "<="
        default_priority = 2 if control == "global_max" else 3
        if control == "global_max":
            if "around" in raw:
                raise fail("around", "global_max applies to the whole body")
            default_value = "106%Rx"
        else:
            around = get("around", EACH_TARGET)
            if not isinstance(around, str) or not around.strip():
                raise fail("around", f"'around' must be a target name or '{EACH_TARGET}'")
            params["around"] = around if around == EACH_TARGET else \
                canonical_structure(around)[0]
            default_value = None
        if control == "ring":
            inner, outer = get("inner_mm", 0.0), get("outer_mm")
            if not _is_number(inner) or inner < 0:
                raise fail("inner_mm", f"inner_mm must be a number >= 0, got {quote(inner)}")
            if outer is None:
                raise fail("outer_mm", "a ring needs outer_mm (mm from the target surface)")
            if not _is_number(outer) or outer <= inner:
                raise fail("outer_mm", f"outer_mm must be a number > inner_mm ({inner}), "
                                       f"got {quote(outer)}")
            params["inner_mm"], params["outer_mm"] = float(inner), float(outer)
        else:
            for k in ("inner_mm", "outer_mm"):
                if k in raw:
                    raise fail(k, f"'{k}' is only for ring controls")
        if "kind" in raw and get("kind") != "control":
            raise fail("kind", "control goals have kind 'control'")
    else:
        for k in ("around", "inner_mm", "outer_mm"):
            if k in raw:
                raise fail(k, f"'{k}' is only for control goals")
        written = get("structure")
        if not isinstance(written, str) or not written.strip():
            raise fail("structure", "each goal needs 'structure' (a TG-263 name or alias) "
                                    f"or 'control' ({', '.join(CONTROL_TYPES)})")
        structure, known = canonical_structure(written.strip())
        params["structure_as_written"] = written.strip()
        if not known:
            params["unknown_name"] = True
        kind = get("kind") or structure_kind(structure)
        if kind not in ("target", "organ"):
            raise fail("kind", f"kind must be 'target' or 'organ', got {quote(kind)}")
        metric_text = get("metric")
        if metric_text is None:
            raise fail("metric", "each goal needs 'metric' (e.g. D95%, Dmean, D0.1cc)")
        default_op = None
        default_priority = 2 if kind == "target" else None
        default_value = None
        if _kind_from_patient(raw, known, get("value")):
            # a name outside TG-263 (OuterTarget): the patient's structure set says
            # whether it is a target (RTROIInterpretedType PTV/CTV/GTV/ITV); the
            # target default priority is checked against that when the goal is resolved
            params["kind_from_patient"] = True
            if "priority" not in raw:
                params["priority_from_kind"] = True
                default_priority = 2
    mf = raw.get("metric")
    metric = parse_metric(metric_text, file=mf.file if mf else file,
                          line=mf.line if mf else line, field=f"{label}.metric")
    if metric.is_index and kind == "organ" and not params.get("kind_from_patient"):
        raise fail("metric", f"{metric.text} is a target index; use it on a target or a "
                             "conformity control")
    if control in ("ring", "global_max") and metric.is_index:
        raise fail("metric", f"{control} controls take a dose metric, not {metric.text}")
    if control == "conformity" and not metric.is_index:
        raise fail("metric", "conformity controls take CI, CIpaddick, HI or GI")
    op = get("operator", default_op)
    if op is None:
        raise fail("operator", "each goal needs 'operator' ('<=' or '>=')")
    if op not in OPERATORS:
        raise fail("operator", f"operator must be '<=' or '>=', got {quote(op)}")
    priority = get("priority", default_priority)
    if priority is None:
        raise fail("priority", "organ goals need 'priority' (1 = hard, 2 = target level, ...)")
    if not _is_int(priority) or not 1 <= priority <= MAX_PRIORITY:
        raise fail("priority", f"priority must be an integer 1..{MAX_PRIORITY}, got "
                               f"{quote(priority)}")
    if "value" not in raw and default_value is None:
        raise fail("value", "each goal needs 'value' (number, '<x>%Rx' or 'predicted')")
    value = parse_value(get("value", default_value), metric, fail)
    tol = get("tolerance", 0.0)
    if not _is_number(tol) or not -100 < tol <= 1000:
        raise fail("tolerance", f"tolerance is a percentage in (-100, 1000], got {quote(tol)}")
    if value == "predicted":
        if priority == 1:
            pf, vf = raw.get("priority"), raw.get("value")
            key = "priority" if pf and vf and pf.file != vf.file else "value"
            raise fail(key, "priority-1 goals are hard: give the value yourself, "
                                "'predicted' is only for priority >= 2")
        if kind != "organ":
            raise fail("value", f"'predicted' is only for organ goals; {kind} goals take "
                                "user values (number or %Rx)")
    elif "tolerance" in raw and tol != 0:
        raise fail("tolerance", "tolerance applies only to 'predicted' values")
    weight = get("weight")
    if weight is not None and (not _is_number(weight) or not 0 < weight <= MAX_WEIGHT):
        raise fail("weight", f"weight must be a number in (0, {MAX_WEIGHT:g}], got "
                             f"{quote(weight)}")
    required = get("required", kind == "target")
    if not isinstance(required, bool):
        raise fail("required", f"required must be true or false, got {quote(required)}")
    note = get("note", "")
    if not isinstance(note, str):
        raise fail("note", "note must be text")
    gid = get("id")
    if gid is None:
        if control == "ring":
            gid = f"ring_{params['inner_mm']:g}_{params['outer_mm']:g}mm"
        elif control is not None:
            gid = control if control == "global_max" else f"{control}.{metric.text}"
        else:
            gid = f"{structure}.{metric.text}" + (".pred" if value == "predicted" else "")
    elif not isinstance(gid, str) or not re.match(r"^[A-Za-z0-9_.%+\-]+$", gid):
        raise fail("id", f"id must be text of letters, digits and _ . % + -, got {quote(gid)}")
    return Goal(id=gid, structure=structure, metric=metric, operator=op, value=value,
                priority=int(priority), tolerance_pct=float(tol),
                weight=None if weight is None else float(weight), kind=kind, note=note,
                source_file=file, line=line, params=params, required=required)


def reparse_goal(goal: Goal, raw: Mapping[str, Field]) -> Goal:
    """Re-validate merged raw fields; the goal keeps its id and origin."""
    raw = dict(raw)
    raw.setdefault("id", Field(goal.id, goal.source_file, goal.line))
    g = parse_goal(raw, file=goal.source_file, line=goal.line, index=0)
    return replace(g, source_file=goal.source_file, line=goal.line)


def parse_goal_list(data, file: str | None) -> tuple[GoalList, list[dict[str, Field]]]:
    """Validate a whole goal-list document. Returns the list and each goal's raw fields
    (the overlay merge re-validates goals from those)."""
    site, desc = check_document(data, file, TOP_KEYS,
                                "a goal list must be a mapping with 'site' and 'goals'",
                                "site", "name the site (e.g. hn)")
    desc = desc or ""
    pw = PriorityWeights()
    if "priority_weights" in data:
        pw = parse_priority_weights(data["priority_weights"], file,
                                    _line(data, "priority_weights", None))
    beam_template, beams = parse_beams(data, file)
    goals_data = data.get("goals")
    if not isinstance(goals_data, list) or not goals_data:
        raise GoalListError("'goals' must be a non-empty list", file=file,
                            line=_line(data, "goals", 1), field="goals")
    goals, raws = [], []
    for i, item in enumerate(goals_data):
        ln = goals_data.line_of(i) if hasattr(goals_data, "line_of") else None
        if not isinstance(item, dict):
            raise GoalListError("each goal must be a mapping (structure, metric, ...)",
                                file=file, line=ln, field=f"goals[{i}]")
        raw = raw_fields(item, file)
        goals.append(parse_goal(raw, file=file, line=ln, index=i))
        raws.append(raw)
    check_unique_ids(goals)
    return GoalList(site.strip(), tuple(goals), str(desc), pw, beam_template, beams,
                    file), raws


def parse_beams(data, file) -> tuple[str | None, int | None]:
    bt, beams = data.get("beam_template"), data.get("beams")
    if bt is not None and (not isinstance(bt, str) or bt not in BEAM_TEMPLATES):
        raise GoalListError(f"unknown beam_template {quote(bt)}; known: "
                            f"{', '.join(sorted(BEAM_TEMPLATES))}", file=file,
                            line=_line(data, "beam_template", None), field="beam_template")
    if beams is not None and (not _is_int(beams) or not 1 <= beams <= 360):
        raise GoalListError(f"beams must be an integer 1..360, got {quote(beams)}", file=file,
                            line=_line(data, "beams", None), field="beams")
    return bt, beams


def check_unique_ids(goals) -> None:
    seen: dict[str, Goal] = {}
    for g in goals:
        if g.id in seen:
            first = seen[g.id]
            raise GoalListError(
                f"duplicate goal id '{g.id}' (first at line {first.line}); give one an "
                "explicit 'id'", file=g.source_file, line=g.line, field="id")
        seen[g.id] = g
