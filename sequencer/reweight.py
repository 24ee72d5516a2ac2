"""Aperture MU re-weighting after sequencing (segment-weight optimisation).

Sequencing fixes the leaf positions; the MU of each step-and-shoot segment or arc control
point can still be chosen. This module finds the MU that bring the deliverable dose closest
(least squares) to a reference dose -- normally the ideal dose of the optimised fluence --
over the voxels that matter (reference >= ``threshold`` x its maximum), within the MU
limits: >= 0 per segment, and the machine's MU/degree range per arc control point. The
leaves do not move, so every leaf constraint still holds.

The dose is linear in the MU: each delivery interval (between two control points) gives a
per-MU dose (its sub-apertures, as in :mod:`atp.sequencer.deliverable`, the machine's leaf /
jaw transmission and tongue-and-groove included, so the MU pay for their leakage; the
sparse matrix plus the dij's far-scatter tail, :mod:`atp.dose.far_scatter`, so the basis
is the dose the plan reports), and each interval's MU
is a fixed linear combination of the free MU (arcs: control point k's MU is delivered
half on each side of it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from atp.sequencer.deliverable import aperture_open_fraction, beam_apertures, deliverable_dose
from atp.sequencer.delivery import BeamDelivery, Delivery
from atp.sequencer.vmat import _wrap, control_point_cover_deg
from scipy.optimize import lsq_linear, minimize

from atp.dose.influence import DoseInfluence


def _mu_map(beam: BeamDelivery) -> tuple[np.ndarray, np.ndarray]:
    """(M, v0): interval MU = M @ v for the free MU v (arc: per control point of the
    fluence; sliding-window arc: per sector, ``beam.mu_group``, spread over the sector's
    intervals by their degrees; static/dynamic: per interval), and the current v."""
    dmu = np.diff(beam.cumulative_mu)
    if beam.mu_group is not None:
        group = beam.mu_group
        theta = sector_degrees(beam)
        M = np.zeros((dmu.size, theta.size))
        M[np.arange(dmu.size), group] = _interval_degrees(beam) / np.maximum(theta[group],
                                                                            1e-12)
        return M, np.bincount(group, weights=dmu, minlength=theta.size)
    if beam.kind != "arc":
        on = np.flatnonzero(dmu > 0)
        M = np.zeros((dmu.size, on.size))
        M[on, np.arange(on.size)] = 1.0
        return M, dmu[on]
    n = beam.n_control_points - 2  # fluence control points (two half-step ends added)
    M = np.zeros((n + 1, n))
    M[0, 0] = 0.5
    for k in range(n - 1):
        M[k + 1, k] = M[k + 1, k + 1] = 0.5
    M[n, n - 1] = 0.5
    v0 = np.linalg.lstsq(M, dmu, rcond=None)[0]
    return M, np.maximum(v0, 0.0)


def _interval_degrees(beam: BeamDelivery) -> np.ndarray:
    """Gantry degrees turned in each interval between control points."""
    return np.abs(_wrap(np.diff(beam.gantry_deg)))


def sector_degrees(beam: BeamDelivery) -> np.ndarray:
    """Degrees of each MU sector of a beam with ``mu_group`` (sliding-window arcs)."""
    return np.bincount(beam.mu_group, weights=_interval_degrees(beam))


def dose_rows(dose, threshold: float, max_rows: int) -> np.ndarray:
    """Dose-grid voxel indices the MU fit looks at: dose >= ``threshold`` x its maximum,
    every k-th of them when there are more than ``max_rows`` (none when no dose)."""
    d = np.asarray(dose).reshape(-1)
    top = float(d.max()) if d.size else 0.0
    if top <= 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(d >= threshold * top)
    if rows.size > max_rows:
        rows = rows[:: int(np.ceil(rows.size / max_rows))]
    return rows


def mu_basis(delivery: Delivery, dij: DoseInfluence, rows, *, n_sub: int = 4,
             row_matrix=None):
    """The deliverable dose as a linear function of the free MU, on dose-grid ``rows``.

    Returns ``(B, v0, lo, hi)``: B (len(rows), n_free) Gy per MU, the current free MU v0
    (B @ v0 = the delivery's dose on those rows), and the MU limits per free MU (>= 0 per
    segment; the machine's MU/degree range per arc control point). Free MU: per arc
    control point of the fluence, or per static/dynamic delivery interval with MU.
    ``row_matrix``: ``dij.matrix[rows]`` as CSC when the caller keeps it (selecting the
    rows of a head-and-neck arc dij takes ~0.3 s; a caller that fits the MU again on the
    same rows, such as the fast path's correction passes and sliders, selects once)."""
    if delivery.technique == "imrt-sliding":
        raise ValueError("sliding-window MU set the leaf timing; they are not free")
    m = delivery.machine
    rows = np.asarray(rows, dtype=np.int64)
    if row_matrix is not None:
        if row_matrix.shape != (rows.size, dij.matrix.shape[1]):
            raise ValueError(f"row_matrix has shape {row_matrix.shape}, expected "
                             f"({rows.size}, {dij.matrix.shape[1]}): dij.matrix[rows]")
        mat = row_matrix.tocsc()
    else:
        mat = (dij.matrix[rows] if rows.size < dij.matrix.shape[0] else dij.matrix).tocsc()
    far = None if dij.far is None else \
        dij.far.restrict_rows(rows if rows.size < dij.matrix.shape[0] else None)
    blocks, v0, lo, hi = [], [], [], []
    for b in delivery.beams:
        M, v = _mu_map(b)
        blocks.append(_interval_doses(b, mat, dij.beamlets, m, n_sub, M, far))
        v0.append(v)
        if b.mu_group is not None:
            theta = sector_degrees(b)
            lo.append(m.min_mu_per_deg * theta * delivery.fractions)
            hi.append(m.max_mu_per_deg * theta * delivery.fractions)
        elif b.kind == "arc":
            cover = control_point_cover_deg(b.gantry_deg[1:-1])
            lo.append(m.min_mu_per_deg * cover * delivery.fractions)
            hi.append(m.max_mu_per_deg * cover * delivery.fractions)
        else:
            lo.append(np.zeros(v.size))
            hi.append(np.full(v.size, np.inf))
    return (np.concatenate(blocks, axis=1), np.concatenate(v0), np.concatenate(lo),
            np.concatenate(hi))


def with_mu(delivery: Delivery, free_mu) -> Delivery:
    """A copy of ``delivery`` with the free MU (the order of :func:`mu_basis`) replaced;
    leaves unchanged."""
    v = np.asarray(free_mu, dtype=np.float64)
    beams, i = [], 0
    for b in delivery.beams:
        M, _ = _mu_map(b)
        n = M.shape[1]
        dmu = M @ v[i:i + n]
        i += n
        beams.append(replace(b, cumulative_mu=np.concatenate([[0.0], np.cumsum(dmu)])))
    if i != v.size:
        raise ValueError(f"expected {i} free MU, got {v.size}")
    return replace(delivery, beams=tuple(beams))


def reweight_mu(delivery: Delivery, dij: DoseInfluence, reference_dose, *,
                threshold: float = 0.1, max_rows: int = 60000, n_sub: int = 4) -> Delivery:
    """A copy of ``delivery`` with MU chosen by bounded least squares against
    ``reference_dose`` (Gy on ``dij.dose_grid``, flattened or 3-D)."""
    if delivery.technique == "imrt-sliding":
        return delivery  # sliding-window MU set the leaf timing; nothing free to change
    ref = np.asarray(reference_dose, dtype=np.float64).reshape(-1)
    rows = dose_rows(ref, threshold, max_rows)
    if rows.size == 0:
        return delivery
    A, _, lo, hi = mu_basis(delivery, dij, rows, n_sub=n_sub)
    res = lsq_linear(A, ref[rows], bounds=(lo, hi),
                     method="bvls" if A.shape[1] <= 400 else "trf", lsmr_tol="auto")
    out = with_mu(delivery, np.clip(res.x, lo, hi))
    meta = dict(delivery.meta)
    meta["mu_reweighted"] = True
    return replace(out, meta=meta)


def _interval_doses(beam: BeamDelivery, mat, info, machine, n_sub, M, far=None):
    """(n_rows, n_free) dose per free MU: (dose per interval MU) @ M for ``M``
    (n_intervals, n_free), accumulated without the per-interval array; ``mat``: the
    dij's selected rows (CSC), ``info``: its BeamletInfo, ``far``: the far-scatter
    operator on the same rows (``FarScatter.restrict_rows``) or None."""
    n_int = beam.n_control_points - 1
    out = np.zeros((mat.shape[0], M.shape[1]))
    per_free = None if far is None else np.zeros((info.n_beamlets, M.shape[1]), np.float32)
    unit = replace(beam, cumulative_mu=np.arange(beam.n_control_points, dtype=np.float64))
    ap = beam_apertures(unit, machine.dosimetric_leaf_gap_mm, n_sub)
    moving = (np.abs(np.diff(beam.leaf_a_mm, axis=0)).max(axis=1) > 1e-9) | \
             (np.abs(np.diff(beam.leaf_b_mm, axis=0)).max(axis=1) > 1e-9) | \
             (np.diff(beam.dij_beam) != 0)
    owner = np.repeat(np.arange(n_int), np.where(moving, n_sub, 1))
    for d in np.unique(ap["dij_beam"]):
        cols = info.columns_of_beam(int(d))
        sel = np.flatnonzero(ap["dij_beam"] == d)
        frac = aperture_open_fraction(info.bev_x_mm[cols], info.bev_y_mm[cols],
                                      info.beamlet_size_mm, machine.leaf_edges_mm,
                                      ap["left"][sel], ap["right"][sel], ap["jaw_x"][sel],
                                      ap["jaw_y"][sel], machine.transmission)
        w = frac * ap["mu"][sel, None]
        out += np.asarray(mat[:, cols] @ w.T) @ M[owner[sel]]
        if per_free is not None:
            per_free[cols] += w.T @ M[owner[sel]]
    if per_free is not None:
        out += far.apply_many(per_free)
    return out


def optimise_mu(delivery: Delivery, dij: DoseInfluence, value_grad, *,
                threshold: float = 0.1, max_rows: int = 60000, max_iter: int = 40,
                n_sub: int = 4, rows=None, row_matrix=None) -> tuple[Delivery, dict]:
    """Control-point / segment MU minimising a plan objective J of the deliverable dose.

    The least-squares fit of :func:`reweight_mu` treats a hot spot like a cold spot; here
    the free MU minimise J itself (segment-weight optimisation, the weight step of direct
    aperture optimisation)::

        min_v  J(D_now + B (v - v0))   s.t.  lo <= v <= hi

    with B the dose per MU on the dose-grid voxels receiving at least ``threshold`` x the
    maximum dose (:func:`mu_basis`; the other voxels keep their dose), by L-BFGS-B on the
    few hundred free MU. ``value_grad(dose)``: J and dJ/dD (NumPy, flattened dose grid,
    Gy) -- any objective, e.g. the fast path's error-map objective. The leaves do not
    move, so every MLC constraint still holds. Returns (delivery, info); the input
    delivery when J does not decrease.

    rows: the dose-grid voxels J reads, when the caller knows them (e.g. the fast path's
    ``HotColdObjective.voxel_support()``): B is built on exactly those rows and the
    dose J sees is exact (0 elsewhere, where J does not look), with no full deliverable
    dose and no threshold. ``row_matrix``: ``dij.matrix[rows]`` (rows sorted and
    unique), when the caller keeps it (:func:`mu_basis`).
    """
    if delivery.technique == "imrt-sliding":
        return delivery, {"iterations": 0, "kept": False, "reason": "sliding window"}

    if rows is None:
        if row_matrix is not None:
            raise ValueError("row_matrix needs the rows it was selected on")
        now = np.asarray(deliverable_dose(delivery, dij, n_sub), np.float32).reshape(-1)
        rows = dose_rows(now, threshold, max_rows)
        if rows.size == 0:
            return delivery, {"iterations": 0, "kept": False, "reason": "no dose"}
        B, v0, lo, hi = mu_basis(delivery, dij, rows, n_sub=n_sub)
        now_rows = now[rows].astype(np.float64)
        dose = now.copy()  # float32 work array: only ``rows`` change
    else:
        rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if rows.size == 0:
            return delivery, {"iterations": 0, "kept": False, "reason": "no rows"}
        B, v0, lo, hi = mu_basis(delivery, dij, rows, n_sub=n_sub, row_matrix=row_matrix)
        now_rows = B @ v0  # the delivery's dose on the rows J reads
        dose = np.zeros(dij.matrix.shape[0], np.float32)

    def fun(v):
        dose[rows] = now_rows + B @ (v - v0)
        j, g = value_grad(dose)
        return float(j), B.T @ np.asarray(g, np.float64).reshape(-1)[rows]

    start = np.clip(v0, lo, hi)
    j0, _ = fun(start)
    res = minimize(fun, start, jac=True, method="L-BFGS-B",
                   bounds=list(zip(lo, np.where(np.isfinite(hi), hi, None))),
                   options={"maxiter": int(max_iter)})
    info = {"iterations": int(res.nit), "objective_before": j0,
            "objective_after": float(min(res.fun, j0)), "kept": bool(res.fun < j0)}
    if not res.fun < j0:
        return delivery, info
    out = with_mu(delivery, np.clip(res.x, lo, hi))
    meta = dict(out.meta)
    meta["mu_optimised"] = True
    return replace(out, meta=meta), info
