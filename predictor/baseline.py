"""Instant non-deep-learning predictors: the distance baseline and the mean-dose floor.

``DistanceBaseline`` ("baseline")
    Dose is modelled as ``max over targets t of Rx_t * f_g(d_t)`` where ``d_t`` is the
    signed distance (mm, negative inside) from a voxel to the surface of target ``t``,
    ``Rx_t`` its prescription (Gy) and ``f_g`` a learnt piecewise-linear curve (fraction
    of the prescription). Two curves are learnt: ``g = primary`` for the highest-dose
    target and ``g = secondary`` for every lower-dose target. The result is clipped to
    the body. Fitting takes a sample of body voxels from each training patient and
    alternates two steps a few times: assign each voxel to the target that currently
    explains it (largest predicted dose), then set every curve bin to the median of
    ``reference dose / Rx`` of the voxels assigned to it (median: the OpenKBP dose score
    is a mean absolute error). Finally, one factor per organ-at-risk name (e.g.
    ``Parotid_L``) is learnt: the median of reference / predicted dose over that organ's
    sampled voxels outside every target; prediction multiplies the organ's non-target
    voxels by it (planners spare organs below what distance alone suggests). Works on
    any patient with prescriptions and target masks; unknown organ names get no factor.

``MeanDosePredictor`` ("mean-dose")
    The reference floor: one constant, the mean training dose over all voxels inside
    the possible-dose (body) masks, everywhere in the body.

Both store their few fitted numbers as JSON in ``predictor/weights/``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from atp.predictor.base import finalize_dose, reference_dose_gy, require_prescriptions
from atp.predictor.data import iter_split
from scipy import ndimage

from atp.errors import InputError
from atp.outputs import write_json
from atp.patient import Patient

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASELINE_WEIGHTS = WEIGHTS_DIR / "baseline.json"
MEAN_DOSE_WEIGHTS = WEIGHTS_DIR / "mean_dose.json"
GROUPS = ("primary", "secondary")


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def signed_distance_mm(mask: np.ndarray, spacing_mm, region: np.ndarray | None = None,
                       ) -> np.ndarray:
    """Signed Euclidean distance (mm) to the surface of ``mask``: < 0 inside, > 0 outside.

    Distances are measured between voxel centres (a voxel just outside the mask is one
    spacing away; a voxel on the inner border is -spacing). When ``region`` is given
    the transform only runs on the bounding box of ``region | mask`` (faster; the
    values inside ``region`` are the same because the mask lies inside the box).
    Voxels outside the box get +inf.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    out = np.full(mask.shape, np.inf, dtype=np.float32)
    box = _bbox(mask | region if region is not None else np.ones_like(mask), 1)
    m = mask[box]
    outside = ndimage.distance_transform_edt(~m, sampling=spacing)
    inside = ndimage.distance_transform_edt(m, sampling=spacing)
    out[box] = np.where(m, -inside, outside).astype(np.float32)
    return out


