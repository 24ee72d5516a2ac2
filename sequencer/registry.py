"""Sequencer registry: a name (``--sequencer vmat``) -> an object with
``sequence(fluence: FluenceSet, machine: Machine) -> Delivery``.

One :class:`atp.registry.Registry`. Built-ins (:mod:`atp.sequencer.techniques`):
``imrt-sns`` (Xia-Verhey step-and-shoot), ``imrt-sliding`` (sliding window), ``vmat``
(rule-based arcs), ``vmat-sliding`` (arc sectors swept by a sliding window). Third
parties add theirs through the ``atp.sequencers`` entry-point group (a class or instance
with ``name`` and ``sequence``) or ``register(obj)``. Asking for a name that is not
installed raises :class:`~atp.errors.BackendUnavailableError` listing the known names; a
broken plug-in raises :class:`atp.registry.PluginError` naming its entry point.
"""

from __future__ import annotations

from atp.registry import Registry

ENTRY_POINT_GROUP = "atp.sequencers"
BUILTIN = {"imrt-sns": "atp.sequencer.techniques:StepAndShoot",
           "imrt-sliding": "atp.sequencer.techniques:SlidingWindow",
           "vmat": "atp.sequencer.techniques:RuleBasedVmat",
           "vmat-sliding": "atp.sequencer.techniques:SlidingWindowVmat"}
SEQUENCERS = Registry("sequencer", ENTRY_POINT_GROUP, methods=("sequence",),
                      attributes=("name",), builtins=BUILTIN)

register = SEQUENCERS.register
unregister = SEQUENCERS.unregister
names = SEQUENCERS.names


def get(name, **params):
    """A sequencer instance for a name (with constructor ``params``), class or instance."""
    return SEQUENCERS.get(name, **params)
