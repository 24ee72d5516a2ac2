"""Training loop for the dose networks (CPU small config, GPU full config).

* deterministic: the network initialisation, the epoch order and every augmentation
  draw come from ``seed`` (per-step generators seeded by (seed, epoch, step)), so a
  resumed run continues exactly where the interrupted one stopped;
* augmentation: left-right flip (swapping the parotid channels), small rotations about
  each axis, isotropic scaling and integer shifts, applied jointly to inputs and dose;
  random patches;
* Adam or AdamW; cosine decay or a one-cycle schedule -- both pure functions of the
  global step and the planned total, so a resumed run continues the schedule exactly;
  AMP (bfloat16 autocast) on CUDA, or wherever ``amp="bf16"``; an optional exponential
  moving average (EMA) of the weights, which is then what is evaluated and shipped;
* loss: volume-weighted MSE (``vw_mse``) or the L1 error inside the body (``body_l1``);
* a full checkpoint (``last.pt``: model, EMA, optimiser, RNG state, position, history;
  plain data, read with ``torch.load(weights_only=True)``) is written atomically every
  ``checkpoint_every_s`` seconds and after every epoch; the best network on the
  selection score (OpenKBP dose + DVH score of held-out patients, when a ``selector`` is
  given) or else on the validation loss is kept as ``best.pt`` (a shippable
  :mod:`atp.predictor.cnn` checkpoint); early stopping after ``patience`` epochs without
  improvement; an optional time budget stops cleanly after a checkpoint.

Named recipes (``PRESETS``): ``small`` / ``full`` per network, and ``okbp_stage1``
(issue 23, Stage 1): the whole patient cropped to the body at 48 x 64 x 64 (7.8 x 7.8 x
5 mm), ResUNet 16-32-64-128 on every channel (CT, body, prescription map, seven OARs,
signed distance to each of three targets), no PTV override, L1 inside the body, AdamW
one-cycle over 40 planned epochs (issue 23 planned 80 at a bf16 speed this AVX2 CPU
lacks: bf16 autocast is ~40x slower than float32 here), EMA 0.998, flips with parotid swap, +-10 deg
rotations, +-3 voxel shifts, 20 training patients held out for selection.

Encoded patients are cached under the output folder (float16) so that a resumed or
repeated run does not re-read the data set.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from atp.predictor.base import finalize_dose, reference_dose_gy
from atp.predictor.cnn import CNNPredictor
from atp.predictor.data import iter_split, split_files
from atp.predictor.encoding import (
    FIRST_OAR_CHANNEL,
    EncodingConfig,
    decode,
    encode_dose,
    encode_patient,
    lr_swap_permutation,
    make_transform,
    network_inputs,
)
from atp.predictor.nets import build_net
from atp.predictor.scoring import cohort_scores, score_patient
from tqdm import tqdm

from atp.errors import InputError
from atp.io.openkbp import load_openkbp_npz
from atp.outputs import atomic_write_bytes

# the small / full presets of each network: (net_kwargs per size, input encoding, PTV
# target, PTV override); the sizes share the grid, patch, batch and learning rate
_PRESET_NETS = {
    "cadunet": ({"small": {"channels": [8, 16, 32, 64], "growth": 4, "layers": 2},
                 "full": {"channels": [16, 32, 64, 128], "growth": 8, "layers": 3}},
                "channels", "prescription", True),
    "resunet": ({"small": {"channels": [8, 16, 32, 64]},
                 "full": {"channels": [16, 64, 128, 256]}},
                "labels", "reference", False),
}
_PRESET_SIZES = {
    "small": ((64, 64, 64), (7.8125, 7.8125, 5.0), (48, 48, 48), 1, 1e-3),
    "full": ((128, 128, 128), (3.906, 3.906, 2.5), (128, 128, 128), 2, 3e-4),
}


def _size_preset(model: str, size: str) -> dict:
    net_kwargs, inputs, ptv_target, ptv_override = _PRESET_NETS[model]
    grid, spacing, patch, batch_size, lr = _PRESET_SIZES[size]
    return {"net_kwargs": net_kwargs[size],
            "encoding": EncodingConfig(size=grid, spacing_mm=spacing, inputs=inputs),
            "patch": patch, "batch_size": batch_size, "lr": lr, "ptv_target": ptv_target,
            "ptv_override": ptv_override}


PRESETS = {(m, s): _size_preset(m, s) for m in _PRESET_NETS for s in _PRESET_SIZES}
PRESETS.update({
    ("resunet", "okbp_stage1"): {
        "net_kwargs": {"channels": [16, 32, 64, 128]},
        "encoding": EncodingConfig(size=(48, 64, 64), spacing_mm=(7.8125, 7.8125, 5.0),
                                inputs="channels", crop="body", ptv_distance=3),
        "patch": (48, 64, 64), "batch_size": 1, "lr": 2e-3, "min_lr": 1e-6,
        "weight_decay": 1e-2, "epochs": 40, "patience": 10**6, "ptv_target": "reference",
        "ptv_override": False, "optimizer": "adamw", "schedule": "onecycle",
        "loss": "body_l1", "amp": "off", "ema_decay": 0.998, "rotate_deg": 10.0,
        "scale_frac": 0.0, "shift_vox": 3, "affine_prob": 0.8,
        "aug_geometry": "physical", "selection": 20, "tta": True},
})
# Stage 2 (issue 23): full resolution in a 64 x 96 x 128 window around the targets (the
# PTV bounding box + 8 voxels of 95 % of the OpenKBP train patients fits); a small
# ResUNet corrects the dose given as its last input channel (Stage 1's, up-sampled);
# trained on the Stage-1-grid-averaged reference dose + smooth 2-3 Gy noise; L1 +
# 0.3 x DVH-point loss; flips only (rotations / shifts would pad the window's edges).
STAGE1_ENCODING = PRESETS[("resunet", "okbp_stage1")]["encoding"]
# (min_spacing_mm: the finest OpenKBP voxels are 2.73 mm in-plane and 1.5 mm between
# slices; a finer CT, e.g. a 1.2 mm DICOM one, is block-averaged to about that scale)
OPENKBP_MIN_SPACING_MM = (2.7, 2.7, 1.5)
_STAGE2_ENCODING = EncodingConfig(size=(64, 96, 128), spacing_mm=None, factor=(1, 1, 1),
                                  inputs="channels", crop="targets", ptv_distance=3,
                                  dose_input=True, min_spacing_mm=OPENKBP_MIN_SPACING_MM)
PRESETS[("resunet", "okbp_stage2")] = {
    "net_kwargs": {"channels": [8, 8, 16, 32],  # 8 at full resolution: a step costs
                   # about what a Stage-1 step does (8-16-32-64: 2.2x that)
                   "residual_channel": _STAGE2_ENCODING.n_stack_channels - 1},
    "encoding": _STAGE2_ENCODING, "coarse_encoding": STAGE1_ENCODING,
    "patch": (64, 96, 128), "batch_size": 1, "lr": 1e-3, "min_lr": 1e-6,
    "weight_decay": 1e-2, "epochs": 30, "patience": 10**6, "ptv_target": "reference",
    "ptv_override": False, "optimizer": "adamw", "schedule": "onecycle", "loss": "l1_dvh",
    "dvh_weight": 0.3, "amp": "off", "ema_decay": 0.998, "affine_prob": 0.0,
    "dose_noise_lo_gy": 2.0, "dose_noise_hi_gy": 3.0, "selection": 20, "tta": True}
# Stage 2 at a CPU's cost: the same network, data and loss, trained on random 32 x 64 x 64
# sub-crops of the window (a sixth of its voxels; the network is fully convolutional and
# still predicts the whole window) with bfloat16 autocast; 40 epochs. okbp_stage2's full
# windows cost ~14 s a step on this 2-core CPU under load (30 epochs ~ 20 h).
PRESETS[("resunet", "okbp_stage2s")] = dict(
    PRESETS[("resunet", "okbp_stage2")], patch=(32, 64, 64), amp="bf16", epochs=40)
# The same two recipes for a GPU (bfloat16 autocast there, fp32 on a CPU): Stage 1's
# network and augmentation, Stage 2 on its whole windows (okbp_stage2), with longer
# one-cycle schedules (``--epochs`` sets the length; the run records it) and the held-out
# selection scored every 10 epochs and after the last.
PRESETS[("resunet", "okbp_stage1g")] = dict(
    PRESETS[("resunet", "okbp_stage1")], amp="auto", epochs=120, select_every=10)
PRESETS[("resunet", "okbp_stage2g")] = dict(
    PRESETS[("resunet", "okbp_stage2")], amp="auto", epochs=120, select_every=10)
# Stage 2 for a GPU, deeper and wider: five levels (8-16-32-64-128; 4x the receptive field
# of okbp_stage2's four, 2.4 M weights) for a window that covers ~96 % of the body's voxels
# (held-out train, the shipped cascade): Stage 2 is where the score is made. It costs
# ~0.25 s more than 8-8-16-32 per prediction on the 2-core CPU with bf16.
PRESETS[("resunet", "okbp_stage2w")] = dict(
    PRESETS[("resunet", "okbp_stage2g")],
    net_kwargs={"channels": [8, 16, 32, 64, 128],
                "residual_channel": _STAGE2_ENCODING.n_stack_channels - 1})
# The deeper, wider Stage 2 at a CPU's cost: okbp_stage2w's network on okbp_stage2s's
# sub-crops (bfloat16), 60 epochs (~1.6 s a step on this CPU: about 4 h, in resumed
# chunks), the held-out selection every 10 epochs and after the last; gradient norm
# clipped at 1 (its first run went NaN in the second epoch without it).
PRESETS[("resunet", "okbp_stage2sw")] = dict(
    PRESETS[("resunet", "okbp_stage2s")], net_kwargs=PRESETS[("resunet", "okbp_stage2w")][
        "net_kwargs"], epochs=60, select_every=10, grad_clip=1.0)
# Stage 1 for the next GPU chunk (Stage 1 makes the cascade's error: 2026-12-05 diagnosis in
# docs/experiments/predictor.md; it over-fits by ~1 Gy): okbp_stage1g 1.5x wider
# (24-48-96-192) with 5x the weight decay. Not yet trained.
PRESETS[("resunet", "okbp_stage1gw")] = dict(
    PRESETS[("resunet", "okbp_stage1g")], net_kwargs={"channels": [24, 48, 96, 192]},
    weight_decay=5e-2)
# Stage 2 made to correct a worse Stage 1 (2026-12-05 diagnosis on the 20 held-out training
# patients: Stage 2 fed the perfect coarse dose scores 1.25 Gy, fed Stage 1's (4.13 Gy
# alone) 3.45: it trusts its input, having seen only 2-3 Gy of noise on it): okbp_stage2s
# with 4-7 Gy noise, 20 epochs, selection every 10.
PRESETS[("resunet", "okbp_stage2sn")] = dict(
    PRESETS[("resunet", "okbp_stage2s")], dose_noise_lo_gy=4.0, dose_noise_hi_gy=7.0,
    epochs=20, select_every=10, grad_clip=1.0)
# Stage 2 on what it will be given: the input dose is the Stage-1 network's prediction of
# each training patient (3.05 Gy from the reference there, 4.13 on held-out patients),
# plus 1-3 Gy of smooth noise for the difference; okbp_stage2sn's schedule.
PRESETS[("resunet", "okbp_stage2sp")] = dict(
    PRESETS[("resunet", "okbp_stage2sn")], dose_input_source="stage1",
    dose_noise_lo_gy=1.0, dose_noise_hi_gy=3.0)
# named recipes -> their network (``atp train --config NAME`` needs no --model)
RECIPE_MODELS = {"okbp_stage1": "resunet", "okbp_stage2": "resunet",
                 "okbp_stage2s": "resunet", "okbp_stage1g": "resunet",
                 "okbp_stage2g": "resunet", "okbp_stage2w": "resunet",
                 "okbp_stage2sw": "resunet", "okbp_stage2sn": "resunet",
                 "okbp_stage2sp": "resunet", "okbp_stage1gw": "resunet"}


@dataclass
class TrainConfig:
    """Every training choice, stored in checkpoints and model cards."""

    model: str = "cadunet"
    preset: str = "small"
    net_kwargs: dict = field(default_factory=dict)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    patch: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    epochs: int = 20
    steps_per_epoch: int | None = None  # None: one pass over the training patients
    patience: int = 5
    seed: int = 2020
    augment: bool = True
    flip_prob: float = 0.5
    rotate_deg: float = 8.0
    scale_frac: float = 0.08
    affine_prob: float = 0.5
    ptv_target: str = "prescription"
    ptv_override: bool = True
    decode: str = "linear"
    optimizer: str = "adam"          # adam | adamw
    schedule: str = "cosine"         # cosine | onecycle
    warmup_frac: float = 0.1         # one-cycle: fraction of the steps spent warming up
    div_factor: float = 25.0         # one-cycle: initial lr = lr / div_factor
    loss: str = "vw_mse"             # vw_mse | body_l1
    amp: str = "auto"                # auto (bf16 on CUDA) | bf16 | off
    ema_decay: float = 0.0           # 0: no EMA
    shift_vox: int = 0               # augmentation: integer shifts up to +-shift_vox
    aug_geometry: str = "normalized"  # normalized | physical (mm-true rotations, pads)
    selection: int = 0               # training patients held out for selection (CLI)
    select_every: int = 1            # the selector runs every N epochs and after the last
    tta: bool = False                # shipped predictor averages a left-right flip
    # Stage 2 (refiner; encoding.dose_input): its input dose is the reference dose
    # block-averaged on ``coarse_encoding`` and interpolated back, plus smooth noise of a
    # standard deviation drawn in [dose_noise_lo_gy, dose_noise_hi_gy] (white noise on a
    # grid dose_noise_smooth_vox times coarser, up-sampled trilinearly)
    coarse_encoding: EncodingConfig | None = None
    dose_noise_lo_gy: float = 0.0
    dose_noise_hi_gy: float = 0.0
    dose_noise_smooth_vox: int = 8
    # "coarse_reference" (above) | "stage1": the input dose is the Stage-1 network's own
    # prediction (``atp train --stage1``) on each training patient, plus the same noise
    dose_input_source: str = "coarse_reference"
    dvh_weight: float = 0.0          # loss l1_dvh: body L1 + dvh_weight * DVH-point loss
    hot_voxels: int = 3              # organs' hottest voxels in the DVH-point loss
    grad_clip: float = 0.0           # > 0: clip the gradient's global norm to this
    checkpoint_every_s: float = 180.0
    time_limit_s: float | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dose_input_source not in ("coarse_reference", "stage1"):
            raise InputError("dose_input_source must be coarse_reference or stage1, got "
                             f"{self.dose_input_source!r}", field="dose_input_source")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoding"] = self.encoding.to_dict()
        d["patch"] = list(self.patch)
        if self.coarse_encoding is not None:
            d["coarse_encoding"] = self.coarse_encoding.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["encoding"] = EncodingConfig.from_dict(d["encoding"])
        if d.get("coarse_encoding") is not None:
            d["coarse_encoding"] = EncodingConfig.from_dict(d["coarse_encoding"])
        d["patch"] = tuple(d["patch"])
        return cls(**d)


def make_config(model: str | None, preset: str = "small", **overrides) -> TrainConfig:
    model = model or RECIPE_MODELS.get(preset)
    if preset in RECIPE_MODELS and model != RECIPE_MODELS[preset]:
        raise InputError(f"config {preset!r} trains {RECIPE_MODELS[preset]!r}, not {model!r}",
                         field="--model")
    key = (model, preset)
    if key not in PRESETS:
        raise InputError(f"no preset {preset!r} for model {model!r}; presets: "
                         f"{sorted(PRESETS)}", field="--config")
    base = dict(PRESETS[key])
    base["net_kwargs"] = dict(base["net_kwargs"])
    cfg = TrainConfig(model=model, preset=preset, **base)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# --- data --------------------------------------------------------------------------------
def coarse_reference_gy(patient, coarse: EncodingConfig) -> np.ndarray:
    """The reference dose block-averaged on the coarse (Stage-1) grid and interpolated
    back to the patient grid (what a perfect Stage 1 would hand Stage 2), zero outside
    the body."""
    t = make_transform(patient, coarse)
    y = encode_dose(reference_dose_gy(patient), t)
    return finalize_dose(decode(y, t, interpolation="linear"), patient)


def encode_patients(patients, enc: EncodingConfig, coarse: EncodingConfig | None = None,
                    stage1=None):
    """(stacks float16 (N,C,...), doses float16 (N,1,...) in units of rx_norm_gy, ids).

    With ``enc.dose_input`` the last channel is :func:`coarse_reference_gy` on
    ``coarse``, or with ``stage1`` (a predictor) that predictor's dose."""
    if enc.dose_input and coarse is None and stage1 is None:
        raise InputError("a dose-input encoding needs the coarse encoding",
                         field="coarse_encoding")
    stacks, doses, ids = [], [], []
    for p in patients:
        dose_in = None
        if enc.dose_input:
            dose_in = (stage1.predict(p) if stage1 is not None
                       else coarse_reference_gy(p, coarse))
        stack, t = encode_patient(p, enc, dose_in)
        dose = encode_dose(reference_dose_gy(p), t) / enc.rx_norm_gy
        stacks.append(stack.astype(np.float16))
        doses.append(dose[None].astype(np.float16))
        ids.append(p.patient_id)
    if not stacks:
        raise InputError("no patients to train on", field="patients")
    return np.stack(stacks), np.stack(doses), ids


