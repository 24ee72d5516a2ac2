"""Shared fixtures: the embedded phantom, paths into ../shared (skipped when absent), a
runner for the README's Python examples."""

from __future__ import annotations

import re
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
