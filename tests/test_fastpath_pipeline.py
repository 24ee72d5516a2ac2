"""The AIRT-style fast path as a pipeline (atp.fastplan, atp.plan(fast=True), atp plan
--fast) on the embedded phantom: one coarse full arc (10 deg control points, the widest
spacing the VMAT sequencer still groups into one arc), dose grid factor 3, baseline
predictor."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

import atp
from atp.cli import main
from atp.errors import BackendUnavailableError, InputError, StructureError
from atp.fastplan import STAGES, FastPlanOptions

torch = pytest.importorskip("torch")

ARC = {"arc_spacing_deg": 10.0, "dose_grid_factor": 3}


class CountingPredictor:
    """The baseline predictor, counting its calls."""

    name = "counting-baseline"

    def __init__(self):
        from atp.predictor import registry

        self._inner = registry.get("baseline")
        self.calls = 0

    def predict(self, patient):
        self.calls += 1
        return self._inner.predict(patient)


@pytest.fixture(scope="module")
def counter():
    return CountingPredictor()


@pytest.fixture(scope="module")
def base(phantom, counter):
    """Zero-sparing fast plan (spare={}) on the CPU, exact fallback initial fluence."""
    return atp.plan(phantom, predictor=counter, fast=True, spare={}, progress=False,
                    fast_options=dict(ARC, device="cpu", initial_fluence="fallback"))


def _mean(dose, patient, name):
    return float(dose[patient.mask(name)].mean())


def test_fast_plan_is_a_sequenced_vmat_plan_with_deliverable_dose(base, phantom, tmp_path):
    from atp import sequencer
    from atp.dose.resample import dose_to_patient_grid

    assert isinstance(base, atp.Plan)
    assert base.delivery is not None and base.delivery.technique == "vmat"
    assert base.dij.meta["arc"] is True and base.dij.meta["control_points"] == 36
    # the plan's dose is the deliverable dose of the apertures, not the ideal fluence dose
    d = sequencer.deliverable_dose(base.delivery, base.dij)
    d = dose_to_patient_grid(d, base.dij.dose_grid, base.dij.patient_grid)
    np.testing.assert_array_equal(base.dose_gy, np.asarray(d, np.float32))
    assert not np.array_equal(base.dose_gy, base.ideal_dose_gy)
    assert base.fidelity is not None and np.all(base.fluence >= 0)
    assert base.settings["fast"] is True and base.settings["spare"] == {}
    assert base.settings["initial_fluence_path"] == "fallback"
    assert base.settings["device"] == "cpu"
    assert all(s in base.timings_s for s in STAGES if s != "export")
    # the plan is a real dose: the primary target gets most of its prescription
    assert _mean(base.dose_gy, phantom, "PTV_70") > 0.85 * 70
    out = base.save(tmp_path / "fast", report=False)
    data = json.loads((out / "plan.json").read_text())
    assert data["settings"]["fast"] is True
    assert data["settings"]["initial_fluence_path"] == "fallback"
    assert data["delivery"]["technique"] == "vmat"
    assert set(STAGES) <= set(data["timings_s"])
    for f in ("dose.npy", "predicted_dose.npy", "fluence.npz", "dij.npz", "ideal_dose.npy"):
        assert (out / f).is_file()
    np.testing.assert_array_equal(np.load(out / "dose.npy"), base.dose_gy)
    # a plan read back has no prepared fast path: respare prepares one from the stored
    # dij and predicted dose (no predictor, no dose engine) and gives the same plan
    loaded = atp.load_plan(out, patient=phantom)
    assert loaded.attachments.get("fastpath") is None and loaded.settings["fast"] is True
    again = atp.respare(loaded, {})
    np.testing.assert_allclose(again.fluence, base.fluence, rtol=1e-5,
                               atol=1e-6 * float(base.fluence.max()))
    assert any("prepared again" in n for n in again.notes)


def test_zero_sparing_equals_the_baseline_run_exactly(base, phantom):
    again = atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij,
                     fast=True, spare={"Parotid_L": 0.0}, progress=False,
                     fast_options={"device": "cpu", "initial_fluence": "fallback"})
    assert again.settings["spare"] == {"Parotid_L": 0.0}
    np.testing.assert_array_equal(again.fluence, base.fluence)
    np.testing.assert_array_equal(again.dose_gy, base.dose_gy)
    slid = atp.respare(base, {"Parotid_L": 0.0, "Parotid_R": 0.0})
    np.testing.assert_array_equal(slid.fluence, base.fluence)
    np.testing.assert_array_equal(slid.dose_gy, base.dose_gy)


def test_raising_a_sparing_factor_lowers_that_oars_mean_dose(base, phantom):
    spared = atp.respare(base, {"Parotid_L": 0.2})
    for attr in ("ideal_dose_gy", "dose_gy"):  # fluence dose and deliverable dose
        before = _mean(getattr(base, attr), phantom, "Parotid_L")
        after = _mean(getattr(spared, attr), phantom, "Parotid_L")
        assert after < before - 1.0, (attr, before, after)
    assert spared.settings["spare"] == {"Parotid_L": 0.2}
    assert spared.settings["respare_of"] == {"spare": {}}


def test_respare_reuses_prediction_and_matrices(base, counter, monkeypatch):
    from atp.optimizer.fastpath.chain import FastPath

    from atp.dose import arc

    assert counter.calls == 1

    def forbidden(*a, **k):
        raise AssertionError("respare must not rebuild the dij or re-prepare")

    monkeypatch.setattr(arc, "arc_influence", forbidden)
    monkeypatch.setattr(FastPath, "prepare", forbidden)
    new = atp.respare(base, spare={"Parotid_R": 0.1})
    assert counter.calls == 1
    assert new.dij is base.dij and new.attachments["fastpath"] is base.attachments["fastpath"]
    assert new.predicted_dose_gy is base.predicted_dose_gy
    assert "dose prediction" not in new.timings_s and "dose influence" not in new.timings_s


def test_bad_sliders_are_input_errors(base, phantom):
    with pytest.raises(InputError, match="--spare.*\\[0, 1\\)"):
        atp.respare(base, {"Parotid_L": 1.0})
    with pytest.raises(InputError, match="\\[0, 1\\)"):
        atp.respare(base, {"Parotid_L": -0.1})
    with pytest.raises(StructureError, match="--spare.*Nonexistent"):
        atp.respare(base, {"Nonexistent": 0.1})
    with pytest.raises(StructureError, match="PTV_70"):  # a target is not an OAR
        atp.plan(phantom, predictor="baseline", fast=True, spare={"PTV_70": 0.1},
                 progress=False)
    with pytest.raises(InputError, match="fast=True"):
        atp.plan(phantom, predictor="baseline", spare={"Parotid_L": 0.1}, progress=False)


def test_device_choice_is_explicit():
    from atp.fastplan import resolve_device

    assert resolve_device("cpu") == ("cpu", None)
    with pytest.raises(InputError, match="--device"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == ("cuda", None)
    else:
        dev, note = resolve_device("auto")
        assert dev == "cpu" and "CPU" in note
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            resolve_device("cuda")


def test_initial_fluence_path_is_noted(base):
    assert any(n.startswith("fast path: initial fluence from the exact fallback")
               for n in base.notes)
    assert base.settings["initial_fluence_weights"] is None


def test_shipped_bev2fluence_weights_are_the_default_and_said(phantom, tmp_path):
    from atp.optimizer.fastpath.bev2fluence import default_weights_path

    shipped = default_weights_path()
    assert shipped is not None, "optimizer/fastpath/weights/bev2fluence.pt is shipped"
    net = atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                   fast_options=dict(ARC, device="cpu"))  # initial_fluence 'auto'
    assert net.settings["initial_fluence_path"] == "network"
    assert net.settings["initial_fluence_weights"] == str(shipped)
    assert any(n.startswith("fast path: initial fluence from the trained Bev2Fluence")
               for n in net.notes)
    assert net.dose_gy[phantom.mask("PTV_70")].mean() > 0.85 * 70
    # a plan read back from disk respares with the same weights (no silent fallback)
    out = net.save(tmp_path / "net", report=False)
    again = atp.respare(atp.load_plan(out, patient=phantom), {})
    assert again.settings["initial_fluence_path"] == "network"
    np.testing.assert_allclose(again.fluence, net.fluence, rtol=1e-4,
                               atol=1e-5 * float(net.fluence.max()))


def test_network_without_weights_is_an_error_not_a_fallback(phantom, monkeypatch):
    from atp.optimizer.fastpath import bev2fluence

    monkeypatch.setattr(bev2fluence, "default_weights_path", lambda: None)
    with pytest.raises(InputError, match="no Bev2Fluence weights"):
        atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                 fast_options=dict(ARC, device="cpu", initial_fluence="network"))
    with pytest.raises(InputError, match="initial_fluence"):
        atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                 fast_options=dict(ARC, device="cpu", initial_fluence="learned"))
    # without shipped weights 'auto' is the exact fallback, and says so
    auto = atp.plan(phantom, predictor="baseline", fast=True, progress=False,
                    fast_options=dict(ARC, device="cpu"))
    assert auto.settings["initial_fluence_path"] == "fallback"


# --- CLI -------------------------------------------------------------------------------
def test_cli_plan_fast(tmp_path, capsys):
    out = tmp_path / "fast"
    rc = main(["plan", "phantom", "--fast", "--predictor", "baseline", "--spare",
               "Parotid_L=0.1", "--arc-spacing", "10", "--quiet",
               "--initial-fluence", "fallback", "--no-report", "--out", str(out)])
    assert rc in (0, 3)
    stdout = capsys.readouterr().out
    assert "fast path: initial fluence from the exact fallback" in stdout
    data = json.loads((out / "plan.json").read_text())
    assert data["settings"]["fast"] is True
    assert data["settings"]["spare"] == {"Parotid_L": 0.1}
    assert data["settings"]["arc"]["spacing_deg"] == 10.0
    assert (rc == 3) == bool(data["summary"]["hard_unmet"])
    if not torch.cuda.is_available():  # --device auto on a CPU-only machine says so
        assert data["settings"]["device"] == "cpu"
        assert any("ran on the CPU" in n for n in data["notes"])


def test_cli_aperture_iterations_reach_the_fast_path(tmp_path):
    out = tmp_path / "fast"
    rc = main(["plan", "phantom", "--fast", "--predictor", "baseline", "--arc-spacing",
               "10", "--quiet", "--initial-fluence", "fallback", "--aperture-iterations",
               "2", "--no-report", "--out", str(out)])
    assert rc in (0, 3)
    data = json.loads((out / "plan.json").read_text())
    assert data["settings"]["fastpath_options"]["aperture_iterations"] == 2


def test_cli_fast_with_sliding_window_arcs(tmp_path):
    out = tmp_path / "sw"
    rc = main(["plan", "phantom", "--fast", "--predictor", "baseline", "--arc-spacing",
               "10", "--quiet", "--sequencer", "vmat-sliding", "--no-report",
               "--out", str(out)])
    assert rc in (0, 3)
    data = json.loads((out / "plan.json").read_text())
    assert data["settings"]["sequence"] == "vmat-sliding"
    assert data["settings"]["preset"] == "airt"  # the objective stays the default's
    assert data["settings"]["fastpath_options"]["coverage_weight"] == 0.0


def test_cli_coverage_preset_sets_sequencer_and_objective(tmp_path):
    from atp.fastplan import PRESETS

    out = tmp_path / "cov"
    rc = main(["plan", "phantom", "--fast", "--predictor", "baseline", "--arc-spacing",
               "10", "--quiet", "--preset", "coverage", "--aperture-iterations", "0",
               "--no-report", "--out", str(out)])
    assert rc in (0, 3)
    s = json.loads((out / "plan.json").read_text())["settings"]
    assert s["preset"] == "coverage" and s["sequence"] == "vmat-sliding"
    cov = PRESETS["coverage"]
    assert s["sector_deg"] == cov.sector_deg
    assert s["fastpath_options"]["sequencing_passes"] == cov.sequencing_passes == 2
    for key, value in asdict(cov.fastpath).items():
        assert s["fastpath_options"][key] == value
    assert s["fastpath_options"]["aperture_iterations"] == 0


def test_explicit_options_win_over_the_preset(base, phantom):
    plan = atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij,
                    fast=True, progress=False,
                    fast_options={"device": "cpu", "initial_fluence": "fallback",
                                  "preset": "coverage", "vmat_sequencer": "vmat",
                                  "fastpath_options": {"sequencing_passes": 0}})
    s = plan.settings
    assert s["preset"] == "coverage" and s["sequence"] == "vmat"
    assert plan.delivery.technique == "vmat"
    assert s["fastpath_options"]["sequencing_passes"] == 0
    assert s["fastpath_options"]["coverage_weight"] == 4.0
    assert s["fastpath_options"]["oar_minus_targets"] == "support"
    assert plan.optimizer["sequencing_passes"] == []
    with pytest.raises(InputError, match="preset"):
        atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij, fast=True,
                 progress=False, fast_options={"device": "cpu", "preset": "fastest"})
    # the same settings as one options object: the same plan
    options = FastPlanOptions.from_preset("coverage", device="cpu", vmat_sequencer="vmat",
                                          initial_fluence="fallback", sequencing_passes=0)
    assert options.fastpath.coverage_weight == 4.0 and options.preset == "coverage"
    same = atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij, fast=True,
                    progress=False, options=options)
    np.testing.assert_array_equal(same.fluence, plan.fluence)
    assert same.settings["fastpath_options"] == s["fastpath_options"]
    with pytest.raises(InputError, match="fastpath_options.lam_hotter"):
        atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij, fast=True,
                 progress=False, fast_options={"fastpath_options": {"lam_hotter": 2}})
    with pytest.raises(InputError, match="options= or fast_options="):
        atp.plan(phantom, fast=True, progress=False, options=options,
                 fast_options={"device": "cpu"})


@pytest.mark.parametrize("args, message", [
    (["--fast", "--spare", "Nonexistent=0.1"], "Nonexistent"),
    (["--fast", "--spare", "Parotid_L=1.5"], "[0, 1)"),
    (["--fast", "--spare", "Parotid_L"], "OAR=FACTOR"),
    (["--fast", "--spare", "Parotid_L=0.1", "--spare", "Parotid_L=0.2"], "twice"),
    (["--spare", "Parotid_L=0.1"], "needs --fast"),
    (["--fast", "--beams", "5"], "--beams"),
    (["--fast", "--sequencer", "imrt-sns"], "VMAT"),
    (["--fast", "--initial-fluence", "learned"], "initial_fluence must be"),
    (["--fast", "--weights", "/nonexistent/b2f.pt"], "no Bev2Fluence weights file"),
    (["--initial-fluence", "fallback"], "needs --fast"),
    (["--aperture-iterations", "3"], "needs --fast"),
    (["--fast", "--aperture-iterations", "-1"], "must be an integer 0..10000"),
    (["--fast", "--preset", "fastest"], "unknown fast-path preset"),
    (["--preset", "coverage"], "needs --fast"),
])
def test_cli_bad_fast_input_is_exit_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "x"
    rc = main(["plan", "phantom", "--predictor", "baseline", "--quiet", *args,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --- GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cpu_and_cuda_fast_paths_agree(base, phantom):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    # the options of ``base`` but the device (the test compared default options to base's
    # until a GPU first ran it: 8.6 Gy apart on the CPU too)
    gpu = atp.plan(phantom, predicted_dose=base.predicted_dose_gy, dij=base.dij, fast=True,
                   spare={}, progress=False,
                   fast_options=dict(ARC, device="cuda", initial_fluence="fallback"))
    assert gpu.settings["device"].startswith("cuda") and gpu.backend == "fastpath-cuda"
    peak = float(base.ideal_dose_gy.max())
    assert float(np.abs(gpu.ideal_dose_gy - base.ideal_dose_gy).max()) < 1e-3 * peak
    np.testing.assert_allclose(gpu.fluence, base.fluence, rtol=1e-2,
                               atol=1e-3 * float(base.fluence.max()))
    for name in ("PTV_70", "Parotid_L", "SpinalCord"):
        assert _mean(gpu.dose_gy, phantom, name) == pytest.approx(
            _mean(base.dose_gy, phantom, name), rel=1e-2, abs=0.1)


@pytest.mark.slow
def test_readme_fastpath_example_runs(run_readme_example):
    out = run_readme_example("fastpath-example")
    data = json.loads((out / "results" / "fast-plan" / "plan.json").read_text())
    assert data["settings"]["spare"] == {"Parotid_L": 0.3}