def cached_split(data_dir, split: str, enc: EncodingConfig, cache_dir: Path,
                 limit: int | None = None, log=print):
    files = split_files(data_dir, split)[:limit] if limit else split_files(data_dir, split)
    enc_key = {k: v for k, v in enc.to_dict().items() if k != "inputs"}  # same stack
    key = hashlib.sha1(json.dumps([enc_key, [str(f) for f in files]],
                                  sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{split}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["stacks"], z["doses"], [str(i) for i in z["ids"]]
    t0 = time.perf_counter()
    stacks, doses, ids = encode_patients(iter_split(data_dir, split, limit), enc)
    buf = io.BytesIO()
    np.savez(buf, stacks=stacks, doses=doses, ids=np.array(ids))
    atomic_write_bytes(path, buf.getvalue())
    log(f"encoded {len(ids)} {split} patients in {time.perf_counter() - t0:.0f} s -> {path}")
    return stacks, doses, ids


def selection_split(files, n: int, seed: int) -> tuple[list, list]:
    """(training files, held-out selection files): ``n`` of the files drawn with ``seed``
    (fixed for a run; recorded in its run.json)."""
    files = list(files)
    if not 0 <= n < len(files):
        raise InputError(f"cannot hold out {n} of {len(files)} training patients",
                         field="selection")
    held = set(np.random.default_rng([seed, 23]).permutation(len(files))[:n].tolist())
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held])


