"""Forward dose of a delivery: an RT Plan (ours or another system's) on a patient's CT.

``forward_dose(patient, delivery, beams)``: for every dose beam (a static field, or one
arc control point) a dij is computed over the beam's whole jaw opening (every control
point's jaws, plus ``margin_mm``), not only over the targets, so the leakage through
closed leaves and jaws under the whole field is in the dose; then the delivery's
beamlet weights come from :func:`atp.sequencer.deliverable.delivered_weights` -- the same
function the planning pipeline's deliverable dose uses (leaf / jaw transmission,
tongue-and-groove, DLG from the machine model). ``rt_plan_dose(plan_path, patient)``
reads the plan first (:func:`atp.sequencer.rtplan.read_rt_plan`). ``closed_field_transmission``
is the commissioning check of the MLC (an all-leaves-closed field under 10x10 jaws through
this code path, relative to the open 10x10 field, at 10 cm depth in water).

Limits: the dose engine's (pencil beam, its beam model); a beamlet is the smallest detail
(5 mm): the dose of a leaf tip or a tongue-and-groove strip is averaged over the beamlet;
the dose grid is the CT down-sampled by ``dose_grid_factor`` and interpolated back.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from atp.dose import registry as engines
from atp.dose.commission import water_phantom
from atp.dose.far_scatter import FarScatter
from atp.dose.geometry import Beam, resolve_beams
from atp.dose.influence import BeamletInfo, DoseInfluence
from atp.errors import InputError
from atp.patient import Role, Structure
from atp.sequencer.deliverable import deliverable_dose, delivered_weights
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.machine import Machine, load_machine
from atp.sequencer.rtplan import read_rt_plan
from atp.xp import host_map


def _field_points(frame, jaw_x, jaw_y, step_mm: float) -> np.ndarray:
    """Points (LPS mm) on the isocentre plane filling the jaw rectangle."""
    u = np.arange(jaw_x[0], jaw_x[1] + step_mm, step_mm)
    v = np.arange(jaw_y[0], jaw_y[1] + step_mm, step_mm)
    uu, vv = np.meshgrid(np.clip(u, jaw_x[0], jaw_x[1]), np.clip(v, jaw_y[0], jaw_y[1]))
    return frame.iso_plane_point(uu.ravel(), vv.ravel())


def _jaw_rects(delivery, n_beams: int) -> list[list]:
    """Per dose beam, the jaw rectangles (x, y) of the control points that deliver MU."""
    rects: list[list] = [[] for _ in range(n_beams)]
    for b in delivery.beams:
        dmu = np.diff(b.cumulative_mu)
        for k in range(b.n_control_points):
            near = (k > 0 and dmu[k - 1] > 0) or (k < dmu.size and dmu[k] > 0)
            if near:
                rects[int(b.dij_beam[k])].append((b.jaw_x_mm[k], b.jaw_y_mm[k]))
    return rects


def _field_key(g, beam, jx, jy, engine, *settings) -> tuple:
    """What a dose beam's jaw-field beamlets depend on (:func:`field_influence`'s cache;
    an engine given as a spec or an object by its repr)."""
    return (g, engine if isinstance(engine, str) else repr(engine), *settings,
            beam.gantry_deg, beam.collimator_deg, beam.couch_deg,
            tuple(np.asarray(beam.isocenter_mm, float).tolist()),
            tuple(sorted({(tuple(np.asarray(x, float).tolist()),
                           tuple(np.asarray(y, float).tolist())) for x, y in zip(jx, jy)})))


def field_influence(patient, delivery, beams, *, engine="pencil-beam",
                    dose_grid_factor: int = 2, beamlet_size_mm: float = 5.0,
                    margin_mm: float = 5.0, threshold=None, progress=None,
                    cache: dict | None = None, only=None) -> DoseInfluence:
    """A dij whose beamlets cover every dose beam's jaw openings (``delivery.beams``'
    control points, ``beams`` the dose beams their ``dij_beam`` indexes); ``only``: just
    these dose beams' (indices into ``beams``; the others get no beamlets). cache: a dict
    kept by the caller for one patient; a dose beam whose jaw openings and settings are
    those of an earlier call reuses that call's beamlets (the planning pipeline computes
    the field dose again after a correction round, mostly with the same jaws)."""
    eng = engines.get(engine)
    beams = resolve_beams(patient, beams)
    rects = _jaw_rects(delivery, len(beams))
    grid = patient.grid
    step = 0.5 * float(np.min(grid.spacing_mm))
    t0 = time.perf_counter()
    kw = {} if threshold is None else {"threshold": float(threshold)}
    used: set = set()  # the cache keeps the latest call's beams only (bounded memory)

    def one(g):
        beam = beams[g]
        jx = np.array([r[0] for r in rects[g]])
        jy = np.array([r[1] for r in rects[g]])
        key = None
        if cache is not None:
            key = _field_key(g, beam, jx, jy, engine, dose_grid_factor, beamlet_size_mm,
                             margin_mm, threshold)
            used.add(key)
            if key in cache:
                return cache[key]
        frame = beam.frame()
        pts = np.concatenate([_field_points(frame, x, y, step) for x, y in
                              {(tuple(x), tuple(y)) for x, y in zip(jx, jy)}])
        idx = np.rint(grid.patient_to_index(pts)).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
        mask = np.zeros(grid.shape, dtype=bool)
        mask[tuple(idx[inside].T)] = True
        if not mask.any():
            raise InputError(f"dose beam {g} (gantry {beam.gantry_deg:g}): its field "
                             "misses the CT", field="IsocenterPosition")
        field = "_atp_field"
        p = patient.with_structures({field: Structure(field, mask, Role.CONTROL)})
        d = eng.influence(p, [beam], beamlet_size_mm=beamlet_size_mm,
                          dose_grid_factor=dose_grid_factor, margin_mm=margin_mm,
                          targets=[field], **kw)
        if key is not None:
            cache[key] = d
        return d

    todo = [g for g in range(len(beams)) if rects[g] and (only is None or g in only)]
    # the dose beams are independent: on the CPU in threads, in order
    on_cpu = getattr(eng, "device", "cpu") == "cpu"
    parts = list(zip(todo, host_map(one, todo) if on_cpu else [one(g) for g in todo]))
    if cache is not None:
        for k in [k for k in cache if k not in used]:
            del cache[k]
    if progress is not None:
        for g in todo:
            progress(g + 1, len(beams))
    first = parts[0][1]
    mats = [d.matrix for _, d in parts]
    bi = np.concatenate([np.full(d.n_beamlets, g, np.int32) for g, d in parts])
    info = BeamletInfo(bi, [b.gantry_deg for b in beams], [b.collimator_deg for b in beams],
                       [b.couch_deg for b in beams], [b.isocenter_mm for b in beams],
                       np.concatenate([d.beamlets.bev_x_mm for _, d in parts]),
                       np.concatenate([d.beamlets.bev_y_mm for _, d in parts]),
                       first.beamlets.beamlet_size_mm)
    meta = dict(first.meta)
    meta.update({"beamlets": "jaw field of every control point + margin",
                 "seconds": round(time.perf_counter() - t0, 3)})
    meta.pop("targets", None)
    far = FarScatter.hstack([(d.far, d.n_beamlets) for _, d in parts], first.n_voxels)
    return DoseInfluence(sp.hstack(mats, format="csc"), info, first.dose_grid,
                         first.patient_grid, meta, far=far)


def forward_dose(patient, delivery, beams, *, engine="pencil-beam",
                 dose_grid_factor: int = 2, beamlet_size_mm: float = 5.0,
                 margin_mm: float = 5.0, threshold=None, progress=None,
                 cache: dict | None = None, per_beam: list | None = None):
    """(dose_gy on the patient grid, total course; the dij) of ``delivery``; cache: see
    :func:`field_influence`; per_beam: a list that gets each delivery beam's delivered
    weights on the dij's beamlets (:func:`atp.sequencer.deliverable.delivered_weights`)."""
    dij = field_influence(patient, delivery, beams, engine=engine,
                          dose_grid_factor=dose_grid_factor,
                          beamlet_size_mm=beamlet_size_mm, margin_mm=margin_mm,
                          threshold=threshold, progress=progress, cache=cache)
    return dij.to_patient_grid(deliverable_dose(delivery, dij, per_beam=per_beam)), dij


