"""The ``--refine`` option: which refinement loop, and for how many rounds.

``N`` or ``dvh:N``: the DVH-point rounds (:mod:`atp.optimizer.refine`: each organ's DVH
points become tighter objectives, rounds kept while the goal-list score improves), as
``--refine N`` always was. ``scorecard`` or ``scorecard:N`` (default
:data:`DEFAULT_SCORECARD_ROUNDS`): AIRTP's scorecard loop (:mod:`atp.score_refine`: DVH
points and scorecard items become tighter objectives, rounds kept while the scorecard
total improves without breaking a priority-1 goal). ``0`` (or ``dvh:0``): no refinement.

plan.json keeps ``settings.refine`` as the integer N for the DVH-point mode (what plans
written before the scorecard mode hold) and as the text ``scorecard:N`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from atp.errors import InputError, quote

MAX_ROUNDS = 20
DEFAULT_SCORECARD_ROUNDS = 3
MODES = ("dvh", "scorecard")


@dataclass(frozen=True)
class RefineSpec:
    mode: str = "dvh"  # one of MODES
    rounds: int = 0

    def __bool__(self) -> bool:
        return self.rounds > 0

    @property
    def setting(self):
        """What plan.json's ``settings.refine`` holds (an int for the DVH-point mode)."""
        return self.rounds if self.mode == "dvh" else f"{self.mode}:{self.rounds}"

    @property
    def text(self) -> str:
        return f"{self.mode}:{self.rounds}"


def _rounds(text: str, field: str) -> int:
    t = text.strip()
    if not t.isdigit() or not 0 <= int(t) <= MAX_ROUNDS:
        raise InputError(f"rounds must be an integer 0..{MAX_ROUNDS}, got {quote(text)} "
                         f"(N, dvh:N or scorecard[:N])", field=field)
    return int(t)


def parse_refine(value, field: str = "--refine") -> RefineSpec:
    """``value`` (None, an int, a RefineSpec or the option's text) -> RefineSpec;
    anything else is an :class:`atp.errors.InputError` naming ``field``."""
    if value is None:
        return RefineSpec()
    if isinstance(value, RefineSpec):
        return value
    if isinstance(value, bool):
        raise InputError(f"must be N, dvh:N or scorecard[:N], got {quote(value)}",
                         field=field)
    if isinstance(value, int):
        return RefineSpec("dvh", _rounds(str(value), field))
    if not isinstance(value, str):
        raise InputError(f"must be N, dvh:N or scorecard[:N], got {quote(value)}",
                         field=field)
    mode, sep, n = value.strip().partition(":")
    if not sep and mode.isdigit():
        return RefineSpec("dvh", _rounds(mode, field))
    if mode not in MODES:
        raise InputError(f"unknown refinement mode {quote(mode)}; known: N, dvh:N, "
                         f"scorecard[:N]", field=field)
    if not sep:
        if mode == "dvh":
            raise InputError("dvh needs its rounds: dvh:N", field=field)
        return RefineSpec(mode, DEFAULT_SCORECARD_ROUNDS)
    return RefineSpec(mode, _rounds(n, field))