@dataclass
class DistanceBaseline:
    """Dose from signed distances to the targets (see the module docstring).

    bin_width_mm / d_min_mm / d_max_mm: the curve knots; distances beyond are clamped.
    samples_per_patient: body voxels drawn per training patient; seed: their RNG seed.
    iterations: assignment / refit rounds.
    """

    bin_width_mm: float = 2.0
    d_min_mm: float = -30.0
    d_max_mm: float = 120.0
    samples_per_patient: int = 40000
    seed: int = 0
    iterations: int = 3
    organ_factors: bool = True
    min_organ_samples: int = 200
    name: str = "baseline"

    def __post_init__(self) -> None:
        self.organ_factors_: dict[str, float] = {}
        self.knots_mm_: np.ndarray | None = None
        self.curves_: dict[str, np.ndarray] | None = None
        self.n_train_: int = 0

    # --- features -------------------------------------------------------------------
    def _distances(self, patient: Patient) -> tuple[list[np.ndarray], list[float]]:
        require_prescriptions(patient, self.name)
        body = patient.body_mask
        ds, rx = [], []
        for p in patient.prescriptions:
            ds.append(signed_distance_mm(patient.mask(p.target), patient.grid.spacing_mm,
                                         region=body))
            rx.append(p.dose_gy)
        return ds, rx

    def _curve_at(self, group: str, d: np.ndarray) -> np.ndarray:
        d = np.clip(d, self.knots_mm_[0], self.knots_mm_[-1])
        return np.interp(d, self.knots_mm_, self.curves_[group]).astype(np.float32)

    # --- learning -------------------------------------------------------------------
    def fit(self, patients: Iterable[Patient]) -> DistanceBaseline:
        rng = np.random.default_rng(self.seed)
        knots = np.arange(self.d_min_mm, self.d_max_mm + 0.5 * self.bin_width_mm,
                          self.bin_width_mm)
        n_t = 0
        dist_rows, rx_rows, dose_rows = [], [], []
        organ_rows: dict[str, list[np.ndarray]] = {}
        offset = 0
        max_targets = 1
        for patient in patients:
            dose = reference_dose_gy(patient)
            ds, rx = self._distances(patient)
            body_idx = np.flatnonzero(patient.body_mask)
            take = rng.choice(body_idx, size=min(self.samples_per_patient, body_idx.size),
                              replace=False)
            dist_rows.append(np.stack([d.ravel()[take] for d in ds], axis=1))
            rx_rows.append(np.asarray(rx, dtype=np.float32))
            dose_rows.append(dose.ravel()[take])
            if self.organ_factors:
                for organ in patient.organs:
                    inside = np.flatnonzero(patient.mask(organ).ravel()[take])
                    organ_rows.setdefault(organ, []).append(inside + offset)
            offset += take.size
            max_targets = max(max_targets, len(rx))
            n_t += 1
        if n_t == 0:
            raise InputError("no training patients", field="patients")
        # pad to a fixed number of targets (missing targets: infinitely far, Rx 0)
        D, R, Y = [], [], []
        for d, r, y in zip(dist_rows, rx_rows, dose_rows):
            pad = max_targets - d.shape[1]
            D.append(np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf))
            R.append(np.broadcast_to(np.pad(r, (0, pad)), (d.shape[0], max_targets)))
            Y.append(y)
        D = np.clip(np.concatenate(D), knots[0], knots[-1])
        R = np.concatenate(R).astype(np.float32)
        Y = np.concatenate(Y).astype(np.float32)
        nbins = knots.size
        bin_idx = np.clip(np.rint((D - knots[0]) / self.bin_width_mm).astype(np.int64),
                          0, nbins - 1)
        group_of_col = np.array([0] + [1] * (max_targets - 1))
        # start: each voxel explained by its nearest (in mm) prescribed target
        Dm = np.where(R > 0, D, np.inf)
        owner = np.argmin(Dm, axis=1)
        curves = {g: np.zeros(nbins, dtype=np.float64) for g in GROUPS}
        rows = np.arange(Y.size)
        for _ in range(max(1, self.iterations)):
            col_bin = bin_idx[rows, owner]
            frac = Y / np.maximum(R[rows, owner], 1e-6)
            grp = group_of_col[owner]
            for gi, g in enumerate(GROUPS):
                sel = grp == gi
                curves[g] = _monotone(_binned_median(
                    col_bin[sel], frac[sel], nbins,
                    fallback=curves[GROUPS[0]] if gi else None), knots)
            # reassign: the target giving the largest predicted dose explains the voxel
            pred = np.stack([np.where(R[:, j] > 0, R[:, j] * np.interp(
                D[:, j], knots, curves[GROUPS[group_of_col[j]]]), -1.0)
                for j in range(max_targets)], axis=1)
            owner = np.argmax(pred, axis=1)
        self.knots_mm_ = knots
        self.curves_ = {g: np.asarray(c, dtype=np.float64) for g, c in curves.items()}
        self.n_train_ = n_t
        # organ factors: median of reference / distance prediction over the organ's
        # sampled voxels outside every target (where the prediction is >= 1 Gy)
        self.organ_factors_ = {}
        if self.organ_factors and organ_rows:
            base = np.max(np.where(R > 0, R * np.stack(
                [np.interp(D[:, j], knots, curves[GROUPS[group_of_col[j]]])
                 for j in range(max_targets)], axis=1), 0.0), axis=1)
            outside = np.all(D > 0, axis=1) & (base >= 1.0)
            for organ, parts in sorted(organ_rows.items()):
                idx = np.concatenate(parts)
                idx = idx[outside[idx]]
                if idx.size >= self.min_organ_samples:
                    f = float(np.median(Y[idx] / base[idx]))
                    self.organ_factors_[organ] = float(np.clip(f, 0.3, 1.5))
        return self

    # --- prediction -----------------------------------------------------------------
    def predict(self, patient: Patient) -> np.ndarray:
        if self.curves_ is None:
            self.load()
        ds, rx = self._distances(patient)
        out = np.zeros(patient.grid.shape, dtype=np.float32)
        for i, (d, r) in enumerate(zip(ds, rx)):
            group = GROUPS[0] if i == 0 else GROUPS[1]
            np.maximum(out, r * self._curve_at(group, d), out=out)
        if self.organ_factors_:
            in_target = patient.prescription_map_gy() > 0
            for organ in patient.organs:
                f = self.organ_factors_.get(organ)
                if f is not None:
                    m = patient.mask(organ) & ~in_target
                    out[m] *= np.float32(f)
        return finalize_dose(out, patient)

    # --- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.curves_ is None:
            raise InputError("baseline is not fitted", field="curves")
        return {"model": "distance-baseline", "version": 1, "n_train_patients": self.n_train_,
                "knots_mm": np.round(self.knots_mm_, 4).tolist(),
                "curves_fraction_of_rx": {g: np.round(c, 5).tolist()
                                          for g, c in self.curves_.items()},
                "organ_factors": {k: round(v, 5) for k, v in self.organ_factors_.items()}}

    def save(self, path: str | Path = BASELINE_WEIGHTS) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    def load(self, path: str | Path = BASELINE_WEIGHTS) -> DistanceBaseline:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            knots = np.asarray(data["knots_mm"], dtype=np.float64)
            curves = {g: np.asarray(data["curves_fraction_of_rx"][g], dtype=np.float64)
                      for g in GROUPS}
            organ_factors = {str(k): float(v)
                             for k, v in data.get("organ_factors", {}).items()}
        except FileNotFoundError:
            raise InputError("baseline weights not found; run "
                             "`python -m atp.predictor.baseline --fit`", file=path) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"malformed baseline weights: {exc}", file=path) from None
        if knots.ndim != 1 or knots.size < 2 or np.any(np.diff(knots) <= 0) or any(
                c.shape != knots.shape or not np.all(np.isfinite(c)) for c in curves.values()):
            raise InputError("baseline knots/curves are inconsistent", file=path,
                             field="curves_fraction_of_rx")
        if not all(np.isfinite(v) and v > 0 for v in organ_factors.values()):
            raise InputError("organ factors must be finite and > 0", file=path,
                             field="organ_factors")
        self.knots_mm_, self.curves_ = knots, curves
        self.organ_factors_ = organ_factors
        self.n_train_ = int(data.get("n_train_patients", 0))
        return self


