"""What every backend returns and offers.

A backend is an object with ``name``, ``is_installed()`` (must not import its library),
``available()`` (installed *and* usable here, e.g. a GPU present), capability flags and
``solve(problem, x0=None, **options) -> Result``. Each backend maps its own solver's
statuses onto :data:`STATUSES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# our statuses: 'optimal' (converged / solver optimal), 'max_iter' (stopped by the
# iteration limit; usable), 'inaccurate' (solver says optimal_inaccurate), 'infeasible'
# (hard constraints cannot all hold), 'error' (solver failed).
STATUSES = ("optimal", "max_iter", "inaccurate", "infeasible", "error")


@dataclass
class Result:
    """Outcome of one solve.

    fluence: beamlet weights (numpy, host), >= 0. objective: the Problem's objective
    (float) at ``fluence`` (recomputed on the host, so backends compare like for like).
    history: (iteration, objective) pairs. timings_s: named wall times in seconds.
    goal_report: per goal achieved / met / violation on the dose grid.
    """

    fluence: np.ndarray
    objective: float
    status: str
    backend: str
    iterations: int = 0
    history: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    solver: str = ""
    goal_report: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    hard_state: dict = field(default_factory=dict)  # per hard goal: weight x, ref shift

    @property
    def unmet_hard(self) -> list[dict]:
        return [g for g in self.goal_report if g.get("hard") and g.get("met") is False]


class Backend:
    """Base class: subclasses set name/description/capabilities and implement solve."""

    name = "base"
    description = ""
    hard_constraints = False  # hard goals become exact constraints
    first_order = False  # uses the shared first-order algorithm (warm starts cheap)
    device = "cpu"
    install_hint = ""

    @classmethod
    def is_installed(cls) -> bool:  # pragma: no cover - overridden
        return True

    @classmethod
    def available(cls) -> bool:
        return cls.is_installed()

    def solve(self, problem, x0=None, **options) -> Result:  # pragma: no cover
        raise NotImplementedError