def score_predictor(predictor, files) -> dict:
    """OpenKBP dose and DVH scores (Gy, :mod:`atp.predictor.scoring`) of ``predictor`` on the
    patients in ``files``, on each patient's own grid; selection_score = dose + DVH."""
    per = []
    for f in files:
        p = load_openkbp_npz(f)
        per.append(score_patient(predictor.predict(p), reference_dose_gy(p), p))
    c = cohort_scores(per)
    return {"sel_dose_score_gy": c["dose_score_gy"], "sel_dvh_score_gy": c["dvh_score_gy"],
            "selection_score": c["dose_score_gy"] + c["dvh_score_gy"]}


def _encode_file(args):
    f, enc, coarse = args
    return encode_patients([load_openkbp_npz(f)], enc, coarse)


def _encode_files_parallel(files, enc, coarse, workers: int):
    """encode_patients over files in ``workers`` processes (same arrays, same order)."""
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        parts = list(ex.map(_encode_file, [(f, enc, coarse) for f in files]))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [i for p in parts for i in p[2]])


def encode_files(files, enc: EncodingConfig, cache_dir: Path, log=print,
                 coarse: EncodingConfig | None = None, workers: int = 1,
                 stage1=None, stage1_key: str | None = None):
    """Encoded (stacks, doses, ids) of OpenKBP .npz files, cached under ``cache_dir``;
    ``workers`` > 1 encodes in that many processes (the same arrays). ``stage1`` (a
    predictor; ``stage1_key``: its checkpoint's SHA-1, part of the cache key): the dose
    input is its prediction instead of the coarse reference (encoded in this process)."""
    files = [Path(f) for f in files]
    ek = enc.to_dict()
    if not ek["dose_input"]:
        del ek["dose_input"]  # the key of caches written before the field existed
    parts = [ek, [str(f) for f in files]] + ([coarse.to_dict()] if enc.dose_input else [])
    if stage1 is not None:
        parts.append({"stage1": stage1_key})
    key = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"files-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["stacks"], z["doses"], [str(i) for i in z["ids"]]
    t0 = time.perf_counter()
    workers = min(int(workers), len(files), os.cpu_count() or 1)
    if workers > 1 and stage1 is None:
        stacks, doses, ids = _encode_files_parallel(files, enc, coarse, workers)
    else:
        stacks, doses, ids = encode_patients((load_openkbp_npz(f) for f in files), enc,
                                             coarse, stage1)
    buf = io.BytesIO()
    np.savez(buf, stacks=stacks, doses=doses, ids=np.array(ids))
    atomic_write_bytes(path, buf.getvalue())
    log(f"encoded {len(ids)} patients in {time.perf_counter() - t0:.0f} s -> {path}")
    return stacks, doses, ids


