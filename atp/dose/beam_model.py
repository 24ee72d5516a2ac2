"""The 6 MV finite-size pencil-beam kernel: a small parameterisation fitted to water data.

Dose per MU at a point from a rectangular beamlet (edges ``u0..u1`` x ``v0..v1`` mm at
the isocentre plane) is

    D = k_cal * T(d) * (SAD / s)^2 * sum_k w_k(d) * F(u; u0, u1, sigma_k') * F(v; v0, v1, sigma_k')

* ``d``: radiological depth (mm of water) from the surface along the ray; ``s``: the
  point's distance from the source along the beam axis (mm); ``(u, v)``: its BEV
  position projected to the isocentre plane.
* ``T(d) = (1 - exp(-beta d)) exp(-mu d) (1 + gamma d)``: build-up (charged-particle
  equilibrium) times attenuation, with a linear term for the in-phantom scatter build-up
  that a single exponential misses: the broad-beam depth term.
* two Gaussian lateral components: a narrow "primary" one (sigma_1 = a1 + b1 d: source
  size, penumbra, electron transport) and a wide "scatter" one (sigma_2 = a2 + b2 d) with
  weight ``w_2(d) = w0 + w1 d`` (phantom scatter grows with depth); w_1 = 1 - w_2.
  ``sigma_k' = sigma_k * SAD / s`` is the width projected to the isocentre plane.
* ``F(u; u0, u1, sigma) = (erf((u - u0) / (sqrt2 sigma)) - erf((u - u1) / (sqrt2 sigma))) / 2``
  is the exact integral of a normalised Gaussian over the beamlet's width, so a field
  made of adjacent beamlets equals the same field computed as one rectangle.
* ``k_cal`` (Gy/MU) is set so that a 10 x 10 cm^2 field at SSD 100 cm in water gives
  0.01 Gy/MU at the depth of maximum dose (the usual linac calibration, 1 cGy/MU).

The parameters live in ``atp/data/photon_6mv.json`` beside the reference data they were
fitted to (``benchmarks/fit_beam_model.py`` redoes the fit); every number's source is
written there. This is the usual structure of analytical pencil-beam models (Bortfeld
et al. 1993 Med Phys 20:311; Ahnesjo & Trepp 1991 Acta Oncol 30:403, in simplified
form): no field-size dependent head scatter, no electron contamination, no
density-scaled lateral spread.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atp.errors import InputError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "photon_6mv.json"
_SQRT2 = math.sqrt(2.0)


def erf_for(xp):
    """The erf function of an array module (scipy for numpy, cupyx for cupy)."""
    if xp is np:
        from scipy.special import erf

        return erf
    from cupyx.scipy.special import erf  # pragma: no cover - GPU only

    return erf


@dataclass(frozen=True)
class PhotonBeamModel:
    """Kernel parameters (mm, 1/mm) of one photon beam quality; see module docstring."""

    buildup_per_mm: float
    attenuation_per_mm: float
    sigma_primary_mm: tuple[float, float]  # (a1, b1): sigma_1(d) = a1 + b1 * d
    sigma_scatter_mm: tuple[float, float]  # (a2, b2)
    scatter_weight: tuple[float, float]  # (w0, w1): w_2(d) = w0 + w1 * d
    sad_mm: float = 1000.0
    name: str = "6MV"
    reference: dict = field(default_factory=dict, compare=False, repr=False)
    calibration_gy_per_mu: float = 0.01
    calibration_field_mm: float = 100.0
    calibration_ssd_mm: float = 1000.0
    depth_linear_per_mm: float = 0.0  # gamma in T(d)

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, *, source: str | None = None) -> PhotonBeamModel:
        try:
            p = d["parameters"]
            cal = d.get("calibration", {})
            return cls(float(p["buildup_per_mm"]), float(p["attenuation_per_mm"]),
                       tuple(float(v) for v in p["sigma_primary_mm"]),
                       tuple(float(v) for v in p["sigma_scatter_mm"]),
                       tuple(float(v) for v in p["scatter_weight"]),
                       float(d.get("sad_mm", 1000.0)), str(d.get("name", "6MV")),
                       dict(d.get("reference", {})),
                       float(cal.get("gy_per_mu", 0.01)), float(cal.get("field_mm", 100.0)),
                       float(cal.get("ssd_mm", 1000.0)),
                       float(p.get("depth_linear_per_mm", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed beam model: {exc!r}", file=source,
                             field="parameters") from None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> PhotonBeamModel:
        path = Path(path) if path is not None else DEFAULT_MODEL
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read beam model: {exc}", file=path) from None
        return cls.from_dict(data, source=str(path))

    def with_parameters(self, **kw) -> PhotonBeamModel:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(kw)
        return PhotonBeamModel(**d)

    # --- kernel pieces (work on numpy or cupy arrays) ----------------------------------
    def depth_term(self, d_mm, xp=np):
        d = xp.maximum(d_mm, 0.0)
        return ((1.0 - xp.exp(-self.buildup_per_mm * d)) * xp.exp(-self.attenuation_per_mm * d)
                * (1.0 + self.depth_linear_per_mm * d))

    def components(self, d_mm, xp=np):
        """[(weight, sigma_mm), ...] at radiological depth d (arrays like d)."""
        d = xp.maximum(d_mm, 0.0)
        w2 = xp.clip(self.scatter_weight[0] + self.scatter_weight[1] * d, 0.0, 1.0)
        s1 = self.sigma_primary_mm[0] + self.sigma_primary_mm[1] * d
        s2 = self.sigma_scatter_mm[0] + self.sigma_scatter_mm[1] * d
        return [(1.0 - w2, s1), (w2, s2)]

    def max_sigma_mm(self, d_max_mm: float) -> float:
        """Largest lateral sigma (mm, at depth) for depths up to d_max_mm."""
        comps = self.components(np.array([0.0, float(d_max_mm)]))
        return float(max(np.max(s) for _, s in comps))

    def raw_dose(self, u, v, s_mm, d_mm, u0, u1, v0, v1, xp=np):
        """Uncalibrated dose of a rectangle [u0,u1] x [v0,v1] (iso-plane mm); broadcasts."""
        erf = erf_for(xp)
        scale = self.sad_mm / s_mm
        total = 0.0
        for w, sig in self.components(d_mm, xp):
            k = 1.0 / (_SQRT2 * sig * scale)
            fx = 0.5 * (erf((u - u0) * k) - erf((u - u1) * k))
            fy = 0.5 * (erf((v - v0) * k) - erf((v - v1) * k))
            total = total + w * fx * fy
        return self.depth_term(d_mm, xp) * scale * scale * total

    # --- calibration -------------------------------------------------------------------
    def reference_depth_dose(self, depth_mm, field_mm: float = 100.0,
                             ssd_mm: float = 1000.0, off_axis_mm=0.0) -> np.ndarray:
        """Uncalibrated dose in water for a square field (side at the isocentre plane)
        at SSD ``ssd_mm``, depth ``depth_mm``, ``off_axis_mm`` along u (at depth)."""
        d = np.asarray(depth_mm, dtype=np.float64)
        s = ssd_mm + d
        u = np.asarray(off_axis_mm, dtype=np.float64) * self.sad_mm / s
        h = field_mm / 2.0
        return self.raw_dose(u, 0.0, s, d, -h, h, -h, h)

    @functools.cached_property
    def dmax_mm(self) -> float:
        """Depth of maximum dose (mm) of the calibration field."""
        d = np.arange(0.0, 60.0, 0.05)
        return float(d[np.argmax(self.reference_depth_dose(d, self.calibration_field_mm,
                                                          self.calibration_ssd_mm))])

    @functools.cached_property
    def gy_per_mu_scale(self) -> float:
        """k_cal: Gy/MU per unit of :meth:`raw_dose`."""
        raw = float(self.reference_depth_dose(self.dmax_mm, self.calibration_field_mm,
                                              self.calibration_ssd_mm))
        return self.calibration_gy_per_mu / raw

    def dose_per_mu(self, u, v, s_mm, d_mm, u0, u1, v0, v1, xp=np):
        """Calibrated dose (Gy/MU) of a rectangle; see :meth:`raw_dose`."""
        return self.gy_per_mu_scale * self.raw_dose(u, v, s_mm, d_mm, u0, u1, v0, v1, xp)
