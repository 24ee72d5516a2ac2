"""The 6 MV finite-size pencil-beam model: primary, phantom scatter, head scatter and
electron contamination, fitted to water data for square fields of 2-40 cm.

Dose per MU at a point from a rectangular beamlet (edges ``u0..u1`` x ``v0..v1`` mm at
the isocentre plane, centre ``(uc, vc)``) is

    D = k_cal * (SAD / s)^2 * H(uc, vc, d) * sum_k A_k(d) * F(u; u0, u1, S sigma_k') * F(v; ...)

* ``d``: radiological depth (mm of water) along the ray; ``s``: distance from the source
  along the beam axis (mm); ``(u, v)``: the point's BEV position at the isocentre plane.
* ``F(u; u0, u1, sigma) = (erf((u - u0) / (sqrt2 sigma)) - erf((u - u1) / (sqrt2 sigma))) / 2``
  is the exact integral of a normalised Gaussian over the beamlet, so adjacent beamlets
  add up to the field; ``sigma_k' = sigma_k * SAD / s`` is the width at the iso plane.
* Depth term of the photons ``T(d) = (1 - (1 - t0) exp(-beta d)) exp(-mu d) (1 + gamma d)``
  (build-up from the surface value ``t0``, attenuation, and a linear term for the scatter
  build-up a single exponential misses): the broad-beam depth dose.
* Components ``(A_k, sigma_k)`` (a Gaussian decomposition of the pencil kernel, as in
  Bortfeld et al. 1993 Med Phys 20:311 and Nyholm et al. 2006 Radiother Oncol 78:347;
  Ahnesjo & Trepp 1991 Acta Oncol 30:403 for the primary/scatter split):

  - primary: ``(1 - h) T(d) w_p(d)``, ``sigma_p = a_p + b_p d`` (source size, electron
    transport, penumbra);
  - phantom scatter, two Gaussians (a narrow and a wide one): ``(1 - h) T(d) w_k(d)``,
    ``w_k = c_k + e_k d + q_k d^2`` (scatter grows with depth), ``sigma_k = a_k + b_k d``;
    ``w_p = 1 - sum w_k``, so the kernel integrates to ``T(d)``: a broad field's depth dose
    is T, a small field loses the part of the scatter that falls outside it;
  - head scatter (extra-focal source in the flattening-filter / primary-collimator
    region): a fraction ``h`` of the fluence, ``h T(d)``, spread with the width of the
    wide scatter Gaussian, so the output follows the MLC/jaw-defined field (the
    collimator scatter factor S_c is folded in with the phantom scatter; the fitted
    water data, output factors at depth, do not separate the two);
  - electron contamination ``E(d) = e0 exp(-mu_e d)``, spread like the head scatter
    (the contaminant electrons come from the head): surface dose > 0 and rising with
    field size.
  Sharing one width keeps the engine at three Gaussians per beamlet (its cost).
* ``H(uc, vc, d) = exp((alpha - kappa d) (uc^2 + vc^2))``: off-axis primary fluence of a
  flattened beam (horns, ``alpha``) softening off axis (horns vanish with depth,
  ``kappa``); evaluated at each beamlet's centre (separable in u and v).
* Heterogeneity: lateral transport lengths grow in low density along the path. The
  primary (secondary-electron) width with ``primary_path_spread`` k > 0 (shipped: 0.5):
  ``sigma_p^2 = sigma_water(d)^2 + (k t_low)^2``, ``t_low = L (1 - rho_bar)`` the
  geometric path the last L = ``density_length_mm`` (20 mm) of the ray lacks matter for,
  ``rho_bar`` its mean relative density (:meth:`PhotonBeamModel.lateral_scales`): the
  electrons leaving the last tissue spread sideways by about k x the distance they fly
  through a cavity, so a 3 x 3 cm field loses lateral equilibrium in and right past a
  3 cm air gap while a 10 x 10 does not (with k = 0 the older O'Connor scaling
  ``S = min(1 / rho_bar, max_lateral_scale)``, up to 20x in air, starved broad fields
  there too). k was chosen against a collapsed-cone engine on air and lung slabs
  (BENCHMARKS.md), not fitted to water (water does not see it). The phantom-scatter
  widths use a transport-weighted density when ``scatter_transport_length_mm`` (lambda,
  20 mm) is set: the scatter reaching the point comes from radiological distance tau
  upstream with weight exp(-tau / lambda), each part stretched by its geometric /
  radiological path t / tau, and
  ``S = 1 / sqrt(E[(tau / t)^2])`` is the width whose central dose in a narrow field
  matches that mixture (``atp.dose.pencil_beam._transport_density``); without it, the
  mean over the last ``scatter_density_length_mm`` (60 mm box, the first model). Beyond
  air or lung a small field therefore loses lateral equilibrium (its central dose drops)
  and regains it within about those lengths of water (re-build-up). Depth attenuation
  uses the radiological depth.
* ``k_cal`` (Gy/MU): a 10 x 10 cm^2 field at SSD 100 cm in water gives 0.01 Gy/MU at the
  depth of maximum dose.

The parameters live in ``atp/data/photon_6mv.json``, fitted by :mod:`atp.dose.fit` to the
table ``atp/data/photon_6mv_reference.csv`` (sources and caveats written there);
``atp commission --fit measured.csv --out model.json`` refits them to a clinic's data.
Limits: a pencil-beam superposition (no lateral scatter from inhomogeneities beyond the
path-density scaling, no backscatter changes at interfaces), flattened beams only, the
off-axis factor is the beamlet centre's, and the engine's sparse matrix drops kernel
tails beyond its lateral cutoff and threshold; the widest Gaussian's tail is restored by
the far-scatter operator (:mod:`atp.dose.far_scatter`), the narrower ones' are not
(see BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import special

from atp.errors import InputError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "photon_6mv.json"
_SQRT2 = math.sqrt(2.0)


def erf_for(xp):
    """The erf function of an array module (scipy for numpy, cupyx for cupy)."""
    if xp is np:
        return special.erf
    from cupyx.scipy.special import erf  # pragma: no cover - GPU only

    return erf


@dataclass(frozen=True)
class PhotonBeamModel:
    """Kernel parameters (mm, 1/mm) of one photon beam quality; see module docstring."""

    buildup_per_mm: float
    attenuation_per_mm: float
    sigma_primary_mm: tuple[float, float]  # (a_p, b_p): sigma_p(d) = a_p + b_p * d
    # phantom-scatter Gaussians: ((c_k, e_k[, q_k]), (a_k, b_k)):
    # w_k = c_k + e_k d (+ q_k d^2), sigma_k = a_k + b_k d
    scatter: tuple = ()
    sad_mm: float = 1000.0
    name: str = "6MV"
    reference: dict = field(default_factory=dict, compare=False, repr=False)
    calibration_gy_per_mu: float = 0.01
    calibration_field_mm: float = 100.0
    calibration_ssd_mm: float = 1000.0
    depth_linear_per_mm: float = 0.0  # gamma in T(d)
    surface_fraction: float = 0.0  # t0 in T(d)
    head_fraction: float = 0.0  # h
    electron_surface: float = 0.0  # e0
    electron_per_mm: float = 0.1  # mu_e
    horn_per_mm2: float = 0.0  # alpha
    softening_per_mm3: float = 0.0  # kappa
    density_length_mm: float = 20.0  # primary (electron transport)
    max_lateral_scale: float = 20.0
    scatter_density_length_mm: float = 60.0  # phantom scatter (photon transport)
    scatter_transport_length_mm: float = 0.0  # > 0: transport weighting instead of the box
    primary_path_spread: float = 0.0  # > 0: path-bounded primary widening (k, mm per mm)

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, *, source: str | None = None) -> PhotonBeamModel:
        try:
            p = d["parameters"]
            cal = d.get("calibration", {})
            if "scatter" in p:
                scatter = tuple((tuple(float(x) for x in c["weight"]),
                                 tuple(float(x) for x in c["sigma_mm"])) for c in p["scatter"])
            else:  # the first (single-scatter-Gaussian) format
                scatter = ((tuple(float(v) for v in p["scatter_weight"]),
                            tuple(float(v) for v in p["sigma_scatter_mm"])),)
            head = p.get("head_scatter", {})
            elec = p.get("electron_contamination", {})
            off = p.get("off_axis", {})
            het = p.get("heterogeneity", {})
            m = cls(float(p["buildup_per_mm"]), float(p["attenuation_per_mm"]),
                    tuple(float(v) for v in p["sigma_primary_mm"]), scatter,
                    float(d.get("sad_mm", 1000.0)), str(d.get("name", "6MV")),
                    dict(d.get("reference", {})),
                    float(cal.get("gy_per_mu", 0.01)), float(cal.get("field_mm", 100.0)),
                    float(cal.get("ssd_mm", 1000.0)),
                    float(p.get("depth_linear_per_mm", 0.0)),
                    float(p.get("surface_fraction", 0.0)),
                    float(head.get("fraction", 0.0)),
                    float(elec.get("surface", 0.0)), float(elec.get("per_mm", 0.1)),
                    float(off.get("horn_per_mm2", 0.0)),
                    float(off.get("softening_per_mm3", 0.0)),
                    float(het.get("density_length_mm", 20.0)),
                    float(het.get("max_lateral_scale", 20.0)),
                    float(het.get("scatter_density_length_mm", 60.0)),
                    float(het.get("scatter_transport_length_mm", 0.0)),
                    float(het.get("primary_path_spread", 0.0)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"malformed beam model: {exc!r}", file=source,
                             field="parameters") from None
        if not (len(m.sigma_primary_mm) == 2 and all(len(w) in (2, 3) and len(s) == 2
                                                      for w, s in m.scatter)):
            raise InputError("malformed beam model: widths and weights need 2 numbers "
                             "(value at the surface, slope per mm)", file=source,
                             field="parameters")
        return m

    def to_dict(self) -> dict:
        """The parameter block of the JSON format (inverse of :meth:`from_dict`)."""
        return {
            "buildup_per_mm": self.buildup_per_mm,
            "attenuation_per_mm": self.attenuation_per_mm,
            "depth_linear_per_mm": self.depth_linear_per_mm,
            "surface_fraction": self.surface_fraction,
            "sigma_primary_mm": list(self.sigma_primary_mm),
            "scatter": [{"weight": list(w), "sigma_mm": list(s)} for w, s in self.scatter],
            "head_scatter": {"fraction": self.head_fraction},
            "electron_contamination": {"surface": self.electron_surface,
                                       "per_mm": self.electron_per_mm},
            "off_axis": {"horn_per_mm2": self.horn_per_mm2,
                         "softening_per_mm3": self.softening_per_mm3},
            "heterogeneity": {"density_length_mm": self.density_length_mm,
                              "scatter_density_length_mm": self.scatter_density_length_mm,
                              "scatter_transport_length_mm":
                                  self.scatter_transport_length_mm,
                              "max_lateral_scale": self.max_lateral_scale,
                              "primary_path_spread": self.primary_path_spread},
        }

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
        """T(d): the broad-beam photon depth term (no electron contamination)."""
        d = xp.maximum(d_mm, 0.0)
        return ((1.0 - (1.0 - self.surface_fraction) * xp.exp(-self.buildup_per_mm * d))
                * xp.exp(-self.attenuation_per_mm * d) * (1.0 + self.depth_linear_per_mm * d))

    def electron_term(self, d_mm, xp=np):
        d = xp.maximum(d_mm, 0.0)
        return self.electron_surface * xp.exp(-self.electron_per_mm * d)

    def components(self, d_mm, xp=np, lateral_scale=None):
        """[(amplitude, sigma_mm), ...] at radiological depth d (arrays like d).

        Amplitudes include T(d) (and E(d) on the head-scatter component); sigma is at
        depth, before projection to the isocentre plane. ``lateral_scale`` (like d,
        >= 1 in low density) multiplies the phantom transport widths: one array for all,
        or a pair (primary, phantom scatter)."""
        d = xp.maximum(d_mm, 0.0)
        t = self.depth_term(d, xp)
        ws = [xp.clip(w[0] + w[1] * d + (w[2] * d * d if len(w) > 2 else 0.0), 0.0, 1.0)
              for w, _ in self.scatter]
        wp = 1.0 - sum(ws) if ws else 1.0 + 0.0 * d
        wp = xp.clip(wp, 0.0, 1.0)
        if lateral_scale is None:
            se = ss = 1.0
        elif isinstance(lateral_scale, tuple):
            se, ss = lateral_scale
        else:
            se = ss = lateral_scale
        sp = self.primary_sigma_mm(d) * se
        keep = (1.0 - self.head_fraction) * t
        out = [(keep * wp, sp)]
        for w, (_, (a, b)) in zip(ws, self.scatter):
            out.append((keep * w, (a + b * d) * ss))
        extra = self.head_fraction * t + self.electron_term(d, xp)
        if len(out) > 1:  # head scatter and contamination share the widest scatter width
            out[-1] = (out[-1][0] + extra, out[-1][1])
        else:
            out[0] = (out[0][0] + extra, out[0][1])
        return out

    def off_axis_exponent(self, d_mm, xp=np):
        """c(d) of the off-axis factor exp(c (uc^2 + vc^2)) (1/mm^2 at the iso plane)."""
        return self.horn_per_mm2 - self.softening_per_mm3 * xp.maximum(d_mm, 0.0)

    def lateral_scale(self, mean_density, xp=np):
        """Width factor 1 / rho_bar, clipped to [1 / 3, max_lateral_scale]."""
        rho = xp.maximum(mean_density, 1.0 / self.max_lateral_scale)
        return xp.clip(1.0 / rho, 1.0 / 3.0, self.max_lateral_scale)

    def primary_sigma_mm(self, d_mm):
        """sigma_p(d) = a_p + b_p d (mm, in water) at radiological depth d >= 0."""
        return self.sigma_primary_mm[0] + self.sigma_primary_mm[1] * d_mm

    def lateral_scales(self, mean_densities, depth_mm, xp=np):
        """(primary, phantom scatter) width factors from the engine's path densities
        (primary box mean, scatter density) at radiological depth ``depth_mm``.

        With ``primary_path_spread`` k > 0 the primary width is bounded by the path
        crossed in low density instead of scaled by 1 / rho_bar:
        ``sigma^2 = sigma_water(d)^2 + (k t_low)^2``, ``t_low = L (1 - rho_bar)`` the
        geometric length of the last L = ``density_length_mm`` the ray lacks matter for
        (L: only the path in the body near its entry). Electrons leaving the last
        tissue spread sideways by about k x the distance they fly through the cavity,
        not without bound: a 3 cm air cavity widens the 2 mm primary kernel by about a
        centimetre (a 3 x 3 field still loses equilibrium there, a 10 x 10 does not),
        while in lung (rho 0.25) it is close to O'Connor's 1 / rho."""
        rho_p, rho_s = mean_densities
        ss = self.lateral_scale(rho_s, xp)
        if self.primary_path_spread <= 0:
            return self.lateral_scale(rho_p, xp), ss
        d = xp.maximum(depth_mm, 0.0)
        t_low = xp.minimum(self.density_length_mm, d) * xp.clip(1.0 - rho_p, 0.0, 1.0)
        sp = xp.sqrt(1.0 + (self.primary_path_spread * t_low / self.primary_sigma_mm(d)) ** 2)
        return xp.clip(sp, 1.0, self.max_lateral_scale), ss

    def max_sigma_mm(self, d_max_mm: float) -> float:
        """Largest lateral sigma (mm, at depth, unit density) for depths up to d_max_mm."""
        comps = self.components(np.array([0.0, float(d_max_mm)]))
        return float(max(np.max(s) for _, s in comps))

    def _axis(self, u, lo: float, hi: float, k, c, strip_mm: float):
        """Sum over strips of [lo, hi] of exp(c x_j^2) x (Gaussian integral over strip j)."""
        erf = erf_for(np)
        if c is None or (np.ndim(c) == 0 and c == 0.0) or hi - lo <= strip_mm:
            xc = 0.5 * (lo + hi)
            f = 0.5 * (erf((u - lo) * k) - erf((u - hi) * k))
            return f if c is None else f * np.exp(c * xc * xc)
        n = max(1, math.ceil((hi - lo) / strip_mm))
        e = np.linspace(lo, hi, n + 1)
        xc = 0.5 * (e[:-1] + e[1:])
        ef = erf((np.asarray(u)[..., None] - e) * np.asarray(k)[..., None])
        w = np.exp(np.asarray(c)[..., None] * xc * xc)
        return (0.5 * (ef[..., :-1] - ef[..., 1:]) * w).sum(axis=-1)

    def raw_dose(self, u, v, s_mm, d_mm, u0, u1, v0, v1, xp=np, lateral_scale=None,
                 strip_mm: float = 5.0):
        """Uncalibrated dose of a rectangle [u0,u1] x [v0,v1] (iso-plane mm); broadcasts.

        The off-axis factor is taken per ``strip_mm`` strip (NumPy only), as the engine
        takes it per beamlet centre."""
        erf = erf_for(xp)
        scale = self.sad_mm / s_mm
        c = self.off_axis_exponent(d_mm, xp) if (self.horn_per_mm2 or
                                                 self.softening_per_mm3) else None
        total = 0.0
        for amp, sig in self.components(d_mm, xp, lateral_scale):
            k = 1.0 / (_SQRT2 * sig * scale)
            if c is None or xp is not np:
                fx = 0.5 * (erf((u - u0) * k) - erf((u - u1) * k))
                fy = 0.5 * (erf((v - v0) * k) - erf((v - v1) * k))
            else:
                k_, c_ = np.broadcast_arrays(np.asarray(k, float), np.asarray(c, float))
                u_, ku, cu = np.broadcast_arrays(np.asarray(u, float), k_, c_)
                fx = self._axis(u_, u0, u1, ku, cu, strip_mm)
                v_, kv, cv = np.broadcast_arrays(np.asarray(v, float), k_, c_)
                fy = fx if (v_.shape == u_.shape and np.array_equal(v_, u_) and u0 == v0
                            and u1 == v1) else self._axis(v_, v0, v1, kv, cv, strip_mm)
            total = total + amp * fx * fy
        return scale * scale * total

    # --- calibration -------------------------------------------------------------------
    def reference_depth_dose(self, depth_mm, field_mm=100.0, ssd_mm: float = 1000.0,
                             off_axis_mm=0.0) -> np.ndarray:
        """Uncalibrated dose in water for a field (side, or (x, y) sides, at the isocentre
        plane) at SSD ``ssd_mm``, depth ``depth_mm``, ``off_axis_mm`` along u (at depth)."""
        fx, fy = (field_mm, field_mm) if np.ndim(field_mm) == 0 else field_mm
        d = np.asarray(depth_mm, dtype=np.float64)
        s = ssd_mm + d
        u = np.asarray(off_axis_mm, dtype=np.float64) * self.sad_mm / s
        return self.raw_dose(u, 0.0, s, d, -fx / 2.0, fx / 2.0, -fy / 2.0, fy / 2.0)

    @functools.cached_property
    def dmax_mm(self) -> float:
        """Depth of maximum dose (mm) of the calibration field."""
        d = np.arange(0.0, 60.0, 0.1)
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
