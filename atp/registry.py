"""One registry for every kind of plug-in: dose engines, predictors, optimiser backends and
sequencers (``atp.dose.registry``, ``atp.predictor.registry``, ``atp.optimizer.registry``,
``atp.sequencer.registry`` are thin wrappers around one :class:`Registry` each).

A registry maps a name (``--backend cpu``) to a *target*: a class, a factory (a callable
returning an instance), an instance, or a lazy ``"module:attr"`` string imported on first
use. Targets come from three places, in this order of precedence:

1. built-ins, given when the registry is made (lazy strings, so nothing is imported early);
2. run-time registration: ``reg.register(name, target, replace=False)``, or as a decorator
   ``@reg.register("name")``; an object with a ``name`` attribute may be registered as
   ``reg.register(obj)``;
3. the entry-point group of the kind (``atp.dose_engines``, ``atp.predictors``,
   ``atp.backends``, ``atp.sequencers``), read once, on the first lookup::

       [project.entry-points."atp.backends"]
       vendor = "vendor_pkg.solver:VendorBackend"

One policy for broken plug-ins: a target that cannot be imported, or that does not follow
its kind's protocol (the methods and attributes the registry names), is kept under its
name. Using it raises :class:`PluginError` naming the entry point and its target and the
one-line reason; :meth:`Registry.listing` (``atp list``) shows it as broken with that
reason. A broken plug-in is never silently missing and never breaks the other names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from atp.errors import BackendUnavailableError, InputError

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_UNLOADED = object()


class RegistrationError(InputError, TypeError):
    """A registration refused: an empty name, a name already taken (without
    ``replace=True``), or a target that does not follow the kind's protocol."""


class PluginError(BackendUnavailableError):
    """A registered plug-in that cannot be loaded or does not follow its kind's protocol."""


@dataclass(frozen=True)
class PluginInfo:
    """One row of :meth:`Registry.listing`."""

    name: str
    origin: str  # "built-in", "registered" or "entry point <group> (<distribution>)"
    target: str  # "module:attr", or the registered object's repr
    error: str | None = None  # one-line reason when the plug-in is broken

    @property
    def broken(self) -> bool:
        return self.error is not None


class _Entry:
    __slots__ = ("error", "name", "origin", "target", "value")

    def __init__(self, name: str, target, origin: str) -> None:
        self.name, self.target, self.origin = name, target, origin
        self.value = target if not isinstance(target, (str, EntryPoint)) else _UNLOADED
        self.error: str | None = None

    @property
    def target_text(self) -> str:
        if isinstance(self.target, EntryPoint):
            return self.target.value
        if isinstance(self.target, str):
            return self.target
        mod = getattr(self.target, "__module__", None)
        qual = getattr(self.target, "__qualname__", None)
        return f"{mod}:{qual}" if mod and qual else repr(self.target)

    def describe(self) -> str:
        return f"{self.origin} {self.name} = {self.target_text}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_target(target) -> object:
    if isinstance(target, EntryPoint):
        return target.load()
    return EntryPoint(name="", value=target, group="").load()


