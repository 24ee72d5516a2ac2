"""Network input encoding from a Patient, and its exact inverse back to the patient grid.

Steps (each invertible; :class:`GridTransform` records them):

1. **Orientation**: the patient arrays are permuted / flipped so that the network sees
   one canonical orientation, OpenKBP's: axis 0 -> +y (posterior), axis 1 -> +x
   (patient left), axis 2 -> -z (feet). Each array axis is matched to the canonical
   axis its direction vector is closest to (exact for axis-aligned grids).
2. **Resampling**: integer block down-sampling per axis. The factor is either given
   (``factor``) or derived from a target spacing (``spacing_mm``, canonical axis order):
   ``round(target / voxel)``, at least 1, so e.g. OpenKBP 3.9 x 3.9 x 2.5 mm voxels
   become 7.8 x 7.8 x 5 mm. Each block is averaged over its voxels (masks become
   occupancy fractions; the PTV channel takes the block maximum); partial blocks at
   the far edges use the voxels they have. Block means are computed in float64 so that averaging a block of
   equal float32 values returns that value bit for bit.
3. **Crop / pad** to the network size: an axis longer than the network is cropped
   around the targets' bounding-box centre, a shorter one is padded, centred.

The inverse (:func:`decode`) undoes 3 (voxels the network did not see get ``fill``),
repeats each coarse voxel over its block (nearest) or interpolates (``linear``) and
undoes 1. With ``nearest``, ``encode_array(decode(y)) == y`` exactly on every network
voxel that maps inside the patient grid, and ``decode(encode_array(x)) == x`` exactly
when the factors are 1 and nothing is cropped.

Channels of :func:`encode_patient` (float32): 0 CT (HU clipped to ``ct_clip_hu`` and
scaled to [0, 1]), 1 body, 2 PTV (each voxel's highest prescription / ``rx_norm_gy``),
3.. one per OAR of ``oars`` (occupancy fraction; missing OAR -> zeros), then
``ptv_distance`` channels: the signed distance to each target, highest prescription
first (computed on the network grid in mm, negative inside, clipped to
+-``distance_clip_mm`` and divided by it; a target the patient lacks -> +1 everywhere),
then, with ``dose_input``, a dose (Gy / ``rx_norm_gy``) given to :func:`encode_patient`
(the Stage-2 refiner's input: an up-sampled coarse dose).
:func:`network_inputs` turns this stack into the input a network configuration wants:
all channels (CAD-UNet) or CT, body, PTV and one OAR label channel (ResUNet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from atp.errors import InputError
from atp.grid import Grid
from atp.patient import Patient

CANONICAL_DIRECTION = np.array([[0.0, 1.0, 0.0],
                                [1.0, 0.0, 0.0],
                                [0.0, 0.0, -1.0]])  # OpenKBP: y, x, -z
DEFAULT_OARS = ("Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx",
                "Bone_Mandible")
# channel pairs exchanged by a left-right flip
LR_PAIRS = (("Parotid_R", "Parotid_L"),)
CT_CHANNEL, BODY_CHANNEL, PTV_CHANNEL, FIRST_OAR_CHANNEL = 0, 1, 2, 3


@dataclass(frozen=True)
class EncodingConfig:
    """How a patient becomes a network input.

    size: network input size (voxels per canonical axis).
    spacing_mm: target voxel size per canonical axis (y, x, -z) in mm, or None to use
        ``factor``. factor: fixed integer down-sampling per axis (used when spacing_mm
        is None). ct_clip_hu: CT window. rx_norm_gy: PTV channel scale.
    oars: canonical OAR names, one channel each. inputs: "channels" (every channel) or
        "labels" (CT, body, PTV, OAR label map).
    crop: where an axis longer than the network is cropped: "targets" (around the
        targets' bounding-box centre) or "body" (around the body's bounding-box centre
        on every axis where the body fits, else around the targets).
    ptv_distance: number of signed-distance channels (targets by decreasing
        prescription); distance_clip_mm: their clip and scale.
    dose_input: a last channel carrying a given dose (the Stage-2 refiner).
    min_spacing_mm: with ``spacing_mm`` None, the finest voxel size per canonical axis the
        network was trained at: an axis finer than it is block-averaged by the smallest
        integer factor that reaches it (a 1.2 mm DICOM CT to 3.5 mm for a network trained
        on 2.7-5.1 mm voxels), on top of ``factor``. None: ``factor`` alone.
    """

    size: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] | None = (7.8125, 7.8125, 5.0)
    factor: tuple[int, int, int] = (2, 2, 2)
    ct_clip_hu: tuple[float, float] = (-1000.0, 1500.0)
    rx_norm_gy: float = 70.0
    oars: tuple[str, ...] = DEFAULT_OARS
    inputs: str = "channels"
    crop: str = "targets"
    ptv_distance: int = 0
    distance_clip_mm: float = 100.0
    dose_input: bool = False
    min_spacing_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "factor", tuple(int(s) for s in self.factor))
        object.__setattr__(self, "oars", tuple(self.oars))
        if self.spacing_mm is not None:
            object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
            if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
                raise InputError("spacing_mm must be 3 positive values", field="spacing_mm")
        if self.min_spacing_mm is not None:
            object.__setattr__(self, "min_spacing_mm",
                               tuple(float(s) for s in self.min_spacing_mm))
            if len(self.min_spacing_mm) != 3 or min(self.min_spacing_mm) <= 0:
                raise InputError("min_spacing_mm must be 3 positive values",
                                 field="min_spacing_mm")
        if len(self.size) != 3 or min(self.size) < 1:
            raise InputError("size must be 3 positive ints", field="size")
        if len(self.factor) != 3 or min(self.factor) < 1:
            raise InputError("factor must be 3 ints >= 1", field="factor")
        if self.ct_clip_hu[1] <= self.ct_clip_hu[0]:
            raise InputError("ct_clip_hu must be (low, high) with low < high",
                             field="ct_clip_hu")
        if self.rx_norm_gy <= 0:
            raise InputError("rx_norm_gy must be > 0", field="rx_norm_gy")
        if self.inputs not in ("channels", "labels"):
            raise InputError("inputs must be 'channels' or 'labels'", field="inputs")
        if self.crop not in ("targets", "body"):
            raise InputError("crop must be 'targets' or 'body'", field="crop")
        if int(self.ptv_distance) < 0 or self.distance_clip_mm <= 0:
            raise InputError("ptv_distance must be >= 0 and distance_clip_mm > 0",
                             field="ptv_distance")
        object.__setattr__(self, "ptv_distance", int(self.ptv_distance))

    @property
    def n_stack_channels(self) -> int:
        return FIRST_OAR_CHANNEL + len(self.oars) + self.ptv_distance + int(self.dose_input)

    @property
    def first_distance_channel(self) -> int:
        return FIRST_OAR_CHANNEL + len(self.oars)

    @property
    def in_channels(self) -> int:
        return self.n_stack_channels if self.inputs == "channels" else 4

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["min_spacing_mm"] is None:  # the dict (and cache keys) of configs before it
            del d["min_spacing_mm"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> EncodingConfig:
        d = dict(d)
        for k in ("size", "factor", "ct_clip_hu", "oars"):
            if k in d:
                d[k] = tuple(d[k])
        for k in ("spacing_mm", "min_spacing_mm"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class GridTransform:
    """Everything needed to go from a patient-grid array to the network grid and back."""

    source_shape: tuple[int, int, int]
    perm: tuple[int, int, int]          # canonical axis k <- patient array axis perm[k]
    flip: tuple[bool, bool, bool]       # flip canonical axis k after permuting
    factor: tuple[int, int, int]
    offset: tuple[int, int, int]        # network index i <-> coarse index i + offset
    size: tuple[int, int, int]
    coarse_shape: tuple[int, int, int] = field(default=(0, 0, 0))

    # --- orientation -----------------------------------------------------------------
    def orient(self, a: np.ndarray) -> np.ndarray:
        a = np.transpose(a, self.perm)
        for k, f in enumerate(self.flip):
            if f:
                a = np.flip(a, axis=k)
        return a

    def unorient(self, a: np.ndarray) -> np.ndarray:
        for k, f in enumerate(self.flip):
            if f:
                a = np.flip(a, axis=k)
        return np.transpose(a, np.argsort(self.perm))

    @property
    def oriented_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[p] for p in self.perm)

    # --- crop / pad ----------------------------------------------------------------------
    def _overlap(self):
        """Slices (coarse, network) of the region both grids share."""
        cs, ns = [], []
        for k in range(3):
            lo = max(0, self.offset[k])
            hi = min(self.coarse_shape[k], self.offset[k] + self.size[k])
            cs.append(slice(lo, hi))
            ns.append(slice(lo - self.offset[k], hi - self.offset[k]))
        return tuple(cs), tuple(ns)

    def to_network(self, coarse: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(self.size, fill, dtype=coarse.dtype)
        cs, ns = self._overlap()
        out[ns] = coarse[cs]
        return out

    def from_network(self, net: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(self.coarse_shape, fill, dtype=net.dtype)
        cs, ns = self._overlap()
        out[cs] = net[ns]
        return out

    def network_valid_mask(self) -> np.ndarray:
        """True on network voxels that map inside the patient grid."""
        m = np.zeros(self.size, dtype=bool)
        _, ns = self._overlap()
        m[ns] = True
        return m


def canonical_axes(grid: Grid) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(perm, flip) bringing the grid's array axes to the canonical orientation."""
    dots = CANONICAL_DIRECTION.T @ grid.direction  # [k, a] = canonical_k . axis_a
    perm, flip, used = [], [], set()
    for k in range(3):
        order = np.argsort(-np.abs(dots[k]))
        a = next(int(a) for a in order if int(a) not in used)
        used.add(a)
        perm.append(a)
        flip.append(bool(dots[k, a] < 0))
    return tuple(perm), tuple(flip)


