"""Registry of dose engines: a name -> an engine class.

``register(name, cls)`` checks that the class implements the
:class:`~atp.dose.engine.DoseEngine` protocol (callable ``influence`` and
``aperture_dose``). ``get(spec)`` accepts an engine instance (returned as is), a name
(instantiated with defaults) or a dict ``{"name": ..., **constructor keywords}``.
Third-party engines register through the entry-point group ``atp.dose_engines``
(``name = "package.module:EngineClass"``), loaded on first lookup. An unknown name
raises :class:`~atp.errors.BackendUnavailableError` listing the installed engines.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from atp.errors import BackendUnavailableError, InputError

ENTRY_POINT_GROUP = "atp.dose_engines"
_REGISTRY: dict[str, type] = {}
_entry_points_loaded = False


def register(name: str, cls: type) -> type:
    """Add an engine class under ``name`` (returns the class, usable as a decorator
    helper). Raises TypeError when the class lacks the protocol's methods."""
    if not isinstance(name, str) or not name:
        raise TypeError("engine name must be a non-empty string")
    if not isinstance(cls, type):
        raise TypeError(f"register() needs a class, got {cls!r}")
    for method in ("influence", "aperture_dose"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"dose engine {cls.__name__} has no {method}() method")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            register(ep.name, ep.load())
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break atp
            import warnings

            warnings.warn(f"dose engine entry point {ep.name!r} failed to load: {exc}",
                          stacklevel=2)


def available() -> list[str]:
    """Names of every registered engine."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get(spec="pencil-beam"):
    """An engine instance from an instance, a name or a ``{"name": ..., **kw}`` dict."""
    if spec is None:
        spec = "pencil-beam"
    if not isinstance(spec, (str, dict)):
        if callable(getattr(spec, "influence", None)):
            return spec
        raise InputError(f"not a dose engine: {spec!r}", field="engine")
    kwargs = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not name:
            raise InputError("engine dict needs a 'name'", field="engine")
    else:
        name = spec
    _load_entry_points()
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"dose engine '{name}' is not installed; installed: {', '.join(available())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise InputError(f"bad options for dose engine '{name}': {exc}",
                         field="engine") from None


def _register_builtins() -> None:
    from atp.dose.pencil_beam import PencilBeamEngine

    register("pencil-beam", PencilBeamEngine)


_register_builtins()
