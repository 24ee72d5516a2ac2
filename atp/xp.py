"""The array-module helper: write array maths once for NumPy (CPU) and CuPy (GPU).

``xp = array_module(x)`` returns ``cupy`` when ``x`` is a CuPy array and ``numpy``
otherwise. CuPy is probed once, lazily, and never imported at the top of a maths module.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
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


def host_threads() -> int:
    """Threads host (NumPy / SciPy) maths may use: ``OMP_NUM_THREADS`` when set (``atp
    batch`` sets it per worker), else the CPUs this process may run on."""
    v = os.environ.get("OMP_NUM_THREADS", "").strip()
    if v.isdigit() and int(v) > 0:
        return int(v)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_POOL: dict = {}
_POOL_LOCK = threading.Lock()
_POOL_PREFIX = "atp-host"


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's pool threads, while the executors would
    believe theirs still run (and queue work for them forever): start afresh."""
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if n not in _POOL:
            _POOL[n] = ThreadPoolExecutor(n, thread_name_prefix=_POOL_PREFIX)
        return _POOL[n]


def host_map(fn, items) -> list:
    """``[fn(x) for x in items]``, in :func:`host_threads` threads when there are more than
    one (for NumPy work that releases the GIL); the results keep the items' order, so a
    caller that adds them up in that order gets the serial sum bit for bit."""
    items = list(items)
    n = min(host_threads(), len(items))
    if n <= 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
        # (inside a pool thread: serially, since waiting on the same pool can deadlock)
        return [fn(x) for x in items]
    return list(_pool(n).map(fn, items))


class ThreadedCSR:
    """A SciPy CSR matrix whose product with a vector runs row blocks of about equal
    non-zeros in threads. SciPy's ``csr_matvec`` releases the GIL but uses one core, and
    the fluence optimiser spends most of its time in it; each row's sum is computed exactly
    as in ``A @ x``, so the result is bitwise the same. Anything but a 1-D product (and
    small matrices) goes to the matrix itself."""

    MIN_NNZ = 200_000  # below this the threads cost more than they save

    def __init__(self, A, threads: int | None = None) -> None:
        self.A = A.tocsr()
        self.shape, self.dtype = self.A.shape, self.A.dtype
        n = self.threads = _threads_for(self.A, threads)
        self.bounds = None
        if n > 1 and self.A.nnz >= self.MIN_NNZ:
            ip = self.A.indptr
            cuts = np.searchsorted(ip, np.linspace(0, ip[-1], n + 1)[1:-1])
            edges = np.unique(np.concatenate([[0], cuts, [self.A.shape[0]]]))
            self.bounds = [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]
            self.blocks = [_row_block(self.A, a, b) for a, b in self.bounds]

    def __matmul__(self, x):
        if self.bounds is None or np.ndim(x) != 1:
            return self.A @ x
        out = np.empty(self.shape[0], dtype=np.result_type(self.dtype, np.asarray(x).dtype))

        def part(i):
            a, b = self.bounds[i]
            out[a:b] = self.blocks[i] @ x

        list(_pool(self.threads).map(part, range(len(self.bounds))))
        return out


def _threads_for(A, threads: int | None = None) -> int:
    """Row-block threads for ``A``: ``threads`` (default :func:`host_threads`), at most
    one a row."""
    n = host_threads() if threads is None else max(1, int(threads))
    return min(n, max(1, A.shape[0]))


def _row_block(A, a: int, b: int):
    """Rows a:b of CSR ``A`` as a CSR matrix on views of its arrays (SciPy's slicing
    copies, 0.14 s for an OpenKBP dose matrix)."""
    ip = A.indptr
    lo, hi = int(ip[a]), int(ip[b])
    return scipy.sparse.csr_matrix((A.data[lo:hi], A.indices[lo:hi], ip[a:b + 1] - lo),
                                   shape=(b - a, A.shape[1]), copy=False)


def _cached(store: dict, A, make):
    """``make(A)``, kept for as long as ``A`` lives (keyed by identity: every warm
    re-solve of a plan, the attainment and correction rounds, reuses the same matrix)."""
    hit = store.get(id(A))
    if hit is not None and hit[0]() is A:
        return hit[1]
    out = make(A)
    for k in [k for k, (r, _) in store.items() if r() is None]:
        del store[k]
    store[id(A)] = (weakref.ref(A), out)
    return out


_TRANSPOSES: dict = {}  # id(A) -> (weakref to A, A.T as CSR)
_THREADED: dict = {}  # id(A) -> (weakref to A, ThreadedCSR(A))


def csr_transpose(A):
    """``A.T.tocsr()``, cached while ``A`` lives (0.3 s a solve on an OpenKBP patient)."""
    return _cached(_TRANSPOSES, A, lambda m: m.T.tocsr())


def device_csr_pair(A, xp):
    """``(A, A^T)`` of CSR ``A`` for products on ``xp``: row-block threaded on NumPy
    (:func:`threaded_csr`, bitwise SciPy's products; the transpose cached while ``A``
    lives), cupyx sparse on CuPy."""
    AT = csr_transpose(A)
    if xp is np:
        return threaded_csr(A), threaded_csr(AT)
    sparse = sparse_module(xp)
    return sparse.csr_matrix(A), sparse.csr_matrix(AT)


def threaded_csr(A) -> ThreadedCSR:
    """:class:`ThreadedCSR` of CSR ``A`` at :func:`host_threads`, cached while ``A``
    lives and the thread count is unchanged."""
    t = _cached(_THREADED, A, ThreadedCSR)
    if t.threads != _threads_for(A):
        t = ThreadedCSR(A)
        _THREADED[id(A)] = (weakref.ref(A), t)
    return t
