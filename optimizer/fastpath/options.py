"""The fast path's options as a frozen dataclass (no torch: the top floor builds and
records them without loading the fast path)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FastPathOptions:
    """The numeric options of :class:`FastPath` (all have documented defaults; see the
    class docstring for what each does). Frozen: presets are named instances
    (:data:`atp.fastplan.PRESETS`), changed with :func:`dataclasses.replace`."""

    lam_hot: float = 4.0
    lam_cold: float = 1.0
    init_steps: int = 20
    correction_steps: int = 30
    smoothness: float = 0.3
    init_smoothness: float = 0.3
    smooth_weight_cp: float = 0.5
    oar_guard: float = 0.5
    coverage_weight: float = 0.0
    coverage_level: float = 0.97
    oar_minus_targets: str = "none"
    max_weight: float = 4.0
    max_level: float = 0.95
