"""The built-in sequencing techniques, registered by name in :mod:`atp.sequencer.registry`.

Each is a frozen dataclass of its options with ``name``, ``kind`` (``imrt`` or ``arc``) and
``sequence(fluence, machine) -> Delivery``, which calls its technique's function with the
options as keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

from atp.sequencer.delivery import Delivery
from atp.sequencer.fluence import FluenceSet
from atp.sequencer.imrt import sequence_sliding_window, sequence_step_and_shoot
from atp.sequencer.machine import Machine
from atp.sequencer.vmat import sequence_vmat
from atp.sequencer.vmat_sliding import SWEEP_SPEED_FACTOR, sequence_vmat_sliding


@dataclass(frozen=True)
class _Technique:
    """A technique: ``name`` (the registry's), ``kind`` and ``function``, given as class
    keywords; the dataclass fields are the function's options."""

    name: ClassVar[str]
    kind: ClassVar[str]
    function: ClassVar[Callable[..., Delivery]]

    def __init_subclass__(cls, *, name: str, kind: str, function, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.name, cls.kind, cls.function = name, kind, staticmethod(function)

    def sequence(self, fluence: FluenceSet, machine: Machine) -> Delivery:
        return type(self).function(fluence, machine, **asdict(self))


@dataclass(frozen=True)
class StepAndShoot(_Technique, name="imrt-sns", kind="imrt",
                   function=sequence_step_and_shoot):
    """Xia-Verhey reducing-level step-and-shoot with ``levels`` intensity levels."""

    levels: int = 10


@dataclass(frozen=True)
class RuleBasedVmat(_Technique, name="vmat", kind="arc", function=sequence_vmat):
    """AIRT-style rule-based VMAT; ``threshold``: significant fluence, fraction of the
    control point's maximum; ``passes``: arcs per optimised arc (residual fluence);
    ``sector_cps``: control points per sector whose summed fluence is spread over them."""

    threshold: float = 0.1
    mu_relative_pass: bool = True
    passes: int = 2
    sector_cps: int = 1


@dataclass(frozen=True)
class SlidingWindowVmat(_Technique, name="vmat-sliding", kind="arc",
                        function=sequence_vmat_sliding):
    """Arc sectors of ``sector_deg`` delivered by unidirectional leaf sweeps
    (:mod:`atp.sequencer.vmat_sliding`); ``passes``: arcs per optimised arc."""

    sector_deg: float = 20.0
    passes: int = 2
    samples_per_cp: int = 2
    max_sweep_fraction: float = 0.6
    sweep_speed_factor: float = SWEEP_SPEED_FACTOR


@dataclass(frozen=True)
class SlidingWindow(_Technique, name="imrt-sliding", kind="imrt",
                    function=sequence_sliding_window):
    """Unidirectional sliding-window IMRT (Spirou-Chui / Bortfeld)."""

    max_control_points: int = 400
