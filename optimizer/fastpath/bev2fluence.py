"""Bev2Fluence: a small 2-D CNN from BEV projections of the predicted dose to fluence maps.

Per arc control point (one 2-D sample each), the input channels on the BEV grid (the
beamlet grid at the isocentre plane, ``u`` along leaf travel = ``bev_x_mm``, ``v`` across
leaf pairs = ``bev_y_mm``) are (:data:`FEATURE_CHANNELS`):

* ``pred_dose``, ``rx_dose``: BEV projections (:mod:`.bev`) of the predicted dose and of
  the prescription map (each target voxel at its highest Rx), both divided by the highest
  prescription (Gy / Gy);
* ``oar``: BEV projection of the union of the OAR masks (fraction, 0..1);
* ``backprojection``: A.T (v * D_pred) per beamlet (v: the fast path's dose-mimicking
  voxel weights), divided by its mean over the beamlets (dimensionless);
* ``beamlet_mask``: 1 where a beamlet of this control point exists;
* ``sin_gantry``, ``cos_gantry``: the control point's gantry angle, constant maps.

The network predicts a *relative* fluence (Softplus >= 0; training targets are the
optimiser's fluence divided by its mean over the patient's beamlets), so it does not
depend on the number of control points or the dij's MU scale. :func:`make_initial_fluence_fn`
turns it into MU per beamlet for :class:`~atp.optimizer.fastpath.chain.FastPath` with the
exact least-squares global scale ``alpha = sum v d D_pred / sum v d^2`` (d = A w_rel).

:class:`BEVLayout` scatters a flat beamlet vector into per-control-point BEV maps and
gathers it back (exact inverse on the beamlets that exist).
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from atp.optimizer.fastpath.bev import BEVProjection
from atp.optimizer.fastpath.correction import unrolled_correction
from atp.optimizer.fastpath.initial_fluence import DoseMimicking
from torch import nn

from atp.errors import InputError
from atp.outputs import atomic_write_bytes, atomic_write_file

FEATURE_VERSION = 2  # 2: rx_dose from the interpolation-support target rule
FEATURE_CHANNELS = ("pred_dose", "rx_dose", "oar", "backprojection", "beamlet_mask",
                    "sin_gantry", "cos_gantry")
WEIGHTS_FORMAT = "atp-bev2fluence-1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BEV_SAMPLES = 32  # samples per BEV ray (half depth 150 mm: ~9.4 mm apart)
BEV_HALF_DEPTH_MM = 150.0


def default_weights_path() -> Path | None:
    """``optimizer/fastpath/weights/bev2fluence.pt`` if it exists, else None."""
    path = WEIGHTS_DIR / "bev2fluence.pt"
    return path if path.is_file() else None


# --- beamlets <-> BEV maps --------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BEVLayout:
    """Where each beamlet sits on its control point's BEV grid.

    u_mm (n_u,), v_mm (n_v,): pixel centres at the isocentre plane (mm), one pixel per
    beamlet (the beamlet size). cp, iv, iu (n_beamlets,): control point, row, column.
    """

    n_cp: int
    u_mm: np.ndarray
    v_mm: np.ndarray
    cp: np.ndarray
    iv: np.ndarray
    iu: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_cp, len(self.v_mm), len(self.u_mm))

    @property
    def flat_index(self) -> np.ndarray:
        return (self.cp * len(self.v_mm) + self.iv) * len(self.u_mm) + self.iu

    @classmethod
    def from_beamlets(cls, beamlets, pad: int = 1) -> BEVLayout:
        """Grid covering every beamlet (plus ``pad`` pixels); beamlets must lie on a
        regular grid of the beamlet size and be unique per control point."""
        du, dv = (float(s) for s in beamlets.beamlet_size_mm)
        x, y = beamlets.bev_x_mm, beamlets.bev_y_mm
        if x.size == 0:
            raise InputError("no beamlets", field="beamlets")

        def axis(c, step, name):
            raw = (c - c.min()) / step
            idx = np.rint(raw).astype(np.int64)
            if np.abs(raw - idx).max() > 1e-3:
                raise InputError(f"beamlet centres ({name}) are not on a {step} mm grid",
                                 field=name)
            n = int(idx.max()) + 1 + 2 * pad
            centres = c.min() + (np.arange(n) - pad) * step
            return centres, idx + pad

        u_mm, iu = axis(x, du, "bev_x_mm")
        v_mm, iv = axis(y, dv, "bev_y_mm")
        out = cls(beamlets.n_beams, u_mm, v_mm, beamlets.beam_index.astype(np.int64), iv, iu)
        if np.unique(out.flat_index).size != out.flat_index.size:
            raise InputError("two beamlets of one control point share a BEV pixel",
                             field="beamlets")
        return out

    def mask(self) -> np.ndarray:
        """(n_cp, n_v, n_u) bool: True where a beamlet exists."""
        m = np.zeros(int(np.prod(self.shape)), dtype=bool)
        m[self.flat_index] = True
        return m.reshape(self.shape)

    def scatter(self, w):
        """Flat beamlet vector (n_beamlets,) -> maps (n_cp, n_v, n_u), 0 where no beamlet.
        Works on numpy arrays and torch tensors (same device and dtype)."""
        n = int(np.prod(self.shape))
        if isinstance(w, torch.Tensor):
            idx = torch.as_tensor(self.flat_index, device=w.device)
            out = torch.zeros(n, dtype=w.dtype, device=w.device)
            return out.index_put((idx,), w.reshape(-1)).reshape(self.shape)
        out = np.zeros(n, dtype=np.asarray(w).dtype)
        out[self.flat_index] = np.asarray(w).reshape(-1)
        return out.reshape(self.shape)

    def gather(self, maps):
        """Maps (n_cp, n_v, n_u) -> flat beamlet vector (n_beamlets,)."""
        if isinstance(maps, torch.Tensor):
            idx = torch.as_tensor(self.flat_index, device=maps.device)
            return maps.reshape(-1)[idx]
        return np.asarray(maps).reshape(-1)[self.flat_index]


# --- input features ---------------------------------------------------------------------
def bev_features(fp, layout: BEVLayout | None = None, *, n_samples: int = BEV_SAMPLES,
                 half_depth_mm: float = BEV_HALF_DEPTH_MM):
    """Network input (n_cp, len(FEATURE_CHANNELS), n_v, n_u) float32 on ``fp.device``,
    and the layout, from a prepared :class:`~atp.optimizer.fastpath.chain.FastPath`."""
    dij = fp.dij
    b = dij.beamlets
    layout = layout or BEVLayout.from_beamlets(b)
    shape = tuple(dij.dose_grid.shape)
    proj = BEVProjection(dij.dose_grid, b.gantry_deg, b.isocenter_mm, layout.u_mm,
                         layout.v_mm, collimator_deg=b.collimator_deg,
                         couch_deg=b.couch_deg, n_samples=n_samples,
                         half_depth_mm=half_depth_mm, device=fp.device)
    rx_max_gy = float(fp.rx.max())
    if rx_max_gy <= 0:
        raise InputError("the patient has no prescribed target voxel on the dose grid",
                         field="prescriptions")
    oar = torch.zeros_like(fp.pred)
    for w in fp.oar_w.values():
        oar = oar + w
    vols = torch.stack([fp.pred / rx_max_gy, fp.rx / rx_max_gy, oar.clamp(max=1.0)])
    with torch.no_grad():
        p = proj(vols.reshape(3, *shape).to(torch.float32))  # (3, n_cp, n_v, n_u)
        bp = fp.op.transpose_apply(fp.mimic_w * fp.pred)
    bp = bp / bp.mean().clamp_min(1e-12)
    bp_map = layout.scatter(bp.to(torch.float32))
    mask = torch.from_numpy(layout.mask()).to(device=fp.device, dtype=torch.float32)
    g = torch.from_numpy(np.radians(b.gantry_deg).astype(np.float32)).to(fp.device)
    ones = torch.ones(layout.shape[1:], device=fp.device)
    sin = g.sin()[:, None, None] * ones
    cos = g.cos()[:, None, None] * ones
    feats = torch.stack([p[0], p[1], p[2], bp_map, mask, sin, cos], dim=1)
    return feats.contiguous(), layout


# --- the network ------------------------------------------------------------------------
def _block(c_in: int, c_out: int) -> nn.Sequential:
    groups = math.gcd(4, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class Bev2FluenceNet(nn.Module):
    """U-Net (``depth`` down-samplings, ``base`` channels at full resolution) mapping
    (batch, in_channels, n_v, n_u) -> relative fluence (batch, n_v, n_u) >= 0 (Softplus),
    or, with ``residual_channel``, that input channel plus a learned correction.
    Any map size works: the input is zero-padded to a multiple of 2**depth and cropped."""

    def __init__(self, in_channels: int = len(FEATURE_CHANNELS), base: int = 16,
                 depth: int = 2, residual_channel: int | None = None) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "base": base, "depth": depth}
        if residual_channel is not None:
            self.config["residual_channel"] = int(residual_channel)
        self.residual_channel = residual_channel
        self.depth = depth
        chans = [base * 2 ** i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_block(in_channels, chans[0])] +
                                 [_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_block(2 * chans[i], chans[i])
                                  for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softplus(head) >= 0; with ``residual_channel`` c: x[:, c] + head (a correction
        of that input map; clamp at 0 when using it as a fluence)."""
        h, w = x.shape[-2:]
        x_in = x
        m = 2 ** self.depth
        x = F.pad(x, (0, (-w) % m, 0, (-h) % m))
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        out = self.head(x)[:, 0, :h, :w]
        if self.residual_channel is not None:
            return x_in[:, self.residual_channel] + out
        return F.softplus(out)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over the pixels where ``mask`` > 0 (relative fluence)."""
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)


# --- weights ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NetKind:
    """What a fluence-map network of the fast path reads and how its weights are tagged:
    ``bev2fluence`` (initial fluence) or ``correction`` (:mod:`.correction_net`)."""

    name: str
    channels: tuple[str, ...]
    feature_version: int
    weights_format: str
    no_network_channel: str  # the input channel taken as the output without a network


BEV2FLUENCE = NetKind("bev2fluence", FEATURE_CHANNELS, FEATURE_VERSION, WEIGHTS_FORMAT,
                      "backprojection")


def save_weights(model: Bev2FluenceNet, path, extra: dict | None = None,
                 kind: NetKind = BEV2FLUENCE) -> None:
    """float32 state dict + config (``.pt``) and the config as JSON next to it, atomically."""
    path = Path(path)
    config = {"format": kind.weights_format, "model": model.config,
              "feature_version": kind.feature_version, "channels": list(kind.channels),
              "bev_samples": BEV_SAMPLES, "bev_half_depth_mm": BEV_HALF_DEPTH_MM,
              **(extra or {})}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    atomic_write_file(path, lambda fh: torch.save({"config": config, "state_dict": state},
                                                  fh))
    atomic_write_bytes(path.with_suffix(".json"),
                       (json.dumps(config, indent=2, default=str) + "\n").encode())


def load_weights(path, device="cpu", kind: NetKind = BEV2FLUENCE) -> Bev2FluenceNet:
    field = "correction_weights" if kind is not BEV2FLUENCE else "weights"
    label = "Bev2Fluence" if kind is BEV2FLUENCE else "correction-network"
    if not Path(path).is_file():
        raise InputError(f"no {label} weights file", file=path, field=field)
    try:  # weights_only: plain data; a pickle that would run code is refused
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            blob = torch.load(Path(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"not a {label} weights file of plain data; a pickle that could "
                         "run code is refused", file=path, field=field) from None
    except Exception as exc:  # noqa: BLE001 - not a torch file, truncated
        msg = " ".join(str(exc).split())[:120]
        raise InputError(f"not a {label} weights file ({msg})", file=path,
                         field=field) from None
    config = blob.get("config", {}) if isinstance(blob, dict) else None
    if not isinstance(config, dict) or config.get("format") != kind.weights_format:
        raise InputError(f"not a {label} weights file", file=path, field=field)
    if config.get("feature_version") != kind.feature_version:
        raise InputError(f"trained on feature version {config.get('feature_version')!s:.40}, "
                         f"this code makes {kind.feature_version}", file=path, field=field)
    try:
        model = Bev2FluenceNet(**config["model"]).to(device)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())[:120]
        raise InputError(f"inconsistent {label} weights: {msg}", file=path,
                         field=field) from None
    return model.eval()


# --- the FastPath hook -------------------------------------------------------------------
def least_squares_scale(dose_op, w_rel: torch.Tensor, predicted_gy: torch.Tensor,
                        voxel_weight: torch.Tensor) -> float:
    """alpha >= 0 minimising sum v (alpha A w_rel - D_pred)^2 (exact, one A product)."""
    d = dose_op(w_rel)
    denom = float((voxel_weight * d * d).sum())
    if denom <= 0:
        return 0.0
    return max(0.0, float((voxel_weight * d * predicted_gy).sum()) / denom)


#: dose-mimicking steps after the network (as the fallback takes from the back-projection)
NETWORK_REFINE_STEPS = 10


def make_initial_fluence_fn(weights_path, device="cpu",
                            refine_steps: int = NETWORK_REFINE_STEPS) -> Callable:
    """``fn(fastpath) -> (n_beamlets,) MU`` tensor on the fast path's device: BEV features,
    the network (relative fluence), gather, then the least-squares global scale; then
    ``refine_steps`` projected-gradient (FISTA) steps of the fast path's dose mimicking
    with its diagonal step and smoothness (as the fallback does from the
    back-projection; 0 = the network alone)."""
    if weights_path is None or not Path(weights_path).is_file():
        raise InputError(f"no Bev2Fluence weights at {weights_path}", field="weights")
    model = load_weights(weights_path, device)

    def initial_fluence_fn(fp) -> torch.Tensor:
        net = model.to(fp.device)
        feats, layout = bev_features(fp)
        with torch.no_grad():
            w_rel = layout.gather(net(feats)).to(torch.float32)
            alpha = least_squares_scale(fp.op, w_rel, fp.pred, fp.mimic_w)
        w = (alpha * w_rel).contiguous()
        if refine_steps > 0:
            objective = DoseMimicking(fp.pred, fp.mimic_w)
            step = getattr(fp, "step_mimic", None)
            if step is None:
                step = objective.norm / float(fp.L_mimic)
            w = unrolled_correction(w, fp.op, objective, refine_steps, step,
                                    regulariser=getattr(fp, "smooth", None),
                                    reg_weight=float(getattr(fp, "mu_init", 0.0)))
        return w.detach()

    initial_fluence_fn.refine_steps = int(refine_steps)
    return initial_fluence_fn
