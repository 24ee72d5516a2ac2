"""Issue-23 Stage 2: full-resolution refiner of a coarse dose, DVH-point loss, cascade."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.predictor.cascade import CascadePredictor
from atp.predictor.cnn import CNNPredictor
from atp.predictor.encoding import EncodingConfig, encode_patient
from atp.predictor.losses import dvh_point_loss
from atp.predictor.nets import build_net
from atp.predictor.train import (
    augment,
    coarse_reference_gy,
    encode_patients,
    lr_swap_permutation,
    make_config,
    train,
)

COARSE = EncodingConfig(size=(16, 16, 16), spacing_mm=(16.0, 16.0, 12.0), crop="body",
                        ptv_distance=3)
FINE = EncodingConfig(size=(16, 32, 32), spacing_mm=None, factor=(1, 1, 1),
                      crop="targets", ptv_distance=3, dose_input=True)


def _cfg(**kw):
    cfg = make_config(None, "okbp_stage2", epochs=1, steps_per_epoch=2, threads=1,
                      checkpoint_every_s=0.0)
    return replace(cfg, encoding=FINE, coarse_encoding=COARSE, patch=FINE.size,
                   net_kwargs={"channels": [4, 8], "residual_channel": 13}, **kw)


def test_residual_net_corrects_its_input_dose():
    torch.manual_seed(0)
    net = build_net("resunet", 3, 14, 1, channels=(4, 8), residual_channel=13)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    x = torch.randn(1, 14, 8, 8, 8)
    assert torch.equal(net(x), torch.relu(x[:, 13:14]))
    with pytest.raises(ValueError):
        build_net("resunet", 3, 14, 1, channels=(4, 8), residual_channel=14)


def test_dvh_point_loss():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 1, 8, 8, 8, generator=g)
    m = torch.zeros(8, 8, 8, dtype=torch.bool)
    m[2:6, 2:6, 2:6] = True
    empty = torch.zeros_like(m)
    assert float(dvh_point_loss(ref, ref, [m, empty], [~m])) == 0.0
    pred = (ref + 0.1).requires_grad_(True)
    loss = dvh_point_loss(pred, ref, [m], [~m])
    assert float(loss.detach()) == pytest.approx(0.1, abs=1e-5)  # every DVH point shifted by 0.1
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert float(dvh_point_loss(pred, ref, [empty], []).detach()) == 0.0


def test_input_noise_is_smooth_in_the_body_and_reproducible(reference_dose_phantom):
    pat = reference_dose_phantom
    stack, _ = encode_patient(pat, FINE, coarse_reference_gy(pat, COARSE))
    s, d = torch.from_numpy(stack), torch.zeros(1, *FINE.size)
    cfg = replace(_cfg(), flip_prob=0.0)
    a, _ = augment(s, d, np.random.default_rng(3), cfg, lr_swap_permutation(FINE))
    b, _ = augment(s, d, np.random.default_rng(3), cfg, lr_swap_permutation(FINE))
    assert torch.equal(a, b) and torch.equal(a[:13], s[:13])
    body = s[1] >= 0.5
    diff = (a[13] - s[13]) * 70.0
    assert torch.all(diff[~body] == 0)
    inside = diff[body & (s[13] * 70 > 5)]  # away from the clamp at 0
    assert 1.0 < float(inside.std()) < 4.0
    # smooth: neighbouring voxels differ far less than the noise amplitude
    assert float((diff[:, :, 1:] - diff[:, :, :-1])[body[:, :, 1:] & body[:, :, :-1]]
                 .abs().mean()) < 0.3 * float(inside.std())


@pytest.mark.slow
def test_stage2_trains_and_cascade_keeps_stage1_outside_the_window(reference_dose_phantom,
                                                                 tmp_path):
    pat = reference_dose_phantom
    data = encode_patients([pat], FINE, COARSE)
    assert data[0].shape == (1, 14, 16, 32, 32)
    res = train(_cfg(), data, data, tmp_path, progress=False, log=lambda *_: None)
    stage2 = CNNPredictor.from_checkpoint(res["best"])
    torch.manual_seed(1)
    net1 = build_net("resunet", 3, COARSE.in_channels, 1, channels=(4, 8))
    stage1 = CNNPredictor(net1, COARSE, ptv_override=False, net_name="resunet",
                          net_kwargs={"channels": [4, 8]}, device="cpu")
    cascade = CascadePredictor(stage1, stage2)
    d1, d = stage1.predict(pat), cascade.predict(pat)
    assert d.shape == pat.grid.shape and d.dtype == np.float32
    assert np.all(d[~pat.body_mask] == 0)
    _, t = encode_patient(pat, FINE, d1)
    from atp.predictor.encoding import decode

    window = np.isfinite(decode(np.zeros(FINE.size, np.float32), t, fill=np.nan))
    assert np.array_equal(d[~window], d1[~window]) and not np.array_equal(d[window],
                                                                         d1[window])
    buf = io.BytesIO()
    torch.save(cascade.checkpoint(), buf)
    path = tmp_path / "cascade.pt"
    path.write_bytes(buf.getvalue())
    again = CNNPredictor.from_checkpoint(path)
    assert isinstance(again, CascadePredictor)
    assert np.array_equal(again.predict(pat), d)


def test_stage2s_recipe_is_stage2_on_bf16_sub_crops(reference_dose_phantom, tmp_path):
    """okbp_stage2s: Stage 2's data, network and loss on random sub-crops of the window
    with bfloat16 autocast; a sub-crop step trains and the network still predicts the
    whole window."""
    full = make_config(None, "okbp_stage2")
    cfg = make_config(None, "okbp_stage2s")
    assert cfg.encoding == full.encoding and cfg.net_kwargs == full.net_kwargs
    assert cfg.amp == "bf16" and cfg.loss == full.loss
    assert all(p < s for p, s in zip(cfg.patch, cfg.encoding.size))
    data = encode_patients([reference_dose_phantom], FINE, COARSE)
    small = replace(_cfg(), patch=(8, 16, 16), amp="bf16")
    res = train(small, data, data, tmp_path, progress=False, log=lambda *_: None)
    net = CNNPredictor.from_checkpoint(res["best"]).net
    with torch.no_grad():
        out = net(torch.from_numpy(np.asarray(data[0], np.float32)))
    assert out.shape == (1, 1, *FINE.size) and torch.isfinite(out).all()


def test_stage2sp_input_is_stage1s_own_prediction(reference_dose_phantom):
    """okbp_stage2sp: the dose channel is the given Stage-1 predictor's dose (what the
    cascade hands Stage 2 at inference), not the coarse reference."""
    pat = reference_dose_phantom
    assert make_config(None, "okbp_stage2sp").dose_input_source == "stage1"

    class Flat:
        def predict(self, p):
            return np.where(p.body_mask, 12.5, 0.0).astype(np.float32)

    own = encode_patients([pat], FINE, None, Flat())[0][0, 13].astype(np.float32)
    ref = encode_patients([pat], FINE, COARSE)[0][0, 13].astype(np.float32)
    body = encode_patient(pat, FINE, Flat().predict(pat))[0][1] >= 0.5
    assert np.allclose(own[body], 12.5 / FINE.rx_norm_gy, atol=1e-3)
    assert not np.allclose(own, ref)


def test_stage2_window_keeps_its_scale_on_a_fine_ct():
    """A CT finer than the OpenKBP voxels is block-averaged to about their scale in the
    Stage-2 window (the network was trained on 2.7-5.1 mm x 1.5-3.3 mm voxels); OpenKBP
    and phantom grids keep factor 1."""
    from atp.predictor.encoding import make_transform
    from atp.predictor.train import make_config

    from atp.phantom import head_neck_phantom

    enc = make_config(None, "okbp_stage2s").encoding
    assert enc.min_spacing_mm == (2.7, 2.7, 1.5)
    assert EncodingConfig.from_dict(enc.to_dict()) == enc
    assert "min_spacing_mm" not in FINE.to_dict()  # older configs' dicts are unchanged
    coarse = head_neck_phantom()
    assert make_transform(coarse, enc).factor == (1, 1, 1)
    fine = head_neck_phantom(shape=(60, 160, 160), spacing_mm=(2.0, 1.2, 1.2))
    t = make_transform(fine, enc)
    spacing = np.asarray(fine.grid.spacing_mm)[list(t.perm)] * np.asarray(t.factor)
    assert (spacing >= np.asarray(enc.min_spacing_mm) - 1e-9).all()
    assert (spacing < 2 * np.asarray(enc.min_spacing_mm)).all()


def test_cli_refuses_a_stage2_network_as_stage1(tmp_path, capsys):
    from pathlib import Path

    from atp.cli import main

    repo = Path(__file__).resolve().parents[1]
    stage2 = repo / "training" / "runs" / "okbp_stage2s" / "best.pt"
    out = tmp_path / "run"
    assert main(["train", "--config", "okbp_stage2s", "--stage1", str(stage2), "--data",
                 str(tmp_path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Stage-2 network" in err and "--stage1" in err and str(stage2) in err
    assert not out.exists()
