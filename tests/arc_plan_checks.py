"""Checks of an exported arc plan shared by the VMAT tests (DMPO and sweep arcs): ``atp
dose`` of its RT Plan recomputes the plan's dose, and dciodvfy finds no error in its RT
Plan and RT Dose."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest


def assert_rt_plan_recomputes(plan, out, tmp_path, capsys) -> None:
    """``atp dose`` of the RT Plan under ``out/dicom`` on the phantom, at the plan's dose
    grid (CT/3), equals ``plan.dose_gy`` within 0.5 % of its maximum, with its MU."""
    from atp.cli import main

    rtplan = sorted((out / "dicom").glob("RP*.dcm"))
    assert rtplan, f"no RT Plan under {out}"
    fwd_dir = tmp_path / "fwd"
    assert main(["dose", str(rtplan[0]), "--patient", "phantom", "--out", str(fwd_dir),
                 "--dose-grid-factor", "3", "--json"]) == 0  # the plan's dose grid
    info = json.loads(capsys.readouterr().out)
    fwd = np.load(fwd_dir / "dose.npy")
    assert np.abs(fwd - plan.dose_gy).max() <= 0.005 * plan.dose_gy.max()
    assert info["mu_per_fraction"] == pytest.approx(
        plan.delivery.total_mu / plan.delivery.fractions, rel=1e-4)


def assert_dciodvfy_clean(out) -> None:
    """dciodvfy reports no error in the RT Plan and RT Dose under ``out/dicom`` (skips
    when dciodvfy is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    files = sorted((out / "dicom").glob("R[PD]*.dcm"))
    assert len(files) == 2
    for f in files:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True,
                             check=False)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
        assert errors == [], (f.name, errors[:5])
