"""Shared fixtures: the embedded phantom, paths into ../shared (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OPENKBP = REPO.parent / "shared" / "data" / "openkbp"


@pytest.fixture(scope="session")
def phantom():
    from atp.phantom import head_neck_phantom

    return head_neck_phantom()


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    if not SHARED_OPENKBP.is_dir():
        pytest.skip("../shared/data/openkbp not present")
    return SHARED_OPENKBP


@pytest.fixture(scope="session")
def openkbp_pt1(openkbp_dir):
    from atp.io.openkbp import load_openkbp_npz

    return load_openkbp_npz(openkbp_dir / "train" / "pt_1.npz")