#: dose beams per group in :func:`forward_dose_grouped` (a VMAT plan has one per control
#: point: 120 jaw-field dijs at once took pt_100's reported dose from 8 to 14 GB)
FORWARD_GROUP_BEAMS = 8


def forward_dose_grouped(patient, delivery, beams, *, group: int = FORWARD_GROUP_BEAMS,
                         **kw) -> tuple[np.ndarray, int]:
    """(dose_gy on the patient grid, jaw-field beamlets) of ``delivery`` as
    :func:`forward_dose` computes it, without holding every dose beam's jaw-field dij at
    once: ``group`` dose beams at a time, each group's dij applied to its delivered
    weights and dropped. The same dose but for the order of the float32 sums (the
    beams are independent and the far-scatter tail is linear in each beam's weights).
    ``kw``: :func:`forward_dose`'s options (no cache)."""
    beams = resolve_beams(patient, beams)
    rects = _jaw_rects(delivery, len(beams))
    total, n = None, 0
    for g0 in range(0, len(beams), max(1, int(group))):
        only = set(range(g0, min(g0 + int(group), len(beams))))
        if not any(rects[g] for g in only):
            continue
        dij = field_influence(patient, delivery, beams, only=only, **kw)
        d = dij.dose(delivered_weights(delivery, dij.beamlets))
        total = d if total is None else total + d
        n += dij.n_beamlets
    if total is None:
        raise InputError("the delivery delivers no MU", field="delivery")
    return dij.to_patient_grid(total), n  # every group's dij: the same dose grid


