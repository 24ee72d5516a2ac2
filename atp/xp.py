"""The array-module helper: write array maths once for NumPy (CPU) and CuPy (GPU).

``xp = array_module(x)`` returns ``cupy`` when ``x`` is a CuPy array and ``numpy``
otherwise. CuPy is probed once, lazily, and never imported at the top of a maths module.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import numpy as np
import scipy.sparse


@functools.lru_cache(maxsize=1)
def cupy_or_none() -> ModuleType | None:
    """Return the cupy module when it is installed *and* a CUDA device is present."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy  # optional heavy dependency (atp[gpu])

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - no driver, no device: treated as "no GPU"
        return None


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    return cupy_or_none() is not None


def array_module(*arrays) -> ModuleType:
    """numpy or cupy, whichever the given arrays live in (numpy when mixed/none)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy  # optional heavy dependency (atp[gpu])

            return cupy
        if mod.startswith("cupyx"):
            import cupy  # optional heavy dependency (atp[gpu])

            return cupy
    return np


def sparse_module(xp: ModuleType) -> ModuleType:
    """scipy.sparse for numpy, cupyx.scipy.sparse for cupy."""
    if xp is np:
        return scipy.sparse
    import cupyx.scipy.sparse  # optional (atp[gpu])

    return cupyx.scipy.sparse


def to_numpy(a) -> np.ndarray:
    """Bring an array (numpy or cupy) to host memory as a numpy array."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
