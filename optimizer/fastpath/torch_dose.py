"""Differentiable dose: ``dose = A @ w`` with the dose-influence matrix A as a constant.

The backward pass is the exact transpose product ``A.T @ grad``; both products use CSR
tensors prepared once (A and A.T), so a GPU run uploads the matrix once and never goes
back to the host inside a loop. Dose is on the dij's dose grid (flattened, Gy); w is the
beamlet fluence in MU.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def _csr_tensor(m: sp.spmatrix, device, dtype) -> torch.Tensor:
    m = sp.csr_matrix(m)
    m.sort_indices()
    with warnings.catch_warnings():  # "CSR support is in beta": we rely on matmul only
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape, device=device, dtype=dtype, check_invariants=False)


class _SparseMatVec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, a_t, w):  # noqa: D401 - torch API
        ctx.a_t = a_t
        return (a @ w.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        return None, None, (ctx.a_t @ grad.unsqueeze(-1)).squeeze(-1)


class TorchDose:
    """A dose-influence matrix on a torch device, as a differentiable linear map.

    matrix: scipy sparse (n_voxels, n_beamlets), Gy per MU.
    """

    def __init__(self, matrix: sp.spmatrix, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = matrix.shape
        self.a = _csr_tensor(matrix, self.device, dtype)
        self.a_t = _csr_tensor(sp.csr_matrix(matrix).T, self.device, dtype)

    @classmethod
    def from_influence(cls, dij, device="cpu") -> "TorchDose":
        return cls(dij.matrix, device)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Dose (n_voxels,) Gy for fluence w (n_beamlets,) MU; differentiable in w."""
        return _SparseMatVec.apply(self.a, self.a_t, w)

    def transpose_apply(self, g: torch.Tensor) -> torch.Tensor:
        """A.T @ g: back-projects a voxel field onto the beamlets (no autograd)."""
        return (self.a_t @ g.unsqueeze(-1)).squeeze(-1)
