"""Shared test helpers: beamlets on a regular BEV lattice around the isocentre."""

from __future__ import annotations

import numpy as np

from atp.dose.influence import BeamletInfo


def lattice(nx: int, ny: int, pitch_mm: float = 5.0):
    """(X, Y) mm, each (ny, nx): beamlet centres of an nx x ny lattice centred on 0."""
    xs = (np.arange(nx) - nx / 2 + 0.5) * pitch_mm
    ys = (np.arange(ny) - ny / 2 + 0.5) * pitch_mm
    return np.meshgrid(xs, ys)


def beamlets_for(maps, gantry):
    """BeamletInfo + flat weights for per-beam maps (n_beams, ny, nx) on the lattice."""
    ny, nx = np.shape(maps[0])
    X, Y = lattice(nx, ny)
    n = len(maps)
    info = BeamletInfo(np.repeat(np.arange(n), X.size), np.asarray(gantry) % 360,
                       np.zeros(n), np.zeros(n), np.zeros((n, 3)), np.tile(X.ravel(), n),
                       np.tile(Y.ravel(), n))
    return info, np.concatenate([m.ravel() for m in maps])
