"""Linac + MLC models as data (``sequencer/machines/*.yaml``), validated on load.

A :class:`Machine` holds what sequencing must respect. All lengths are mm at the
isocentre plane in the beam-limiting-device frame (IEC 61217): x along leaf travel
(bank A / X1 on the -x side, bank B / X2 on the +x side), y across leaf pairs.

Fields of the YAML file (all required unless noted)::

  name, description, manufacturer, treatment_machine_name   text
  source_axis_distance_mm, nominal_energy_mv                  > 0
  mlc.leaf_widths_mm            [[width_mm, count], ...] from -y to +y (centred on y=0)
  mlc.max_leaf_speed_mm_s       > 0
  mlc.min_leaf_gap_mm           >= 0, gap between opposing leaf tips
  mlc.dosimetric_leaf_gap_mm    >= 0, radiation-field widening of every opening (the
                                rounded leaf end)
  mlc.leaf_transmission         in [0, 0.2]: fraction of the open-field dose through
                                closed leaves (interleaf leakage averaged in)
  mlc.tongue_groove_mm          in [0, narrowest leaf]: tongue-and-groove strip width
                                at each leaf-pair boundary
  mlc.leaf_position_range_mm    [min, max] allowed tip position
  mlc.max_leaf_span_mm          > 0, most- vs least-extended leaf of one bank
  jaws.x1_range_mm ... y2_range_mm   [min, max] per jaw;  jaws.min_field_mm >= 0
  jaws.transmission             in [0, 0.2]: fraction through the jaws
  jaws.tracking                 optional bool (default false): the jaws follow the
                                open leaves at every control point
  delivery.max_dose_rate_mu_min, delivery.max_gantry_speed_deg_s   > 0
  delivery.min_mu_per_deg, delivery.max_mu_per_deg   0 <= min < max (per fraction)
  delivery.min_gantry_speed_deg_s  optional, 0 < min <= max: how far an arc may slow its
                                   gantry (default: the maximum, a constant-speed gantry)
  delivery.dynamic_dose_rate_mu_min  optional, 0 < rate <= max: the dose rate sliding-window
                                   (dynamic MLC) beams are delivered at (default: the
                                   maximum); written as their DoseRateSet

Sliding window: a sweep's leaves are timed at the dynamic dose rate
(:meth:`Machine.mm_per_mu`). Crossing a field of width W at leaf speed v costs
``W * rate / v`` MU on top of the fluence's own (about 70 MU a fraction for a 17.5 cm
field at 600 MU/min and 25 mm/s), and every MU adds leaf leakage; a lower rate costs
fewer MU and longer beam-on (docs/experiments/plan-quality.md, "The dynamic-MLC dose
rate").

Transmission (:attr:`Machine.transmission`, :class:`atp.dose.aperture.Transmission`)
enters every deliverable dose through :func:`atp.dose.aperture.delivered_fraction`.

Arcs: the leaves may travel ``max_leaf_speed / min_gantry_speed`` mm per degree (the
gantry slows down while they move: :attr:`Machine.leaf_travel_limit_per_deg_mm`, what
:func:`atp.sequencer.check_delivery` holds arcs to); the rule-based VMAT sequencer keeps to
the travel at full gantry speed (:attr:`Machine.max_leaf_travel_per_deg_mm`) so its arcs
never slow down for the leaves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atp.dose.aperture import Transmission
from atp.errors import InputError, quote
from atp.yamlio import load_yaml

MACHINE_DIR = Path(__file__).resolve().parent / "machines"
MAX_TRANSMISSION = 0.2  # a larger value is a percent typed as a fraction, not a collimator


@dataclass(frozen=True, eq=False)
class Machine:
    """A validated treatment machine (see module docstring for the meaning of fields)."""

    name: str
    description: str
    manufacturer: str
    treatment_machine_name: str
    source_axis_distance_mm: float
    nominal_energy_mv: float
    leaf_edges_mm: np.ndarray  # (n_pairs + 1,) pair boundaries along y, increasing
    max_leaf_speed_mm_s: float
    min_leaf_gap_mm: float
    dosimetric_leaf_gap_mm: float
    leaf_position_range_mm: tuple[float, float]
    max_leaf_span_mm: float
    jaw_x1_range_mm: tuple[float, float]
    jaw_x2_range_mm: tuple[float, float]
    jaw_y1_range_mm: tuple[float, float]
    jaw_y2_range_mm: tuple[float, float]
    min_field_mm: float
    max_dose_rate_mu_min: float
    max_gantry_speed_deg_s: float
    min_mu_per_deg: float
    max_mu_per_deg: float
    source: str | None = None
    min_gantry_speed_deg_s: float | None = None  # None: the gantry turns at full speed
    leaf_transmission: float = 0.0
    jaw_transmission: float = 0.0
    tongue_groove_mm: float = 0.0
    jaw_tracking: bool = False
    dynamic_dose_rate_mu_min: float | None = None  # None: the maximum dose rate

    @property
    def sliding_dose_rate_mu_min(self) -> float:
        """The dose rate (MU/min) sliding-window (dynamic MLC) beams are delivered at."""
        return float(self.dynamic_dose_rate_mu_min or self.max_dose_rate_mu_min)

    def dose_rate_mu_min(self, kind: str) -> float:
        """The dose rate (MU/min) a beam of ``kind`` ('dynamic', 'static', 'arc') is
        delivered at: the dynamic dose rate for sliding window, else the maximum."""
        return self.sliding_dose_rate_mu_min if kind == "dynamic" else self.max_dose_rate_mu_min

    @property
    def transmission(self) -> Transmission:
        """Leaf / jaw transmission and tongue-and-groove width of this machine."""
        return Transmission(self.leaf_transmission, self.jaw_transmission,
                            self.tongue_groove_mm)

    @property
    def n_pairs(self) -> int:
        return int(self.leaf_edges_mm.shape[0] - 1)

    @property
    def leaf_widths_mm(self) -> np.ndarray:
        return np.diff(self.leaf_edges_mm)

    @property
    def leaf_centres_mm(self) -> np.ndarray:
        return 0.5 * (self.leaf_edges_mm[1:] + self.leaf_edges_mm[:-1])

    @property
    def max_leaf_travel_per_deg_mm(self) -> float:
        """Leaf travel (mm) possible while the gantry turns 1 degree at full speed."""
        return self.max_leaf_speed_mm_s / self.max_gantry_speed_deg_s

    @property
    def slowest_gantry_speed_deg_s(self) -> float:
        """The gantry speed an arc may slow down to (deg/s)."""
        return float(self.min_gantry_speed_deg_s or self.max_gantry_speed_deg_s)

    @property
    def leaf_travel_limit_per_deg_mm(self) -> float:
        """Leaf travel (mm) possible per degree of an arc with the gantry slowed to its
        minimum speed: the machine's limit for arcs."""
        return self.max_leaf_speed_mm_s / self.slowest_gantry_speed_deg_s

    def mm_per_mu(self, fractions: int = 1) -> float:
        """Leaf travel (mm) per total-course MU of a sliding-window beam: the maximum
        leaf speed at the dynamic dose rate (:attr:`sliding_dose_rate_mu_min`)."""
        return (self.max_leaf_speed_mm_s * 60.0 / self.sliding_dose_rate_mu_min
                / max(fractions, 1))


