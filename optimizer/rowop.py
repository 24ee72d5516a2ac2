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

from atp.xp import ThreadedCSR, device_csr_pair, sparse_module


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
