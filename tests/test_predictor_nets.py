"""CAD-UNet and ResUNet: argument checks, shapes, and a few training steps that lower the loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.predictor.blocks import ConvNormAct, SqueezeExcitation, make_act, make_norm
from atp.predictor.encoding import EncodingConfig, encode_dose, encode_patient, network_inputs
from atp.predictor.losses import roi_weights, training_target, volume_weighted_mse
from atp.predictor.nets import build_net
from atp.predictor.nets.cadunet import CADUNet
from atp.predictor.nets.resunet import ResUNet

TINY = EncodingConfig(size=(16, 16, 16), spacing_mm=(16.0, 16.0, 12.0))


def _tiny_case(phantom, cfg=TINY):
    from scipy import ndimage

    rx = phantom.prescription_map_gy()
    dose = np.where(phantom.body_mask, np.maximum(ndimage.gaussian_filter(rx, 2.0), rx), 0)
    stack, t = encode_patient(phantom, cfg)
    target = encode_dose(dose.astype(np.float32), t) / cfg.rx_norm_gy
    return torch.from_numpy(stack)[None], torch.from_numpy(target)[None, None]


@pytest.mark.parametrize("name,inputs,kwargs", [
    ("cadunet", "channels", {"channels": (4, 8), "growth": 4, "layers": 2}),
    ("resunet", "labels", {"channels": (4, 8, 8)}),
])
def test_few_steps_lower_the_loss(phantom, name, inputs, kwargs):
    torch.manual_seed(0)
    cfg = EncodingConfig(size=TINY.size, spacing_mm=TINY.spacing_mm, inputs=inputs)
    stack, dose = _tiny_case(phantom, cfg)
    net = build_net(name, 3, cfg.in_channels, 1, **kwargs)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    target = training_target(stack, dose, "prescription" if name == "cadunet" else "reference")
    w = roi_weights(stack)
    losses = []
    for _ in range(12):
        y = net(network_inputs(stack, cfg))
        loss = volume_weighted_mse(y, target, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert y.shape == dose.shape and float(y.detach().min()) >= 0
    assert losses[-1] < 0.7 * losses[0], losses


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="spatial_dims"):
        CADUNet(4, 3, 1)
    with pytest.raises(ValueError, match="channels"):
        CADUNet(3, 3, 1, channels=(8,))
    with pytest.raises(ValueError, match="in_channels"):
        ResUNet(3, 0, 1)
    with pytest.raises(ValueError, match="act"):
        ResUNet(3, 4, 1, act="swishy")
    with pytest.raises(ValueError, match="norm"):
        make_norm("layer", 3, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvNormAct(3, 2, 2, kernel_size=2)
    with pytest.raises(ValueError, match="unknown network"):
        build_net("vnet", 3, 1)
    with pytest.raises(ValueError, match="divisible"):
        CADUNet(3, 2, 1, channels=(4, 8, 16))(torch.zeros(1, 2, 6, 8, 8))


def test_2d_variants_and_blocks():
    x = torch.randn(2, 3, 16, 16)
    assert CADUNet(2, 3, 1, channels=(4, 8, 16))(x).shape == (2, 1, 16, 16)
    assert ResUNet(2, 3, 2, channels=(4, 8))(x).shape == (2, 2, 16, 16)
    se = SqueezeExcitation(3, 8, reduction=2)
    z = torch.randn(1, 8, 4, 4, 4)
    assert se(z).shape == z.shape
    assert isinstance(make_act("softplus"), torch.nn.Softplus)


def test_volume_weights_balance_rois(phantom):
    stack, dose = _tiny_case(phantom)
    w = roi_weights(stack)
    ptv = stack[:, 2:3] > 0
    outside = (stack[:, 1:2] < 0.5) & (stack[:, 2:].amax(1, keepdim=True) < 0.5)
    # a small ROI has a larger weight than the big outside region, and each ROI's total
    # weight is the voxel count of the whole grid
    assert float(w[ptv].min()) > float(w[outside].max())
    assert float(w[outside].sum()) == pytest.approx(16 ** 3, rel=1e-5)
    tgt = training_target(stack, dose, "prescription")
    assert torch.allclose(tgt[ptv], stack[:, 2:3][ptv])
    assert volume_weighted_mse(tgt, tgt, w) == 0
