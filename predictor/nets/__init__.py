"""Dose-prediction networks, one per file, by name."""

from __future__ import annotations


def build_net(name: str, spatial_dims: int, in_channels: int, out_channels: int = 1,
              **kwargs):
    """Construct a network by name ('cadunet' or 'resunet') with its keyword arguments."""
    if name == "cadunet":
        from atp.predictor.nets.cadunet import CADUNet  # lazy: imports torch (optional)

        return CADUNet(spatial_dims, in_channels, out_channels, **kwargs)
    if name == "resunet":
        from atp.predictor.nets.resunet import ResUNet  # lazy: imports torch (optional)

        return ResUNet(spatial_dims, in_channels, out_channels, **kwargs)
    raise ValueError(f"unknown network '{name}'; known: cadunet, resunet")


NET_NAMES = ("cadunet", "resunet")
