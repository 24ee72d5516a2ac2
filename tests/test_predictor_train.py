"""Training loop (checkpoint, resume, determinism), CNN predictor, and the CLI commands."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.predictor.cnn import CNNPredictor
from atp.predictor.encoding import EncodingConfig
from atp.predictor.train import augment, fit_predictor, lr_swap_permutation, make_config, train

from atp.cli import main

TINY = EncodingConfig(size=(16, 16, 16), spacing_mm=(16.0, 16.0, 12.0))


def _data(phantom, n=2):
    from test_predictor_nets import _tiny_case

    s, d = _tiny_case(phantom)
    stacks = np.repeat(s.numpy().astype(np.float16), n, axis=0)
    doses = np.repeat(d.numpy().astype(np.float16), n, axis=0)
    return stacks, doses, [f"p{i}" for i in range(n)]


def _cfg(**kw):
    cfg = make_config("cadunet", "small", epochs=2, steps_per_epoch=2, threads=1,
                      checkpoint_every_s=0.0)
    return replace(cfg, encoding=TINY, patch=(16, 16, 16),
                   net_kwargs={"channels": [4, 8], "growth": 4, "layers": 1}, **kw)


def test_resume_continues_exactly(phantom, tmp_path):
    data = _data(phantom)
    full = train(_cfg(), data, data, tmp_path / "a", progress=False, log=lambda *_: None)
    part = train(_cfg(time_limit_s=1e-9), data, data, tmp_path / "b", progress=False,
                 log=lambda *_: None)
    assert part["stopped"] == "time limit" and part["epochs_completed"] == 0
    rest = train(_cfg(), data, data, tmp_path / "b", resume=True, progress=False,
                 log=lambda *_: None)
    assert rest["epochs_completed"] == 2
    for (k, a), b in zip(full["net"].state_dict().items(), rest["net"].state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_loss"] for h in full["history"]] == [h["val_loss"] for h in rest["history"]]
    with pytest.raises(Exception, match="configuration"):
        train(_cfg(lr=0.5), data, data, tmp_path / "b", resume=True, progress=False,
              log=lambda *_: None)


def test_early_stopped_run_resumes_with_more_patience(phantom, tmp_path):
    data = _data(phantom)
    frozen = {"lr": 0.0, "min_lr": 0.0, "epochs": 4}  # no learning: val loss never improves

    def run(patience, resume):
        return train(_cfg(patience=patience, **frozen), data, data, tmp_path / "r",
                     resume=resume, progress=False, log=lambda *_: None)

    first = run(1, False)
    assert first["stopped"] == "early stopping" and first["epochs_completed"] == 2
    assert run(1, True)["epochs_completed"] == 2  # same patience: stays stopped
    assert run(5, True)["epochs_completed"] == 4  # more patience: continues


def test_best_checkpoint_is_a_predictor(phantom, tmp_path):
    data = _data(phantom)
    res = train(_cfg(), data, data, tmp_path, progress=False, log=lambda *_: None)
    pred = CNNPredictor.from_checkpoint(res["best"], name="tiny")
    dose = pred.predict(phantom)
    assert dose.shape == phantom.grid.shape and dose.dtype == np.float32
    assert np.all(dose[~phantom.body_mask] == 0)
    assert np.allclose(dose[phantom.mask("PTV_70")], 70.0)  # PTV set to its prescription
    out = tmp_path / "pred.npy"
    assert main(["predict", "phantom", "--predictor", res["best"], "--out", str(out)]) == 0
    assert np.allclose(np.load(out), dose, atol=1e-4)


def test_flip_swaps_parotids(phantom):
    from test_predictor_nets import _tiny_case

    s, d = _tiny_case(phantom)
    cfg = replace(_cfg(), flip_prob=1.0, affine_prob=0.0)
    swap = lr_swap_permutation(cfg.encoding)
    fs, fd = augment(s[0], d[0], np.random.default_rng(0), cfg, swap)
    ir, il = 3 + TINY.oars.index("Parotid_R"), 3 + TINY.oars.index("Parotid_L")
    assert torch.equal(fs[ir], torch.flip(s[0, il], dims=[1]))
    assert torch.equal(fd, torch.flip(d[0], dims=[2]))


def test_cli_predict_baseline_and_errors(tmp_path, capsys):
    out = tmp_path / "d.npy"
    assert main(["predict", "phantom", "--predictor", "baseline", "--out", str(out)]) == 0
    assert np.load(out).shape == (40, 64, 64)
    assert main(["predict", "phantom", "--predictor", "nope", "--out", str(out)]) == 2
    assert "installed" in capsys.readouterr().err
    assert main(["predict", "phantom", "--predictor", str(tmp_path / "missing.pt"),
                 "--out", str(out)]) == 2


def test_cli_train_rejects_bad_data(tmp_path):
    assert main(["train", "--model", "cadunet", "--data", str(tmp_path), "--out",
                 str(tmp_path / "run"), "--quiet"]) == 2


def test_cnn_predictor_fit_in_memory(phantom):
    from atp.predictor.nets import build_net
    from scipy import ndimage

    from atp.patient import Patient

    rx = phantom.prescription_map_gy()
    dose = np.where(phantom.body_mask, ndimage.gaussian_filter(rx, 2.0), 0).astype(np.float32)
    meta = dict(phantom.metadata, reference_dose_gy=dose)
    pat = Patient(phantom.ct_hu, phantom.grid, phantom.structures, phantom.prescriptions,
                  "p", meta)
    kwargs = {"channels": [4, 8], "growth": 4, "layers": 1}
    torch.manual_seed(0)
    pred = CNNPredictor(build_net("cadunet", 3, TINY.in_channels, 1, **kwargs), TINY,
                        net_name="cadunet", net_kwargs=kwargs, device="cpu")
    before = {k: v.clone() for k, v in pred.net.state_dict().items()}
    fit_predictor(pred, [pat], epochs=1, steps_per_epoch=2, patch=(16, 16, 16), threads=1)
    after = pred.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert pred.predict(pat).shape == phantom.grid.shape
