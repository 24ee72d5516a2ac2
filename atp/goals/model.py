"""Plain data types of the goal-list language (the contract other stages code against).

A goal list is YAML (``goal_lists/<site>.yaml``); loading gives :class:`Goal` objects;
``resolve`` turns them, for one patient and one predicted dose, into
:class:`ResolvedGoal` objects with numeric values; ``evaluate`` measures a dose
against them giving :class:`GoalResult`.

Metric text (``Metric.parse``):
  ``Dmean``, ``Dmax``, ``Dmin``           dose in Gy (Dmax/Dmin: voxel maximum/minimum;
                                          use ``D0.03cc`` for a near-maximum)
  ``D95%``, ``D0.1cc``, ``D2cc``          dose (Gy) received by at least that volume
  ``V20Gy%``, ``V20Gy`` (cc), ``V95%%``   volume (% of structure, or cc) receiving >= a
                                          dose (Gy, or % of the structure's Rx with ``%%``)
  ``CI`` (RTOG), ``CIpaddick``, ``HI`` (ICRU-83), ``GI``   plan-quality indices
  (``V95%Rx`` is accepted as a synonym of ``V95%%``; the full grammar is in
  :mod:`atp.goals.metric`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atp.goals.metric import Metric

__all__ = ["Goal", "GoalResult", "Metric", "ResolvedGoal"]


@dataclass(frozen=True)
class Goal:
    """One goal as written in a goal list (after overlay merge), before resolution.

    value: a number (in the metric's result unit) or the string 'predicted'.
    tolerance_pct: for 'predicted' values: -t means ask for t % less than predicted.
    priority: 1 = hard; targets default 2; OAR goals usually 3+.
    kind: 'target' | 'organ' | 'control'.
    required: a patient lacking the structure is an error (True, default for targets)
        or the goal is skipped and recorded (False, default for organs).
    source_file / line: where it was written (for error messages).
    params: for control goals: {'control': 'ring'|'global_max'|'conformity', 'around':
        target name or 'each_target', 'inner_mm', 'outer_mm'}.
    """

    id: str
    structure: str
    metric: Metric
    operator: str  # '<=' or '>='
    value: float | str
    priority: int
    tolerance_pct: float = 0.0
    weight: float | None = None
    kind: str = "organ"
    note: str = ""  # citation / protocol reference
    source_file: str | None = None
    line: int | None = None
    params: dict = field(default_factory=dict)  # control-goal parameters (ring mm, ...)
    required: bool = False

    @property
    def is_predicted(self) -> bool:
        return isinstance(self.value, str) and self.value == "predicted"

    def where(self) -> str:
        """'file:line' of the goal, for messages."""
        return f"{self.source_file or '?'}:{self.line or '?'}"


@dataclass(frozen=True)
class ResolvedGoal:
    """A goal with a numeric value for one patient.

    value: numeric target value in ``metric.result_unit``; None only for a 'predicted'
        goal resolved without a predicted dose (evaluation then reports pass = None).
    source: 'user' (written value) | 'predicted' (from the predicted DVH) | 'control'.
    reference_rx_gy: the prescription that '%Rx' values / ``V95%%`` doses refer to.
    predicted_value: the predicted dose's value of the metric (before tolerance), if any.
    weight: the objective weight after the priority -> weight rule.
    """

    id: str
    structure: str
    metric: Metric
    operator: str
    value: float | None
    priority: int
    weight: float
    kind: str
    source: str
    tolerance_pct: float = 0.0
    predicted_value: float | None = None
    note: str = ""
    params: dict = field(default_factory=dict)
    reference_rx_gy: float | None = None
    source_file: str | None = None
    line: int | None = None

    @property
    def is_hard(self) -> bool:
        return self.priority == 1

    def met_by(self, achieved: float) -> bool | None:
        """Whether ``achieved`` satisfies the goal (None when the value is unknown)."""
        if self.value is None:
            return None
        return achieved <= self.value if self.operator == "<=" else achieved >= self.value

    def margin_of(self, achieved: float) -> float | None:
        """Signed room to spare (metric unit): > 0 met, < 0 violated by that much."""
        if self.value is None:
            return None
        return self.value - achieved if self.operator == "<=" else achieved - self.value

    def to_dict(self) -> dict:
        return {
            "id": self.id, "structure": self.structure, "metric": self.metric.text,
            "unit": self.metric.result_unit, "operator": self.operator,
            "value": self.value, "priority": self.priority, "weight": self.weight,
            "kind": self.kind, "source": self.source, "tolerance_pct": self.tolerance_pct,
            "predicted_value": self.predicted_value, "reference_rx_gy": self.reference_rx_gy,
            "note": self.note, "params": dict(self.params),
        }


@dataclass(frozen=True)
class GoalResult:
    """A resolved goal measured on a dose: achieved value, pass/fail, margin."""

    goal: ResolvedGoal
    achieved: float
    passed: bool | None  # None: the goal's value is unknown (see ``reason``)
    margin: float | None  # signed: > 0 means met with room to spare (in the metric's unit)
    reason: str = ""

    def to_dict(self) -> dict:
        d = self.goal.to_dict()
        d.update(achieved=self.achieved, passed=self.passed, margin=self.margin)
        if self.reason:
            d["reason"] = self.reason
        return d