def _monotone(curve: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Outside the target (distance >= 0) dose may only fall with distance."""
    out = np.array(curve, dtype=float)
    k = int(np.searchsorted(knots, 0.0))
    out[k:] = np.minimum.accumulate(out[k:])
    return out


def _binned_median(bins: np.ndarray, values: np.ndarray, nbins: int,
                   fallback: np.ndarray | None) -> np.ndarray:
    """Median of ``values`` per bin; empty bins take the neighbours' (or fallback) values."""
    out = np.full(nbins, np.nan)
    if bins.size:
        order = np.lexsort((values, bins))
        b, v = bins[order], values[order]
        starts = np.searchsorted(b, np.arange(nbins), side="left")
        ends = np.searchsorted(b, np.arange(nbins), side="right")
        for i in range(nbins):
            n = ends[i] - starts[i]
            if n >= 20:
                seg = v[starts[i]:ends[i]]
                out[i] = 0.5 * (seg[(n - 1) // 2] + seg[n // 2])
    good = np.isfinite(out)
    if not good.any():
        return np.array(fallback if fallback is not None else np.zeros(nbins), dtype=float)
    idx = np.arange(nbins)
    return np.interp(idx, idx[good], out[good])


@dataclass
class MeanDosePredictor:
    """The floor: the mean training dose (Gy) over possible-dose voxels, everywhere in body."""

    name: str = "mean-dose"

    def __post_init__(self) -> None:
        self.mean_dose_gy_: float | None = None
        self.n_train_: int = 0

    def fit(self, patients: Iterable[Patient]) -> MeanDosePredictor:
        total, count, n = 0.0, 0, 0
        for patient in patients:
            dose = reference_dose_gy(patient)
            body = patient.body_mask
            total += float(dose[body].sum(dtype=np.float64))
            count += int(body.sum())
            n += 1
        if count == 0:
            raise InputError("no training voxels", field="patients")
        self.mean_dose_gy_, self.n_train_ = total / count, n
        return self

    def predict(self, patient: Patient) -> np.ndarray:
        if self.mean_dose_gy_ is None:
            self.load()
        return finalize_dose(np.full(patient.grid.shape, self.mean_dose_gy_, np.float32),
                             patient)

    def save(self, path: str | Path = MEAN_DOSE_WEIGHTS) -> Path:
        write_json(path, {"model": "mean-dose", "version": 1, "n_train_patients": self.n_train_,
                          "mean_dose_gy": self.mean_dose_gy_})
        return Path(path)

    def load(self, path: str | Path = MEAN_DOSE_WEIGHTS) -> MeanDosePredictor:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            value = float(data["mean_dose_gy"])
        except FileNotFoundError:
            raise InputError("mean-dose weights not found", file=path) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"malformed mean-dose weights: {exc}", file=path) from None
        if not (np.isfinite(value) and value >= 0):
            raise InputError("mean dose must be a finite value >= 0 Gy", file=path,
                             field="mean_dose_gy")
        self.mean_dose_gy_, self.n_train_ = value, int(data.get("n_train_patients", 0))
        return self


def _main(argv=None) -> int:  # pragma: no cover - exercised by hand / by the lead

    ap = argparse.ArgumentParser(description="fit the baseline and mean-dose predictors")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "openkbp"))
    ap.add_argument("--fit", action="store_true", required=True)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N patients")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    pats = list(iter_split(args.data, "train", limit=args.limit))
    t1 = time.perf_counter()
    b = DistanceBaseline().fit(pats)
    t2 = time.perf_counter()
    m = MeanDosePredictor().fit(pats)
    print(f"loaded {len(pats)} patients in {t1 - t0:.1f} s; baseline fit {t2 - t1:.1f} s")
    print("saved", b.save(), m.save())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
