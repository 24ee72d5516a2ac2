"""Predictor registry: names, errors, third-party registration, default choice."""

from __future__ import annotations

import numpy as np
import pytest
from atp.predictor import registry

from atp.errors import BackendUnavailableError, InputError


class _Constant:
    name = "constant-test"

    def predict(self, patient):
        return np.ones(patient.grid.shape, dtype=np.float32)


def test_builtins_listed():
    names = registry.available()
    assert "baseline" in names and "mean-dose" in names


def test_unknown_name_lists_installed():
    with pytest.raises(BackendUnavailableError) as exc:
        registry.get("no-such-model")
    assert "baseline" in str(exc.value) and "no-such-model" in str(exc.value)


def test_register_get_unregister(phantom):
    registry.register("constant-test", _Constant)
    try:
        assert "constant-test" in registry.available()
        p = registry.get("constant-test")
        assert p.predict(phantom).shape == phantom.grid.shape
        with pytest.raises(InputError):
            registry.register("constant-test", _Constant)
        registry.register("constant-test", _Constant, replace=True)
    finally:
        registry.unregister("constant-test")
    assert "constant-test" not in registry.available()


def test_register_rejects_bad_input():
    with pytest.raises(InputError):
        registry.register("", _Constant)
    with pytest.raises(InputError):
        registry.register("x", 42)


def test_get_accepts_instance_and_dict():
    inst = _Constant()
    assert registry.get(inst) is inst
    assert registry.get({"name": "baseline"}).name == "baseline"
    with pytest.raises(InputError):
        registry.get(3.5)


def test_factory_returning_non_predictor_is_refused():
    registry.register("bad-factory-test", lambda: object())
    try:
        with pytest.raises(BackendUnavailableError):
            registry.get("bad-factory-test")
    finally:
        registry.unregister("bad-factory-test")


