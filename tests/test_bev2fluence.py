"""Bev2Fluence: beamlet <-> BEV maps, training steps, the FastPath hook, data + train CLI."""

import numpy as np
import pytest
import torch
from atp.optimizer.fastpath.bev2fluence import (
    FEATURE_CHANNELS,
    NETWORK_REFINE_STEPS,
    Bev2FluenceNet,
    BEVLayout,
    default_weights_path,
    least_squares_scale,
    make_initial_fluence_fn,
    masked_l1,
    save_weights,
)
from atp.optimizer.fastpath.chain import FastPath

from atp.dose.influence import BeamletInfo
from atp.errors import InputError


@pytest.fixture(scope="module")
def arc_case(phantom):
    """Phantom, coarse arc dij (30 deg, dose grid factor 3), a predicted dose (Gy)."""
    from atp.predictor import registry

    from atp.dose.arc import arc_influence
    from atp.dose.geometry import arc_control_points

    dij = arc_influence(phantom, arc_control_points(180.0, 180.0, 30.0), dose_grid_factor=3)
    pred = registry.get("baseline").predict(phantom)
    return phantom, dij, pred


@pytest.fixture(scope="module")
def record(arc_case):
    """A gen_data record whose target is the fallback initial fluence (MU)."""
    from training.fastpath.gen_data import patient_record

    patient, dij, pred = arc_case
    target = FastPath(patient, dij, pred, init_steps=10).prepare().w_init.numpy()
    return patient_record(patient, dij, pred, target)


def test_scatter_gather_round_trip_is_exact(arc_case):
    dij = arc_case[1]
    layout = BEVLayout.from_beamlets(dij.beamlets)
    rng = np.random.default_rng(0)
    w = rng.random(dij.n_beamlets).astype(np.float32)
    maps = layout.scatter(w)
    assert maps.shape == layout.shape and maps.shape[0] == dij.beamlets.n_beams
    assert np.array_equal(layout.gather(maps), w)
    assert maps[~layout.mask()].sum() == 0 and layout.mask().sum() == dij.n_beamlets
    wt = torch.from_numpy(w)
    assert torch.equal(layout.gather(layout.scatter(wt)), wt)
    # pixel centres are the beamlet centres
    b = dij.beamlets
    assert np.allclose(layout.u_mm[layout.iu], b.bev_x_mm)
    assert np.allclose(layout.v_mm[layout.iv], b.bev_y_mm)


def test_layout_rejects_duplicate_and_off_grid_beamlets():
    def info(x, y):
        return BeamletInfo([0, 0], [0.0], [0.0], [0.0], [[0, 0, 0]], x, y, (5.0, 5.0))

    with pytest.raises(InputError):
        BEVLayout.from_beamlets(info([2.5, 2.5], [2.5, 2.5]))
    with pytest.raises(InputError):
        BEVLayout.from_beamlets(info([2.5, 4.0], [2.5, 2.5]))