def rt_plan_dose(plan_path, patient, *, machine="millennium120", **kw):
    """Read an RT Plan and compute its dose on ``patient``: (dose_gy, delivery, info)."""
    delivery, beams, info = read_rt_plan(plan_path, machine)
    for b in delivery.beams:
        iso = b.isocenter_mm
        if not patient.grid.contains_point(iso):
            raise InputError(f"beam {b.name}: isocentre ({', '.join(f'{v:.1f}' for v in iso)})"
                             f" mm lies outside the patient's CT", file=str(plan_path),
                             field="IsocenterPosition")
    if any(b.kind == "arc" for b in delivery.beams):  # a dose beam per control point
        dose, n = forward_dose_grouped(patient, delivery, beams, **kw)
    else:
        dose, dij = forward_dose(patient, delivery, beams, **kw)
        n = dij.n_beamlets
    info = dict(info, total_mu=round(delivery.total_mu, 3),
                mu_per_fraction=round(delivery.total_mu / delivery.fractions, 3),
                beamlets=int(n), dose_max_gy=round(float(dose.max()), 4))
    return dose, delivery, info


def closed_field_transmission(machine="millennium120", *, depth_mm: float = 100.0,
                              field_mm: float = 100.0, engine="pencil-beam",
                              phantom_mm: float = 200.0) -> dict:
    """The MLC transmission measured end to end: every leaf pair closed (tips at the
    minimum gap, 1 cm inside the X1 jaw edge) and the open field, both under
    ``field_mm`` square jaws, gantry 0, SSD 100 cm in water, through
    :func:`forward_dose`'s dij and delivered weights (a ``phantom_mm`` water cube of
    5 mm voxels, dose on 10 mm); their dose ratio at ``depth_mm`` (the mean over 3 x 3 cm
    about the central axis, away from the closed-gap line)."""
    m = machine if isinstance(machine, Machine) else load_machine(machine)
    phantom = water_phantom(size_mm=(phantom_mm,) * 3, spacing_mm=(5.0, 5.0, 5.0))
    half = field_mm / 2.0
    n = m.n_pairs
    jaws_x = np.array([[-half, half]] * 2)
    jaws_y = np.array([[-half, half]] * 2)
    gap = m.min_leaf_gap_mm
    x_meet = -half + 10.0
    closed = (np.full((2, n), x_meet - gap / 2), np.full((2, n), x_meet + gap / 2))
    opened = (np.full((2, n), -half - 20.0), np.full((2, n), half + 20.0))
    iso = (0.0, 0.0, 0.0)
    deliveries = {}
    for name, (a, b) in (("closed", closed), ("open", opened)):
        beam = BeamDelivery(name, "static", np.zeros(2), 0.0, 0.0, np.array(iso), a, b,
                            jaws_x, jaws_y, np.array([0.0, 100.0]), np.zeros(2, int), 1)
        deliveries[name] = Delivery("imrt-sns", m, (beam,), 1)
    # one dij over the (same) jaw field serves both deliveries
    dij = field_influence(phantom, deliveries["open"], [Beam(0.0, 0.0, 0.0, iso)],
                          engine=engine, dose_grid_factor=2)
    out = {name: dij.to_patient_grid(deliverable_dose(d, dij))
           for name, d in deliveries.items()}
    g = phantom.grid
    pts = g.voxel_centres_mm().reshape(*g.shape, 3)
    region = ((np.abs(pts[..., 0]) <= 15.0) & (np.abs(pts[..., 2]) <= 15.0)
              & (np.abs(pts[..., 1] - depth_mm) <= g.spacing_mm[1] / 2 + 1e-6))
    ratio = float(out["closed"][region].mean() / out["open"][region].mean())
    return {"machine": m.name, "setup": f"{field_mm / 10:g}x{field_mm / 10:g} cm2 jaws, "
            "SSD 100 cm, water, all leaves closed vs open, through atp dose",
            "depth_cm": depth_mm / 10.0,
            "transmission_percent": round(100.0 * ratio, 3),
            "machine_leaf_transmission_percent": round(100.0 * m.leaf_transmission, 3),
            "machine_jaw_transmission_percent": round(100.0 * m.jaw_transmission, 3),
            "goal_percent": [1.0, 2.0]}
