"""Metric text -> :class:`Metric` (the grammar of the goal-list language; ``Metric`` is
re-exported by :mod:`atp.goals.model` with the other types).

=====================  ===================================================  ===========
text                   meaning                                              result unit
=====================  ===================================================  ===========
``Dmean``              mean dose                                            Gy
``Dmax`` / ``Dmin``    hottest / coldest voxel                              Gy
``D95%``               dose received by at least 95 % of the structure      Gy
``D0.1cc``, ``D2cc``   dose received by at least that volume (cc)           Gy
``V20Gy%``             volume receiving >= 20 Gy, % of the structure        %
``V20Gy`` (``V20Gycc``)  the same in cc                                     cc
``V95%%`` (``V95%Rx``)   volume receiving >= 95 % of the reference Rx, %    %
``CI``                 RTOG conformity index                                (none)
``CIpaddick``          Paddick conformity index                             (none)
``HI``                 ICRU-83 homogeneity index                            (none)
``GI``                 gradient index                                       (none)
=====================  ===================================================  ===========

``Dmean``/``Dmax``/``Dmin`` and the indices are matched case-insensitively
(``CI_Paddick`` is accepted for ``CIpaddick``). The definitions of each are in
:mod:`atp.dvh` and :mod:`atp.metrics`. The parsed metric's ``text`` is the canonical
spelling above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atp.errors import GoalListError, quote


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

    @classmethod
    def parse(cls, text: str) -> Metric:
        """Parse metric text such as 'D95%', 'D0.1cc', 'V20Gy%', 'Dmean', 'CI'.

        Raises :class:`~atp.errors.GoalListError` (field 'metric') for unknown text.
        """
        return parse_metric(text)

    @property
    def is_index(self) -> bool:
        """True for the plan-quality indices (CI, CIpaddick, HI, GI)."""
        return self.kind in ("CI", "CIpaddick", "HI", "GI")

    def __str__(self) -> str:
        return self.text



_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_D_VOL = re.compile(rf"^D{_NUM}\s*(%|cc)$", re.IGNORECASE)
_V_GY = re.compile(rf"^V{_NUM}\s*Gy\s*(%|cc)?$", re.IGNORECASE)
_V_RX = re.compile(rf"^V{_NUM}\s*%\s*(%|Rx)$", re.IGNORECASE)
_SIMPLE = {"dmean": "Dmean", "dmax": "Dmax", "dmin": "Dmin"}
_INDICES = {"ci": "CI", "ci_rtog": "CI", "cirtog": "CI", "cipaddick": "CIpaddick",
            "ci_paddick": "CIpaddick", "hi": "HI", "gi": "GI"}

GRAMMAR_HELP = ("known metrics: Dmean, Dmax, Dmin, D<x>% (e.g. D95%), D<v>cc (e.g. D0.1cc), "
                "V<d>Gy% / V<d>Gy (cc), V<x>%% (dose as % of Rx), CI, CIpaddick, HI, GI")


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_metric(text, *, file=None, line: int | None = None, field: str = "metric") -> Metric:
    """Parse one metric; errors name ``file``, ``line`` and ``field`` when given."""
    def fail(msg: str) -> GoalListError:
        return GoalListError(msg, file=file, line=line, field=field)

    if not isinstance(text, str) or not text.strip():
        raise fail(f"metric must be text such as 'D95%', got {quote(text)}; {GRAMMAR_HELP}")
    raw = text.strip()
    key = raw.lower().replace(" ", "")
    if key in _SIMPLE:
        kind = _SIMPLE[key]
        return Metric(kind=kind, text=kind, result_unit="Gy")
    if key in _INDICES:
        kind = _INDICES[key]
        return Metric(kind=kind, text=kind, result_unit="")
    m = _D_VOL.match(raw)
    if m:
        vol, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%" and not 0.0 <= vol <= 100.0:
            raise fail(f"{quote(raw)}: volume must be within 0..100 %")
        if unit == "cc" and vol <= 0.0:
            raise fail(f"{quote(raw)}: volume must be > 0 cc")
        return Metric(kind="D", text=f"D{_fmt(vol)}{unit}", result_unit="Gy",
                      volume=vol, volume_unit=unit)
    m = _V_RX.match(raw)
    if m:
        dose = float(m.group(1))
        if dose <= 0.0:
            raise fail(f"{quote(raw)}: dose must be > 0 % of Rx")
        return Metric(kind="V", text=f"V{_fmt(dose)}%%", result_unit="%", dose=dose,
                      dose_unit="%")
    m = _V_GY.match(raw)
    if m:
        dose, unit = float(m.group(1)), (m.group(2) or "cc").lower()
        text_unit = "%" if unit == "%" else ""
        return Metric(kind="V", text=f"V{_fmt(dose)}Gy{text_unit}", result_unit=unit,
                      dose=dose, dose_unit="Gy")
    raise fail(f"unknown metric {quote(raw)}; {GRAMMAR_HELP}")
