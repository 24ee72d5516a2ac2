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
                      half_depth_mm: float = 150.0, device="cpu") -> torch.Tensor:
    """Normalised grid_sample coordinates, float32 tensor (n_cp, n_v, n_u, n_samples, 3)
    on ``device``.

    Per control point: pixels on the BEV grid (u_mm x v_mm at the isocentre plane), and
    ``n_samples`` points along each source->pixel ray, at distances from the source
    spread evenly over ``[SAD - half_depth_mm, SAD + half_depth_mm]`` along the central
    axis. Patient mm -> normalised coordinates is affine, so each ray is computed as
    ``N(src) + (N(pixel) - N(src)) * s / SAD`` with N that map: the per-pixel end points
    on the host (float64), the samples in one broadcast on the device.
    """
    gantry = np.atleast_1d(np.asarray(gantry_deg, dtype=float))
    n_cp = gantry.size
    coll = np.broadcast_to(np.asarray(collimator_deg, dtype=float), (n_cp,))
    couch = np.broadcast_to(np.asarray(couch_deg, dtype=float), (n_cp,))
    iso = np.broadcast_to(np.asarray(isocenter_mm, dtype=float).reshape(-1, 3), (n_cp, 3))
    uu, vv = np.meshgrid(np.asarray(u_mm, float), np.asarray(v_mm, float))  # (n_v, n_u)
    shape = np.asarray(grid.shape, dtype=float)
    scale = 2.0 / np.maximum(shape - 1.0, 1.0)

    def normalised(points_mm):  # grid_sample order (x, y, z) = (axis2, axis1, axis0)
        return (grid.patient_to_index(points_mm) * scale - 1.0)[..., ::-1]

    src = np.empty((n_cp, 3))
    pix = np.empty((n_cp, *uu.shape, 3))
    sad = np.empty(n_cp)
    for c in range(n_cp):
        fr = beam_frame(float(gantry[c]), float(coll[c]), float(couch[c]), iso[c])
        src[c] = normalised(fr.source_mm)
        pix[c] = normalised(fr.iso_plane_point(uu, vv))  # distance SAD from the source
        sad[c] = fr.sad_mm
    t = (np.linspace(-half_depth_mm, half_depth_mm, n_samples)[None, :] + sad[:, None]) \
        / sad[:, None]  # (n_cp, n_samples): distance from the source / SAD
    f32 = {"dtype": torch.float32, "device": device}
    src_t = torch.as_tensor(src, **f32)[:, None, None, None, :]
    ray_t = torch.as_tensor(pix, **f32)[..., None, :] - src_t
    return src_t + ray_t * torch.as_tensor(t, **f32)[:, None, None, :, None]


class BEVProjection:
    """Project dose volumes into the BEV of each control point (see module docstring).

    Built once per (grid, arc, BEV grid); ``__call__(dose)`` with dose (*grid.shape) or
    (batch, *grid.shape) returns (n_cp, n_v, n_u) or (batch, n_cp, n_v, n_u).
    """

    def __init__(self, grid: Grid, gantry_deg, isocenter_mm, u_mm, v_mm, *,
                 collimator_deg=0.0, couch_deg=0.0, n_samples: int = 64,
                 half_depth_mm: float = 150.0, device="cpu") -> None:
        pts = bev_sample_points(grid, gantry_deg, collimator_deg, couch_deg, isocenter_mm,
                                u_mm, v_mm, n_samples, half_depth_mm, device=device)
        self.n_cp, self.n_v, self.n_u, self.n_samples = pts.shape[:4]
        self.grid_shape = tuple(grid.shape)
        # (1, n_cp * n_v, n_u, n_samples, 3) so one grid_sample call does everything
        self.points = pts.reshape(1, self.n_cp * self.n_v, self.n_u, self.n_samples, 3)

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        batched = dose.dim() == 4
        vol = dose if batched else dose.unsqueeze(0)
        b = vol.shape[0]
        # the volumes as channels of one grid_sample input: the sample coordinates and
        # trilinear weights are computed once for all of them
        samp = F.grid_sample(vol.unsqueeze(0), self.points.to(vol.dtype), mode="bilinear",
                             padding_mode="zeros", align_corners=True)
        proj = samp[0].mean(dim=-1).reshape(b, self.n_cp, self.n_v, self.n_u)
        return proj if batched else proj[0]
