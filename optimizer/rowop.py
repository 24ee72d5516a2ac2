"""The problem matrix when some of its rows are patient-grid voxels (``fine_target_edges``).

A patient-grid (CT-grid) row is the trilinear interpolation of eight dose-grid rows of the
dij, so storing it as a sparse row holds about the union of those eight rows' non-zeros:
41-71 % of the matrix's non-zeros on OpenKBP patients (an arc's 120 control points: 949 M
non-zeros on train pt_173, more than a 23 GB machine holds with its transpose). Those
dose-grid rows are (nearly all) rows of the matrix already, so

    A = [ B[:top] ]      B: the dose-grid rows (``top`` the problem's own, then any
        [ S  B    ]         interpolation source the problem does not use),
                         S: (patient rows, rows of B), eight weights a row,

and ``A w = [b[:top]; S b]`` with ``b = B w``; ``A^T y = B^T (y[:top] + S^T y[top:])``.
The products cost B's non-zeros plus eight a patient row, and the result is the
interpolation of the dose-grid dose exactly as the reported dose is interpolated to the
patient grid (in float32, where the stored rows were summed in float64 then rounded).

:class:`InterpolatedRows` is that operator on the host (SciPy CSR); ``on(xp)`` gives the
device form the first-order solvers use (row-block threaded products on NumPy, cupyx
sparse on CuPy), one code path for both.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from atp.xp import ThreadedCSR, csr_transpose, device_csr_pair, sparse_module


class InterpolatedRows:
    """``A = [B[:top]; S B]`` (see the module docstring). B: CSR (n_base, n_cols); S: CSR
    (n_fine, n_base), float32. Behaves as the (top + n_fine, n_cols) matrix for ``@`` with
    a vector or a (dense or sparse) matrix, ``.T @``, ``tocsr()`` and ``astype``."""

    format = "interpolated"

    def __init__(self, B, S, top: int, xp=np, BT=None, ST=None):
        self.B, self.S, self.top, self.xp = B, S, int(top), xp
        self._BT, self._ST = BT, ST
        self.shape = (self.top + S.shape[0], B.shape[1])
        self.dtype = np.dtype(B.dtype)

    @property
    def nnz(self) -> int:
        """Stored non-zeros (B's and S's): what the operator costs in memory and time."""
        return int(_csr(self.B).nnz + _csr(self.S).nnz)

    @property
    def BT(self):
        """B^T: the one given (the device form's), else B's CSC view (no copy)."""
        return self.B.T if self._BT is None else self._BT

    @property
    def ST(self):
        if self._ST is None:
            self._ST = self.S.T.tocsr()
        return self._ST

    def __matmul__(self, x):
        b = self.B @ x
        fine = self.S @ b
        top = b[:self.top] if b.shape[0] != self.top else b
        if sp.issparse(b):
            return sp.vstack([top, fine], format="csr")
        return self.xp.concatenate([top, fine])

    def rmatvec(self, y):
        """``A^T y`` (y: (n_rows,) or (n_rows, k) dense)."""
        xp = self.xp
        z = self.ST @ y[self.top:]
        if z.shape[0] == self.top:
            z = z + y[:self.top]
        else:
            z = xp.concatenate([z[:self.top] + y[:self.top], z[self.top:]])
        return self.BT @ z

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def astype(self, dtype, copy: bool = True) -> InterpolatedRows:
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return InterpolatedRows(self.B.astype(dtype), self.S.astype(dtype), self.top, self.xp)

    def tocsr(self) -> sp.csr_matrix:
        """The stored matrix (for the QP backend: it holds every patient row's union)."""
        B = _csr(self.B)
        return sp.vstack([B[:self.top], _csr(self.S) @ B], format="csr")

    def on(self, xp) -> InterpolatedRows:
        """The operator for the solvers on ``xp``: NumPy row-block threaded products
        (:func:`atp.xp.threaded_csr`, bitwise those of SciPy), CuPy sparse on a GPU."""
        if isinstance(self.B, TailGrouped):
            B = self.B.on(xp)
            BT = B.T
        else:
            B, BT = device_csr_pair(self.B, xp)
        if xp is np:
            return InterpolatedRows(B, self.S, self.top, np, BT, self.ST)
        sparse = sparse_module(xp)
        return InterpolatedRows(B, sparse.csr_matrix(self.S), self.top, xp, BT,
                                sparse.csr_matrix(self.ST))


class _Transposed:
    """``A.T`` of an :class:`InterpolatedRows` (``@`` only)."""

    def __init__(self, op: InterpolatedRows):
        self.op = op
        self.shape = (op.shape[1], op.shape[0])
        self.dtype = op.dtype

    def __matmul__(self, y):
        if sp.issparse(y):
            y = y.toarray()
        return self.op.rmatvec(y)


def _csr(m):
    """The SciPy matrix behind a :class:`atp.xp.ThreadedCSR` (or ``m`` itself; not
    ``getattr(m, 'A')``: SciPy < 1.14's sparse matrices have ``.A``, their dense copy)."""
    return m.A if isinstance(m, ThreadedCSR) else m


def interpolated_rows(dij_csr, real: np.ndarray, interp: sp.csr_matrix,
                      dtype=np.float32) -> InterpolatedRows:
    """The operator for a problem whose rows are the dij's rows ``real`` (sorted dose-grid
    voxel indices) then the patient-grid rows ``interp`` (CSR over the dose-grid voxels)
    interpolates: source voxels outside ``real`` become extra rows of B after them."""
    interp = interp.tocsr()
    cols = np.unique(interp.indices)
    pos_c = np.minimum(np.searchsorted(real, cols), max(real.size - 1, 0))
    found = real[pos_c] == cols if real.size else np.zeros(cols.size, bool)
    extra = cols[~found]
    base = np.concatenate([real, extra])
    where = np.empty(cols.size, np.int64)  # each source voxel's row of B
    where[found] = pos_c[found]
    where[~found] = real.size + np.arange(extra.size)
    remap = where[np.searchsorted(cols, interp.indices)]
    S = sp.csr_matrix((interp.data.astype(dtype), remap, interp.indptr.copy()),
                      shape=(interp.shape[0], base.size))
    B = sp.csr_matrix(dij_csr[base, :], dtype=dtype)
    return InterpolatedRows(B, S, real.size)


class TailGrouped:
    """``A ~ N + R_c P^T``: the first-order solvers' form of a dij's rows (CSR ``A``).

    A pencil beam's dose falls off smoothly away from its axis, so most of a dij's stored
    non-zeros are its scatter tail: on OpenKBP patients the entries under 0.3 % of their
    beam's peak are ~95 % of the non-zeros and ~15 % of the dose. Neighbouring beamlets'
    tails are nearly the same, so the tail is kept once per group of ``g x g``
    neighbouring beamlets of a beam (their mean, ``R_c``; ``P`` (beamlets, groups) maps
    each beamlet to its group) and the entries at or above the threshold exactly (``N``).
    A fluence uniform over each group gets exactly ``A w``; otherwise the error is the
    fluence's variation within a group times the tail's variation over it (2 x 2 groups of
    5 mm beamlets at 0.3 %: within 0.1 Gy of the exact rows on a 70 Gy plan, a third of the
    products' cost). The exact matrix stays the problem's ``A`` (measurement, the QP
    backend, reported doses); only the iterations use this one
    (``ProblemOptions.dij_tail_threshold`` / ``dij_tail_group``)."""

    format = "tail-grouped"

    def __init__(self, N, Rc, P, xp=np, NT=None, RcT=None, PT=None):
        self.N, self.Rc, self.P, self.xp = N, Rc, P, xp
        self._NT, self._RcT, self._PT = NT, RcT, PT
        self.shape = N.shape
        self.dtype = np.dtype(N.dtype)

    @property
    def nnz(self) -> int:
        return int(_csr(self.N).nnz + _csr(self.Rc).nnz)

    def __matmul__(self, x):
        PT = csr_transpose(self.P) if self._PT is None else self._PT
        return self.N @ x + self.Rc @ (PT @ x)

    def rmatvec(self, y):
        """``A^T y`` (y: (n_rows,) or (n_rows, k) dense)."""
        NT = csr_transpose(self.N) if self._NT is None else self._NT
        RcT = csr_transpose(self.Rc) if self._RcT is None else self._RcT
        return NT @ y + self.P @ (RcT @ y)

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def on(self, xp) -> TailGrouped:
        """The operator on ``xp``: each factor as :func:`atp.xp.device_csr_pair` makes it
        (row-block threaded on NumPy, cupyx sparse on CuPy; cached while they live)."""
        N, NT = device_csr_pair(_csr(self.N), xp)
        Rc, RcT = device_csr_pair(_csr(self.Rc), xp)
        P, PT = device_csr_pair(_csr(self.P), xp)
        return TailGrouped(N, Rc, P, xp, NT, RcT, PT)


def beamlet_groups(beam_index, bev_x_mm, bev_y_mm, beamlet_size_mm, group: int) -> np.ndarray:
    """Each beamlet's group: the ``group x group`` block of its beam's beamlet grid that
    holds it (group indices 0.. in the order of (beam, block x, block y))."""
    bx, by = (float(beamlet_size_mm[0]), float(beamlet_size_mm[1])) \
        if np.ndim(beamlet_size_mm) else (float(beamlet_size_mm),) * 2
    ix = np.floor(np.asarray(bev_x_mm, np.float64) / bx + 1e-6).astype(np.int64)
    iy = np.floor(np.asarray(bev_y_mm, np.float64) / by + 1e-6).astype(np.int64)
    key = np.stack([np.asarray(beam_index, np.int64), ix // int(group), iy // int(group)], 1)
    return np.unique(key, axis=0, return_inverse=True)[1].reshape(-1)


def tail_grouped(A, cut: np.ndarray, groups: np.ndarray) -> TailGrouped:
    """:class:`TailGrouped` of CSR ``A`` (rows, beamlets): entries below ``cut`` (per
    beamlet) are the tail, averaged over ``groups`` (per beamlet, :func:`beamlet_groups`)."""
    A = sp.csr_matrix(A)
    n_cols = A.shape[1]
    groups = np.asarray(groups, np.int64)
    tail = A.data < np.asarray(cut, A.dtype)[A.indices]

    def part(keep):
        m = sp.csr_matrix((np.where(keep, A.data, 0).astype(A.dtype), A.indices.copy(),
                           A.indptr.copy()), shape=A.shape)
        m.eliminate_zeros()
        return m

    N, R = part(~tail), part(tail)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    count = np.bincount(groups, minlength=n_groups).astype(np.float64)
    P = sp.csr_matrix((np.ones(n_cols, A.dtype), (np.arange(n_cols), groups)),
                      shape=(n_cols, n_groups))
    mean = sp.csr_matrix(((1.0 / count[groups]).astype(A.dtype),
                          (np.arange(n_cols), groups)), shape=(n_cols, n_groups))
    Rc = sp.csr_matrix(R @ mean, dtype=A.dtype)
    Rc.sort_indices()
    return TailGrouped(N, Rc, P)
