"""Building blocks shared by the dose networks (PyTorch; 2-D or 3-D).

Layers are chosen by name (``act="relu"``, ``norm="instance"``) so that a YAML / JSON
model configuration can select them; every constructor checks its arguments and names
the offending parameter.
"""

from __future__ import annotations

import torch
from torch import nn

ACTS = {"relu": lambda: nn.ReLU(inplace=True), "leakyrelu": lambda: nn.LeakyReLU(0.01, True),
        "prelu": nn.PReLU, "elu": lambda: nn.ELU(inplace=True), "gelu": nn.GELU,
        "softplus": nn.Softplus, "identity": nn.Identity}
NORMS = ("instance", "batch", "group", "none")


def check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def check_channels(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def conv_cls(spatial_dims: int):
    return nn.Conv3d if check_dims(spatial_dims) == 3 else nn.Conv2d


def maxpool_cls(spatial_dims: int):
    return nn.MaxPool3d if check_dims(spatial_dims) == 3 else nn.MaxPool2d


def make_act(name: str) -> nn.Module:
    key = str(name).lower()
    if key not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {name!r}")
    return ACTS[key]()


def make_norm(name: str, spatial_dims: int, channels: int) -> nn.Module:
    key = str(name).lower()
    if key not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {name!r}")
    if key == "none":
        return nn.Identity()
    if key == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    three = check_dims(spatial_dims) == 3
    if key == "instance":
        return (nn.InstanceNorm3d if three else nn.InstanceNorm2d)(channels, affine=True)
    return (nn.BatchNorm3d if three else nn.BatchNorm2d)(channels)


class ConvNormAct(nn.Sequential):
    """convolution -> normalisation -> activation ('same' padding for odd kernels)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: int = 3, act: str = "relu", norm: str = "instance") -> None:
        check_channels("in_channels", in_channels)
        check_channels("out_channels", out_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        super().__init__(
            conv_cls(spatial_dims)(in_channels, out_channels, kernel_size,
                                   padding=kernel_size // 2, bias=str(norm) == "none"),
            make_norm(norm, spatial_dims, out_channels),
            make_act(act))


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool -> bottleneck MLP -> sigmoid gate per channel."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        check_dims(spatial_dims)
        check_channels("channels", channels)
        check_channels("reduction", reduction)
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.flatten(2).mean(dim=2)
        gate = self.fc(squeeze)
        return x * gate.view(*gate.shape, *([1] * (x.ndim - 2)))


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a 1x1 conv-norm shortcut, then the activation."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 act: str = "relu", norm: str = "instance") -> None:
        super().__init__()
        conv = conv_cls(spatial_dims)
        check_channels("in_channels", in_channels)
        check_channels("out_channels", out_channels)
        self.body = nn.Sequential(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, spatial_dims, out_channels), make_act(act),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, spatial_dims, out_channels))
        self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, bias=False),
                                      make_norm(norm, spatial_dims, out_channels))
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def check_channel_sequence(channels, min_len: int = 2) -> tuple[int, ...]:
    try:
        ch = tuple(channels)
    except TypeError:
        raise ValueError(f"channels must be a sequence of ints, got {channels!r}") from None
    if len(ch) < min_len:
        raise ValueError(f"channels needs at least {min_len} entries, got {ch}")
    for c in ch:
        check_channels("channels[i]", c)
    return ch
