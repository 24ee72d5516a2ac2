"""Differentiable dose: ``dose = A @ w`` with the dose-influence matrix A as a constant.

The backward pass is the exact transpose product ``A.T @ grad``; both products use CSR
tensors prepared once (A and A.T), so a GPU run uploads the matrix once and never goes
back to the host inside a loop. Dose is on the dij's dose grid (flattened, Gy); w is the
beamlet fluence in MU.

Speed: the CSR index arrays are int32 whenever the matrix allows (fewer than 2^31
non-zeros), which makes torch's CPU sparse x dense product ~3x faster than with int64
indices; and A.T's CSR arrays are the CSC arrays of A (a dij is stored CSC), so building
the transpose costs no sort. The one CSC -> CSR conversion (A's forward arrays, ~0.4-1 s
for a 23 M non-zero head-and-neck arc on one core) is kept on the host
(:attr:`TorchDose.host_csr`: the CPU tensor's own arrays; on a GPU a host copy of
the matrix, ~8 bytes per non-zero), so a
:class:`RowDose` of any row set slices its forward rows from it instead of converting
again. The fast path passes :attr:`atp.dose.influence.DoseInfluence.csr` (converted
once per dij and kept with it), so a second plan on the same dij converts nothing.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def _csr_parts_tensor(indptr, indices, data, shape, device, dtype) -> torch.Tensor:
    idx = np.int32 if int(indptr[-1]) < 2 ** 31 - 1 and max(shape) < 2 ** 31 - 1 else np.int64
    with warnings.catch_warnings():  # "CSR support is in beta": we rely on matmul only
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(np.ascontiguousarray(indptr, dtype=idx)),
            torch.from_numpy(np.ascontiguousarray(indices, dtype=idx)),
            torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
            size=shape, device=device, dtype=dtype, check_invariants=False)


def _sorted_csr(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m)
    m.sort_indices()
    return m


def _csr_tensor(m: sp.csr_matrix, device, dtype) -> torch.Tensor:
    return _csr_parts_tensor(m.indptr, m.indices, m.data, m.shape, device, dtype)


def _transpose_csr_tensor(m: sp.spmatrix, device, dtype) -> torch.Tensor:
    """CSR tensor of m.T: the CSC arrays of m, read as CSR of the transpose."""
    c = m if sp.isspmatrix_csc(m) else sp.csc_matrix(m)
    if not c.has_sorted_indices:
        c = c.copy()
        c.sort_indices()
    return _csr_parts_tensor(c.indptr, c.indices, c.data, (m.shape[1], m.shape[0]), device,
                             dtype)


class _SparseMatVec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, a_t, w):
        ctx.a_t = a_t
        return (a @ w.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        return None, None, (ctx.a_t @ grad.unsqueeze(-1)).squeeze(-1)


class TorchDose:
    """A dose-influence matrix on a torch device, as a differentiable linear map.

    matrix: scipy sparse (n_voxels, n_beamlets), Gy per MU. csr: the same matrix as a
    sorted SciPy CSR when the caller has it (skips the conversion). ``host_csr`` keeps
    the CSR form for row slicing (:meth:`restrict_rows`).
    """

    def __init__(self, matrix: sp.spmatrix, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, csr: sp.csr_matrix | None = None
                 ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = matrix.shape
        if csr is None:
            csr = _sorted_csr(matrix)
        elif csr.shape != matrix.shape:
            raise ValueError(f"csr has shape {csr.shape}, the matrix {matrix.shape}")
        self.host_csr = csr
        self.a = _csr_tensor(csr, self.device, dtype)
        self.a_t = _transpose_csr_tensor(matrix, self.device, dtype)

    def restrict_rows(self, rows, row_matrix: sp.spmatrix) -> RowDose:
        """:class:`RowDose` of this map on the sorted voxel indices ``rows``;
        ``row_matrix``: the same rows as SciPy CSC (its arrays are the transpose's), the
        forward rows are sliced from :attr:`host_csr` (no CSC -> CSR conversion)."""
        rows = np.asarray(rows, dtype=np.int64)
        return RowDose(row_matrix, rows, self.shape[0], self.device, self.dtype,
                       row_csr=_sorted_csr(self.host_csr[rows]))

    @classmethod
    def from_influence(cls, dij, device="cpu") -> TorchDose:
        return cls(dij.matrix, device)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Dose (n_voxels,) Gy for fluence w (n_beamlets,) MU; differentiable in w."""
        return _SparseMatVec.apply(self.a, self.a_t, w)

    def transpose_apply(self, g: torch.Tensor) -> torch.Tensor:
        """A.T @ g: back-projects a voxel field onto the beamlets (no autograd)."""
        return (self.a_t @ g.unsqueeze(-1)).squeeze(-1)


class RowDose:
    """``A`` restricted to the dose-grid rows an objective reads, with the full map's
    interface: ``op(w)`` is the full (n_voxels,) dose vector, exact on ``rows`` and 0
    elsewhere; ``op.transpose_apply(g)`` is ``A[rows].T @ g[rows]``, which equals
    ``A.T @ g`` for any g that is 0 off ``rows`` -- such as the error map of an
    objective whose ``voxel_support()`` is ``rows``. The correction loops run on it at
    the cost of the rows' non-zeros (about half of a head-and-neck arc dij's).

    row_matrix: scipy sparse ``A[rows]`` (len(rows), n_beamlets); n_voxels: A's rows;
    row_csr: the same rows as sorted SciPy CSR when known
    (:meth:`TorchDose.restrict_rows`).
    """

    def __init__(self, row_matrix: sp.spmatrix, rows, n_voxels: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 *, row_csr: sp.csr_matrix | None = None):
        self.sub = TorchDose(row_matrix, device, dtype, csr=row_csr)
        self.device, self.dtype = self.sub.device, dtype
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        if self.rows.numel() != row_matrix.shape[0]:
            raise ValueError(f"{self.rows.numel()} rows for a row matrix of "
                             f"{row_matrix.shape[0]}")
        self.shape = (int(n_voxels), row_matrix.shape[1])

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Dose (n_voxels,) Gy: exact on ``rows``, 0 elsewhere; differentiable in w."""
        full = torch.zeros(self.shape[0], device=self.device, dtype=self.dtype)
        return full.index_put((self.rows,), self.sub(w))

    def transpose_apply(self, g: torch.Tensor) -> torch.Tensor:
        """A[rows].T @ g[rows] (no autograd)."""
        return self.sub.transpose_apply(g[self.rows])