def test_entry_point_factory_is_loaded_lazily(monkeypatch, tmp_path):
    from importlib.metadata import EntryPoint

    import atp.registry

    (tmp_path / "fake_vendor_pred.py").write_text(
        "import numpy as np\n"
        "class Constant:\n"
        "    name = 'constant-test'\n"
        "    def predict(self, patient):\n"
        "        return np.ones(patient.grid.shape, dtype=np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("fake", "fake_vendor_pred:Constant", registry.ENTRY_POINT_GROUP),
           EntryPoint("broken", "no_such_vendor_pkg:make", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(atp.registry, "entry_points", lambda group: [
        e for e in eps if e.group == group])
    registry.PREDICTORS.refresh()
    try:
        assert {"fake", "broken"} <= set(registry.available())
        assert registry.get("fake").name == "constant-test"
        with pytest.raises(BackendUnavailableError, match="no_such_vendor_pkg:make"):
            registry.get("broken")
    finally:
        monkeypatch.undo()
        registry.PREDICTORS.refresh()
    assert "fake" not in registry.available()


def test_default_is_a_runnable_registered_predictor(phantom):
    name = registry.default_predictor_name()
    assert name in registry.available()
    dose = registry.get(name).predict(phantom)
    assert dose.shape == phantom.grid.shape and dose.dtype == np.float32


def test_default_follows_shipped_scores(tmp_path, monkeypatch):
    import json

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    index = {"predictors": {
        "baseline": {"kind": "builtin", "file": "a.json", "needs": [],
                     "validation": {"dose_score_gy": 7.0}},
        "mean-dose": {"kind": "builtin", "file": "b.json", "needs": [],
                      "validation": {"dose_score_gy": 3.0}},
        "ghost": {"kind": "cnn", "file": "missing.pt", "needs": [],
                  "validation": {"dose_score_gy": 1.0}},
        "needs-lib": {"kind": "cnn", "file": "a.json", "needs": ["no_such_module_xyz"],
                      "validation": {"dose_score_gy": 0.5}}}}
    (tmp_path / "shipped.json").write_text(json.dumps(index))
    monkeypatch.setattr(registry, "SHIPPED_INDEX", tmp_path / "shipped.json")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    # missing weights and missing libraries are skipped; the best remaining one wins
    assert registry.default_predictor_name() == "mean-dose"
    (tmp_path / "shipped.json").write_text("{not json")
    with pytest.raises(InputError):
        registry.default_predictor_name()


def test_default_predictor_is_per_site():
    """The shipped networks are head-and-neck only: other sites get the baseline."""
    from atp.predictor.registry import default_predictor_name, shipped_index

    cnn = [n for n, e in shipped_index().items() if e.get("kind") == "cnn"]
    assert all(shipped_index()[n].get("sites") == ["hn", "nasopharynx"] for n in cnn)
    assert default_predictor_name("prostate") == "baseline"
    assert default_predictor_name("hn") == default_predictor_name()


def test_network_refuses_a_patient_with_none_of_its_organs(tmp_path):
    pytest.importorskip("torch")
    from atp.predictor.cnn import CNNPredictor
    from atp.predictor.registry import WEIGHTS_DIR

    from atp.errors import InputError
    from atp.phantom import tg119_phantom

    pred = CNNPredictor.from_checkpoint(WEIGHTS_DIR / "resunet.pt")
    with pytest.raises(InputError, match="head-and-neck patients only.*baseline"):
        pred.predict(tg119_phantom())


def test_network_refuses_a_lung_like_patient(phantom):
    """A spinal cord and an oesophagus are not enough: with no head-and-neck organ, an organ
    the network never saw (a lung) marks another site."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from atp.predictor.cnn import CNNPredictor
    from atp.predictor.registry import WEIGHTS_DIR

    from atp.errors import InputError
    from atp.patient import Role, Structure

    keep = {"External", "PTV_70", "PTV_56", "SpinalCord", "Esophagus"}
    structures = {k: v for k, v in phantom.structures.items() if k in keep}
    lung = phantom.structures["Parotid_L"].mask
    structures["Lung_L"] = Structure("Lung_L", lung, Role.ORGAN)
    lung_like = replace(phantom, structures=structures)
    pred = CNNPredictor.from_checkpoint(WEIGHTS_DIR / "cascade.pt")
    with pytest.raises(InputError, match="none of its head-and-neck organs.*Lung_L"):
        pred.predict(lung_like)


def test_network_predicts_a_head_neck_patient_with_only_a_cord(phantom):
    """OpenKBP train pt_131 and pt_143 have the spinal cord as their only organ: still
    head-and-neck patients, predicted (they used to exit 2)."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from atp.predictor.cnn import CNNPredictor
    from atp.predictor.registry import WEIGHTS_DIR

    keep = {"External", "PTV_70", "PTV_56", "SpinalCord"}
    cord_only = replace(phantom, structures={k: v for k, v in phantom.structures.items()
                                             if k in keep})
    dose = CNNPredictor.from_checkpoint(WEIGHTS_DIR / "cascade.pt").predict(cord_only)
    assert dose.shape == phantom.grid.shape and float(dose.max()) > 30.0


def test_cli_predict_default_follows_the_site(tmp_path, capsys):
    from atp.cli import main

    out = tmp_path / "d.npy"
    assert main(["predict", "phantom", "--site", "prostate", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("baseline:") and out.is_file()


def test_bf16_network_runs_in_float32_where_bf16_is_emulated(phantom, monkeypatch):
    torch = pytest.importorskip("torch")
    from atp.predictor import cnn
    from atp.predictor.encoding import encode_patient
    from atp.predictor.registry import WEIGHTS_DIR

    pred = cnn.CNNPredictor.from_checkpoint(WEIGHTS_DIR / "cascade.pt").stage1
    assert pred.amp == "bf16" and isinstance(cnn.bf16_is_fast(torch.device("cpu")), bool)
    stack, _ = encode_patient(phantom, pred.encoding)
    monkeypatch.setattr(cnn, "bf16_is_fast", lambda device: False)
    emulated = pred.predict_network_grid(stack)
    pred.amp = "off"
    assert np.array_equal(emulated, pred.predict_network_grid(stack))
