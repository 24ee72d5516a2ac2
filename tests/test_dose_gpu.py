"""CPU and GPU (CuPy) engines agree: same dij within 0.5 % of the maximum dose."""

from __future__ import annotations

import numpy as np
import pytest

from atp.dose.geometry import Beam
from atp.dose.pencil_beam import PencilBeamEngine
from atp.xp import gpu_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU / CuPy")]


def test_cpu_gpu_agree(phantom):
    beams = [Beam(0), Beam(100), Beam(220)]
    cpu = PencilBeamEngine(device="cpu").influence(phantom, beams)
    gpu = PencilBeamEngine(device="gpu").influence(phantom, beams)
    assert cpu.n_beamlets == gpu.n_beamlets
    w = np.random.default_rng(0).uniform(0.5, 1.5, cpu.n_beamlets)
    dc, dg = cpu.dose(w), gpu.dose(w)
    assert np.max(np.abs(dc - dg)) <= 0.005 * dc.max()
