"""Issue-23 Stage-1 recipe: signed-distance inputs, body crop, EMA, one-cycle, exact resume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atp.predictor.cnn import CNNPredictor
from atp.predictor.encoding import EncodingConfig, encode_dose, encode_patient, lr_swap_permutation
from atp.predictor.train import (
    augment,
    encode_patients,
    lr_at,
    make_config,
    pad_values,
    selection_split,
    train,
)

ENC = EncodingConfig(size=(16, 16, 16), spacing_mm=(16.0, 16.0, 12.0), crop="body",
                     ptv_distance=3)


def _cfg(**kw):
    cfg = make_config(None, "okbp_stage1", epochs=2, steps_per_epoch=2, threads=1,
                      checkpoint_every_s=0.0)
    return replace(cfg, encoding=ENC, patch=(16, 16, 16), net_kwargs={"channels": [4, 8, 8]},
                   **kw)


def test_distance_channels_and_body_crop(phantom):
    stack, t = encode_patient(phantom, ENC)
    assert stack.shape == (ENC.n_stack_channels, 16, 16, 16) == (13, 16, 16, 16)
    first = max(phantom.prescriptions, key=lambda r: r.dose_gy).target
    occ = encode_dose(phantom.mask(first).astype(np.float32), t)
    d = stack[ENC.first_distance_channel]
    assert (d[occ >= 0.5] <= 0).all() and (d[occ == 0] > 0).all()
    assert d.min() >= -1 and d.max() <= 1
    for k in range(len(phantom.prescriptions), 3):  # targets the patient lacks: far away
        assert (stack[ENC.first_distance_channel + k] == 1).all()
    # the body is centred in the crop on every axis where it fits
    assert abs(float(stack[1].sum()) - float(encode_dose(
        phantom.body_mask.astype(np.float32), t).sum())) < 1e-3
    assert lr_swap_permutation(ENC)[ENC.first_distance_channel:] == [10, 11, 12]
    assert pad_values(ENC)[10:] == [1.0, 1.0, 1.0] and pad_values(ENC)[:10] == [0.0] * 10


def test_one_cycle_schedule():
    cfg = _cfg()
    total = 100
    lrs = [lr_at(cfg, s, total) for s in range(total + 1)]
    warm = round(cfg.warmup_frac * total)
    assert lrs[0] == pytest.approx(cfg.lr / cfg.div_factor)
    assert lrs[warm] == pytest.approx(cfg.lr) and max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(cfg.min_lr)
    rising, falling = lrs[:warm + 1], lrs[warm:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)


def test_physical_shift_moves_whole_voxels_and_pads_distances(phantom):
    stack, _ = encode_patient(phantom, ENC)
    s = torch.from_numpy(stack)
    d = torch.rand(1, 16, 16, 16)
    cfg = replace(_cfg(), flip_prob=0.0, affine_prob=1.0, rotate_deg=0.0, shift_vox=2)
    rng = np.random.default_rng(5)
    v = np.random.default_rng(5)
    v.random(), v.random(), v.uniform(0, 0, 3), v.uniform(0, 0)  # draws before the shift
    shift = v.integers(-2, 3, 3)
    fs, fd = augment(s, d, rng, cfg, lr_swap_permutation(ENC))
    # out[i] = in[i + shift] along each canonical axis
    src = tuple(slice(max(0, k), 16 - max(0, -k)) for k in shift)
    dst = tuple(slice(max(0, -k), 16 - max(0, k)) for k in shift)
    assert torch.allclose(fs[(slice(None), *dst)], s[(slice(None), *src)], atol=1e-5)
    assert torch.allclose(fd[(slice(None), *dst)], d[(slice(None), *src)], atol=1e-5)
    if np.any(shift != 0):  # the padded border of a distance channel reads "far away"
        edge = fs[10].flatten()
        assert torch.isclose(edge, torch.ones_like(edge)).any()


def test_selection_split_is_fixed_and_disjoint():
    files = [f"pt_{i}.npz" for i in range(30)]
    fit, sel = selection_split(files, 5, 2020)
    assert len(sel) == 5 and len(fit) == 25 and not set(fit) & set(sel)
    assert selection_split(files, 5, 2020) == (fit, sel)
    assert selection_split(files, 5, 7)[1] != sel


@pytest.mark.slow
def test_resume_at_every_step_is_bitwise(reference_dose_phantom, tmp_path):
    """Run N steps at once == stop after every single step and resume (CPU, EMA, AdamW,
    one-cycle, augmentation, per-epoch selection)."""
    pat = reference_dose_phantom
    data = encode_patients([pat, pat], ENC)
    calls: list[int] = []

    def selector(pred):  # on the network grid: cheap, and it sees the EMA weights
        calls.append(1)
        y = pred.predict_network_grid(data[0][0].astype(np.float32))
        return {"selection_score": float(np.abs(y / 70.0 - data[1][0, 0]).mean())}

    quiet = {"progress": False, "log": lambda *_: None, "selector": selector}
    full = train(_cfg(), data, data, tmp_path / "a", **quiet)
    n_calls = 0
    while True:
        part = train(_cfg(time_limit_s=1e-9), data, data, tmp_path / "b", resume=True,
                     **quiet)
        n_calls += 1
        if part["stopped"] != "time limit" or part["epochs_completed"] == 2:
            break
    assert n_calls >= 4 and part["global_step"] == full["global_step"] == 4
    assert len(calls) == 4  # one selection per epoch in each run
    for name in ("net", "ema"):
        for (k, a), b in zip(full[name].state_dict().items(),
                             part[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    strip = [{k: v for k, v in h.items() if k not in ("elapsed_s", "selection_s")}
             for h in full["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in ("elapsed_s", "selection_s")}
                     for h in part["history"]]
    ck_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k, v in ck_a["optimizer"]["state"].items():
        for kk, t in v.items():
            assert torch.equal(t, ck_b["optimizer"]["state"][k][kk])
    # the one-cycle schedule is defined on the planned epochs: they cannot change
    with pytest.raises(Exception, match="configuration"):
        train(_cfg(epochs=3), data, data, tmp_path / "b", resume=True, **quiet)


def test_best_is_the_ema_predictor_with_tta(phantom, reference_dose_phantom, tmp_path):
    pat = reference_dose_phantom
    data = encode_patients([pat], ENC)
    cfg = _cfg(epochs=1)
    res = train(cfg, data, data, tmp_path, progress=False, log=lambda *_: None,
                selector=lambda p: {"selection_score": 1.0})
    pred = CNNPredictor.from_checkpoint(res["best"])
    assert pred.tta and not pred.ptv_override and pred.encoding == ENC
    for k, v in res["ema"].state_dict().items():
        assert torch.equal(pred.net.state_dict()[k], v), k
    dose = pred.predict(phantom)
    assert dose.shape == phantom.grid.shape and dose.dtype == np.float32
    assert np.all(dose[~phantom.body_mask] == 0)
    # TTA: the prediction of a mirrored stack is the mirror of the prediction
    stack, _ = encode_patient(phantom, ENC)
    mirrored = np.flip(stack[lr_swap_permutation(ENC)], axis=2)
    assert np.allclose(pred.predict_network_grid(mirrored),
                       np.flip(pred.predict_network_grid(stack), axis=1), atol=1e-4)


def test_cli_train_needs_a_model_or_a_recipe(tmp_path, capsys):
    from atp.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert make_config(None, "okbp_stage1").model == "resunet"
    with pytest.raises(Exception, match="resunet"):
        make_config("cadunet", "okbp_stage1")


def test_resume_checkpoint_that_is_not_ours_is_input_error(tmp_path):
    """A truncated, foreign or code-bearing last.pt is exit-2 input naming the file."""
    import pickle

    import torch
    from atp.predictor.train import _load_resume_checkpoint

    from atp.errors import InputError

    truncated = tmp_path / "truncated.pt"
    torch.save({"config": {}, "model": {}, "optimizer": {}, "state": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps(print))  # a global, refused by weights_only
    for bad in (truncated, foreign, code):
        with pytest.raises(InputError) as err:
            _load_resume_checkpoint(bad)
        assert str(bad) in str(err.value) and "--resume" in str(err.value)
    good = tmp_path / "good.pt"
    torch.save({"config": {"a": 1}, "model": {}, "optimizer": {}, "state": {"epoch": 0}}, good)
    assert _load_resume_checkpoint(good)["state"] == {"epoch": 0}


def test_select_every_scores_every_nth_epoch_and_the_last(reference_dose_phantom, tmp_path):
    """select_every=2 over 3 epochs: the selector runs after epochs 2 and 3 only, and an
    unscored epoch never becomes best.pt."""
    data = encode_patients([reference_dose_phantom], ENC)
    calls: list[int] = []

    def selector(pred):
        calls.append(1)
        return {"selection_score": 10.0 - len(calls)}

    res = train(_cfg(epochs=3, steps_per_epoch=1, select_every=2), data, data, tmp_path,
                progress=False, log=lambda *_: None, selector=selector)
    assert len(calls) == 2 and res["best_epoch"] == 2
    assert ["selection_score" in h for h in res["history"]] == [False, True, True]


def test_parallel_encoding_gives_the_same_arrays(openkbp_dir, tmp_path):
    from atp.predictor.data import split_files
    from atp.predictor.train import encode_files

    files = split_files(openkbp_dir, "train")[:3]
    a = encode_files(files, ENC, tmp_path / "a")
    b = encode_files(files, ENC, tmp_path / "b", workers=2)
    assert a[2] == b[2]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_gpu_recipes_are_the_cpu_recipes_with_longer_schedules():
    for g, c in (("okbp_stage1g", "okbp_stage1"), ("okbp_stage2g", "okbp_stage2")):
        gc, cc = make_config(None, g), make_config(None, c)
        assert gc.model == cc.model == "resunet" and gc.encoding == cc.encoding
        assert gc.net_kwargs == cc.net_kwargs and gc.patch == cc.patch
        assert gc.amp == "auto" and gc.select_every == 10 and gc.epochs > cc.epochs