def lr_swap_permutation(enc: EncodingConfig) -> list[int]:
    """Stack channel order after a left-right flip (paired OAR channels exchanged)."""
    perm = list(range(enc.n_stack_channels))
    for a, b in LR_PAIRS:
        if a in enc.oars and b in enc.oars:
            ia, ib = FIRST_OAR_CHANNEL + enc.oars.index(a), FIRST_OAR_CHANNEL + enc.oars.index(b)
            perm[ia], perm[ib] = ib, ia
    return perm


def make_transform(patient: Patient, config: EncodingConfig) -> GridTransform:
    perm, flip = canonical_axes(patient.grid)
    spacing_c = np.asarray(patient.grid.spacing_mm)[list(perm)]
    if config.spacing_mm is not None:
        factor = tuple(max(1, round(t / s)) for t, s in zip(config.spacing_mm, spacing_c))
    else:
        factor = config.factor
        if config.min_spacing_mm is not None:
            factor = tuple(f * max(1, math.ceil(m / (s * f) - 1e-6)) for f, m, s in
                           zip(factor, config.min_spacing_mm, spacing_c))
    oriented = tuple(patient.grid.shape[p] for p in perm)
    coarse = tuple(-(-n // f) for n, f in zip(oriented, factor))
    # crop centre: the targets' bounding box centre (coarse index); else the array centre
    rx = patient.prescription_map_gy() > 0
    if rx.any():
        idx = np.argwhere(_orient_with(rx, perm, flip))
        centre = (idx.min(axis=0) + idx.max(axis=0)) / 2.0 / np.asarray(factor)
    else:
        centre = (np.asarray(coarse) - 1) / 2.0
    if config.crop == "body" and patient.body_mask.any():
        idx = np.argwhere(_orient_with(patient.body_mask, perm, flip))
        lo, hi = idx.min(axis=0) // np.asarray(factor), idx.max(axis=0) // np.asarray(factor)
        fits = (hi - lo + 1) <= np.asarray(config.size)
        centre = np.where(fits, (lo + hi) / 2.0, centre)
    offset = []
    for k in range(3):
        n, m = config.size[k], coarse[k]
        if m <= n:
            offset.append(-((n - m) // 2))
        else:
            start = round(centre[k] - (n - 1) / 2.0)
            offset.append(int(np.clip(start, 0, m - n)))
    return GridTransform(tuple(patient.grid.shape), perm, flip, factor, tuple(offset),
                         config.size, coarse)


def _orient_with(a, perm, flip):
    a = np.transpose(a, perm)
    for k, f in enumerate(flip):
        if f:
            a = np.flip(a, axis=k)
    return a


def _blocks(a: np.ndarray, factor) -> np.ndarray:
    s = a.shape
    return a.reshape(s[0] // factor[0], factor[0], s[1] // factor[1], factor[1],
                     s[2] // factor[2], factor[2])


def _block_reduce(a: np.ndarray, factor, how: str) -> np.ndarray:
    """Block mean (float64) or max over the voxels of each block that lie in the array.

    Blocks at the far edge may be partial (shape not a multiple of the factor): they are
    reduced over their real voxels only, so the inverse stays exact there too.
    """
    shape = a.shape
    pads = [(0, (-n) % f) for n, f in zip(shape, factor)]
    if how == "max":
        return _blocks(np.pad(a, pads, mode="edge"), factor).max(axis=(1, 3, 5))
    total = np.pad(a, pads) if any(p for _, p in pads) else a
    total = np.asarray(total, dtype=np.float64)
    for k, f in enumerate(factor):  # one axis at a time: far faster than a 6-D reduce
        if f > 1:
            s = total.shape
            total = total.reshape(s[:k] + (s[k] // f, f) + s[k + 1:]).sum(axis=k + 1)
    # real voxels per block: a product of per-axis counts (only the last block of an
    # axis can be partial)
    c0, c1, c2 = (np.minimum(f, n - f * np.arange(-(-n // f))).astype(np.float64)
                  for n, f in zip(shape, factor))
    return total / (c0[:, None, None] * c1[None, :, None] * c2[None, None, :])


def encode_array(a: np.ndarray, t: GridTransform, *, how: str = "mean",
                 fill: float = 0.0) -> np.ndarray:
    """One patient-grid array -> network grid (float32), per the transform."""
    a = np.asarray(a)
    if tuple(a.shape) != t.source_shape:
        raise InputError(f"array shape {a.shape} != transform source {t.source_shape}",
                         field="array")
    o = t.orient(a)  # block means sum in float64 (exact for masks and float32 CT)
    c = _block_reduce(o, t.factor, how)
    return t.to_network(np.asarray(c, dtype=np.float32), fill)


def decode(y: np.ndarray, t: GridTransform, *, fill: float = 0.0,
           interpolation: str = "nearest") -> np.ndarray:
    """Network-grid array -> patient grid (float32), the inverse of :func:`encode_array`."""
    y = np.asarray(y, dtype=np.float32)
    if tuple(y.shape) != t.size:
        raise InputError(f"network array shape {y.shape} != {t.size}", field="array")
    coarse = t.from_network(y, fill)
    oriented = t.oriented_shape
    if interpolation == "nearest":
        up = coarse
        for k, f in enumerate(t.factor):
            if f > 1:
                up = np.repeat(up, f, axis=k)
        up = up[tuple(slice(0, n) for n in oriented)]
    elif interpolation == "linear":
        up = _linear_upsample(coarse, t.factor, oriented)
    else:
        raise InputError("interpolation must be 'nearest' or 'linear'", field="interpolation")
    return np.ascontiguousarray(t.unorient(up), dtype=np.float32)


def _linear_upsample(coarse: np.ndarray, factor, shape) -> np.ndarray:
    """Trilinear interpolation between coarse voxel centres onto the fine grid (edge
    values held beyond the outermost centres), one axis at a time (separable)."""
    up = np.asarray(coarse, dtype=np.float32)
    for k, (n, f) in enumerate(zip(shape, factor)):
        m = up.shape[k]
        x = np.clip((np.arange(n) + 0.5) / f - 0.5, 0.0, m - 1)
        i0 = np.minimum(np.floor(x).astype(np.int64), m - 1)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (x - i0).astype(np.float32).reshape((-1,) + (1,) * (2 - k))
        up = np.take(up, i0, axis=k) * (1.0 - w) + np.take(up, i1, axis=k) * w
    return up


def encode_patient(patient: Patient, config: EncodingConfig,
                   dose_input_gy: np.ndarray | None = None
                   ) -> tuple[np.ndarray, GridTransform]:
    """The full channel stack (C, *size) float32 and the transform (see module doc).

    dose_input_gy: the dose of the last channel (patient grid, Gy) when
    ``config.dose_input``."""
    if config.dose_input and dose_input_gy is None:
        raise InputError("this encoding needs an input dose", field="dose_input_gy")
    t = make_transform(patient, config)
    lo, hi = config.ct_clip_hu
    ct = (np.clip(patient.ct_hu, lo, hi) - lo) / (hi - lo)
    chans = [encode_array(ct, t, fill=0.0),
             encode_array(patient.body_mask, t),
             encode_array(patient.prescription_map_gy() / config.rx_norm_gy, t, how="max")]
    for name in config.oars:
        if name in patient.structures:
            chans.append(encode_array(patient.mask(name), t))
        else:
            chans.append(np.zeros(config.size, dtype=np.float32))
    if config.ptv_distance:
        targets = sorted(patient.prescriptions, key=lambda r: (-r.dose_gy, r.target))
        spacing = np.asarray(patient.grid.spacing_mm)[list(t.perm)] * np.asarray(t.factor)
        for k in range(config.ptv_distance):
            if k < len(targets) and targets[k].target in patient.structures:
                occ = encode_array(patient.mask(targets[k].target), t)
                chans.append(signed_distance(occ, spacing, config.distance_clip_mm))
            else:
                chans.append(np.ones(config.size, dtype=np.float32))
    if config.dose_input:
        chans.append(encode_array(np.asarray(dose_input_gy, dtype=np.float32)
                                  / config.rx_norm_gy, t))
    return np.stack(chans).astype(np.float32), t


def signed_distance(occupancy: np.ndarray, spacing_mm, clip_mm: float) -> np.ndarray:
    """Signed distance (mm, < 0 inside) to the voxels at least half occupied (any occupied
    voxel when none is), clipped to +-clip_mm and divided by it; +1 for an empty mask."""
    inside = occupancy >= 0.5
    if not inside.any():
        inside = occupancy > 0
    if not inside.any():
        return np.ones(occupancy.shape, dtype=np.float32)
    # the same values as the two whole-array transforms, on two boxes: every inside voxel
    # lies in the mask's bounding box, so a voxel farther than clip_mm from the box is
    # clipped anyway (outside distances: box + clip_mm), and an inside voxel's nearest
    # outside voxel is at most the box's one-voxel rim away (inside distances: box + 1)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (inside.ndim,))
    idx = np.argwhere(inside)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1

    def box(margin):
        return tuple(slice(max(0, int(a) - m), min(n, int(b) + m))
                     for a, b, m, n in zip(lo, hi, margin, inside.shape))

    far = box([math.ceil(clip_mm / s) + 1 for s in spacing])
    rim = box([1] * inside.ndim)
    d = np.full(inside.shape, float(clip_mm))
    d[far] = ndimage.distance_transform_edt(~inside[far], sampling=spacing_mm)
    d[rim] -= ndimage.distance_transform_edt(inside[rim], sampling=spacing_mm)
    return (np.clip(d, -clip_mm, clip_mm) / clip_mm).astype(np.float32)


def encode_dose(dose_gy: np.ndarray, t: GridTransform) -> np.ndarray:
    return encode_array(dose_gy, t, how="mean")


def network_inputs(stack, config: EncodingConfig):
    """The network input from a channel stack (numpy (C,...) or torch (B,C,...))."""
    if config.inputs == "channels":
        return stack
    lead = stack.ndim - 4  # 0 for (C, ...), 1 for (B, C, ...)
    sl = (slice(None),) * lead
    oars = stack[sl + (slice(FIRST_OAR_CHANNEL, config.first_distance_channel),)]
    n = oars.shape[lead]
    weights = (np.arange(1, n + 1, dtype=np.float32) / n)
    # label map: the first OAR (list order) occupying >= half of a voxel, scaled to (0, 1]
    occupied = oars >= 0.5
    try:  # torch
        import torch  # optional heavy dependency (atp[ml])

        if isinstance(stack, torch.Tensor):
            w = torch.as_tensor(weights, device=stack.device).view(
                *([1] * lead), n, *([1] * 3))
            first = torch.argmax(occupied.to(torch.uint8), dim=lead, keepdim=True)
            label = torch.gather(w.expand_as(oars), lead, first) * occupied.any(
                dim=lead, keepdim=True)
            return torch.cat([stack[sl + (slice(0, FIRST_OAR_CHANNEL),)], label.to(
                stack.dtype)], dim=lead)
    except ImportError:  # pragma: no cover - torch missing
        pass
    first = np.argmax(occupied, axis=lead)
    label = weights[first] * occupied.any(axis=lead)
    return np.concatenate([stack[sl + (slice(0, FIRST_OAR_CHANNEL),)],
                           np.expand_dims(label, lead).astype(stack.dtype)], axis=lead)
