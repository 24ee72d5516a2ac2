"""Range-checked argparse types for numeric options: ``--beams 1000`` or
``--arc-spacing nan`` is refused at parse time (exit 2, one line naming the option),
with the same limits as the goal-list fields they stand for."""

from __future__ import annotations

import argparse
import math

from atp.errors import InputError
from atp.refine_spec import parse_refine


def int_range(lo: int, hi: int):
    """An argparse ``type``: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer {lo}..{hi}, got "
                                             f"'{str(text)[:40]}'") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer {lo}..{hi}, got {v}")
        return v

    parse.__name__ = f"integer {lo}..{hi}"
    return parse


def float_range(lo: float, hi: float, *, low_open: bool = False):
    """An argparse ``type``: a finite number in [lo, hi] ((lo, hi] with ``low_open``)."""
    left = "(" if low_open else "["

    def parse(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or v > hi or (v <= lo if low_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{lo:g}, "
                                             f"{hi:g}], got '{str(text)[:40]}'")
        return v

    parse.__name__ = f"number in {left}{lo:g}, {hi:g}]"
    return parse


# the limits shared by several commands
BEAMS = int_range(1, 360)              # as goal lists' `beams`
FRACTIONS = int_range(1, 100)          # as prescription sidecars' `fractions`
DOSE_GRID_FACTOR = int_range(1, 8)
REFINE_ROUNDS = int_range(0, 20)
MAX_ITER = int_range(1, 100_000)
ARC_SPACING_DEG = float_range(0.5, 30.0)
ANGLE_DEG = float_range(-360.0, 360.0)
ITERATIONS = int_range(0, 10_000)


def refine_spec(text: str):
    """``--refine``: N, dvh:N or scorecard[:N] (:func:`atp.refine_spec.parse_refine`)."""
    try:
        return parse_refine(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


refine_spec.__name__ = "N, dvh:N or scorecard[:N]"
