"""Shared fixtures: the embedded phantom, the toy dose-influence matrix and a plan on it,
the phantom with a reference dose, paths into ../shared (skipped when absent), a runner
for the README's Python examples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OPENKBP = REPO.parent / "shared" / "data" / "openkbp"


@pytest.fixture(scope="session")
def phantom():
    from atp.phantom import head_neck_phantom

    return head_neck_phantom()


@pytest.fixture(scope="module")
def toy(phantom, request):
    """The toy dose-influence matrix on the phantom (``atp.optimizer.testing.toy_dij``,
    dose grid factor 2), built once per test module: ``TOY_BEAMS`` beams when the module
    sets it, else 5."""
    from atp.optimizer.testing import toy_dij

    return toy_dij(phantom, n_beams=getattr(request.module, "TOY_BEAMS", 5), factor=2)


@pytest.fixture(scope="module")
def base_plan(phantom, toy):
    """The phantom's plan on ``toy`` (baseline predictor, cpu backend, 150 iterations,
    sequenced as by default), once per test module."""
    import atp

    return atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, optimizer_options={"max_iter": 150})


@pytest.fixture
def reference_dose_phantom(phantom):
    """The phantom (id "p") with a reference dose in its metadata: the prescription map
    blurred (Gaussian, 2 voxels) and never below it, zero outside the body."""
    from scipy import ndimage

    from atp.patient import Patient

    rx = phantom.prescription_map_gy()
    dose = np.where(phantom.body_mask, np.maximum(ndimage.gaussian_filter(rx, 2.0), rx), 0)
    meta = dict(phantom.metadata, reference_dose_gy=dose.astype(np.float32))
    return Patient(phantom.ct_hu, phantom.grid, phantom.structures, phantom.prescriptions,
                   "p", meta)


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    if not SHARED_OPENKBP.is_dir():
        pytest.skip("../shared/data/openkbp not present")
    return SHARED_OPENKBP


@pytest.fixture(scope="session")
def openkbp_pt1(openkbp_dir):
    from atp.io.openkbp import load_openkbp_npz

    return load_openkbp_npz(openkbp_dir / "train" / "pt_1.npz")


@pytest.fixture
def run_readme_example(tmp_path, monkeypatch):
    """run(marker): execute the README's ```python block after ``<!-- marker -->`` in
    tmp_path (the working directory) and return tmp_path."""

    def run(marker: str) -> Path:
        readme = (REPO / "README.md").read_text()
        m = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", readme, re.DOTALL)
        assert m, f"README lacks the {marker} block"
        monkeypatch.chdir(tmp_path)
        exec(compile(m.group(1), "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
        return tmp_path

    return run