# --- loading --------------------------------------------------------------------------------

def _line_of(data, path: tuple[str, ...]) -> int | None:
    """1-based line of the key at ``path`` in YAML read by :func:`atp.yamlio.load_yaml`
    (best effort)."""
    line = None
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return line
        line = data.line_of(key) if hasattr(data, "line_of") else line
        data = data[key]
    return line


def _finite(v) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except OverflowError:
        return False


MAX_LEAF_PAIRS = 200
MAX_POSITION_MM = 1000.0  # leaf / jaw positions at the isocentre plane
# upper bounds: a value beyond these is a typo or a unit slip, not a machine
MAXIMA = {
    "source_axis_distance_mm": 2000.0, "nominal_energy_mv": 25.0,
    "mlc.max_leaf_speed_mm_s": 200.0, "mlc.min_leaf_gap_mm": 20.0,
    "mlc.dosimetric_leaf_gap_mm": 10.0, "mlc.max_leaf_span_mm": 1000.0,
    "jaws.min_field_mm": 100.0,  # tongue_groove_mm: at most the narrowest leaf (below)
    "delivery.max_dose_rate_mu_min": 10_000.0, "delivery.max_gantry_speed_deg_s": 20.0,
    "delivery.min_gantry_speed_deg_s": 20.0, "delivery.min_mu_per_deg": 100.0,
    "delivery.max_mu_per_deg": 1000.0, "delivery.dynamic_dose_rate_mu_min": 10_000.0,
}


