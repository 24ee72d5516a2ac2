"""Sequencer registry: a name (``--sequencer vmat``) -> an object with
``sequence(fluence: FluenceSet, machine: Machine) -> Delivery``.

Built-ins: ``imrt-sns`` (Xia-Verhey step-and-shoot), ``imrt-sliding`` (sliding window),
``vmat`` (rule-based arcs), ``vmat-sliding`` (arc sectors swept by a sliding window). Third parties add theirs through the ``atp.sequencers``
entry-point group (a class or instance with ``name`` and ``sequence``). Asking for a name
that is not installed raises :class:`~atp.errors.BackendUnavailableError` listing the
known names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points

from atp.sequencer.delivery import Delivery
from atp.sequencer.fluence import FluenceSet
from atp.sequencer.machine import Machine

from atp.errors import BackendUnavailableError

ENTRY_POINT_GROUP = "atp.sequencers"
REQUIRED = ("name", "sequence")


@dataclass
class StepAndShoot:
    """Xia-Verhey reducing-level step-and-shoot with ``levels`` intensity levels."""

    levels: int = 10
    name: str = field(default="imrt-sns", init=False)
    kind: str = field(default="imrt", init=False)

    def sequence(self, fluence: FluenceSet, machine: Machine) -> Delivery:
        from atp.sequencer.imrt import sequence_step_and_shoot

        return sequence_step_and_shoot(fluence, machine, levels=self.levels)


@dataclass
class SlidingWindow:
    """Unidirectional sliding-window IMRT (Spirou-Chui / Bortfeld)."""

    max_control_points: int = 400
    name: str = field(default="imrt-sliding", init=False)
    kind: str = field(default="imrt", init=False)

    def sequence(self, fluence: FluenceSet, machine: Machine) -> Delivery:
        from atp.sequencer.imrt import sequence_sliding_window

        return sequence_sliding_window(fluence, machine,
                                       max_control_points=self.max_control_points)


@dataclass
class RuleBasedVmat:
    """AIRT-style rule-based VMAT; ``threshold``: significant fluence, fraction of the
    control point's maximum; ``passes``: arcs per optimised arc (residual fluence)."""

    threshold: float = 0.1
    mu_relative_pass: bool = True
    passes: int = 2
    name: str = field(default="vmat", init=False)
    kind: str = field(default="arc", init=False)

    def sequence(self, fluence: FluenceSet, machine: Machine) -> Delivery:
        from atp.sequencer.vmat import sequence_vmat

        return sequence_vmat(fluence, machine, threshold=self.threshold,
                             mu_relative_pass=self.mu_relative_pass, passes=self.passes)


@dataclass
class SlidingWindowVmat:
    """Arc sectors of ``sector_deg`` delivered by unidirectional leaf sweeps
    (:mod:`atp.sequencer.vmat_sliding`); ``passes``: arcs per optimised arc."""

    sector_deg: float = 20.0
    passes: int = 2
    samples_per_cp: int = 2
    max_sweep_fraction: float = 0.6
    name: str = field(default="vmat-sliding", init=False)
    kind: str = field(default="arc", init=False)

    def sequence(self, fluence: FluenceSet, machine: Machine) -> Delivery:
        from atp.sequencer.vmat_sliding import sequence_vmat_sliding

        return sequence_vmat_sliding(fluence, machine, sector_deg=self.sector_deg,
                                     passes=self.passes, samples_per_cp=self.samples_per_cp,
                                     max_sweep_fraction=self.max_sweep_fraction)


BUILTIN = {"imrt-sns": StepAndShoot, "imrt-sliding": SlidingWindow, "vmat": RuleBasedVmat,
           "vmat-sliding": SlidingWindowVmat}
_registered: dict[str, object] = {}


def register(seq) -> None:
    """Add a sequencer class or instance (checked for ``name`` and ``sequence``)."""
    missing = [a for a in REQUIRED if not hasattr(seq, a)]
    if missing:
        raise TypeError(f"sequencer {seq!r} lacks {missing}")
    _registered[seq.name if isinstance(seq.name, str) else seq().name] = seq


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered) | set(_entry_points()))


def get(name, **params):
    """A sequencer instance for a name (with constructor ``params``), class or instance."""
    if not isinstance(name, str):
        return name(**params) if isinstance(name, type) else name
    if name in _registered:
        obj = _registered[name]
    elif name in BUILTIN:
        obj = BUILTIN[name]
    else:
        eps = _entry_points()
        if name not in eps:
            raise BackendUnavailableError(
                f"unknown sequencer '{name}'; installed: {', '.join(names())}")
        obj = eps[name].load()
        missing = [a for a in REQUIRED if not hasattr(obj, a)]
        if missing:
            raise BackendUnavailableError(
                f"sequencer plugin '{name}' lacks {missing}; installed: {', '.join(names())}")
    return obj(**params) if isinstance(obj, type) else obj