def test_features_and_a_few_training_steps_lower_the_loss(record):
    x = torch.from_numpy(record["inputs"])
    m = torch.from_numpy(record["mask"].astype(np.float32))
    y = torch.from_numpy(record["target_mu"])
    y = y / y[m > 0].mean()
    assert x.shape[1] == len(FEATURE_CHANNELS) and torch.isfinite(x).all()
    assert torch.equal(x[:, FEATURE_CHANNELS.index("beamlet_mask")], m)
    torch.manual_seed(0)
    from training.fastpath.train_bev2fluence import train_step

    model = Bev2FluenceNet(base=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(masked_l1(model(x), y, m))
    for _ in range(15):
        train_step(model, opt, x, y, m)
    with torch.no_grad():
        after = float(masked_l1(model(x), y, m))
    assert after < 0.8 * before


def test_network_initial_fluence_plugs_into_the_fast_path(arc_case, tmp_path):
    patient, dij, pred = arc_case
    torch.manual_seed(0)
    path = tmp_path / "bev2fluence.pt"
    save_weights(Bev2FluenceNet(base=8, depth=2), path)
    assert path.with_suffix(".json").is_file()
    fn = make_initial_fluence_fn(path, "cpu", refine_steps=0)  # the network alone
    assert make_initial_fluence_fn(path).refine_steps == NETWORK_REFINE_STEPS
    fp = FastPath(patient, dij, pred, initial_fluence_fn=fn, correction_steps=3).prepare()
    assert fp.initial_path == "network"
    w = fp.w_init
    assert isinstance(w, torch.Tensor) and w.shape == (dij.n_beamlets,)
    assert torch.all(w >= 0) and float(w.sum()) > 0
    # the global scale is the least-squares one: rescaling does not fit better
    def err(s):
        return float((fp.mimic_w * (fp.op(s * w) - fp.pred) ** 2).sum())
    assert err(1.0) <= min(err(0.97), err(1.03))
    assert least_squares_scale(fp.op, w, fp.pred, fp.mimic_w) == pytest.approx(1.0, rel=1e-3)
    res = fp.run()
    assert res.initial_path == "network" and np.all(res.fluence_mu >= 0)
    # a few dose-mimicking steps after the network lower the mimicking error
    fp5 = FastPath(patient, dij, pred, initial_fluence_fn=make_initial_fluence_fn(
        path, refine_steps=5)).prepare()
    assert fp5.initial_path == "network" and torch.all(fp5.w_init >= 0)
    assert float((fp.mimic_w * (fp5.op(fp5.w_init) - fp.pred) ** 2).sum()) < err(1.0)
    with pytest.raises(InputError):
        make_initial_fluence_fn(tmp_path / "missing.pt")
    shipped = default_weights_path()
    assert shipped is None or shipped.is_file()


def test_saved_data_trains_and_resumes_from_the_cli(record, tmp_path):
    from training.fastpath.gen_data import save_record
    from training.fastpath.train_bev2fluence import main

    meta = {"patient_id": "phantom", "max_iter": 0, "predictor": "baseline",
            "arc_spacing_deg": 30.0, "control_points": 12, "dose_grid_factor": 3}
    for split, name in (("train", "a"), ("train", "b"), ("validation", "c")):
        save_record(tmp_path / "data" / split / f"{name}.npz", record, dict(meta, split=split))
    out = tmp_path / "w" / "bev2fluence.pt"
    argv = ["--data", str(tmp_path / "data"), "--out", str(out), "--run-dir",
            str(tmp_path / "run"), "--base", "4", "--cps-per-step", "4", "--epochs", "1"]
    assert main(argv) == 0
    assert out.is_file() and (tmp_path / "w" / "MODEL_CARD.md").is_file()
    card = (tmp_path / "w" / "MODEL_CARD.md").read_text()
    assert "2 OpenKBP training patients" in card and "validation split" in card
    assert main(argv[:-1] + ["2", "--resume"]) == 0  # continues from epoch 1 to 2
    blob = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert [e["epoch"] for e in blob["state"]["history"]] == [1, 2]


def test_gen_data_features_match_the_fast_path(arc_case):
    from atp.optimizer.fastpath.bev2fluence import bev_features

    from training.fastpath.gen_data import dose_grid_inputs

    patient, dij, pred = arc_case
    fp = FastPath(patient, dij, pred, init_steps=0).prepare()
    a, layout_a = bev_features(fp)
    b, layout_b = bev_features(dose_grid_inputs(patient, dij, pred))
    assert np.array_equal(layout_a.flat_index, layout_b.flat_index)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("script", ["gen_data", "gen_correction_data", "eval_bev2fluence",
                                    "train_bev2fluence"])
def test_offline_scripts_run_with_python_m_from_the_repository_root(script):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", f"training.fastpath.{script}", "--help"],
                         check=False, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"python -m training.fastpath.{script}" in run.stdout


def test_no_library_module_imports_the_offline_scripts():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert not (root / "optimizer" / "fastpath" / "gen_data.py").exists()
    for folder in ("atp", "optimizer", "predictor", "sequencer"):
        for f in (root / folder).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            assert "import training" not in text and "from training" not in text, f
