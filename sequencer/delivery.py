"""What a sequencer returns: beams (static fields or arcs) as DICOM-like control points.

Leaf positions are *physical* tip positions (what goes into an RT Plan), mm at the
isocentre plane: bank A (X1, -x side) and bank B (X2, +x side), one value per leaf pair.
The radiation field of an opening is wider by the machine's dosimetric leaf gap (DLG/2
each side); ``atp.sequencer.deliverable`` applies that when computing dose.

Between control points k and k+1 the leaves move linearly while
``cumulative_mu[k+1] - cumulative_mu[k]`` MU (total course) are delivered. Step-and-shoot
segments are pairs of control points with equal leaves. ``dij_beam[k]`` is the
``DoseInfluence`` beam whose columns carry the dose delivered near control point k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from atp.sequencer.machine import Machine


@dataclass(frozen=True, eq=False)
class BeamDelivery:
    """One treatment beam (field or arc)."""

    name: str
    kind: str  # 'static' (step-and-shoot), 'dynamic' (sliding window) or 'arc'
    gantry_deg: np.ndarray  # (n_cp,)
    collimator_deg: float
    couch_deg: float
    isocenter_mm: np.ndarray  # (3,) patient LPS mm
    leaf_a_mm: np.ndarray  # (n_cp, n_pairs)
    leaf_b_mm: np.ndarray  # (n_cp, n_pairs)
    jaw_x_mm: np.ndarray  # (n_cp, 2) X1, X2
    jaw_y_mm: np.ndarray  # (n_cp, 2) Y1, Y2
    cumulative_mu: np.ndarray  # (n_cp,) total-course MU, 0 first, non-decreasing
    dij_beam: np.ndarray  # (n_cp,) int
    n_segments: int = 0  # apertures delivered (step-and-shoot segments, arc control points)
    #: (n_cp - 1,) sector of each interval between control points, or None. Set by
    #: sliding-window VMAT: a sector's MU may only be scaled as a whole (its leaf timing
    #: is fixed relative to its MU), so the MU step has one free MU per sector.
    mu_group: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("gantry_deg", "leaf_a_mm", "leaf_b_mm", "jaw_x_mm", "jaw_y_mm",
                     "cumulative_mu", "isocenter_mm"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "dij_beam", np.asarray(self.dij_beam, dtype=np.int64))
        n = self.cumulative_mu.shape[0]
        if not (self.gantry_deg.shape == (n,) and self.leaf_a_mm.shape[0] == n
                and self.leaf_b_mm.shape == self.leaf_a_mm.shape
                and self.jaw_x_mm.shape == (n, 2) and self.jaw_y_mm.shape == (n, 2)
                and self.dij_beam.shape == (n,)):
            raise ValueError(f"beam {self.name}: control-point arrays differ in length")
        if self.mu_group is not None:
            group = np.asarray(self.mu_group, dtype=np.int64)
            if group.shape != (n - 1,) or (group.size and group.min() < 0):
                raise ValueError(f"beam {self.name}: mu_group needs one sector index >= 0 "
                                 "per interval between control points")
            object.__setattr__(self, "mu_group", group)

    @property
    def n_control_points(self) -> int:
        return int(self.cumulative_mu.shape[0])

    @property
    def mu(self) -> float:
        """Total-course MU of this beam."""
        return float(self.cumulative_mu[-1])

    @property
    def meterset_weights(self) -> np.ndarray:
        """Cumulative meterset weights 0 .. 1 (DICOM CumulativeMetersetWeight)."""
        return self.cumulative_mu / self.mu if self.mu > 0 else np.linspace(0, 1, len(self.cumulative_mu))

    @property
    def rotation_direction(self) -> str:
        """'CW', 'CC' or 'NONE' (IEC gantry rotation between first and second CP)."""
        if self.kind != "arc" or self.n_control_points < 2:
            return "NONE"
        step = (self.gantry_deg[1] - self.gantry_deg[0] + 180.0) % 360.0 - 180.0
        return "CW" if step > 0 else "CC"

    @property
    def arc_length_deg(self) -> float:
        if self.kind != "arc":
            return 0.0
        steps = (np.diff(self.gantry_deg) + 180.0) % 360.0 - 180.0
        return float(np.abs(steps).sum())


@dataclass(frozen=True, eq=False)
class Delivery:
    """A sequenced plan: beams, the machine they were sequenced for, fractions."""

    technique: str  # registry name: 'imrt-sns' | 'imrt-sliding' | 'vmat' | ...
    machine: Machine
    beams: tuple[BeamDelivery, ...]
    fractions: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def total_mu(self) -> float:
        return float(sum(b.mu for b in self.beams))

    def delivery_time_s(self) -> float:
        """Estimated beam-on time per fraction (s): per interval the slowest of dose
        rate, leaf speed and gantry speed limits."""
        m = self.machine
        total = 0.0
        for b in self.beams:
            dmu = np.diff(b.cumulative_mu) / self.fractions
            travel = np.maximum(np.abs(np.diff(b.leaf_a_mm, axis=0)).max(axis=1),
                                np.abs(np.diff(b.leaf_b_mm, axis=0)).max(axis=1))
            dg = np.abs((np.diff(b.gantry_deg) + 180.0) % 360.0 - 180.0)
            t = np.maximum.reduce([dmu / (m.dose_rate_mu_min(b.kind) / 60.0),
                                   travel / m.max_leaf_speed_mm_s,
                                   dg / m.max_gantry_speed_deg_s])
            total += float(t.sum())
        return total

    def summary(self) -> dict:
        return {
            "technique": self.technique,
            "machine": self.machine.name,
            "fractions": self.fractions,
            "total_mu": round(self.total_mu, 3),
            "mu_per_fraction": round(self.total_mu / self.fractions, 3),
            "delivery_time_s_per_fraction": round(self.delivery_time_s(), 2),
            "beams": [
                {"name": b.name, "kind": b.kind, "mu": round(b.mu, 3),
                 "mu_per_fraction": round(b.mu / self.fractions, 3),
                 "segments": b.n_segments, "control_points": b.n_control_points,
                 "gantry_start_deg": float(b.gantry_deg[0]),
                 "gantry_stop_deg": float(b.gantry_deg[-1]),
                 "rotation": b.rotation_direction}
                for b in self.beams
            ],
            **{k: v for k, v in self.meta.items() if isinstance(v, (int, float, str))},
        }


def check_delivery(delivery: Delivery, tol_mm: float = 1e-6) -> list[str]:
    """Every way the delivery breaks its machine model (empty list: deliverable).

    Checks per control point: opposing tips >= min gap apart, tips inside the leaf range,
    bank span, jaws inside their ranges; between control points: leaf travel within what
    the leaf speed allows (arcs: with the gantry slowed to its minimum speed; dynamic
    fields: at full dose rate),
    arc MU per degree within limits; cumulative MU non-decreasing.
    """
    m = delivery.machine
    bad: list[str] = []
    lo, hi = m.leaf_position_range_mm
    for b in delivery.beams:
        a, bb = b.leaf_a_mm, b.leaf_b_mm
        if a.shape[1] != m.n_pairs:
            bad.append(f"{b.name}: {a.shape[1]} leaf pairs, machine has {m.n_pairs}")
            continue
        gap = bb - a
        if gap.min() < m.min_leaf_gap_mm - tol_mm:
            bad.append(f"{b.name}: leaf gap {gap.min():.3f} mm < min {m.min_leaf_gap_mm}")
        if min(a.min(), bb.min()) < lo - tol_mm or max(a.max(), bb.max()) > hi + tol_mm:
            bad.append(f"{b.name}: leaf outside the range [{lo}, {hi}] mm")
        span = max((a.max(axis=1) - a.min(axis=1)).max(), (bb.max(axis=1) - bb.min(axis=1)).max())
        if span > m.max_leaf_span_mm + tol_mm:
            bad.append(f"{b.name}: bank span {span:.1f} mm > {m.max_leaf_span_mm}")
        for k, (rng, name) in enumerate(((m.jaw_x1_range_mm, "X1"), (m.jaw_x2_range_mm, "X2"))):
            v = b.jaw_x_mm[:, k]
            if v.min() < rng[0] - tol_mm or v.max() > rng[1] + tol_mm:
                bad.append(f"{b.name}: jaw {name} outside {rng}")
        for k, (rng, name) in enumerate(((m.jaw_y1_range_mm, "Y1"), (m.jaw_y2_range_mm, "Y2"))):
            v = b.jaw_y_mm[:, k]
            if v.min() < rng[0] - tol_mm or v.max() > rng[1] + tol_mm:
                bad.append(f"{b.name}: jaw {name} outside {rng}")
        dmu = np.diff(b.cumulative_mu)
        if b.cumulative_mu[0] != 0 or (dmu.size and dmu.min() < -1e-9):
            bad.append(f"{b.name}: cumulative MU must start at 0 and never decrease")
        if b.n_control_points < 2:
            continue
        travel = np.maximum(np.abs(np.diff(a, axis=0)), np.abs(np.diff(bb, axis=0))).max(axis=1)
        if b.kind == "arc":
            dg = np.abs((np.diff(b.gantry_deg) + 180.0) % 360.0 - 180.0)
            allowed = m.leaf_travel_limit_per_deg_mm * dg
            if np.any(travel > allowed + 1e-6):
                k = int(np.argmax(travel - allowed))
                bad.append(f"{b.name}: leaf travel {travel[k]:.2f} mm between control points "
                           f"{k} and {k + 1} exceeds {allowed[k]:.2f} mm with the gantry at "
                           f"its slowest ({m.slowest_gantry_speed_deg_s:g} deg/s)")
            mu_deg = dmu / delivery.fractions / np.maximum(dg, 1e-9)
            if mu_deg.max() > m.max_mu_per_deg * (1 + 1e-6):
                bad.append(f"{b.name}: {mu_deg.max():.2f} MU/deg > {m.max_mu_per_deg}")
            if mu_deg.min() < m.min_mu_per_deg * (1 - 1e-6):
                bad.append(f"{b.name}: {mu_deg.min():.3f} MU/deg < {m.min_mu_per_deg}")
        elif b.kind == "dynamic":
            allowed = m.mm_per_mu(delivery.fractions) * dmu
            if np.any(travel > allowed + 1e-6):
                bad.append(f"{b.name}: leaves faster than {m.max_leaf_speed_mm_s} mm/s at "
                           f"{m.sliding_dose_rate_mu_min:g} MU/min (the dynamic dose rate)")
        elif b.kind == "static":
            moving = travel > 1e-9
            if np.any(dmu[moving] > 1e-9):
                bad.append(f"{b.name}: step-and-shoot leaves move while the beam is on")
    return bad