def data_list(files) -> list[dict]:
    """Name, size and SHA-1 of each data file (recorded with a run)."""
    out = []
    for f in files:
        b = Path(f).read_bytes()
        out.append({"file": Path(f).name, "bytes": len(b),
                    "sha1": hashlib.sha1(b).hexdigest()})
    return out


# --- augmentation ------------------------------------------------------------------------
def pad_values(enc: EncodingConfig) -> list[float]:
    """Per stack channel, the value outside the patient (distance channels: far away)."""
    pads = [0.0] * enc.n_stack_channels
    for k in range(enc.ptv_distance):
        pads[enc.first_distance_channel + k] = 1.0
    return pads


def affine_theta(rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """The (1, 3, 4) ``affine_grid`` matrix of one random rotation / scale / shift.

    ``physical`` geometry: the rotation is a rotation in mm (the normalised grid
    coordinates are scaled by each axis' half-extent), shifts are whole voxels."""
    a = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, 3))
    s = 1.0 + rng.uniform(-cfg.scale_frac, cfg.scale_frac)
    cx, sx = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx[0], -sx[0]], [0, sx[0], cx[0]]])
    ry = np.array([[cx[1], 0, sx[1]], [0, 1, 0], [-sx[1], 0, cx[1]]])
    rz = np.array([[cx[2], -sx[2], 0], [sx[2], cx[2], 0], [0, 0, 1]])
    theta = np.zeros((1, 3, 4))
    rot = (rx @ ry @ rz) / s
    if cfg.aug_geometry == "physical":
        enc = cfg.encoding
        spacing = enc.spacing_mm or (1.0, 1.0, 1.0)
        half = np.array([enc.size[k] * spacing[k] for k in (2, 1, 0)]) / 2.0  # (W, H, D)
        rot = np.diag(1.0 / half) @ rot @ np.diag(half)
    theta[0, :, :3] = rot
    if cfg.shift_vox:
        v = rng.integers(-cfg.shift_vox, cfg.shift_vox + 1, 3)  # canonical axes 0, 1, 2
        theta[0, :, 3] = [2.0 * v[k] / cfg.encoding.size[k] for k in (2, 1, 0)]
    return theta