class Registry:
    """Names -> plug-ins of one kind.

    kind: the word used in messages ("dose engine"); group: the entry-point group;
    methods: callables every class / instance must have; attributes: plain attributes every
    instance must have (checked on instances only, so classes may set them in __init__);
    builtins: name -> target, or a callable returning that dict, called on first use (e.g.
    to read an index of shipped weights).
    """

    def __init__(self, kind: str, group: str, *, methods: Iterable[str] = (),
                 attributes: Iterable[str] = (),
                 builtins: dict | Callable[[], dict] | None = None) -> None:
        self.kind, self.group = kind, group
        self.methods, self.attributes = tuple(methods), tuple(attributes)
        self._builtins = builtins
        self._entries: dict[str, _Entry] = {}
        self._shadowed: list[_Entry] = []
        self._built = self._scanned = False

    # --- registration --------------------------------------------------------------
    def register(self, name, target=None, *, replace: bool = False):
        """Register ``target`` under ``name``; returns the target. ``register(obj)`` takes
        the name from ``obj.name``; ``register("name")`` returns a class/function decorator.
        A name already taken is refused unless ``replace=True``."""
        if target is None and isinstance(name, str):
            return lambda obj: self.register(name, obj, replace=replace)
        if target is None:
            target, name = name, getattr(name, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise RegistrationError(f"{self.kind} name must be a non-empty string, got "
                                    f"{name!r}", field="name")
        self._check_target(name, target)
        self._ensure_ready()
        if name in self._entries and not replace:
            raise RegistrationError(f"{self.kind} '{name}' is already registered "
                                    f"({self._entries[name].describe()}); pass replace=True",
                                    field=name)
        self._entries[name] = _Entry(name, target, "registered")
        return target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def refresh(self) -> None:
        """Forget what was read from entry points; they are read again on the next lookup."""
        self._entries = {n: e for n, e in self._entries.items()
                         if not e.origin.startswith("entry point")}
        self._shadowed, self._scanned = [], False

    def _check_target(self, name: str, target) -> None:
        if isinstance(target, str):
            if not _TARGET.match(target):
                raise RegistrationError(f"{self.kind} '{name}': a lazy target is written "
                                        f"'module:attr', got {target!r}")
            return
        problem = self._protocol_problem(target)
        if problem:
            raise RegistrationError(f"{self.kind} '{name}': {problem}")

    def _is_instance(self, obj) -> bool:
        return not isinstance(obj, type) and all(
            callable(getattr(obj, m, None)) for m in self.methods)

    def _protocol_problem(self, obj) -> str | None:
        """Why ``obj`` is not a class, factory or instance of this kind (None when it is)."""
        if isinstance(obj, type):
            missing = [m for m in self.methods if not callable(getattr(obj, m, None))]
            return f"class {obj.__name__} has no {', '.join(missing)}()" if missing else None
        if self._is_instance(obj):
            return self._instance_problem(obj)
        if callable(obj):
            return None  # a factory: its product is checked when it is called
        return f"{obj!r} is not a class, a factory or an instance with " \
               f"{', '.join(self.methods + self.attributes)}"

    def _instance_problem(self, obj) -> str | None:
        missing = [a for a in self.methods + self.attributes if not hasattr(obj, a)]
        return f"{type(obj).__name__} lacks {', '.join(missing)}" if missing else None

    # --- population ----------------------------------------------------------------
    def _ensure_ready(self) -> None:
        if not self._built:
            self._built = True
            builtins = self._builtins() if callable(self._builtins) else self._builtins
            for n, t in (builtins or {}).items():
                self._check_target(n, t)
                self._entries.setdefault(n, _Entry(n, t, "built-in"))
        if self._scanned:
            return
        self._scanned = True
        for ep in entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            origin = f"entry point {self.group}" + (f" ({dist})" if dist else "")
            entry = _Entry(ep.name, ep, origin)
            if ep.name in self._entries:
                self._shadowed.append(entry)
            else:
                self._entries[ep.name] = entry

    # --- lookup --------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name, broken plug-ins included."""
        self._ensure_ready()
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        self._ensure_ready()
        return name in self._entries

    def _resolve(self, entry: _Entry):
        if entry.value is _UNLOADED and entry.error is None:
            try:
                value = _import_target(entry.target)
            except Exception as exc:  # noqa: BLE001 - any failure of a plug-in's import
                entry.error = f"failed to load: {_one_line(exc)}"
            else:
                problem = self._protocol_problem(value)
                if problem:
                    entry.error = problem
                else:
                    entry.value = value
        if entry.error is not None:
            raise PluginError(f"{self.kind} '{entry.name}' ({entry.describe()}) is broken: "
                              f"{entry.error}")
        return entry.value

    def load(self, name: str):
        """The target registered as ``name`` (imported if lazy): a class, factory or
        instance. Unknown names raise BackendUnavailableError listing the known ones;
        broken plug-ins raise PluginError."""
        self._ensure_ready()
        entry = self._entries.get(name)
        if entry is None:
            raise BackendUnavailableError(
                f"{self.kind} '{name}' is not installed; known: {', '.join(self.names())} "
                f"(third parties add theirs through the '{self.group}' entry-point group)")
        return self._resolve(entry)

    def create(self, name: str, **kwargs):
        """An instance of ``name``: classes and factories are called with ``kwargs``."""
        return self._instantiate(self.load(name), name, kwargs)

    def get(self, spec, **kwargs):
        """An instance from a name, a ``{"name": ..., **kwargs}`` dict, a class or an
        instance (returned as is)."""
        if isinstance(spec, dict):
            kwargs = {**spec, **kwargs}
            name = kwargs.pop("name", None)
            if not isinstance(name, str) or not name:
                raise InputError(f"{self.kind} dict needs a 'name'", field=self.kind)
            return self.create(name, **kwargs)
        if isinstance(spec, str):
            return self.create(spec, **kwargs)
        if isinstance(spec, type) and self._protocol_problem(spec) is None:
            return self._instantiate(spec, spec.__name__, kwargs)
        if self._is_instance(spec) and self._instance_problem(spec) is None:
            return spec
        raise InputError(f"not a {self.kind}: {spec!r}", field=self.kind)

    def _instantiate(self, obj, name: str, kwargs: dict):
        if self._is_instance(obj):
            if kwargs:
                raise InputError(f"{self.kind} '{name}' is an instance and takes no "
                                 f"options, got {sorted(kwargs)}", field=self.kind)
            return obj
        try:
            made = obj(**kwargs)
        except TypeError as exc:
            raise InputError(f"bad options for {self.kind} '{name}': {exc}",
                             field=self.kind) from None
        problem = self._instance_problem(made) if self._is_instance(made) else \
            f"it returned {type(made).__name__}, which has no " \
            f"{', '.join(self.methods + self.attributes)}"
        if problem:
            raise PluginError(f"{self.kind} '{name}' is broken: {problem}")
        return made

    def listing(self) -> list[PluginInfo]:
        """Every name with its origin and target, loading each (not instantiating it) to
        report broken plug-ins with their one-line reason; shadowed entry points (a name
        already taken) are listed as broken too."""
        self._ensure_ready()
        rows = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            try:
                self._resolve(entry)
            except PluginError:
                pass
            rows.append(PluginInfo(name, entry.origin, entry.target_text, entry.error))
        for entry in self._shadowed:
            taken = self._entries[entry.name]
            rows.append(PluginInfo(entry.name, entry.origin, entry.target_text,
                                   f"ignored: the name is taken by the {taken.origin} one"))
        return rows