class _Reader:
    def __init__(self, data: dict, root, source: str) -> None:
        self.data, self.root, self.source = data, root, source

    def fail(self, path: tuple[str, ...], msg: str):
        raise InputError(msg, file=self.source, field=".".join(path),
                         line=_line_of(self.root, path))

    def get(self, *path: str):
        cur = self.data
        for i, key in enumerate(path):
            if not isinstance(cur, dict) or key not in cur:
                self.fail(path[: i + 1], "missing")
            cur = cur[key]
        return cur

    def text(self, *path: str) -> str:
        v = self.get(*path)
        if not isinstance(v, str) or not v.strip():
            self.fail(path, f"must be non-empty text, got {quote(v)}")
        return v

    def number(self, *path: str, minimum: float | None = None, strict: bool = False) -> float:
        v = self.get(*path)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            self.fail(path, f"must be a number, got {quote(v)}")
        if minimum is not None and (v <= minimum if strict else v < minimum):
            self.fail(path, f"must be {'>' if strict else '>='} {minimum}, got {v}")
        top = MAXIMA.get(".".join(path))
        if top is not None and v > top:
            self.fail(path, f"must be <= {top:g} (no linac has more), got {v:g}")
        return float(v)

    def optional_number(self, *path: str, **kw) -> float | None:
        """:meth:`number` of an optional field; None when it is absent."""
        parent = self.data
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            return None
        return self.number(*path, **kw)

    def flag(self, *path: str, default: bool) -> bool:
        cur = self.data
        for key in path[:-1]:
            cur = cur.get(key) if isinstance(cur, dict) else None
        if not isinstance(cur, dict) or path[-1] not in cur:
            return default
        v = cur[path[-1]]
        if not isinstance(v, bool):
            self.fail(path, f"must be true or false, got {v!r}")
        return v

    def range(self, *path: str) -> tuple[float, float]:
        v = self.get(*path)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and _finite(x) for x in v)
                or v[0] >= v[1] or max(abs(v[0]), abs(v[1])) > MAX_POSITION_MM):
            self.fail(path, f"must be [min, max] with min < max within +-{MAX_POSITION_MM:g} "
                            f"mm, got {quote(v)}")
        return float(v[0]), float(v[1])


