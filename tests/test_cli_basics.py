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


def _run_cli(argv: list[str], modules: tuple) -> tuple[int, str, list]:
    """``atp.cli.main(argv)`` in a fresh interpreter: (exit code, stdout, which of
    ``modules`` it loaded); its stderr must hold nothing else."""
    import subprocess
    import sys

    code = (f"import json, sys; from atp.cli import main; rc = main({argv!r}); "
            f"print(json.dumps([rc, [m for m in {modules!r} if m in sys.modules]]), "
            "file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    rc, loaded = json.loads(out.stderr)
    return rc, out.stdout, loaded


def test_help_loads_no_stage_scipy_or_pydicom():
    """``atp --help`` (and so every command's start-up) builds every command's parser;
    the stages, scipy and pydicom (seconds together on a loaded machine) load only when a
    command runs: the command modules import them lazily (ARCHITECTURE.md, import rules)."""
    heavy = ("atp.optimizer", "atp.predictor", "atp.sequencer", "scipy", "pydicom", "torch")
    rc, out, loaded = _run_cli(["--help"], heavy)
    assert "usage: atp" in out
    assert (rc, loaded) == (0, [])


def test_list_loads_no_pydicom_predictor_or_mu_fit():
    """``atp list`` names the plug-ins (loading each built-in's class or factory, so a
    broken one shows) without the patient readers (pydicom), the predictors' modules
    (scipy.ndimage, the OpenKBP reader) or the sequencer's MU fit (scipy.optimize): the
    registries and package ``__init__``s import those lazily."""
    heavy = ("pydicom", "scipy.optimize", "atp.io.loader", "atp.predictor.baseline",
             "atp.predictor.cnn", "atp.sequencer.api", "atp.sequencer.reweight", "torch")
    rc, out, loaded = _run_cli(["list", "--json"], heavy)
    assert '"predictors"' in out
    assert (rc, loaded) == (0, [])
