"""ResUNet dose proposer: residual encoder, conv-block decoder, Softplus output.

A 3x3 stem convolution maps the input (by default 4 channels: CT, body, PTV, OAR
labels) to ``channels[0]``. The encoder has one residual block per further entry of
``channels`` (instance norm; 1x1 conv shortcut), each followed by max pooling (kernel
3, stride 2, padding 1), and a bottleneck residual block keeping the last width. The
decoder up-samples trilinearly (bilinearly in 2-D), concatenates the matching encoder
features and applies a conv-norm-act block. A 1x1 convolution and a Softplus give the
non-negative dose; they run in float32 even under (bfloat16) autocast.

``residual_channel=c`` (the Stage-2 refiner): the head has no Softplus; the output is
``relu(x[:, c] + head)``, a signed correction of the dose given as input channel c.
"""

from __future__ import annotations

import torch
from atp.predictor.blocks import (
    ConvNormAct,
    ResidualBlock,
    check_channel_sequence,
    check_channels,
    check_dims,
    conv_cls,
    maxpool_cls,
)
from torch import nn


class ResUNet(nn.Module):
    """MONAI-style constructor: ``ResUNet(spatial_dims, in_channels, out_channels, channels)``.

    channels: (stem, level 1, level 2, ...) widths, len >= 2; the input size must be
    divisible by 2 ** (len(channels) - 1). act / norm: names (see predictor.blocks).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 4, out_channels: int = 1,
                 channels=(16, 64, 128, 256), act: str = "relu",
                 norm: str = "instance", residual_channel: int | None = None) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        check_channels("in_channels", in_channels)
        check_channels("out_channels", out_channels)
        ch = check_channel_sequence(channels)
        self.depth = len(ch)
        self.stem = conv_cls(spatial_dims)(in_channels, ch[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            ResidualBlock(spatial_dims, ch[i - 1], ch[i], act, norm) for i in range(1, len(ch)))
        self.pool = maxpool_cls(spatial_dims)(kernel_size=3, stride=2, padding=1)
        self.bottleneck = ResidualBlock(spatial_dims, ch[-1], ch[-1], act, norm)
        # decoder level i (deepest first): up-sampled ch[i] features + the encoder's
        # ch[i] skip -> ch[i - 1] (the full-resolution level keeps ch[1]); a last block
        # fuses the stem features.
        self.decoder = nn.ModuleList(
            ConvNormAct(spatial_dims, 2 * ch[i], ch[i - 1] if i > 1 else ch[1], 3, act, norm)
            for i in range(len(ch) - 1, 0, -1))
        self.fuse = ConvNormAct(spatial_dims, ch[1] + ch[0], ch[0], 3, act, norm)
        self.residual_channel = residual_channel
        if residual_channel is not None:
            if not 0 <= int(residual_channel) < in_channels or out_channels != 1:
                raise ValueError("residual_channel must be an input channel (one output)")
            self.head = conv_cls(spatial_dims)(ch[0], out_channels, 1)
        else:
            self.head = nn.Sequential(conv_cls(spatial_dims)(ch[0], out_channels, 1),
                                      nn.Softplus())
        self._mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** (self.depth - 1)
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by {m}")
        stem = self.stem(x)
        skips = []
        h = stem
        for block in self.encoder:
            h = block(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck(h)
        for block in self.decoder:
            skip = skips.pop()
            h = nn.functional.interpolate(h, size=skip.shape[2:], mode=self._mode,
                                          align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        h = self.fuse(torch.cat([h, stem], dim=1))
        # the output layer always runs in float32, also under bf16 autocast
        with torch.autocast(h.device.type, enabled=False):
            y = self.head(h.float())
            if self.residual_channel is not None:
                c = int(self.residual_channel)
                y = torch.relu(x[:, c:c + 1].float() + y)
            return y
