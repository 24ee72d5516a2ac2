"""The learned correction module (optimizer.fastpath.correction_net): features, the
residual network as a drop-in for the exact unrolled steps, training data and training
from the CLI, and the pipeline's choice between network and exact correction."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.optimizer.fastpath.bev2fluence import Bev2FluenceNet, load_weights, save_weights
from atp.optimizer.fastpath.correction import unrolled_correction
from atp.optimizer.fastpath.correction_net import (
    CORRECTION,
    CORRECTION_CHANNELS,
    correction_features,
    correction_record,
    make_correction_fn,
)

import atp
from atp.errors import InputError

ARC = {"arc_spacing_deg": 10.0, "dose_grid_factor": 3}


@pytest.fixture(scope="module")
def fast(phantom):
    return atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                    fast_options=dict(ARC, device="cpu", initial_fluence="fallback",
                                      correction="exact"))


@pytest.fixture(scope="module")
def identity_weights(tmp_path_factory):
    """A correction network whose learned part is zero: output = its input fluence."""
    torch.manual_seed(0)
    net = Bev2FluenceNet(in_channels=len(CORRECTION_CHANNELS), base=8, depth=2,
                         residual_channel=CORRECTION_CHANNELS.index("fluence"))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    path = tmp_path_factory.mktemp("corr") / "correction.pt"
    save_weights(net, path, kind=CORRECTION)
    return path


def test_correction_features_are_the_exact_first_step(fast):
    fp = fast.attachments["fastpath"]
    w0 = fp.w_init
    feats, layout, scale = correction_features(fp, w0, {"Parotid_L": 0.2})
    assert feats.shape == (layout.n_cp, len(CORRECTION_CHANNELS), *layout.shape[1:])
    assert scale == pytest.approx(float(w0.mean()))
    ch = {c: i for i, c in enumerate(CORRECTION_CHANNELS)}
    torch.testing.assert_close(layout.gather(feats[:, ch["fluence"]]), w0 / scale)
    # the step channel is where one exact correction step (without momentum) moves w0
    one = unrolled_correction(w0, fp.op, fp.objective({"Parotid_L": 0.2}), 1,
                              fp._step_size({"Parotid_L": 0.2}), momentum=False,
                              regulariser=fp.smooth, reg_weight=fp.mu)
    moved = torch.clamp_min(w0 - scale * layout.gather(feats[:, ch["step"]]), 0.0)
    torch.testing.assert_close(moved, one, rtol=1e-4, atol=1e-6 * float(w0.max()))
    # the slider enters through the gradient channel
    other, _, _ = correction_features(fp, w0, {})
    assert not torch.equal(other[:, ch["gradient"]], feats[:, ch["gradient"]])


def test_identity_network_plus_steps_is_the_exact_correction(fast, identity_weights):
    fp = fast.attachments["fastpath"]
    w0 = fp.w_init
    alone = make_correction_fn(identity_weights, refine_steps=0)(fp, w0, {})
    torch.testing.assert_close(alone, w0, rtol=1e-6, atol=1e-6 * float(w0.max()))
    fn = make_correction_fn(identity_weights, refine_steps=5)
    exact = unrolled_correction(w0, fp.op, fp.objective({}), 5, fp._step_size({}),
                                regulariser=fp.smooth, reg_weight=fp.mu)
    torch.testing.assert_close(fn(fp, w0, {}), exact, rtol=1e-5,
                               atol=1e-6 * float(w0.max()))
    with pytest.raises(InputError):
        make_correction_fn(identity_weights.parent / "missing.pt")
    with pytest.raises(InputError, match="not a Bev2Fluence"):
        load_weights(identity_weights)  # a correction file is not an initial-fluence one


def test_plan_says_which_correction_it_used(phantom, fast, identity_weights, monkeypatch):
    assert fast.settings["correction_path"] == "exact"
    assert any("exact unrolled gradient steps" in n for n in fast.notes)
    net = atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                   fast_options=dict(ARC, device="cpu", initial_fluence="fallback",
                                     correction_weights=str(identity_weights)))
    assert net.settings["correction_path"] == "network"
    assert net.settings["correction_weights"] == str(identity_weights)
    assert any("trained correction network" in n for n in net.notes)
    assert np.all(net.fluence >= 0) and net.dose_gy[phantom.mask("PTV_70")].mean() > 50
    # sliders go through the network too, and zero sliders are the baseline exactly
    np.testing.assert_array_equal(atp.respare(net, {}).fluence, net.fluence)
    from atp.optimizer.fastpath import correction_net

    monkeypatch.setattr(correction_net, "default_correction_weights_path", lambda: None)
    with pytest.raises(InputError, match="no correction-network weights"):
        atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                 fast_options=dict(ARC, device="cpu", correction="network"))
    with pytest.raises(InputError, match="correction must be"):
        atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                 fast_options=dict(ARC, device="cpu", correction="learned"))


def test_correction_data_trains_from_the_cli(fast, tmp_path):
    from training.fastpath.gen_data import save_record
    from training.fastpath.train_bev2fluence import main

    fp = fast.attachments["fastpath"]
    for i, sp in enumerate(({}, {"Parotid_L": 0.2})):
        rec = correction_record(fp, fp.w_init, sp, fp.run(sp).fluence_mu)
        rec.update({"channels": np.array(CORRECTION_CHANNELS),
                    "feature_version": np.array(CORRECTION.feature_version),
                    "kind": np.array(CORRECTION.name)})
        save_record(tmp_path / "data" / f"pt_{i}.npz", rec, {"patient_id": f"pt_{i}"})
    out = tmp_path / "w" / "correction.pt"
    rc = main(["--kind", "correction", "--data", str(tmp_path / "data"), "--out", str(out),
               "--run-dir", str(tmp_path / "run"), "--epochs", "2", "--base", "8",
               "--val-fraction", "0.5"])
    assert rc == 0 and out.is_file()
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["format"] == CORRECTION.weights_format
    assert config["model"]["residual_channel"] == CORRECTION_CHANNELS.index("fluence")
    card = (tmp_path / "w" / "MODEL_CARD_correction.md").read_text()
    assert "Fluence-correction network" in card and "gen_correction_data" in card
    model = load_weights(out, kind=CORRECTION)
    assert model.residual_channel == 0
    # a Bev2Fluence trainer refuses correction data (and the other way round)
    with pytest.raises(ValueError, match="correction data"):
        from training.fastpath.train_bev2fluence import load_record

        load_record(tmp_path / "data" / "pt_0.npz")


def test_write_patients_skips_fails_and_writes_atomically(tmp_path, capsys):
    from training.fastpath.gen_data import write_patients

    src = [tmp_path / f"pt_{i}.npz" for i in (1, 2, 3)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "pt_1.npz").write_bytes(b"old")

    def make(path, dest):
        if dest.exists():
            return None
        if path.stem == "pt_2":
            raise RuntimeError("bad CT")
        return {"x": np.arange(3)}, {"patient_id": path.stem}, "ok"

    assert write_patients(src, out, make) == 1  # one failure -> exit status 1
    text = capsys.readouterr()
    assert "pt_1: exists, skipped" in text.out and "pt_2: FAILED RuntimeError" in text.err
    assert (out / "pt_1.npz").read_bytes() == b"old"
    assert not (out / "pt_2.npz").exists()
    with np.load(out / "pt_3.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert not list(out.glob(".*partial"))
