"""Backend registry: a name (``--backend cpu``) -> an optimiser backend.

Built-ins: ``cpu``, ``gpu``, ``qp``. Third parties add theirs through the
``atp.backends`` entry-point group (a class or an instance with the Backend attributes).
``resolve(name)`` turns a request into a usable backend: ``auto`` picks ``gpu`` when a
GPU is present, else ``cpu``; an unknown or unusable name raises
:class:`~atp.errors.BackendUnavailableError` listing what is installed and how to fix it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from atp.errors import BackendUnavailableError

BUILTIN = {
    "cpu": "atp.optimizer.backends.cpu:CpuBackend",
    "gpu": "atp.optimizer.backends.gpu:GpuBackend",
    "qp": "atp.optimizer.backends.qp:QpBackend",
}
REQUIRED = ("name", "is_installed", "solve")
_registered: dict[str, object] = {}


def register(backend) -> None:
    """Add a backend class or instance (checked for the required attributes)."""
    missing = [a for a in REQUIRED if not hasattr(backend, a)]
    if missing:
        raise TypeError(f"backend {backend!r} lacks {missing}")
    _registered[backend.name] = backend


def _load(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _entry_point_backends() -> dict[str, object]:
    out = {}
    for ep in entry_points(group="atp.backends"):
        out[ep.name] = ep
    return out


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered) | set(_entry_point_backends()))


def _class_for(name: str):
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        return _load(BUILTIN[name])
    eps = _entry_point_backends()
    if name in eps:
        obj = eps[name].load()
        register(obj)
        return obj
    raise BackendUnavailableError(
        f"unknown backend '{name}'; known: {', '.join(names())} (or 'auto')")


def installed() -> list[str]:
    return [n for n in names() if _safe_installed(n)]


def _safe_installed(name: str) -> bool:
    try:
        return bool(_class_for(name).is_installed())
    except Exception:  # noqa: BLE001 - a broken third-party plugin is "not installed"
        return False


def get(name):
    """A backend instance for a name, class or instance (not checked for availability)."""
    if not isinstance(name, str):
        return name() if isinstance(name, type) else name
    cls = _class_for(name)
    return cls() if isinstance(cls, type) else cls


def resolve(name: str = "auto"):
    """A backend that can run here; ``auto``: gpu if a GPU is present, else cpu."""
    if not isinstance(name, str):
        return get(name)
    if name == "auto":
        gpu = get("gpu")
        return gpu if gpu.available() else get("cpu")
    backend = get(name)
    avail = backend.available() if hasattr(backend, "available") else backend.is_installed()
    if not avail:
        hint = getattr(backend, "install_hint", "")
        why = "no usable GPU here" if name == "gpu" and backend.is_installed() else \
            "not installed"
        raise BackendUnavailableError(
            f"backend '{name}' is unavailable ({why}); installed: {', '.join(installed())}"
            + (f"; to enable it: {hint}" if hint else "")
            + ("; or use --backend auto" if name == "gpu" else ""))
    return backend
