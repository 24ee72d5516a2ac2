"""Error map E = grad_D J(D) for a pluggable differentiable dose objective J.

Default J (AIRT-style, per voxel i of the dose grid, doses in Gy):

* PTV homogeneity, asymmetric: ``lam_hot/2 * relu(D - Rx)^2 + lam_cold/2 * relu(Rx - D)^2``
  over target voxels, with ``lam_hot > lam_cold`` so hot spots cost more than cold spots;
  ``Rx`` is each voxel's highest prescription.
* PTV coverage (``coverage_weight`` c >= 0, default 0): an extra cold hinge
  ``c/2 * relu(l * Rx - D)^2`` at the coverage level ``l`` (default 0.97) over the same
  target voxels -- a minimum-dose term aimed at near-minimum coverage (D99 >= 95 % Rx):
  voxels below l * Rx feel lam_cold + c, so cold spots there cost more than anywhere in
  [l Rx, Rx], while above Rx lam_hot still rules.
* OAR sparing slider s_o in [0, 1): squared hinge ``1/2 * relu(D - R_o)^2`` over the OAR
  with the reference ``R_o = (1 - s_o) * D0`` (D0: the baseline dose, i.e. the plan with
  no sparing). s_o = 0 gives R_o = D0, so the term vanishes at the baseline.
* Organ maximum (``max_weight`` m >= 0, default 0): for each organ with a maximum-dose
  limit L_o (``max_limits``: name -> (voxel weights, L_o Gy)), the squared hinge
  ``m/2 * relu(D - max_level * L_o)^2`` over its voxels -- an absolute ceiling for
  serial organs (spinal cord, brainstem) that the baseline-relative guard does not give.
* OAR guard (``guard_weight`` g >= 0, default 0): every OAR without an active slider gets
  the same hinge at R_o = D0 with weight g, so correcting the PTV does not raise OAR
  doses above the baseline. It too vanishes at D = D0, and an OAR's slider at 0 is the
  same objective as no slider for it.

Every term is normalised by its voxel count so weights do not depend on structure size.
Any callable ``J(dose) -> scalar tensor`` can replace :class:`HotColdObjective`;
:func:`error_map` differentiates it with autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class HotColdObjective:
    """Differentiable dose objective J(D) (see module docstring).

    rx_gy: (n,) per-voxel prescription on target voxels (0 elsewhere).
    target_weight: (n,) target voxel weights (mask or partial-volume fraction).
    oar_weights: name -> (n,) voxel weights of each OAR.
    sparing: name -> s_o in [0, 1).
    baseline_dose: (n,) D0 used for the OAR references (needed when any s_o > 0).
    """

    rx_gy: torch.Tensor
    target_weight: torch.Tensor
    lam_hot: float = 2.0
    lam_cold: float = 1.0
    oar_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    sparing: Mapping[str, float] = field(default_factory=dict)
    baseline_dose: torch.Tensor | None = None
    guard_weight: float = 0.0
    coverage_weight: float = 0.0
    coverage_level: float = 0.97
    max_limits: Mapping[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    max_weight: float = 0.0
    max_level: float = 0.95

    def __post_init__(self) -> None:
        if not float(self.max_weight) >= 0.0:
            raise ValueError(f"max_weight must be >= 0, got {self.max_weight}")
        if not 0.0 < float(self.max_level) <= 1.0:
            raise ValueError(f"max_level must be in (0, 1], got {self.max_level}")
        if not float(self.coverage_weight) >= 0.0:
            raise ValueError(f"coverage_weight must be >= 0, got {self.coverage_weight}")
        if not 0.0 < float(self.coverage_level) <= 1.0:
            raise ValueError(f"coverage_level must be in (0, 1], got {self.coverage_level}")
        if not self.lam_hot > self.lam_cold > 0:
            raise ValueError("need lam_hot > lam_cold > 0 (hot spots cost more)")
        for name, s in self.sparing.items():
            if name not in self.oar_weights:
                raise KeyError(f"sparing given for unknown OAR '{name}'; "
                               f"known: {sorted(self.oar_weights)}")
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparing factor for {name} must be in [0, 1), got {s}")
        if self.guard_weight < 0:
            raise ValueError(f"guard_weight must be >= 0, got {self.guard_weight}")
        needs_d0 = any(float(s) > 0 for s in self.sparing.values()) or (
            self.guard_weight > 0 and len(self.oar_weights) > 0)
        if needs_d0 and self.baseline_dose is None:
            raise ValueError("baseline_dose is needed when a sparing factor or the OAR "
                             "guard is > 0")

    def voxel_support(self) -> torch.Tensor:
        """Sorted dose-grid voxel indices J reads (targets and OAR terms): J and its error
        map depend on the dose there only, so a solver may compute just those rows."""
        terms = self._terms()
        if not terms:
            return torch.zeros(0, dtype=torch.long, device=self.rx_gy.device)
        return torch.unique(torch.cat([t[0] for t in terms]))

    def oar_term_weights(self) -> dict[str, tuple[float, float]]:
        """name -> (term weight, sparing factor) of each active OAR hinge."""
        out = {}
        for name in self.oar_weights:
            s = float(self.sparing.get(name, 0.0))
            weight = 1.0 if s > 0.0 else float(self.guard_weight)
            if weight > 0.0:
                out[name] = (weight, s)
        return out

    def _terms(self):
        """Per term (voxel indices, voxel weights / count, reference Gy, lam_hot, lam_cold)
        on its own voxels only (gathered once: a term never reads the rest of the grid)."""
        if getattr(self, "_cache", None) is None:
            terms = []
            tw = self.target_weight
            idx = torch.nonzero(tw > 0).reshape(-1)
            if idx.numel():
                rx = self.rx_gy[idx]
                tw_norm = tw[idx] / tw.sum().clamp_min(1.0)
                terms.append((idx, tw_norm, rx, 0.5 * self.lam_hot, 0.5 * self.lam_cold))
                if self.coverage_weight > 0:
                    terms.append((idx, tw_norm, float(self.coverage_level) * rx, 0.0,
                                  0.5 * float(self.coverage_weight)))
            for name, (weight, s) in self.oar_term_weights().items():
                w = self.oar_weights[name]
                idx = torch.nonzero(w > 0).reshape(-1)
                if idx.numel():
                    terms.append((idx, weight * w[idx] / w.sum().clamp_min(1.0),
                                  (1.0 - s) * self.baseline_dose[idx], 0.5, 0.0))
            if self.max_weight > 0:
                for w, limit_gy in self.max_limits.values():
                    idx = torch.nonzero(w > 0).reshape(-1)
                    if idx.numel():
                        ref = torch.full((idx.numel(),), float(self.max_level) *
                                         float(limit_gy), dtype=w.dtype, device=w.device)
                        terms.append((idx, float(self.max_weight) * w[idx] /
                                      w.sum().clamp_min(1.0), ref, 0.5, 0.0))
            self._cache = terms
        return self._cache

    def value_and_grad(self, dose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J, dJ/dD) in closed form (the same maths as ``__call__``; no autograd graph,
        one gradient array: the error map's fast path)."""
        d = dose.detach()
        j = d.new_zeros(())
        grad = torch.zeros_like(d)
        for idx, w, ref, hot, cold in self._terms():
            x = torch.index_select(d, 0, idx) - ref
            over = torch.relu(x)
            pen = hot * over ** 2
            g = 2.0 * hot * over
            if cold:
                under = torch.relu(-x)
                pen = pen + cold * under ** 2
                g = g - 2.0 * cold * under
            j = j + (w * pen).sum()
            grad.index_add_(0, idx, w * g)
        return j, grad

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        j = dose.new_zeros(())
        for idx, w, ref, hot, cold in self._terms():
            x = torch.index_select(dose, 0, idx) - ref
            pen = hot * torch.relu(x) ** 2
            if cold:
                pen = pen + cold * torch.relu(-x) ** 2
            j = j + (w * pen).sum()
        return j


def value_and_error_map(dose: torch.Tensor,
                        objective: Callable[[torch.Tensor], torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, E = dJ/dD) at ``dose``; ``dose`` is not modified. An objective with a
    ``value_and_grad`` method (closed form, e.g. :class:`HotColdObjective`) is asked
    directly; any other callable is differentiated by one autograd pass."""
    if hasattr(objective, "value_and_grad"):
        return objective.value_and_grad(dose)
    d = dose.detach().requires_grad_(True)
    with torch.enable_grad():
        j = objective(d)
        (grad,) = torch.autograd.grad(j, d, allow_unused=True)
    if grad is None:  # J does not depend on the dose (no terms)
        grad = torch.zeros_like(d)
    return j.detach(), grad


def error_map(dose: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    """E = dJ/dD at ``dose`` (same shape as dose), by autograd; ``dose`` is not modified."""
    return value_and_error_map(dose, objective)[1]
