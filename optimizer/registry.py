"""Backend registry: a name (``--backend cpu``) -> an optimiser backend.

One :class:`atp.registry.Registry`. Built-ins: ``cpu``, ``gpu``, ``qp``. Third parties add
theirs through the ``atp.backends`` entry-point group (a class or an instance with the
Backend attributes ``name``, ``is_installed``, ``solve``) or ``register(obj)``.
``resolve(name)`` turns a request into a usable backend: ``auto`` picks ``gpu`` when a
GPU is present, else ``cpu``; an unknown or unusable name raises
:class:`~atp.errors.BackendUnavailableError` listing what is installed and how to fix it;
a broken plug-in raises :class:`atp.registry.PluginError` naming its entry point.
"""

from __future__ import annotations

from atp.errors import BackendUnavailableError
from atp.registry import PluginError, Registry

ENTRY_POINT_GROUP = "atp.backends"
BUILTIN = {
    "cpu": "atp.optimizer.backends.cpu:CpuBackend",
    "gpu": "atp.optimizer.backends.gpu:GpuBackend",
    "qp": "atp.optimizer.backends.qp:QpBackend",
}
BACKENDS = Registry("backend", ENTRY_POINT_GROUP, methods=("is_installed", "solve"),
                    attributes=("name",), builtins=BUILTIN)

register = BACKENDS.register
unregister = BACKENDS.unregister
names = BACKENDS.names


def is_installed(name: str) -> bool:
    """Whether the backend's libraries are present (False for a broken plug-in, which
    ``atp list`` shows with its reason)."""
    try:
        return bool(BACKENDS.load(name).is_installed())
    except PluginError:
        return False


def installed() -> list[str]:
    return [n for n in names() if is_installed(n)]


def get(name):
    """A backend instance for a name, class or instance (not checked for availability)."""
    return BACKENDS.get(name)


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
