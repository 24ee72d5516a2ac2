"""DICOM RT Plan -> :class:`~atp.sequencer.delivery.Delivery` (any planning system's plan).

Reads photon treatment beams with their control points: gantry / collimator / couch
angles, isocentre, jaws (X / ASYMX, Y / ASYMY), MLC leaf positions (MLCX with its
LeafPositionBoundaries) and cumulative meterset weights; attributes a control point does
not repeat are carried over from the one before (DICOM PS3.3 C.8.8.14). Beam MU come from
the fraction group (BeamMeterset, per fraction) times the fractions planned, so the
delivery holds total-course MU like every atp delivery. A beam whose gantry moves is an
arc ('arc', one dose beam per control point); a beam whose leaves move while MU are
delivered is sliding window ('dynamic'); otherwise step-and-shoot / static ('static').

The leaf geometry is the plan's own (its LeafPositionBoundaries); what the plan does not
say -- leaf and jaw transmission, tongue-and-groove, the dosimetric leaf gap -- comes from
the ``machine`` model given (default Millennium 120). A beam without an MLC is collimated
by its jaws alone (leaves retracted). Beams of delivery type other than TREATMENT
(setup fields) and beams with no MU are skipped; MLCY (leaves along y), wedges, blocks,
compensators and electron / proton beams are refused with the field that holds them.

Any problem -> :class:`~atp.errors.InputError` naming the file and the field.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.machine import Machine, load_machine

from atp.dose.geometry import Beam, arc_dose_angles
from atp.errors import InputError

RT_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"
_OPEN_MM = 200.0  # leaves of a beam without an MLC: retracted this far


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, msg: str):
        raise InputError(msg, file=str(self.path), field=field)

    def number(self, ds, keyword: str, field: str, default=None) -> float:
        v = getattr(ds, keyword, None)
        if v is None or v == "":
            if default is not None:
                return float(default)
            self.fail(f"{field}.{keyword}", "missing")
        try:
            x = float(v)
        except (TypeError, ValueError):
            self.fail(f"{field}.{keyword}", f"not a number: {str(v)[:40]!r}")
        if not np.isfinite(x):
            self.fail(f"{field}.{keyword}", "not finite")
        return x

    def numbers(self, ds, keyword: str, field: str, n: int | None = None) -> np.ndarray:
        v = getattr(ds, keyword, None)
        if v is None:
            self.fail(f"{field}.{keyword}", "missing")
        vals = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") \
            and not isinstance(v, str) else [v]
        try:
            arr = np.array([float(x) for x in vals], dtype=np.float64)
        except (TypeError, ValueError):
            self.fail(f"{field}.{keyword}", "not a list of numbers")
        if not np.all(np.isfinite(arr)):
            self.fail(f"{field}.{keyword}", "not finite")
        if n is not None and arr.size != n:
            self.fail(f"{field}.{keyword}", f"expected {n} values, got {arr.size}")
        return arr


def read_rt_plan(path, machine: str | Machine = "millennium120"):
    """Read an RT Plan file. Returns ``(delivery, beams, info)``: the Delivery (its
    ``dij_beam`` indexes ``beams``), the list of :class:`atp.dose.geometry.Beam` (one per
    distinct gantry / collimator / couch / isocentre) and plain facts about the plan."""
    path = Path(path)
    ctx = _Ctx(path)
    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError:
        raise InputError("no such file", file=str(path)) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise InputError(f"not a DICOM file ({type(exc).__name__})", file=str(path)) from None
    if str(getattr(ds, "SOPClassUID", "")) != RT_PLAN_SOP_CLASS or \
            getattr(ds, "Modality", "RTPLAN") != "RTPLAN":
        ctx.fail("SOPClassUID", f"not an RT Plan (Modality {getattr(ds, 'Modality', '?')})")
    base = machine if isinstance(machine, Machine) else load_machine(machine)

    groups = getattr(ds, "FractionGroupSequence", None)
    if not groups:
        ctx.fail("FractionGroupSequence", "missing or empty")
    fg = groups[0]
    fractions = int(ctx.number(fg, "NumberOfFractionsPlanned", "FractionGroupSequence[0]",
                               default=1))
    if fractions < 1:
        ctx.fail("FractionGroupSequence[0].NumberOfFractionsPlanned", "must be >= 1")
    meterset = {}
    for i, r in enumerate(getattr(fg, "ReferencedBeamSequence", None) or []):
        f = f"FractionGroupSequence[0].ReferencedBeamSequence[{i}]"
        num = int(ctx.number(r, "ReferencedBeamNumber", f))
        meterset[num] = ctx.number(r, "BeamMeterset", f, default=0.0)

    beam_seq = getattr(ds, "BeamSequence", None)
    if not beam_seq:
        ctx.fail("BeamSequence", "missing or empty (an ion or brachy plan?)")
    geometry: list[Beam] = []
    keys: dict[tuple, int] = {}
    beams: list[BeamDelivery] = []
    edges_all = None
    skipped = []
    for bi, bd in enumerate(beam_seq):
        f = f"BeamSequence[{bi}]"
        number = int(ctx.number(bd, "BeamNumber", f))
        name = str(getattr(bd, "BeamName", "") or f"Beam{number}")
        if str(getattr(bd, "TreatmentDeliveryType", "TREATMENT")) != "TREATMENT":
            skipped.append(f"{name}: delivery type {bd.TreatmentDeliveryType}")
            continue
        if str(getattr(bd, "RadiationType", "PHOTON")) != "PHOTON":
            ctx.fail(f"{f}.RadiationType", f"{bd.RadiationType} beams are not supported "
                     "(photons only)")
        for kw in ("NumberOfWedges", "NumberOfCompensators", "NumberOfBlocks"):
            if int(ctx.number(bd, kw, f, default=0)) > 0:
                ctx.fail(f"{f}.{kw}", "wedges, compensators and blocks are not modelled")
        mu_fx = meterset.get(number)
        if mu_fx is None:
            ctx.fail(f"{f}.BeamNumber", f"beam {number} is not in the fraction group")
        if mu_fx <= 0:
            skipped.append(f"{name}: no MU")
            continue
        sad = ctx.number(bd, "SourceAxisDistance", f, default=base.source_axis_distance_mm)
        if abs(sad - base.source_axis_distance_mm) > 1e-3:
            ctx.fail(f"{f}.SourceAxisDistance", f"{sad:g} mm; the dose engine's machine "
                     f"has SAD {base.source_axis_distance_mm:g} mm")
        # beam limiting devices
        n_pairs = None
        edges = None
        for di, dev in enumerate(getattr(bd, "BeamLimitingDeviceSequence", None) or []):
            kind = str(getattr(dev, "RTBeamLimitingDeviceType", ""))
            if kind == "MLCY":
                ctx.fail(f"{f}.BeamLimitingDeviceSequence[{di}].RTBeamLimitingDeviceType",
                         "MLCY (leaves moving along y) is not supported")
            if kind == "MLCX":
                g = f"{f}.BeamLimitingDeviceSequence[{di}]"
                n_pairs = int(ctx.number(dev, "NumberOfLeafJawPairs", g))
                edges = ctx.numbers(dev, "LeafPositionBoundaries", g, n_pairs + 1)
                if np.any(np.diff(edges) <= 0):
                    ctx.fail(f"{g}.LeafPositionBoundaries", "not strictly increasing")
        if edges is not None:
            if edges_all is None:
                edges_all = edges
            elif edges.shape != edges_all.shape or not np.allclose(edges, edges_all):
                ctx.fail(f"{f}.BeamLimitingDeviceSequence", "beams with different MLCs")
        cps = getattr(bd, "ControlPointSequence", None)
        if not cps or len(cps) < 2:
            ctx.fail(f"{f}.ControlPointSequence", "needs at least 2 control points")
        n_cp = len(cps)
        gantry = np.zeros(n_cp)
        coll = np.zeros(n_cp)
        couch = np.zeros(n_cp)
        weight = np.zeros(n_cp)
        jx = np.zeros((n_cp, 2))
        jy = np.zeros((n_cp, 2))
        la = np.full((n_cp, n_pairs or 1), 0.0 if n_pairs else -_OPEN_MM)
        lb = np.full((n_cp, n_pairs or 1), 0.0 if n_pairs else _OPEN_MM)
        iso = None
        state = {}
        for k, cp in enumerate(cps):
            c = f"{f}.ControlPointSequence[{k}]"
            for kw, key in (("GantryAngle", "g"), ("BeamLimitingDeviceAngle", "c"),
                            ("PatientSupportAngle", "s")):
                if getattr(cp, kw, None) not in (None, ""):
                    state[key] = ctx.number(cp, kw, c) % 360.0
                elif key not in state:
                    ctx.fail(f"{c}.{kw}", "missing on the first control point")
            if getattr(cp, "IsocenterPosition", None) not in (None, ""):
                p = ctx.numbers(cp, "IsocenterPosition", c, 3)
                if iso is not None and not np.allclose(p, iso, atol=1e-3):
                    ctx.fail(f"{c}.IsocenterPosition", "the isocentre moves within a beam")
                iso = p
            for pi, pos in enumerate(getattr(cp, "BeamLimitingDevicePositionSequence",
                                             None) or []):
                kind = str(getattr(pos, "RTBeamLimitingDeviceType", ""))
                g = f"{c}.BeamLimitingDevicePositionSequence[{pi}]"
                if kind in ("X", "ASYMX"):
                    state["jx"] = ctx.numbers(pos, "LeafJawPositions", g, 2)
                elif kind in ("Y", "ASYMY"):
                    state["jy"] = ctx.numbers(pos, "LeafJawPositions", g, 2)
                elif kind == "MLCX":
                    if n_pairs is None:
                        ctx.fail(f"{g}.RTBeamLimitingDeviceType", "MLCX positions but no "
                                 "MLCX in the beam's BeamLimitingDeviceSequence")
                    v = ctx.numbers(pos, "LeafJawPositions", g, 2 * n_pairs)
                    if np.any(v[:n_pairs] > v[n_pairs:] + 1e-6):
                        ctx.fail(f"{g}.LeafJawPositions", "a bank A leaf beyond its bank B "
                                 "leaf")
                    state["mlc"] = v
            weight[k] = ctx.number(cp, "CumulativeMetersetWeight", c)
            gantry[k], coll[k], couch[k] = state["g"], state["c"], state["s"]
            for key, dev in (("jx", "X"), ("jy", "Y")):
                if key not in state:
                    state[key] = np.array([-_OPEN_MM, _OPEN_MM])  # no jaw: fully open
            jx[k], jy[k] = state["jx"], state["jy"]
            if jx[k, 0] > jx[k, 1] or jy[k, 0] > jy[k, 1]:
                ctx.fail(f"{c}.BeamLimitingDevicePositionSequence", "jaw 1 beyond jaw 2")
            if n_pairs is not None:
                if "mlc" not in state:
                    ctx.fail(f"{c}.BeamLimitingDevicePositionSequence",
                             "no MLCX positions on the first control point")
                la[k], lb[k] = state["mlc"][:n_pairs], state["mlc"][n_pairs:]
        if iso is None:
            ctx.fail(f"{f}.ControlPointSequence[0].IsocenterPosition", "missing")
        final = ctx.number(bd, "FinalCumulativeMetersetWeight", f, default=weight[-1])
        if final <= 0 or np.any(np.diff(weight) < -1e-9) or weight[0] < -1e-9 or \
                weight[-1] > final * (1 + 1e-6):
            ctx.fail(f"{f}.ControlPointSequence", "cumulative meterset weights must rise "
                     "from 0 to FinalCumulativeMetersetWeight")
        mu = np.maximum.accumulate(np.clip(weight, 0, None)) / final * mu_fx * fractions
        dij = np.zeros(n_cp, dtype=np.int64)
        dose_gantry = arc_dose_angles(gantry)  # close arc control points share a dose beam
        for k in range(n_cp):
            key = (round(dose_gantry[k], 4), round(coll[k], 4), round(couch[k], 4),
                   *np.round(iso, 3))
            if key not in keys:
                keys[key] = len(geometry)
                geometry.append(Beam(float(dose_gantry[k]), float(coll[k]), float(couch[k]),
                                     tuple(iso)))
            dij[k] = keys[key]
        if np.ptp(coll) > 1e-6 or np.ptp(couch) > 1e-6:
            ctx.fail(f"{f}.ControlPointSequence", "collimator or couch rotating during a "
                     "beam is not supported")
        steps = np.abs((np.diff(gantry) + 180.0) % 360.0 - 180.0)
        dmu = np.diff(mu)
        moving = (np.abs(np.diff(la, axis=0)).max(axis=1) > 1e-6) | \
                 (np.abs(np.diff(lb, axis=0)).max(axis=1) > 1e-6)
        kind = "arc" if steps.max() > 1e-6 else (
            "dynamic" if np.any(moving & (dmu > 1e-9)) else "static")
        beams.append(BeamDelivery(name, kind, gantry, float(coll[0]), float(couch[0]), iso,
                                  la, lb, jx, jy, mu, dij,
                                  n_segments=int(np.sum(dmu > 1e-9))))
    if not beams:
        ctx.fail("BeamSequence", "no treatment beam with MU")
    if edges_all is None:  # jaws only: one "pair" spanning the field, leaves retracted
        edges_all = np.array([-_OPEN_MM, _OPEN_MM])
    n = edges_all.size - 1
    fixed = []
    for b in beams:
        if b.leaf_a_mm.shape[1] != n:  # a jaw-only beam in a plan with an MLC
            k = b.n_control_points
            b = replace(b, leaf_a_mm=np.full((k, n), -_OPEN_MM),
                        leaf_b_mm=np.full((k, n), _OPEN_MM))
        fixed.append(b)
    edges = np.array(edges_all, dtype=np.float64)
    edges.setflags(write=False)
    m = replace(base, leaf_edges_mm=edges,
                leaf_position_range_mm=(min(base.leaf_position_range_mm[0], -_OPEN_MM),
                                        max(base.leaf_position_range_mm[1], _OPEN_MM)))
    kinds = {b.kind for b in fixed}
    technique = ("vmat" if "arc" in kinds else "imrt-sliding" if "dynamic" in kinds
                 else "imrt-sns")
    rx = []
    for r in getattr(ds, "DoseReferenceSequence", None) or []:
        v = getattr(r, "TargetPrescriptionDose", None)
        try:
            if v not in (None, "") and float(v) > 0:
                rx.append(float(v))
        except (TypeError, ValueError):
            ctx.fail("DoseReferenceSequence.TargetPrescriptionDose", f"not a number: {v!r}")
    info = {"file": str(path), "label": str(getattr(ds, "RTPlanLabel", "")),
            "plan_prescription_gy": max(rx) if rx else None,
            "sop_instance_uid": str(getattr(ds, "SOPInstanceUID", "")),
            "manufacturer": str(getattr(ds, "Manufacturer", "")),
            "fractions": fractions, "beams": len(fixed), "skipped": skipped,
            "kinds": sorted(kinds), "dose_beams": len(geometry),
            "machine_model": base.name, "leaf_pairs": n}
    return Delivery(technique, m, tuple(fixed), fractions, {"source": "rtplan"}), \
        geometry, info
