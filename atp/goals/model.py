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
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Metric:
    """A parsed DVH / plan-quality metric.

    kind: 'Dmean' | 'Dmax' | 'Dmin' | 'D' (dose at volume) | 'V' (volume at dose)
          | 'CI' | 'CIpaddick' | 'HI' | 'GI'
    volume: for 'D': the volume (value in ``volume_unit``: '%' or 'cc').
    dose: for 'V': the dose threshold (value in ``dose_unit``: 'Gy' or '%' of Rx).
    result_unit: unit of the metric's value: 'Gy' (D*), '%' or 'cc' (V*), '' (indices).
    text: the metric as written, e.g. 'D95%'.
    """

    kind: str
    text: str
    result_unit: str
    volume: float | None = None
    volume_unit: str | None = None
    dose: float | None = None
    dose_unit: str | None = None


@dataclass(frozen=True)
class Goal:
    """One goal as written in a goal list (after overlay merge), before resolution.

    value: a number (in the metric's result unit) or the string 'predicted'.
    tolerance_pct: for 'predicted' values: -t means ask for t % less than predicted.
    priority: 1 = hard; targets default 2; OAR goals usually 3+.
    kind: 'target' | 'organ' | 'control'.
    source_file / line: where it was written (for error messages).
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


@dataclass(frozen=True)
class ResolvedGoal:
    """A goal with a numeric value for one patient.

    value: numeric target value in ``metric.result_unit``.
    source: 'user' (written value) | 'predicted' (from the predicted DVH) | 'control'.
    predicted_value: the predicted dose's value of the metric (before tolerance), if any.
    weight: the objective weight after the priority -> weight rule.
    """

    id: str
    structure: str
    metric: Metric
    operator: str
    value: float
    priority: int
    weight: float
    kind: str
    source: str
    tolerance_pct: float = 0.0
    predicted_value: float | None = None
    note: str = ""
    params: dict = field(default_factory=dict)

    @property
    def is_hard(self) -> bool:
        return self.priority == 1


@dataclass(frozen=True)
class GoalResult:
    """A resolved goal measured on a dose: achieved value, pass/fail, margin."""

    goal: ResolvedGoal
    achieved: float
    passed: bool
    margin: float  # signed: > 0 means met with room to spare (in the metric's unit)
