"""CAD-UNet: a U-Net of channel-attention densely connected (CAD) blocks.

Contracting path: a CAD block per level (its output has ``channels[i]`` channels, the
defaults double per level) followed by max pooling. Expanding path: nearest-neighbour
up-sampling (x2), concatenation with the matching contracting features, and a CAD block
reducing the channels. A 1x1(x1) convolution gives the dose channel, passed through a
ReLU so the prediction is >= 0.

A CAD block: ``layers`` densely connected conv-norm-act layers (each sees the block
input and every earlier layer's output and adds ``growth`` channels), a squeeze-and-
excitation gate over the concatenated features (channel attention), and a 1x1
transition convolution to the block's output channels.
"""

from __future__ import annotations

import torch
from atp.predictor.blocks import (
    ConvNormAct,
    SqueezeExcitation,
    check_channel_sequence,
    check_channels,
    check_dims,
    conv_cls,
    make_act,
    maxpool_cls,
)
from torch import nn


class CADBlock(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, growth: int,
                 layers: int = 2, se_reduction: int = 4, act: str = "relu",
                 norm: str = "instance") -> None:
        super().__init__()
        check_channels("growth", growth)
        check_channels("layers", layers)
        self.layers = nn.ModuleList(
            ConvNormAct(spatial_dims, in_channels + i * growth, growth, 3, act, norm)
            for i in range(layers))
        total = in_channels + layers * growth
        self.attention = SqueezeExcitation(spatial_dims, total, se_reduction)
        self.transition = ConvNormAct(spatial_dims, total, out_channels, 1, act, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return self.transition(self.attention(torch.cat(feats, dim=1)))


class CADUNet(nn.Module):
    """Channel-attention densely connected U-Net (MONAI-style constructor).

    spatial_dims: 2 or 3. in_channels / out_channels: input ROI channels / dose channels.
    channels: output channels of each contracting level (len >= 2; default doubling).
    growth: channels each dense layer adds (default: channels[0] // 2, at least 4).
    layers: dense layers per CAD block. se_reduction: squeeze-excitation bottleneck ratio.
    act / norm: names (see predictor.blocks). The input size must be divisible by
    2 ** (len(channels) - 1).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int = 1,
                 channels=(16, 32, 64, 128), growth: int | None = None, layers: int = 2,
                 se_reduction: int = 4, act: str = "relu", norm: str = "instance") -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        check_channels("in_channels", in_channels)
        check_channels("out_channels", out_channels)
        ch = check_channel_sequence(channels)
        growth = growth if growth is not None else max(4, ch[0] // 2)
        check_channels("growth", growth)
        self.depth = len(ch)
        blk = {"growth": growth, "layers": layers, "se_reduction": se_reduction, "act": act, "norm": norm}
        self.down = nn.ModuleList()
        prev = in_channels
        for c in ch:
            self.down.append(CADBlock(spatial_dims, prev, c, **blk))
            prev = c
        self.pool = maxpool_cls(spatial_dims)(2)
        self.up = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(CADBlock(spatial_dims, ch[i] + ch[i - 1], ch[i - 1], **blk))
        self.head = nn.Sequential(conv_cls(spatial_dims)(ch[0], out_channels, 1),
                                  make_act("relu"))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** (self.depth - 1)
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by {m}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
