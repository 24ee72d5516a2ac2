"""Scorecards: a plan judged by piecewise-linear scores of DVH metrics (higher is better).

A scorecard YAML (``scorecards/<name>.yaml``, installed as ``atp.scorecards``) holds::

    scorecard: hn                  # its name
    title: ...                     # one line
    sources: {KEY: citation, ...}  # the publications the score points come from
    items:
      - id: cord_max               # unique
        structure: SpinalCord      # canonical (TG-263) structure name
        metric: D0.1cc             # the goal-list metric grammar (atp.goals.metric)
        points: [[40, 10], [45, 8], [50, 0]]   # [metric value, score], value increasing
        max: 10                    # the item's best score; every point's score in 0..max
        priority: 1                # clinical importance (1 most), for display
        source: QUANTEC-cord       # key into sources

An item's score is the linear interpolation of its points at the metric's value,
constant beyond the first and last point (``numpy.interp``). An item whose structure the
patient lacks is not scored (value and score None) and the total's maximum leaves it
out. Every problem in the file raises :class:`ScorecardError` naming file, line and
field (exit 2 on the command line).
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atp.errors import InputError, quote
from atp.goals.metric import parse_metric
from atp.goals.resolve import measure
from atp.yamlio import load_yaml

ITEM_KEYS = {"id", "structure", "metric", "points", "max", "priority", "source", "note"}
TOP_KEYS = {"scorecard", "title", "sources", "items"}


class ScorecardError(InputError):
    """A scorecard file is malformed."""


@dataclass(frozen=True)
class ScoreItem:
    id: str
    structure: str
    metric: object  # atp.goals.model.Metric
    points: tuple  # ((value, score), ...) value strictly increasing
    max_score: float
    priority: int = 2
    source: str = ""

    def score(self, value: float) -> float:
        xs, ys = zip(*self.points)
        return float(np.interp(value, xs, ys))


@dataclass(frozen=True)
class Scorecard:
    name: str
    title: str
    items: tuple
    sources: dict
    file: str = ""

    def evaluate(self, patient, dose_gy) -> dict:
        """{"items": [{id, structure, metric, value, score, max, ...}], "total",
        "max_total", "fraction"}; items whose structure is absent are not scored."""
        rows, total, best = [], 0.0, 0.0
        names = set(patient.structures)
        rx = patient.prescriptions[0].dose_gy if patient.prescriptions else None
        for it in self.items:
            row = {"id": it.id, "structure": it.structure, "metric": it.metric.text,
                   "unit": it.metric.result_unit, "max": it.max_score,
                   "priority": it.priority, "value": None, "score": None}
            if it.structure in names and patient.structure(it.structure).n_voxels > 0:
                value = float(measure(it.metric, patient, it.structure, dose_gy,
                                      reference_rx_gy=rx))
                row.update(value=value, score=it.score(value))
                total += row["score"]
                best += it.max_score
            else:
                row["note"] = "structure absent: not scored"
            rows.append(row)
        return {"scorecard": self.name, "items": rows, "total": total, "max_total": best,
                "fraction": total / best if best > 0 else None}


def scorecards_dir() -> Path:
    """Folder of the shipped scorecards (package ``atp.scorecards``)."""
    return Path(str(importlib.resources.files("atp.scorecards")))


def list_scorecards() -> list[str]:
    return sorted(p.stem for p in scorecards_dir().glob("*.yaml"))


def scorecard_path(name_or_file) -> Path:
    """A shipped scorecard name (``hn``) or a YAML file path."""
    text = str(name_or_file)
    if text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file():
        return Path(text)
    p = scorecards_dir() / f"{text}.yaml"
    if not p.is_file():
        raise ScorecardError(f"unknown scorecard {quote(text)}; shipped: "
                             f"{', '.join(list_scorecards()) or 'none'} (or give a YAML file)",
                             field="--scorecard")
    return p


def _number(v, *, file, line, field) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScorecardError(f"must be a finite number, got {quote(v)}", file=file,
                             line=line, field=field)
    return float(v)


def _item(raw, i: int, file: str, line: int | None) -> ScoreItem:
    where = f"items[{i}]"
    if not isinstance(raw, dict):
        raise ScorecardError(f"must be a mapping with structure, metric, points, max, got "
                             f"{quote(raw)}", file=file, line=line, field=where)

    def ln(key):
        return raw.line_of(key) if hasattr(raw, "line_of") else line

    unknown = sorted(set(map(str, raw)) - ITEM_KEYS)
    if unknown:
        raise ScorecardError(f"unknown key (known: {', '.join(sorted(ITEM_KEYS))})",
                             file=file, line=ln(unknown[0]), field=f"{where}.{unknown[0]}")
    for key in ("id", "structure", "metric", "points", "max"):
        if key not in raw:
            raise ScorecardError("missing", file=file, line=line, field=f"{where}.{key}")
    for key in ("id", "structure"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ScorecardError(f"must be a non-empty text, got {quote(raw[key])}",
                                 file=file, line=ln(key), field=f"{where}.{key}")
    metric = parse_metric(raw["metric"], file=file, line=ln("metric"),
                          field=f"{where}.metric")
    mx = _number(raw["max"], file=file, line=ln("max"), field=f"{where}.max")
    if mx <= 0:
        raise ScorecardError(f"must be > 0, got {mx:g}", file=file, line=ln("max"),
                             field=f"{where}.max")
    pts = raw["points"]
    if not isinstance(pts, list) or len(pts) < 2:
        raise ScorecardError("must be a list of at least two [value, score] pairs",
                             file=file, line=ln("points"), field=f"{where}.points")
    out = []
    for k, p in enumerate(pts):
        pl = pts.line_of(k) if hasattr(pts, "line_of") else ln("points")
        f = f"{where}.points[{k}]"
        if not isinstance(p, list) or len(p) != 2:
            raise ScorecardError(f"must be a [value, score] pair, got {quote(p)}", file=file,
                                 line=pl, field=f)
        x = _number(p[0], file=file, line=pl, field=f)
        s = _number(p[1], file=file, line=pl, field=f)
        if not 0 <= s <= mx:
            raise ScorecardError(f"score {s:g} outside 0..max ({mx:g})", file=file, line=pl,
                                 field=f)
        if out and x <= out[-1][0]:
            raise ScorecardError(f"values must increase: {x:g} after {out[-1][0]:g}",
                                 file=file, line=pl, field=f)
        out.append((x, s))
    if max(s for _, s in out) != mx:
        raise ScorecardError(f"no point reaches the item's max ({mx:g})", file=file,
                             line=ln("points"), field=f"{where}.points")
    prio = raw.get("priority", 2)
    if isinstance(prio, bool) or not isinstance(prio, int) or not 1 <= prio <= 4:
        raise ScorecardError(f"must be an integer 1..4, got {quote(prio)}", file=file,
                             line=ln("priority"), field=f"{where}.priority")
    return ScoreItem(raw["id"].strip(), raw["structure"].strip(), metric, tuple(out), mx,
                     prio, str(raw.get("source", "")))


def load_scorecard(name_or_file) -> Scorecard:
    """Read and check a scorecard (a shipped name or a YAML file)."""
    path = scorecard_path(name_or_file)
    file = str(path)
    data = load_yaml(path, error=ScorecardError, what="scorecard")
    if not isinstance(data, dict):
        raise ScorecardError("must be a mapping with 'scorecard' and 'items'", file=file)
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise ScorecardError(f"unknown key (known: {', '.join(sorted(TOP_KEYS))})",
                             file=file, line=data.line_of(unknown[0]), field=unknown[0])
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise ScorecardError("must be a non-empty list", file=file,
                             line=data.line_of("items"), field="items")
    sources = data.get("sources") or {}
    if not isinstance(sources, dict):
        raise ScorecardError("must be a mapping of key: citation", file=file,
                             line=data.line_of("sources"), field="sources")
    parsed, seen = [], set()
    for i, raw in enumerate(items):
        it = _item(raw, i, file, items.line_of(i))
        if it.id in seen:
            raise ScorecardError(f"duplicate item id {quote(it.id)}", file=file,
                                 line=items.line_of(i), field=f"items[{i}].id")
        if it.source and sources and it.source not in sources:
            raise ScorecardError(f"source {quote(it.source)} is not among 'sources'",
                                 file=file, line=items.line_of(i), field=f"items[{i}].source")
        seen.add(it.id)
        parsed.append(it)
    return Scorecard(str(data.get("scorecard") or path.stem), str(data.get("title") or ""),
                     tuple(parsed), dict(sources), file)


def format_scores(result: dict) -> list[str]:
    """Lines of a scorecard result for the terminal."""
    lines = [(f"{'item':22s} {'structure':14s} {'metric':8s} {'value':>9s} {'score':>6s} "
             f"{'max':>5s}")]
    for r in result["items"]:
        v = "absent" if r["value"] is None else f"{r['value']:.2f}"
        s = "-" if r["score"] is None else f"{r['score']:.2f}"
        lines.append(f"{r['id'][:22]:22s} {r['structure'][:14]:14s} {r['metric'][:8]:8s} "
                     f"{v:>9s} {s:>6s} {r['max']:5.1f}")
    frac = result["fraction"]
    lines.append(f"total {result['total']:.2f} / {result['max_total']:.2f}"
                 + (f" ({100 * frac:.1f} %)" if frac is not None else ""))
    return lines


# --- AIRTP's scorecard-to-objective mapping (the scorecard refinement, atp.score_refine) --
#: an upper objective aims this far (Gy) beyond the next better score point
POINT_MARGIN_GY = 1.0
#: but never tightens the current value by more than AIRTP's margin: max(85 %, -7 Gy)
MAX_TIGHTEN_FRACTION, MAX_TIGHTEN_GY = 0.15, 7.0


def _objective_kind(metric, upper: bool):
    """(objective kind, volume fraction) for a metric, or None (not a dose metric)."""
    if metric.kind == "Dmean":
        return ("mean_max" if upper else "mean_min"), 1.0
    if metric.kind in ("Dmax", "Dmin") or (metric.kind == "D" and metric.volume_unit == "cc"):
        return ("max" if upper else "min"), 1.0
    if metric.kind == "D" and metric.volume_unit == "%":
        return ("dv_max" if upper else "dv_min"), float(metric.volume) / 100.0
    return None


def item_objective(item: ScoreItem, value: float) -> dict | None:
    """The dose objective that moves ``item`` (at ``value``) to its next better score
    point, after AIRTP's scorecard-to-dose mapping; None when the metric is not a dose.

    Better scores lie at lower values (an organ's dose, a hot spot: an upper objective
    aimed :data:`POINT_MARGIN_GY` below the next better point) or at higher values (a
    target's coverage: a lower objective at the next better point). The objective never
    asks more than AIRTP's margin of the current value (15 %, at most 7 Gy). An item at
    its full score gets a holding objective at the edge of its full score (``hold``:
    inactive while the item keeps it; a re-plan that trades it away pays). Its priority
    is AIRTP's, ``60 + min(|slope|, 7) * 20 / (1 + exp(score / 3))`` with the slope
    (score per Gy) of the segment the value lies on (clamped to the points): steep,
    poorly scored items first."""
    score = item.score(value)
    xs, ys = (np.asarray(a, float) for a in zip(*item.points))
    upper = bool(ys[0] > ys[-1]) if ys[0] != ys[-1] else bool(xs[int(np.argmax(ys))] < value)
    kind = _objective_kind(item.metric, upper)
    if kind is None:
        return None
    hold = score >= item.max_score - 1e-9
    if hold:
        edge = [x for x, s in item.points if s >= item.max_score - 1e-9]
        nxt = max(edge) if upper else min(edge)
        ref = nxt
    else:
        better = [x for x, s in item.points if s > score + 1e-9 and (x < value if upper
                                                                     else x > value)]
        if not better:
            return None
        nxt = max(better) if upper else min(better)
        ref = (max(nxt - POINT_MARGIN_GY, value * (1 - MAX_TIGHTEN_FRACTION),
                   value - MAX_TIGHTEN_GY) if upper else
               min(nxt, value / (1 - MAX_TIGHTEN_FRACTION), value + MAX_TIGHTEN_GY))
    if ref <= 0:
        return None
    xc = float(np.clip(value, xs[0], xs[-1]))
    k = int(np.clip(np.searchsorted(xs, xc, side="right") - 1, 0, len(xs) - 2))
    slope = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
    priority = 60.0 + min(abs(slope), 7.0) * 20.0 / (1.0 + math.exp(score / 3.0))
    return {"structure": item.structure, "kind": kind[0], "volume": kind[1],
            "dose_gy": round(float(ref), 3), "priority": round(priority, 2),
            "source": f"scorecard:{item.id}", "metric": item.metric.text,
            "value": round(float(value), 3),
            "next_point": [float(nxt), float(dict(item.points)[nxt])], "hold": hold}
