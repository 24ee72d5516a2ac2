"""Parameter-free, differentiable beam's-eye-view (BEV) projection of a 3-D dose.

For each control point, a BEV pixel (u, v) on the isocentre plane (``bev_x`` along leaf
travel, ``bev_y`` across leaf pairs, the same grid as the fluence maps / MLC rows)
defines the divergent ray from the source through it. The dose is sampled trilinearly
(``torch.nn.functional.grid_sample``) at ``n_samples`` points along that ray, spaced
evenly in distance from the source over ``[SAD - half_depth_mm, SAD + half_depth_mm]``,
and the samples are averaged. The op is linear in the dose and differentiable, runs on
the dose tensor's device, and has no trainable parameters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from atp.dose.geometry import beam_frame
from atp.grid import Grid


def bev_sample_points(grid: Grid, gantry_deg, collimator_deg, couch_deg, isocenter_mm,
                      u_mm: np.ndarray, v_mm: np.ndarray, n_samples: int = 64,
                      half_depth_mm: float = 150.0) -> np.ndarray:
    """Normalised grid_sample coordinates, shape (n_cp, n_v, n_u, n_samples, 3).

    Per control point: pixels on the BEV grid (u_mm x v_mm at the isocentre plane), and
    ``n_samples`` points along each source->pixel ray.
    """
    gantry = np.atleast_1d(np.asarray(gantry_deg, dtype=float))
    n_cp = gantry.size
    coll = np.broadcast_to(np.asarray(collimator_deg, dtype=float), (n_cp,))
    couch = np.broadcast_to(np.asarray(couch_deg, dtype=float), (n_cp,))
    iso = np.broadcast_to(np.asarray(isocenter_mm, dtype=float).reshape(-1, 3), (n_cp, 3))
    uu, vv = np.meshgrid(np.asarray(u_mm, float), np.asarray(v_mm, float))  # (n_v, n_u)
    out = np.empty((n_cp, *uu.shape, n_samples, 3), dtype=np.float32)
    for c in range(n_cp):
        fr = beam_frame(float(gantry[c]), float(coll[c]), float(couch[c]), iso[c])
        src = fr.source_mm
        pix = fr.iso_plane_point(uu, vv)  # (n_v, n_u, 3), distance SAD from the source
        # distances from the source along the central axis, mapped onto each ray
        s = np.linspace(fr.sad_mm - half_depth_mm, fr.sad_mm + half_depth_mm, n_samples)
        pts = src + (pix - src)[..., None, :] * (s / fr.sad_mm)[:, None]
        idx = grid.patient_to_index(pts)  # continuous array indices (..., 3)
        # grid_sample wants (x, y, z) = (axis2, axis1, axis0) normalised to [-1, 1]
        shape = np.asarray(grid.shape, dtype=float)
        norm = 2.0 * idx / np.maximum(shape - 1.0, 1.0) - 1.0
        out[c] = norm[..., ::-1]
    return out


class BEVProjection:
    """Project dose volumes into the BEV of each control point (see module docstring).

    Built once per (grid, arc, BEV grid); ``__call__(dose)`` with dose (*grid.shape) or
    (batch, *grid.shape) returns (n_cp, n_v, n_u) or (batch, n_cp, n_v, n_u).
    """

    def __init__(self, grid: Grid, gantry_deg, isocenter_mm, u_mm, v_mm, *,
                 collimator_deg=0.0, couch_deg=0.0, n_samples: int = 64,
                 half_depth_mm: float = 150.0, device="cpu") -> None:
        pts = bev_sample_points(grid, gantry_deg, collimator_deg, couch_deg, isocenter_mm,
                                u_mm, v_mm, n_samples, half_depth_mm)
        self.n_cp, self.n_v, self.n_u, self.n_samples = pts.shape[:4]
        self.grid_shape = tuple(grid.shape)
        # (1, n_cp * n_v, n_u, n_samples, 3) so one grid_sample call does everything
        self.points = torch.from_numpy(
            pts.reshape(1, self.n_cp * self.n_v, self.n_u, self.n_samples, 3)).to(device)

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        batched = dose.dim() == 4
        vol = dose if batched else dose.unsqueeze(0)
        b = vol.shape[0]
        pts = self.points.expand(b, -1, -1, -1, -1).to(vol.dtype)
        samp = F.grid_sample(vol.unsqueeze(1), pts, mode="bilinear", padding_mode="zeros",
                             align_corners=True)  # (b, 1, n_cp*n_v, n_u, n_samples)
        proj = samp.mean(dim=-1).reshape(b, self.n_cp, self.n_v, self.n_u)
        return proj if batched else proj[0]
