import json

from atp.cli import main


def test_info_json(capsys):
    assert main(["info", "phantom", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {s["name"] for s in info["structures"]}
    assert {"PTV_70", "PTV_56", "SpinalCord", "External"} <= names


def test_missing_patient_exits_2(capsys, tmp_path):
    assert main(["info", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and err.count("\n") == 1


def test_help_loads_no_stage_scipy_or_pydicom():
    """``atp --help`` (and so every command's start-up) builds every command's parser;
    the stages, scipy and pydicom (seconds together on a loaded machine) load only when a
    command runs: the command modules import them lazily (ARCHITECTURE.md, import rules)."""
    import subprocess
    import sys

    heavy = ("atp.optimizer", "atp.predictor", "atp.sequencer", "scipy", "pydicom", "torch")
    code = ("import sys; from atp.cli import main; rc = main(['--help']); "
            f"print(rc, [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "usage: atp" in out.stdout
    assert out.stderr.strip() == "0 []", out.stderr


def test_list_loads_no_pydicom_predictor_or_mu_fit():
    """``atp list`` names the plug-ins (loading each built-in's class or factory, so a
    broken one shows) without the patient readers (pydicom), the predictors' modules
    (scipy.ndimage, the OpenKBP reader) or the sequencer's MU fit (scipy.optimize): the
    registries and package ``__init__``s import those lazily."""
    import subprocess
    import sys

    heavy = ("pydicom", "scipy.optimize", "atp.io.loader", "atp.predictor.baseline",
             "atp.predictor.cnn", "atp.sequencer.api", "atp.sequencer.reweight", "torch")
    code = ("import sys; from atp.cli import main; rc = main(['list', '--json']); "
            f"print(rc, [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert '"predictors"' in out.stdout
    assert out.stderr.strip() == "0 []", out.stderr