def augment(stack, dose, rng: np.random.Generator, cfg: TrainConfig, swap: list[int]):
    """Jointly flip / rotate / scale / shift one sample: stack (C,...) and dose (1,...)."""
    import torch  # optional heavy dependency (atp[ml])
    import torch.nn.functional as F

    if rng.random() < cfg.flip_prob:  # canonical axis 1 is patient left-right
        stack = torch.flip(stack[swap], dims=[2])
        dose = torch.flip(dose, dims=[2])
    if rng.random() < cfg.affine_prob:
        theta = affine_theta(rng, cfg)
        both = torch.cat([stack, dose], 0)[None].float()
        pad = None
        if cfg.aug_geometry == "physical":  # pad each channel with its outside value
            pad = torch.tensor(pad_values(cfg.encoding) + [0.0],
                               device=both.device).view(1, -1, 1, 1, 1)
            both = both - pad
        grid = F.affine_grid(torch.as_tensor(theta, dtype=torch.float32, device=both.device),
                             both.shape, align_corners=False)
        both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        if pad is not None:
            both = both + pad
        both = both[0]
        stack, dose = both[:-1], both[-1:]
    if cfg.encoding.dose_input and cfg.dose_noise_hi_gy > 0:
        stack = stack.clone()
        c = cfg.encoding.n_stack_channels - 1
        noise = smooth_noise(rng, cfg, tuple(stack.shape[1:])).to(stack.device)
        stack[c] = torch.clamp(stack[c] + noise * (stack[1] >= 0.5), min=0.0)
    return stack, dose


def smooth_noise(rng: np.random.Generator, cfg: TrainConfig, shape):
    """Smooth random field (normalised dose units) of standard deviation drawn in
    [dose_noise_lo_gy, dose_noise_hi_gy]: white noise on a coarser grid, up-sampled."""
    import torch  # optional heavy dependency (atp[ml])
    import torch.nn.functional as F

    k = max(1, int(cfg.dose_noise_smooth_vox))
    coarse = rng.standard_normal((1, 1) + tuple(-(-n // k) + 1 for n in shape))
    field = F.interpolate(torch.as_tensor(coarse, dtype=torch.float32), size=shape,
                          mode="trilinear", align_corners=False)[0, 0]
    field = field / field.std().clamp(min=1e-6)
    sd = rng.uniform(cfg.dose_noise_lo_gy, cfg.dose_noise_hi_gy)
    return field * float(sd / cfg.encoding.rx_norm_gy)


def random_patch(stack, dose, rng: np.random.Generator, patch):
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(stack.shape[1:], patch)]
    sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, patch))
    return stack[sl], dose[sl]


