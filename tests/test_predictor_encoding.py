"""Encoding: orientation, block resampling, crop/pad and their exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
from atp.predictor.encoding import (
    EncodingConfig,
    canonical_axes,
    decode,
    encode_array,
    encode_patient,
    make_transform,
    network_inputs,
)

from atp.errors import InputError


def test_phantom_oriented_like_openkbp(phantom):
    perm, flip = canonical_axes(phantom.grid)
    assert perm == (1, 2, 0) and flip == (False, False, True)
    cfg = EncodingConfig(size=(64, 64, 64), spacing_mm=(8.0, 8.0, 6.0))
    stack, t = encode_patient(phantom, cfg)
    assert stack.shape == (cfg.n_stack_channels, 64, 64, 64)
    # PTV_70 lies on the patient's left (+x): higher canonical axis-1 index than the cord
    ptv = np.argwhere(encode_array(phantom.mask("PTV_70"), t) > 0.5).mean(0)
    cord = np.argwhere(encode_array(phantom.mask("SpinalCord"), t) > 0).mean(0)
    assert ptv[1] > cord[1]
    assert ptv[0] < cord[0]  # anterior of the cord (lower y index)
    assert stack[2].max() == pytest.approx(1.0)  # 70 Gy / rx_norm 70
    assert 0.0 <= stack[0].min() and stack[0].max() <= 1.0


@pytest.mark.parametrize("size,spacing", [((64, 64, 64), (8.0, 8.0, 6.0)),   # pad
                                          ((16, 16, 8), (8.0, 8.0, 6.0)),    # crop
                                          ((24, 24, 24), (12.0, 4.0, 3.0))])  # mixed
def test_encode_of_decode_is_exact(phantom, size, spacing):
    cfg = EncodingConfig(size=size, spacing_mm=spacing)
    t = make_transform(phantom, cfg)
    rng = np.random.default_rng(0)
    y = rng.random(size).astype(np.float32) * 70
    valid = t.network_valid_mask()
    back = encode_array(decode(y, t), t)
    assert np.array_equal(back[valid], y[valid])
    assert np.all(back[~valid] == 0)


def test_decode_of_encode_is_exact_without_resampling(phantom):
    cfg = EncodingConfig(size=(72, 72, 48), spacing_mm=None, factor=(1, 1, 1))
    t = make_transform(phantom, cfg)
    x = np.random.default_rng(1).normal(size=phantom.grid.shape).astype(np.float32)
    assert np.array_equal(decode(encode_array(x, t), t), x)
    assert np.array_equal(decode(encode_array(x, t, how="max"), t), x)


def test_block_mean_and_linear_decode(phantom):
    cfg = EncodingConfig(size=(32, 32, 32), spacing_mm=(8.0, 8.0, 6.0))
    t = make_transform(phantom, cfg)
    ones = np.ones(phantom.grid.shape, np.float32)
    enc = encode_array(ones, t)
    inner = enc[t.network_valid_mask()]
    assert inner.min() > 0 and inner.max() == 1.0
    lin = decode(enc, t, interpolation="linear")
    assert lin.shape == phantom.grid.shape and np.isclose(lin[20, 32, 32], 1.0)
    with pytest.raises(InputError):
        decode(enc, t, interpolation="cubic")
    with pytest.raises(InputError):
        encode_array(np.zeros((3, 3, 3)), t)


def test_label_inputs(phantom):
    cfg = EncodingConfig(size=(32, 32, 32), spacing_mm=(8.0, 8.0, 6.0), inputs="labels")
    stack, _ = encode_patient(phantom, cfg)
    x = network_inputs(stack, cfg)
    assert x.shape == (4, 32, 32, 32) and cfg.in_channels == 4
    labels = np.unique(np.round(x[3] * len(cfg.oars)))
    assert labels[0] == 0 and len(labels) > 3
    import torch

    xt = network_inputs(torch.from_numpy(stack)[None], cfg)
    assert np.allclose(xt[0].numpy(), x)


def test_config_validation_and_round_trip():
    cfg = EncodingConfig(inputs="labels", size=(32, 32, 16))
    assert EncodingConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"size": (0, 1, 1)}, {"inputs": "x"}, {"rx_norm_gy": 0},
                {"ct_clip_hu": (5, 1)}, {"spacing_mm": (1, -1, 1)}):
        with pytest.raises(InputError):
            EncodingConfig(**bad)


def test_signed_distance_on_boxes_equals_the_whole_array_transforms():
    """signed_distance works on the mask's bounding box (+ clip, + 1 voxel): the values
    are those of the two whole-array Euclidean distance transforms, bit for bit."""
    from atp.predictor.encoding import signed_distance
    from scipy import ndimage

    def whole(occ, sp, clip):
        inside = occ >= 0.5
        if not inside.any():
            inside = occ > 0
        d = (ndimage.distance_transform_edt(~inside, sampling=sp)
             - ndimage.distance_transform_edt(inside, sampling=sp))
        return (np.clip(d, -clip, clip) / clip).astype(np.float32)

    rng = np.random.default_rng(1)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 24, 3))
        occ = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            a = [int(rng.integers(0, n)) for n in shape]
            b = [min(n, x + int(rng.integers(1, 8))) for x, n in zip(a, shape)]
            occ[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = rng.uniform(0.2, 1.0)
        sp, clip = tuple(rng.uniform(0.5, 5, 3)), float(rng.uniform(3, 60))
        assert np.array_equal(signed_distance(occ, sp, clip), whole(occ, sp, clip))