def load_machine_file(path: str | Path) -> Machine:
    """Load and validate one machine YAML file; any problem -> InputError(file, field, line)."""
    path = Path(path)
    data = load_yaml(path, what="machine file")
    if not isinstance(data, dict):
        raise InputError("a machine file must be a mapping", file=path)
    r = _Reader(data, data, str(path))

    runs = r.get("mlc", "leaf_widths_mm")
    widths: list[float] = []
    if not isinstance(runs, list) or not runs:
        r.fail(("mlc", "leaf_widths_mm"), "must be a list of [width_mm, count] pairs")
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2 or isinstance(run[1], bool)
                or not isinstance(run[1], int) or not 1 <= run[1] <= MAX_LEAF_PAIRS
                or isinstance(run[0], bool) or not isinstance(run[0], (int, float))
                or not _finite(run[0]) or not 0 < run[0] <= 100):
            r.fail(("mlc", "leaf_widths_mm"),
                   f"each entry must be [width_mm in (0, 100], count 1..{MAX_LEAF_PAIRS}], "
                   f"got {quote(run)}")
        widths += [float(run[0])] * run[1]
        if len(widths) > MAX_LEAF_PAIRS:
            r.fail(("mlc", "leaf_widths_mm"), f"more than {MAX_LEAF_PAIRS} leaf pairs")
    edges = np.concatenate([[0.0], np.cumsum(widths)])
    edges -= edges[-1] / 2.0
    edges.setflags(write=False)

    leaf_range = r.range("mlc", "leaf_position_range_mm")
    m = Machine(
        name=r.text("name"),
        description=r.text("description"),
        manufacturer=r.text("manufacturer"),
        treatment_machine_name=r.text("treatment_machine_name"),
        source_axis_distance_mm=r.number("source_axis_distance_mm", minimum=0, strict=True),
        nominal_energy_mv=r.number("nominal_energy_mv", minimum=0, strict=True),
        leaf_edges_mm=edges,
        max_leaf_speed_mm_s=r.number("mlc", "max_leaf_speed_mm_s", minimum=0, strict=True),
        min_leaf_gap_mm=r.number("mlc", "min_leaf_gap_mm", minimum=0),
        dosimetric_leaf_gap_mm=r.number("mlc", "dosimetric_leaf_gap_mm", minimum=0),
        leaf_position_range_mm=leaf_range,
        max_leaf_span_mm=r.number("mlc", "max_leaf_span_mm", minimum=0, strict=True),
        jaw_x1_range_mm=r.range("jaws", "x1_range_mm"),
        jaw_x2_range_mm=r.range("jaws", "x2_range_mm"),
        jaw_y1_range_mm=r.range("jaws", "y1_range_mm"),
        jaw_y2_range_mm=r.range("jaws", "y2_range_mm"),
        min_field_mm=r.number("jaws", "min_field_mm", minimum=0),
        max_dose_rate_mu_min=r.number("delivery", "max_dose_rate_mu_min", minimum=0,
                                      strict=True),
        max_gantry_speed_deg_s=r.number("delivery", "max_gantry_speed_deg_s", minimum=0,
                                        strict=True),
        min_mu_per_deg=r.number("delivery", "min_mu_per_deg", minimum=0),
        max_mu_per_deg=r.number("delivery", "max_mu_per_deg", minimum=0, strict=True),
        source=str(path),
        min_gantry_speed_deg_s=r.optional_number("delivery", "min_gantry_speed_deg_s",
                                                 minimum=0, strict=True),
        leaf_transmission=r.number("mlc", "leaf_transmission", minimum=0),
        jaw_transmission=r.number("jaws", "transmission", minimum=0),
        tongue_groove_mm=r.number("mlc", "tongue_groove_mm", minimum=0),
        jaw_tracking=r.flag("jaws", "tracking", default=False),
        dynamic_dose_rate_mu_min=r.optional_number("delivery", "dynamic_dose_rate_mu_min",
                                                   minimum=0, strict=True),
    )
    if (m.dynamic_dose_rate_mu_min is not None
            and m.dynamic_dose_rate_mu_min > m.max_dose_rate_mu_min):
        r.fail(("delivery", "dynamic_dose_rate_mu_min"),
               "must not exceed delivery.max_dose_rate_mu_min")
    if (m.min_gantry_speed_deg_s is not None
            and m.min_gantry_speed_deg_s > m.max_gantry_speed_deg_s):
        r.fail(("delivery", "min_gantry_speed_deg_s"),
               "must not exceed delivery.max_gantry_speed_deg_s")
    for path in (("mlc", "leaf_transmission"), ("jaws", "transmission")):
        if r.number(*path, minimum=0) > MAX_TRANSMISSION:
            r.fail(path, f"must be a fraction in [0, {MAX_TRANSMISSION}] (e.g. 0.015 for "
                         f"1.5 %), got {r.get(*path)}")
    if m.tongue_groove_mm > float(np.min(np.diff(edges))):
        r.fail(("mlc", "tongue_groove_mm"), "wider than the narrowest leaf")
    if m.min_mu_per_deg >= m.max_mu_per_deg:
        r.fail(("delivery", "min_mu_per_deg"), "must be below delivery.max_mu_per_deg")
    if m.min_leaf_gap_mm >= leaf_range[1] - leaf_range[0]:
        r.fail(("mlc", "min_leaf_gap_mm"), "larger than the leaf position range")
    return m


def available_machines() -> list[str]:
    """Names (file stems) of the machine models shipped in ``sequencer/machines``."""
    return sorted(p.stem for p in MACHINE_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=16)
def _load_named(stem: str) -> Machine:
    return load_machine_file(MACHINE_DIR / f"{stem}.yaml")


def load_machine(name_or_path: str | Path = "millennium120") -> Machine:
    """A shipped machine by name (``millennium120``, ``hd120``; case-insensitive) or a path."""
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_machine_file(p)
    stem = text.lower().replace("-", "").replace("_", "")
    for s in available_machines():
        if s.replace("-", "").replace("_", "") == stem:
            return _load_named(s)
    raise InputError(f"unknown machine '{text}'; shipped machines: {available_machines()} "
                     "(or give a path to a machine YAML file)", field="machine")
