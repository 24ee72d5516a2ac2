"""Registry of dose engines: a name -> an engine (class, factory or instance).

One :class:`atp.registry.Registry`; an engine follows the
:class:`~atp.dose.engine.DoseEngine` protocol (callable ``influence`` and
``aperture_dose``). ``get(spec)`` accepts an engine instance (returned as is), a name
(instantiated with defaults) or a dict ``{"name": ..., **constructor keywords}``.
Third-party engines register through the entry-point group ``atp.dose_engines``
(``name = "package.module:EngineClass"``) or ``register(name, cls)``. An unknown name
raises :class:`~atp.errors.BackendUnavailableError` listing the known engines; a broken
plug-in raises :class:`atp.registry.PluginError` naming its entry point.
"""

from __future__ import annotations

from atp.registry import Registry

ENTRY_POINT_GROUP = "atp.dose_engines"
DEFAULT = "pencil-beam"
ENGINES = Registry("dose engine", ENTRY_POINT_GROUP, methods=("influence", "aperture_dose"),
                   builtins={"pencil-beam": "atp.dose.pencil_beam:PencilBeamEngine"})

register = ENGINES.register
unregister = ENGINES.unregister
available = ENGINES.names


def get(spec=DEFAULT, **kwargs):
    """An engine instance from an instance, a name or a ``{"name": ..., **kw}`` dict."""
    return ENGINES.get(DEFAULT if spec is None else spec, **kwargs)