# --- loop --------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of a step: a pure function of (step, planned total), so resumes
    continue the schedule exactly. cosine: lr -> min_lr; onecycle: cosine warm-up from
    lr / div_factor to lr over warmup_frac of the steps, then cosine down to min_lr."""
    step = min(step, total)
    if cfg.schedule == "onecycle":
        warm = max(1, round(cfg.warmup_frac * total))
        if step < warm:
            lo = cfg.lr / cfg.div_factor
            return lo + 0.5 * (cfg.lr - lo) * (1 - math.cos(math.pi * step / warm))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (
            1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    if cfg.schedule != "cosine":
        raise InputError(f"unknown schedule {cfg.schedule!r}", field="schedule")
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * step
                                                                    / max(total, 1)))


# options that may change between an interrupted run and its resumption (the one-cycle
# schedule is defined on the planned epochs, so there they may not change)
RESUME_MAY_CHANGE = ("epochs", "patience", "time_limit_s", "checkpoint_every_s", "threads",
                     "tta")


def _resume_key(d: dict) -> dict:
    d = {**TrainConfig().to_dict(), **d}  # options added since the checkpoint: defaults
    keep = {k: v for k, v in d.items() if k not in RESUME_MAY_CHANGE}
    if d.get("schedule") == "onecycle":
        keep["epochs"] = d["epochs"]
    keep["encoding"] = EncodingConfig.from_dict(d["encoding"]).to_dict()
    return keep


def _save_torch(obj, path: Path) -> None:
    import torch  # optional heavy dependency (atp[ml])

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())



_RESUME_KEYS = ("config", "model", "optimizer", "state")


def _load_resume_checkpoint(last: Path) -> dict:
    """``last.pt`` read for a resume (plain data, ``weights_only=True``); a truncated,
    foreign or code-bearing file is an :class:`InputError` naming it (CLI exit 2)."""
    import torch  # optional heavy dependency (atp[ml])

    try:
        ck = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input here
        raise InputError(f"not a resumable atp training checkpoint "
                         f"({type(exc).__name__}); remove it or give a new --out",
                         file=last, field="--resume") from None
    missing = [k for k in _RESUME_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing or not isinstance(ck.get("config"), dict) or not isinstance(ck.get("state"), dict):
        raise InputError("not a resumable atp training checkpoint (missing "
                         f"{', '.join(missing) or 'config/state'})", file=last, field="--resume")
    return ck

def training_loss(y, s, d, cfg: TrainConfig):
    """The configured loss of network output y for stacks s and reference doses d."""
    # lazy: losses imports torch (optional, atp[ml])
    from atp.predictor.losses import body_l1, roi_weights, training_target, volume_weighted_mse

    tgt = training_target(s, d, cfg.ptv_target)
    if cfg.loss == "body_l1":
        return body_l1(y, tgt, s)
    if cfg.loss == "l1_dvh":
        return body_l1(y, tgt, s) + cfg.dvh_weight * _dvh_loss(y, tgt, s, cfg)
    if cfg.loss != "vw_mse":
        raise InputError(f"unknown loss {cfg.loss!r}", field="loss")
    return volume_weighted_mse(y, tgt, roi_weights(s, len(cfg.encoding.oars)))


def _dvh_loss(y, tgt, s, cfg: TrainConfig):
    """DVH-point loss per sample: targets from the distance channels (< 0 inside), organs
    from the OAR channels (occupancy >= 0.5)."""
    from atp.predictor.losses import dvh_point_loss  # lazy: imports torch (optional)

    enc = cfg.encoding
    first = enc.first_distance_channel
    total = 0.0
    for b in range(y.shape[0]):
        targets = [s[b, first + k] < 0 for k in range(enc.ptv_distance)]
        organs = [s[b, FIRST_OAR_CHANNEL + k] >= 0.5 for k in range(len(enc.oars))]
        total = total + dvh_point_loss(y[b:b + 1], tgt[b:b + 1], targets, organs,
                                       cfg.hot_voxels)
    return total / y.shape[0]


def evaluate(net, stacks, doses, cfg: TrainConfig, device) -> dict:
    """Validation loss (the training loss) and coarse-grid body MAE in Gy."""
    import torch  # optional heavy dependency (atp[ml])

    was_training = net.training
    net.eval()
    losses, maes = [], []
    with torch.inference_mode():
        for i in range(len(stacks)):
            s = torch.from_numpy(stacks[i:i + 1].astype(np.float32)).to(device)
            d = torch.from_numpy(doses[i:i + 1].astype(np.float32)).to(device)
            with _autocast(device, cfg.amp):
                y = net(network_inputs(s, cfg.encoding)).float()
            losses.append(float(training_loss(y, s, d, cfg)))
            body = s[:, 1:2] >= 0.5
            maes.append(float((y - d).abs()[body].mean()) * cfg.encoding.rx_norm_gy)
    net.train(was_training)
    return {"val_loss": float(np.mean(losses)), "val_mae_gy": float(np.mean(maes))}


def _finite_step(net, loss, grad_clip: float) -> bool:
    """Whether the step may be taken: the loss and the gradient's global norm are finite
    (clipping the norm to ``grad_clip`` when > 0)."""
    import torch  # optional heavy dependency (atp[ml])

    if not bool(torch.isfinite(loss.detach())):
        return False
    params = [p for p in net.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.detach()) for p in params]))
    return bool(torch.isfinite(norm))


def _autocast(device, amp: str = "auto"):
    import torch  # optional heavy dependency (atp[ml])

    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp not in ("auto", "off", "bf16"):
        raise InputError(f"amp must be auto, bf16 or off, got {amp!r}", field="amp")
    return contextlib.nullcontext()


def _ema_update(ema, net, decay: float) -> None:
    import torch  # optional heavy dependency (atp[ml])

    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p.detach(), 1.0 - decay)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)


def train(cfg: TrainConfig, train_data, val_data, out_dir: str | Path, *, resume: bool = False,
          progress: bool = True, log=print, meta: dict | None = None,
          selector=None) -> dict:
    """Train ``cfg.model`` on encoded arrays; writes last.pt / best.pt / history.json.

    selector: optional ``f(predictor) -> dict`` run after every epoch on the predictor
    being trained (EMA weights when ``ema_decay``); its ``selection_score`` (lower is
    better) then picks ``best.pt`` instead of the validation loss."""
    import torch  # optional heavy dependency (atp[ml])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stacks, doses = train_data[0], train_data[1]
    vstacks, vdoses = val_data[0], val_data[1]
    n = len(stacks)
    if n == 0:
        raise InputError("no training patients", field="--data")
    if any(p > s for p, s in zip(cfg.patch, cfg.encoding.size)):
        raise InputError(f"patch {cfg.patch} larger than the network size {cfg.encoding.size}",
                         field="patch")
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.model, 3, cfg.encoding.in_channels, 1,
                    **{k: (tuple(v) if isinstance(v, list) else v)
                       for k, v in cfg.net_kwargs.items()}).to(device)
    ema = copy.deepcopy(net).eval() if cfg.ema_decay else None
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise InputError(f"unknown optimizer {cfg.optimizer!r}", field="optimizer")
    steps_per_epoch = cfg.steps_per_epoch or max(1, n // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    metric = "selection_score" if selector is not None else "val_loss"
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val_loss": float("inf"),
             "best_epoch": -1, "bad_epochs": 0, "history": [], "epoch_loss_sum": 0.0,
             "train_seconds": 0.0, "done": False, "best_metric": metric}
    last = out / "last.pt"
    if resume and last.is_file():
        ck = _load_resume_checkpoint(last)
        if _resume_key(ck["config"]) != _resume_key(cfg.to_dict()):
            raise InputError("checkpoint was written with another configuration; use a new "
                             "--out or the same options", file=last, field="config")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"])
        state.update(ck["state"])
        if state["done"] and state["bad_epochs"] < cfg.patience:
            state["done"] = False  # early-stopped, resumed with a larger --patience
        log(f"resumed at epoch {state['epoch']} step {state['step_in_epoch']}")
    swap = lr_swap_permutation(cfg.encoding)
    shipped = ema if ema is not None else net

    def save_last():
        ck = {"config": cfg.to_dict(), "model": net.state_dict(),
              "optimizer": opt.state_dict(), "state": state,
              "torch_rng": torch.get_rng_state()}
        if ema is not None:
            ck["ema"] = ema.state_dict()
        _save_torch(ck, last)

    def make_predictor():
        m = dict(meta or {})
        m.update({"train_config": cfg.to_dict(), "best_epoch": state["best_epoch"],
                  "best_metric": metric, "best_value": state["best_val_loss"],
                  "best_val_loss": state["best_val_loss"],
                  "train_seconds": round(state["train_seconds"], 1),
                  "epochs_completed": state["epoch"], "steps": state["global_step"],
                  "ema_decay": cfg.ema_decay, "device": str(device),
                  "torch": str(torch.__version__)})
        was_training = shipped.training
        p = CNNPredictor(shipped, cfg.encoding, name=cfg.model, ptv_target=cfg.ptv_target,
                         ptv_override=cfg.ptv_override, decode=cfg.decode,
                         dose_scale_gy=cfg.encoding.rx_norm_gy, net_name=cfg.model,
                         net_kwargs=cfg.net_kwargs, meta=m, device=str(device),
                         tta=cfg.tta)
        shipped.train(was_training)
        return p

    bar = None
    if progress:
        bar = tqdm(total=total_steps, initial=state["global_step"], unit="step",
                   mininterval=10, desc=cfg.model)
    net.train()
    t_start = time.perf_counter()
    t_ckpt = t_start
    step_at_ckpt = state["global_step"]
    seconds_before = state["train_seconds"]
    stopped = "epochs"
    while state["epoch"] < cfg.epochs and not state["done"]:
        epoch = state["epoch"]
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        while state["step_in_epoch"] < steps_per_epoch:
            step = state["step_in_epoch"]
            rng = np.random.default_rng([cfg.seed, epoch, step])
            xs, ys = [], []
            for b in range(cfg.batch_size):
                i = int(order[(step * cfg.batch_size + b) % n])
                # to the device first: augmentation runs where the network does
                s = torch.from_numpy(stacks[i]).to(device).float()
                d = torch.from_numpy(doses[i]).to(device).float()
                if cfg.augment:
                    s, d = augment(s, d, rng, cfg, swap)
                s, d = random_patch(s, d, rng, cfg.patch)
                xs.append(s)
                ys.append(d)
            s = torch.stack(xs)
            d = torch.stack(ys)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, state["global_step"], total_steps)
            with _autocast(device, cfg.amp):
                y = net(network_inputs(s, cfg.encoding)).float()
            loss = training_loss(y, s, d, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not _finite_step(net, loss, cfg.grad_clip):
                # one non-finite loss or gradient would make every weight NaN: the step
                # is skipped (counted in the epoch's record); the schedule goes on
                state["skipped"] = state.get("skipped", 0) + 1
                loss = torch.zeros(())
            else:
                opt.step()
            if ema is not None:
                k = state["global_step"]
                _ema_update(ema, net, min(cfg.ema_decay, (1.0 + k) / (10.0 + k)))
            state["epoch_loss_sum"] += float(loss.detach())
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            state["train_seconds"] = seconds_before + time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}", epoch=epoch)
            now = time.perf_counter()
            if now - t_ckpt >= cfg.checkpoint_every_s:
                save_last()
                done_steps = state["global_step"] - step_at_ckpt
                log(json.dumps({"checkpoint_step": state["global_step"], "epoch": epoch,
                                "epoch_loss_so_far": state["epoch_loss_sum"]
                                / state["step_in_epoch"], "lr": opt.param_groups[0]["lr"],
                                "s_per_step": round((now - t_ckpt) / max(done_steps, 1), 3)}))
                t_ckpt, step_at_ckpt = now, state["global_step"]
            if cfg.time_limit_s and now - t_start >= cfg.time_limit_s:
                stopped = "time limit"
                break
        if stopped == "time limit" and state["step_in_epoch"] < steps_per_epoch:
            save_last()
            break
        metrics = evaluate(shipped, vstacks, vdoses, cfg, device) if len(vstacks) else {
            "val_loss": state["epoch_loss_sum"] / steps_per_epoch, "val_mae_gy": float("nan")}
        select = selector is not None and (
            (epoch + 1) % max(1, cfg.select_every) == 0 or epoch + 1 == cfg.epochs)
        if select:
            t_sel = time.perf_counter()
            metrics.update(selector(make_predictor()))
            metrics["selection_s"] = round(time.perf_counter() - t_sel, 1)
        rec = {"epoch": epoch, "step": state["global_step"],
               "train_loss": state["epoch_loss_sum"] / steps_per_epoch,
               **metrics, "lr": opt.param_groups[0]["lr"],
               "elapsed_s": round(state["train_seconds"], 1)}
        if state.get("skipped"):
            rec["skipped_steps"] = state.pop("skipped")
        state["history"].append(rec)
        log(json.dumps(rec))
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        state["epoch_loss_sum"] = 0.0
        if metric not in metrics:
            pass  # not scored this epoch (select_every): it cannot become best
        elif metrics[metric] < state["best_val_loss"]:
            state["best_val_loss"], state["best_epoch"], state["bad_epochs"] = (
                metrics[metric], epoch, 0)
            _save_torch(make_predictor().checkpoint(), out / "best.pt")
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= cfg.patience:
                state["done"] = True
                stopped = "early stopping"
        save_last()
        t_ckpt, step_at_ckpt = time.perf_counter(), state["global_step"]
        if cfg.time_limit_s and time.perf_counter() - t_start >= cfg.time_limit_s:
            stopped = "time limit"
        if stopped == "time limit":
            break
    if bar is not None:
        bar.close()
    result = {"stopped": stopped, "epochs_completed": state["epoch"],
              "global_step": state["global_step"], "best_epoch": state["best_epoch"],
              "best_metric": metric, "best_val_loss": state["best_val_loss"],
              "train_seconds": round(state["train_seconds"], 1), "history": state["history"],
              "best": str(out / "best.pt") if (out / "best.pt").is_file() else None,
              "net": net, "ema": ema, "predictor": make_predictor}
    atomic_write_bytes(out / "history.json", (json.dumps(
        {k: v for k, v in result.items() if k not in ("net", "ema", "predictor")}, indent=2)
        + "\n").encode())
    return result


def fit_predictor(predictor, patients, *, val_patients=(), out_dir=None, **overrides):
    """Train ``predictor`` (a CNNPredictor) in memory on patients with reference doses."""
    cfg = make_config(predictor.net_name or "cadunet", overrides.pop("preset", "small"),
                      **overrides)
    cfg = replace(cfg, encoding=predictor.encoding, net_kwargs=predictor.net_kwargs or
                  cfg.net_kwargs)
    tr = encode_patients(patients, cfg.encoding)
    va = encode_patients(val_patients, cfg.encoding) if val_patients else (
        np.zeros((0,)), np.zeros((0,)), [])
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, tr, va, out_dir or tmp, progress=False, log=lambda *_: None)
    predictor.net.load_state_dict(res["net"].state_dict())
    predictor.net.eval()
    return predictor
